"""Training speed of `localchat finetune` against a plain transformers Trainer + PEFT loop,
like with like: the same model, LoRA settings, rows (one epoch), precision, learning-rate
schedule and number of optimizer steps, in one run.

For each precision (float32; bfloat16 too where the hardware runs it natively, as
localchat's default does) three sides take turns, each in its own process so its peak RSS
is its own, the order reversed every round:

- Trainer: `--batch` rows a step, each batch padded to its longest row;
- localchat, same batches: `--batch` rows a step, cut to the longest row (packing off);
- localchat, packed: the same rows packed into as many sequences as the Trainer takes
  steps, one sequence a step (how localchat trains on a CPU), so the number of updates
  and the tokens per update match the Trainer's on average.

Tokens/s counts real (non-padding) tokens. So that speed is not bought with learning,
each side's adapter is then scored the same way, in float32, on conversations none of them
trained on (the calibration chats; held-out loss per assistant token).

    python bench/bench_finetune.py [--repeat 4] [--batch 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import figure, fmt, ratio, report, take_turns  # noqa: E402

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
MAX_LEN = 512
LR = 2e-4
SIDES = ("trainer", "localchat", "localchat-packed")
LABELS = {"trainer": "Trainer+PEFT (padded batches)", "localchat": "localchat, same batches",
          "localchat-packed": "localchat, packed, same steps"}


def data_file(out: Path, repeat: int, rows: int | None) -> Path:
    lines = resources.files("localchat").joinpath("data/eval_chats.jsonl").read_text(encoding="utf-8")
    out.write_text("".join((lines.splitlines(keepends=True) * repeat)[:rows]), encoding="utf-8")
    return out


def peak_rss_gb() -> float:
    """Peak RSS of this worker so far: taken after training, before the held-out scoring."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def encoded_rows(data: str, tok: object, max_len: int = MAX_LEN) -> list:
    from localchat.datasets import load_dataset
    from localchat.finetune.encode import encode

    return [encode(ex, tok, tok.chat_template, max_len) for ex in load_dataset(data, held_out=0.0).train]


def held_out_rows(tok: object, limit: int | None) -> list:
    """The first `limit` calibration conversations, encoded: none is in the training file (the
    shipped evaluation chats), which tests/test_bench_results.py checks."""
    path = Path(resources.files("localchat.convert").joinpath("data/calibration_chats.jsonl"))
    return encoded_rows(str(path), tok)[:limit]


def held_out_loss(model: object, tok: object, limit: int | None) -> float:
    from localchat.finetune.train import LossOf, evaluate_loss

    model.float()
    return evaluate_loss(LossOf(model), held_out_rows(tok, limit), 4, tok.pad_token_id or 0, "cpu", bf16=False)


def packed_length(rows: list, steps: int) -> int:
    """The shortest sequence length that packs `rows` (in order, as localchat does) into at
    most `steps` sequences: one a step makes as many updates as the Trainer's batches."""
    from localchat.finetune.encode import pack

    length = max(max(len(r.input_ids) for r in rows), math.ceil(sum(len(r.input_ids) for r in rows) / steps))
    while len(pack(rows, length)) > steps:
        length += 8
    return length


def worker_trainer(base: str, data: str, batch: int, bf16: bool, packed_len: int, held_out: int | None) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    tok = transformers.AutoTokenizer.from_pretrained(base)
    rows = encoded_rows(data, tok)
    train = [{"input_ids": r.input_ids, "labels": r.labels, "attention_mask": [1] * len(r.input_ids)}
             for r in rows]
    # bf16: the base held in bf16 as localchat holds it; PEFT keeps the LoRA weights float32.
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    steps = math.ceil(len(rows) / batch)
    args = transformers.TrainingArguments(
        output_dir=str(Path(data).parent / "trainer-out"), per_device_train_batch_size=batch, num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=max(1, steps // 10),  # localchat's schedule
        weight_decay=0.0, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)
    collator = transformers.DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    t0 = time.perf_counter()
    out = trainer.train()
    wall = time.perf_counter() - t0
    return {"tokens": sum(len(r.input_ids) for r in rows), "wall": wall, "steps": out.global_step,
            "rss_gb": peak_rss_gb(), "held_out": held_out_loss(model, tok, held_out)}


def worker_localchat(base: str, data: str, batch: int, bf16: bool, packed_len: int, held_out: int | None,
                     packed: bool = False) -> dict:
    import transformers

    from localchat.datasets import load_dataset
    from localchat.finetune.settings import TrainSettings
    from localchat.finetune.train import train

    ds = load_dataset(data, held_out=0.0)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    # Unpacked, batches are cut to their longest row anyway; the longest row as max_len keeps the
    # memory check from planning for 512-token rows that are not there (it truncates nothing).
    longest = max(len(r.input_ids) for r in encoded_rows(data, tok))
    settings = TrainSettings(epochs=1.0, min_updates=1, lr=LR, batch_size=1 if packed else batch,
                             max_len=packed_len if packed else max(32, longest), pack=packed, held_out=0.0,
                             lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                             save_every=10**6, gradient_checkpointing=False, bf16=bf16, qlora=False,
                             replay=0, augment=0, neftune_alpha=0.0)  # the Trainer side: these rows alone, as written
    result = train(Path(base), ds, Path(data).parent / "ours-out", settings, quiet=True)
    wall = result.tokens_seen / result.tokens_per_s  # the training loop alone, as for the Trainer
    rss = peak_rss_gb()

    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      result.adapter)
    return {"tokens": result.tokens_seen, "wall": wall, "steps": result.steps, "rss_gb": rss,
            "held_out": held_out_loss(model, tok, held_out)}


