"""Training speed of `localchat finetune` against a plain transformers Trainer + PEFT loop
with padded batches, on the same model, data, LoRA settings and batch size, in one run.

Both sides see the same rows once (the shipped chat conversations, repeated), each side
in its own process so its peak RSS is its own. Tokens/s counts real (non-padding) tokens.
Goal: at least 1.5x. Packing and cutting batches to real lengths are how we get there,
with the frozen base in bf16 where the CPU has bf16 units, and cheaper LoRA layers.
So that speed is not bought with learning, each side's adapter is then scored the same
way, in float32, on conversations it did not train on (held-out loss per assistant token).

    python bench/bench_finetune.py [--repeat 4] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
MAX_LEN = 512


def data_file(out: Path, repeat: int) -> Path:
    lines = resources.files("localchat").joinpath("data/eval_chats.jsonl").read_text(encoding="utf-8")
    out.write_text(lines * repeat, encoding="utf-8")
    return out


def peak_rss_gb() -> float:
    """Peak RSS of this worker so far: taken after training, before the held-out scoring."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def held_out_rows(tok: object) -> list:
    """The calibration conversations that are not in the training file, encoded."""
    from localchat.finetune.data import load_dataset
    from localchat.finetune.encode import encode

    def first_question(ex: object) -> str:
        return next(m["content"] for m in ex.messages if m["role"] == "user")

    train_file = Path(resources.files("localchat").joinpath("data/eval_chats.jsonl"))
    trained = {first_question(ex) for ex in load_dataset(str(train_file), held_out=0.0).train}
    path = Path(resources.files("localchat.convert").joinpath("data/calibration_chats.jsonl"))
    rows = [ex for ex in load_dataset(str(path), held_out=0.0).train if first_question(ex) not in trained]
    return [encode(ex, tok, tok.chat_template, MAX_LEN) for ex in rows]


def held_out_loss(model: object, tok: object) -> float:
    from localchat.finetune.train import evaluate_loss

    model.float()
    return evaluate_loss(model, held_out_rows(tok), 4, tok.pad_token_id or 0, "cpu", bf16=False)


def worker_trainer(base: str, data: str, batch: int, bf16: bool = False) -> dict:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from localchat.finetune.data import load_dataset
    from localchat.finetune.encode import encode

    tok = transformers.AutoTokenizer.from_pretrained(base)
    ds = load_dataset(data, held_out=0.0)
    rows = [encode(ex, tok, tok.chat_template, MAX_LEN) for ex in ds.train]
    train = [{"input_ids": r.input_ids, "labels": r.labels, "attention_mask": [1] * len(r.input_ids)} for r in rows]
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    args = transformers.TrainingArguments(output_dir=str(Path(data).parent / "trainer-out"), per_device_train_batch_size=batch,
                                          num_train_epochs=1, learning_rate=2e-4, logging_steps=1000,
                                          save_strategy="no", report_to=[], use_cpu=True, seed=0,
                                          dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)
    collator = transformers.DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return {"tokens": sum(len(r.input_ids) for r in rows), "wall": wall, "rss_gb": peak_rss_gb(),
            "held_out": held_out_loss(model, tok)}


def worker_localchat(base: str, data: str, batch: int, bf16: bool | None = None, qlora: bool = False) -> dict:
    from localchat.finetune.data import load_dataset
    from localchat.finetune.settings import TrainSettings
    from localchat.finetune.train import train

    ds = load_dataset(data, held_out=0.0)
    settings = TrainSettings(epochs=1.0, min_updates=1, batch_size=None, max_len=MAX_LEN, held_out=0.0,
                             lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], save_every=10**6,
                             gradient_checkpointing=False, bf16=bf16, qlora=qlora)
    result = train(Path(base), ds, Path(data).parent / "ours-out", settings, quiet=True)
    wall = result.tokens_seen / result.tokens_per_s  # the training loop alone, as for the Trainer
    rss = peak_rss_gb()

    import torch
    import transformers
    from peft import PeftModel

    tok = transformers.AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      result.adapter)
    return {"tokens": result.tokens_seen, "wall": wall, "steps": result.steps, "rss_gb": rss,
            "held_out": held_out_loss(model, tok)}


WORKERS = {
    "trainer": worker_trainer,
    "trainer-bf16": lambda b, d, n: worker_trainer(b, d, n, bf16=True),
    "localchat-fp32": lambda b, d, n: worker_localchat(b, d, n, bf16=False),
    "localchat": worker_localchat,  # as users run it: bf16 autocast where the hardware has bf16 units
    "localchat-qlora": lambda b, d, n: worker_localchat(b, d, n, qlora=True),
}
LABELS = {"trainer": "Trainer+PEFT (padded)", "trainer-bf16": "Trainer+PEFT bf16=True",
          "localchat-fp32": "localchat fp32 (packed)", "localchat": "localchat default (packed)",
          "localchat-qlora": "localchat --qlora (4-bit base)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=4, help="copies of the 24 shipped conversations")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.base, args.data, args.batch)))
        return 0

    import tempfile

    from localchat.store import default_store, install_starter
    from tests.checkpoints import starter_hf

    entry = install_starter(default_store(), quiet=True)
    base = starter_hf(default_store().path_of(entry.files[0].path))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = data_file(Path(tmp) / "chats.jsonl", args.repeat)
        for side in WORKERS:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--base", str(base),
                                     "--data", str(data), "--batch", str(args.batch)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{side} failed: {err[-2000:]}")
            r = json.loads(out.strip().splitlines()[-1])
            r["tok_s"] = r["tokens"] / r["wall"]
            results[side] = r
            print(f"{side} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    t, o = results["trainer"], results["localchat"]
    print(f"\nLoRA r={LORA['r']} on {base.name}, {args.repeat * 24} conversations, batch {args.batch}, one epoch")
    print("| run | tokens/s | train s | peak RSS GB | held-out loss | tokens/s vs Trainer |")
    print("|---|---|---|---|---|---|")
    for side, r in results.items():
        print(f"| {LABELS[side]} | {r['tok_s']:.0f} | {r['wall']:.1f} | {r['rss_gb']:.2f} | {r['held_out']:.4f} | "
              f"{r['tok_s'] / t['tok_s']:.2f}x |")
    ratio = o["tok_s"] / t["tok_s"]
    print(f"\nlocalchat against the plain Trainer: {ratio:.2f}x tokens/s at "
          f"{o['rss_gb'] / t['rss_gb']:.2f}x peak RSS (goal >= 1.5x): {'PASS' if ratio >= 1.5 else 'FAIL'}")
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(base)
    untrained = held_out_loss(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tok)
    print(f"held-out loss of the untrained base: {untrained:.4f} "
          f"({len(held_out_rows(tok))} calibration conversations not in the training file)")
    b = results["trainer-bf16"]
    print(f"against the Trainer with bf16 turned on by hand: {o['tok_s'] / b['tok_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