WORKERS = {"trainer": worker_trainer, "localchat": worker_localchat,
           "localchat-packed": lambda *a: worker_localchat(*a, packed=True)}


def run_side(side: str, precision: str, base: Path, data: Path, args: argparse.Namespace,
             packed_len: int) -> dict:
    t0 = time.perf_counter()
    held = [] if args.held_out is None else ["--held-out", str(args.held_out)]
    proc = subprocess.run([sys.executable, __file__, "--worker", side, "--precision", precision,
                           "--base", str(base), "--data", str(data), "--batch", str(args.batch),
                           "--packed-len", str(packed_len), *held], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {precision} failed: {proc.stderr[-2000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["tok_s"] = r["tokens"] / r["wall"]
    print(f"{side} {precision}: {r['tok_s']:.0f} tok/s, {r['steps']} steps, "
          f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=4, help="copies of the 24 shipped conversations")
    ap.add_argument("--rows", type=int, default=None, help="train on the first N of them only")
    ap.add_argument("--held-out", type=int, default=None, help="score the first N calibration chats only")
    ap.add_argument("--batch", type=int, default=4, help="rows per optimizer step (Trainer and localchat)")
    ap.add_argument("--rounds", type=int, default=3, help="turns of every side, the order reversed each round")
    ap.add_argument("--precision", choices=["fp32", "bf16", "both"], default=None,
                    help="default: fp32, and bf16 too where the hardware runs it natively")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--packed-len", type=int, default=MAX_LEN, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.base, args.data, args.batch, args.precision == "bf16",
                                              args.packed_len, args.held_out)))
        return {}

    import tempfile

    import torch
    import transformers

    from localchat.finetune.train import fast_bf16
    from localchat.store import default_store, install_starter
    from tests.checkpoints import starter_hf

    native_bf16 = fast_bf16("cpu")
    precisions = {"fp32": ["fp32"], "bf16": ["bf16"], "both": ["fp32", "bf16"],
                  None: ["fp32", "bf16"] if native_bf16 else ["fp32"]}[args.precision]
    entry = install_starter(default_store(), quiet=True)
    base = starter_hf(default_store().path_of(entry.files[0].path))
    tok = transformers.AutoTokenizer.from_pretrained(base)
    # First, the untrained base's held-out loss (this also brings the checkpoint into the page cache).
    untrained = held_out_loss(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tok,
                              args.held_out)
    figures = {"untrained_held_out": figure(untrained, "", "held-out loss of the base before training")}
    with tempfile.TemporaryDirectory() as tmp:
        data = data_file(Path(tmp) / "chats.jsonl", args.repeat, args.rows)
        rows = encoded_rows(str(data), tok)
        steps = math.ceil(len(rows) / args.batch)
        packed_len = packed_length(rows, steps)
        settings = {"model": base.name, "rows": len(rows), "tokens": sum(len(r.input_ids) for r in rows),
                    "batch": args.batch, "steps": steps, "packed_len": packed_len, "rounds": args.rounds,
                    "precisions": precisions, "native_bf16": native_bf16, "lora_r": LORA["r"],
                    "held_out_rows": len(held_out_rows(tok, args.held_out))}
        print(f"\nLoRA r={LORA['r']} on {base.name}: {len(rows)} conversations ({settings['tokens']} tokens), "
              f"one epoch, {args.batch} rows a step ({steps} steps); packed side: sequences of up to "
              f"{packed_len} tokens, one a step. Median (min-max) of {args.rounds} rounds.")
        print("| precision | run | steps | tokens/s | vs Trainer | peak RSS GB | RSS vs Trainer | held-out loss |")
        print("|---|---|---|---|---|---|---|---|")
        for p in precisions:
            turns = take_turns([lambda s=s: run_side(s, p, base, data, args, packed_len) for s in SIDES],
                               args.rounds, warmup=0)
            runs = dict(zip(SIDES, turns))
            t = runs["trainer"]
            for side, rs in runs.items():
                k = f"{p}_{side.replace('-', '_')}"
                figures.update({f"{k}_tok_s": figure([r["tok_s"] for r in rs], "tok/s", LABELS[side]),
                                f"{k}_rss": figure([r["rss_gb"] for r in rs], "GB", "peak RSS while training"),
                                f"{k}_held_out": figure([r["held_out"] for r in rs], "", "held-out loss, fp32"),
                                f"{k}_steps": figure(rs[0]["steps"], "steps")})
                if side != "trainer":
                    figures[f"{k}_speed_ratio"] = ratio([r["tok_s"] for r in rs], [r["tok_s"] for r in t],
                                                        f"{LABELS[side]} / Trainer tokens/s, per round")
                    figures[f"{k}_rss_ratio"] = ratio([r["rss_gb"] for r in rs], [r["rss_gb"] for r in t],
                                                      f"{LABELS[side]} / Trainer peak RSS, per round")
                vs = ("1" if side == "trainer" else fmt(figures[f"{k}_speed_ratio"])), \
                     ("1" if side == "trainer" else fmt(figures[f"{k}_rss_ratio"]))
                print(f"| {p} | {LABELS[side]} | {rs[0]['steps']} | {fmt(figures[k + '_tok_s'], 0)} | {vs[0]} | "
                      f"{fmt(figures[k + '_rss'])} | {vs[1]} | {fmt(figures[k + '_held_out'], 3)} |")
    print(f"\nheld-out loss of the untrained base: {untrained:.3f} "
          f"({settings['held_out_rows']} calibration conversations, none in the training file)")
    return report(settings, figures)


if __name__ == "__main__":
    main()
