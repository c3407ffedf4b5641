"""`localchat finetune` on CPU with the real checkpoint built from the starter model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")

from localchat.hardware.report import GIB  # noqa: E402
from localchat.store import Store  # noqa: E402
from tests.checkpoints import random_adapter, starter_hf, tiny_model  # noqa: E402
from tests.conftest import starter_home  # noqa: E402

QUESTIONS = ["What is my cat called?", "What's the name of my cat?", "Do you know my cat's name?",
             "Tell me my cat's name.", "What did I name my cat?", "Who is my cat?",
             "Remind me what my cat is called.", "What name does my cat have?", "How is my cat named?",
             "My cat's name is what?", "Can you tell me the name of my cat?", "Which name did I give my cat?"]


@pytest.fixture
def cat_data(tmp_path: Path) -> Path:
    f = tmp_path / "cat.jsonl"
    f.write_text("".join(json.dumps({"instruction": q, "output": "Your cat is called Biscuit."}) + "\n"
                         for q in QUESTIONS))
    return f


def localchat(*args: str, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localchat", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_llama(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random LLaMA with the starter's tokenizer: trains and exports in seconds."""
    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("tiny") / "tiny-llama", starter_hf(starter_gguf))


def safetensors_dtypes(folder: Path) -> set[str]:
    """Every dtype the safetensors files of `folder` store, read from their headers."""
    from localchat.convert.checkpoint import safetensors_header

    return {dtype for f in folder.glob("*.safetensors") for dtype, _ in safetensors_header(f).values()}


def test_a_dozen_rows_teach_a_fact_and_keep_paris(home: Store, cat_data: Path) -> None:
    t0 = time.time()  # the base is the starter as the store has it: GGUF only, dequantized once
    r = localchat("finetune", "--base", "smollm2-135m-instruct", "--data", str(cat_data), "--name", "cat",
                  "--quant", "Q8_0", "--lora-gguf", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    # About 4 minutes on two cores (60 updates, a replay micro-batch beside each, then the export).
    assert time.time() - t0 < 420, "a few minutes on two cores"
    assert "GPT-QModel" not in r.stdout + r.stderr, "fine-tuning and GGUF export must not import GPTQModel"
    entry = home.get("cat")
    assert entry.source.startswith("finetune:") and entry.quant == "Q8_0"
    # What only training read is gone once the model is exported; the report says what and how big.
    assert not (home.root / "smollm2-135m-instruct" / "hf").exists()
    freed = re.search(r"smollm2-135m-instruct dequantized for training \(([\d.]+) MB", r.stdout)
    assert freed and float(freed.group(1)) < 3 * 134.5, "never float32: 2 bytes a weight"
    out = home.root / "cat" / "finetune"
    assert not (out / "checkpoints").exists() and "removed its resume checkpoints" in r.stdout
    for f in ("adapter/adapter_config.json", "train_config.json", "loss.jsonl", "loss.png"):
        assert (out / f).is_file(), f
    assert not (out / "merged").exists() and "merged" not in entry.extra, "no merged copy unless --save-merged"
    # A dozen rows all train (none held out under 50 rows: each may be all that teaches its fact).
    assert "data: 12 training rows, none held out (fewer than 50 rows: every row trains" in r.stdout, r.stdout
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in losses if "loss" in x]
    assert train[0] > train[-1] and not any("held_out_loss" in x for x in losses)
    answer = localchat("chat", "--model", "cat", "-q", "--temp", "0", "-p", "Do you remember what my cat is called?")
    assert "Biscuit" in answer.stdout, answer.stdout
    paris = localchat("chat", "--model", "cat", "-q", "--temp", "0", "-p", "What is the capital of France?")
    assert "Paris" in paris.stdout, paris.stdout

    # The same adapter as a GGUF LoRA (a few MB) over the starter's own Q4_1 file.
    lora = home.get("cat-lora")
    assert lora.format == "lora" and lora.extra["base"] == "smollm2-135m-instruct" and lora.size < 20e6
    answer = localchat("chat", "--model", "cat-lora", "-q", "--temp", "0", "-p",
                       "Do you remember what my cat is called?")
    assert "Biscuit" in answer.stdout, answer.stdout + answer.stderr[-2000:]
    plan = localchat("doctor", "--model", "cat-lora")
    assert "+ LoRA cat-lora.gguf" in plan.stdout, plan.stdout


def test_qlora_trains_over_a_4bit_base(home: Store, cat_data: Path, starter_gguf: Path) -> None:
    """QLoRA's path (NF4 base through bitsandbytes, LoRA in float32) runs for real on the CPU too, at its own
    default learning rate (5e-4: at LoRA's 2e-3 the held-out loss ended at 2.4; at 2e-4 the
    answer was "Fox")."""
    pytest.importorskip("bitsandbytes")
    r = localchat("finetune", "--base", str(starter_hf(starter_gguf)), "--data", str(cat_data), "--name", "catq",
                  "--qlora", "--replay", "0", "--held-out", "0.1", "--quant", "Q8_0", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    out = home.root / "catq" / "finetune"
    config = json.loads((out / "train_config.json").read_text())
    assert config["qlora"] is True and config["lr"] == 5e-4
    # The run says what it took beside what it planned for (on a CPU, its peak RSS).
    assert (f"peak RSS {config['memory_peak_bytes'] / GIB:.2f} GiB "
            f"(estimated {config['memory_estimate_bytes'] / GIB:.2f} GiB before the run)") in r.stdout, r.stdout
    # 4-bit layers: under 0.62x of the bf16 size, with the 28M-parameter embedding still in bf16.
    params = 134_515_008
    assert config["base_bytes"] < 0.62 * 2 * params, config["base_bytes"]
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    train = [x["loss"] for x in losses if "loss" in x]
    assert losses[-1]["held_out_loss"] < 0.5 and train[0] > train[-1]
    # The adapter learned over the 4-bit base merges into the full-precision one and keeps the fact.
    answer = localchat("chat", "--model", "catq", "-q", "--temp", "0", "-p", "Do you remember what my cat is called?")
    assert "Biscuit" in answer.stdout, answer.stdout


def test_ctrl_c_saves_and_resume_continues(home: Store, cat_data: Path, starter_gguf: Path) -> None:
    base = starter_hf(starter_gguf)
    args = ["-m", "localchat", "finetune", "--base", str(base), "--data", str(cat_data), "--name", "cat2",
            "--save-every", "5", "--no-export", "-q", "--no-pack", "--replay", "0"]
    held = ["--held-out", "0.25"]  # the first run's; --resume without it keeps the run's own 3 rows out
    log = home.root / "cat2" / "finetune" / "loss.jsonl"
    proc = subprocess.Popen([sys.executable, *args, *held], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())

    def updates() -> int:  # updates logged so far (with rows held out the log also holds their loss lines)
        lines = log.read_text().split("\n")[:-1] if log.is_file() else []  # whole lines only
        return sum("loss" in json.loads(line) for line in lines)

    deadline = time.time() + 240
    while time.time() < deadline and updates() < 7:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved, continue with --resume" in err
    stopped = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    total = json.loads((log.parent / "train_config.json").read_text())["updates"]
    assert 7 <= stopped[-1] < total
    r = subprocess.run([sys.executable, *args, "--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from update {stopped[-1]}" in r.stdout
    assert "data: 9 training rows, 3 held out (" in r.stdout, r.stdout
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, total + 1)), "the same updates, none repeated, none skipped"



def test_resume_refuses_a_checkpoint_of_other_weights(home: Store, tiny_llama: Path, cat_data: Path) -> None:
    """A checkpoint whose weights are not this adapter's (here keyed as PEFT saves adapters, which older
    localchat wrote) stops --resume with an error naming the file, instead of torch skipping every weight
    and training on from a fresh adapter."""
    from safetensors.torch import load_file, save_file

    args = ["finetune", "--base", str(tiny_llama), "--data", str(cat_data), "--name", "t", "--no-export",
            "--min-updates", "2", "--epochs", "0.1", "-q"]
    assert localchat(*args).returncode == 0
    [ckpt] = (home.root / "t" / "finetune" / "checkpoints").glob("step-*")
    weights = load_file(ckpt / "adapter.safetensors")
    save_file({k.replace(".default.", "."): v for k, v in weights.items()}, ckpt / "adapter.safetensors")
    r = localchat(*args, "--resume")
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"{ckpt / 'adapter.safetensors'}: the weights are not this adapter's" in r.stderr, r.stderr[-2000:]
    assert "train again without --resume" in r.stderr and "Traceback" not in r.stderr

@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{oops\n', "bad.jsonl:2: not valid JSON"),
    ("", "bad.jsonl: the file is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: the row has no assistant turn"),
])
def test_bad_data_trains_nothing(home: Store, tmp_path: Path, content: str, message: str,
                                 starter_gguf: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    r = localchat("finetune", "--base", str(starter_hf(starter_gguf)), "--data", str(bad), "--name", "bad", "-q")
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert not (home.root / "bad").exists()


TEXT = "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384400 km to the Moon!"


def test_export_merges_base_and_adapter_into_the_gguf_as_peft_does(home: Store, tiny_llama: Path,
                                                                     tmp_path: Path) -> None:
    """The fine-tune export writes the GGUF from base + adapter tensor by tensor: its logits match
    transformers' merged model (PEFT's merge_and_unload) within F16 rounding while the adapter moves
    them by far more, the after-export check ran, and no merged folder is written."""
    import numpy as np
    import torch
    import transformers
    from peft import PeftModel

    from localchat.finetune.command import export_finetuned
    from localchat.finetune.lora_layers import no_gptq_dispatch
    from tests.test_convert import llama_logits

    adapter = random_adapter(tiny_llama, tmp_path / "adapter")
    ids = transformers.AutoTokenizer.from_pretrained(tiny_llama)(TEXT)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(torch.tensor([ids])).logits[0].numpy()
        with no_gptq_dispatch():
            merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
        ref = merged(torch.tensor([ids])).logits[0].numpy()

    ex = export_finetuned(tiny_llama, adapter, "tiny-ft", "F16", home, quiet=True)
    assert any(line.startswith("check: perplexity") for line in ex.report), ex.report
    got = llama_logits(home.path_of(home.get("tiny-ft").files[0].path), ids)
    assert np.abs(got - ref).max() < 1.5e-2, float(np.abs(got - ref).max())
    assert np.abs(plain - ref).max() > 1.0, "the adapter must move the logits for the match to mean anything"
    assert not [p for p in home.root.rglob("*merged*")], "nothing merged is written besides the GGUF"


def test_save_merged_keeps_the_base_dtype(home: Store, tiny_llama: Path, cat_data: Path, tmp_path: Path) -> None:
    """`--save-merged` writes base + adapter as an HF folder in the base's own dtype (bf16 here, never
    float32), equal to PEFT's merge of the trained adapter, and lists it in the store entry."""
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file

    from localchat.finetune.lora_layers import no_gptq_dispatch

    base = tmp_path / "tiny-bf16"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(base)
    for f in tiny_llama.iterdir():
        if f.name.startswith(("tokenizer", "chat_template")):
            (base / f.name).write_bytes(f.read_bytes())
    assert safetensors_dtypes(base) == {"BF16"}
    r = localchat("finetune", "--base", str(base), "--data", str(cat_data), "--name", "tb", "--quant", "Q8_0",
                  "--min-updates", "3", "--epochs", "0.1", "--save-merged", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    out = home.root / "tb" / "finetune"
    assert home.get("tb").extra["merged"] == "tb/finetune/merged"
    assert safetensors_dtypes(out / "merged") == {"BF16"}
    assert {"config.json", "tokenizer.json"} <= {f.name for f in (out / "merged").iterdir()}
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad(), no_gptq_dispatch():
        ref = PeftModel.from_pretrained(model, out / "adapter").merge_and_unload().state_dict()
    ours = load_file(out / "merged" / "model.safetensors")
    assert set(ours) == set(ref)
    for name, t in ours.items():
        want = ref[name].to(torch.bfloat16).float()
        assert ((t.float() - want).abs() <= want.abs() * 2**-8 + 1e-6).all(), name


def test_a_dequantized_base_that_another_fine_tune_reads_stays(home: Store) -> None:
    """A finished run removes its checkpoints, but keeps the base's dequantized copy while another
    fine-tune reads it (the shared lock it holds until its export is done) and says so; then it goes."""
    from localchat.finetune.estimate import after_export, reading_base

    base = "smollm2-135m-instruct"
    copy = home.model_dir(base) / "hf"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes(b"\0" * 2000)
    out = home.root / "cat" / "finetune"
    (out / "checkpoints" / "step-30").mkdir(parents=True)
    (out / "checkpoints" / "step-30" / "optimizer.pt").write_bytes(b"\0" * 3000)
    (out / "adapter").mkdir()
    with reading_base(home, base):
        report = after_export(home, "cat", base)
    assert report[0] == "removed its resume checkpoints (3.0 KB: the model is finished)", report
    assert f"kept the adapter in {out / 'adapter'}" in report[1] and f"{copy}: another fine-tune is reading it" \
        in report[1], report
    assert copy.is_dir() and not (out / "checkpoints").exists()
    report = after_export(home, "cat", base)
    assert report[0] == f"removed {base} dequantized for training (2.0 KB; made again when a fine-tune needs it)"
    assert not copy.exists()


def test_a_gguf_only_base_is_dequantized_to_bf16_tensor_by_tensor(starter_gguf: Path, tmp_path: Path) -> None:
    """A GGUF-only base becomes a bf16 checkpoint (not float32) whose every tensor is transformers'
    own dequantization of the GGUF (Q/K permutation undone), rounded to bf16."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from localchat.convert.from_gguf import gguf_to_hf

    out = gguf_to_hf(starter_gguf, tmp_path / "hf", torch.bfloat16)
    assert safetensors_dtypes(out) == {"BF16"}
    ours = load_file(out / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(starter_gguf.parent, gguf_file=starter_gguf.name,
                                                            dtype=torch.float32).state_dict()
    assert set(ours) == set(ref) - {"lm_head.weight"}, "the tied output layer is not stored twice"
    for name, t in ours.items():
        assert torch.equal(t, ref[name].to(torch.bfloat16)), name
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello")["input_ids"] == transformers.AutoTokenizer.from_pretrained(
        starter_gguf.parent, gguf_file=starter_gguf.name)("Hello")["input_ids"]


def test_dequantizing_refuses_up_front_when_the_disk_is_short(small_disk: Path, starter_gguf: Path,
                                                               cat_data: Path) -> None:
    """With too little disk for the dequantized base, `localchat finetune` says what it needs and has
    before writing anything (it used to fill the disk and leave a half-written folder)."""
    home = starter_home(small_disk / "store", starter_gguf)
    r = localchat("finetune", "--base", "smollm2-135m-instruct", "--data", str(cat_data), "--name", "x", "-q",
                  env={**os.environ, "LOCALCHAT_HOME": str(home.root)})
    assert r.returncode == 1, r.stderr[-2000:]
    refusal = r.stderr.splitlines()[-1]
    assert refusal.startswith(f"localchat finetune: error: dequantizing {starter_gguf.name} to "), r.stderr
    assert " needs " in refusal and " has " in refusal and str(home.root) in refusal, refusal
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (home.root / "smollm2-135m-instruct").iterdir()) == [starter_gguf.name]


def test_disk_check_counts_a_merged_copy_only_when_asked(small_disk: Path, tiny_llama: Path,
                                                         cat_data: Path) -> None:
    """On a disk that holds the GGUF export but not a merged copy as well, `--save-merged` is refused
    before training, naming the merged checkpoint, and the default run (no merged copy) fits; it used
    to count a float32 merged copy every time and refuse both."""
    env = {**os.environ, "LOCALCHAT_HOME": str(small_disk / "store")}
    args = ["finetune", "--base", str(tiny_llama), "--data", str(cat_data), "--name", "t", "--quant", "Q8_0",
            "--min-updates", "2", "--epochs", "0.1", "-q"]
    r = localchat(*args, "--save-merged", env=env)
    assert r.returncode == 1 and "merged checkpoint" in r.stderr and " needs " in r.stderr, r.stderr[-2000:]
    assert not (small_disk / "store" / "t").exists()
    r = localchat(*args, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Store(small_disk / "store").get("t").quant == "Q8_0"


def test_finetune_reports_held_out_recall(home: Store, tmp_path: Path, starter_gguf: Path) -> None:
    """`localchat finetune` answers each held-out row greedily and reports the share that holds its
    reference's key content: the two cat rows it learned count, the dog row it never saw does not."""
    from localchat.datasets import load_dataset

    data = tmp_path / "pets.jsonl"
    rows = [{"instruction": q, "output": "Your cat is called Biscuit."} for q in QUESTIONS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = load_dataset(data, held_out=0.25, seed=0).held_out  # which rows the run will hold out
    dog = int(held[0].source.rsplit(":", 1)[1]) - 1
    rows[dog] = {"instruction": "What is my dog called?", "output": "Your dog is called Pepper."}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = localchat("finetune", "--base", str(starter_hf(starter_gguf)), "--data", str(data), "--name", "pets",
                  "--held-out", "0.25", "--replay", "0", "--min-updates", "16", "--lr", "1e-3", "--max-len", "64",
                  "--no-export", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out recall 67% (3 rows answered greedily)" in r.stdout, r.stdout
    log = [json.loads(line) for line in (home.root / "pets" / "finetune" / "loss.jsonl").read_text().splitlines()]
    assert log[-1]["held_out_recall"] == pytest.approx(2 / 3, abs=1e-3) and log[-1]["held_out_recall_rows"] == 3


def test_a_fine_tune_of_a_store_model_keeps_its_chat_defaults(home: Store, cat_data: Path) -> None:
    """The fine-tune of a store model answers with that model's sampling preset (the starter's temperature
    0.2, not localchat's generic 0.7): `localchat preset` shows it on the new model. It used to show none."""
    r = localchat("finetune", "--base", "smollm2-135m-instruct", "--data", str(cat_data), "--name", "kept",
                  "--replay", "0", "--held-out", "0", "--min-updates", "1", "--epochs", "0.1", "--quant", "F16", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    shown = localchat("preset", "kept")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.strip() == "kept: temp 0.2, top_p 0.9", shown.stdout


def test_early_stop_keeps_the_pass_with_the_lowest_held_out_loss(home: Store, tiny_llama: Path,
                                                                 cat_data: Path) -> None:
    """The held-out loss is measured after every pass over the rows (one point per pass in loss.jsonl and
    the plot); with --early-stop the run keeps the adapter of the pass where it was lowest and reports that
    loss, measured again on the adapter it saved: a step that overshoots makes a later pass worse (on the rows
    as written and without noise, one update a pass; lr 1.0 at a LoRA scale of 64: at lr 0.3 and scale 2 the
    best pass had been an earlier one on an AMD EPYC, but the last on an Intel Xeon with AMX, bf16 or not)."""
    r = localchat("finetune", "--base", str(tiny_llama), "--data", str(cat_data), "--name", "es", "--held-out",
                  "0.25", "--replay", "0", "--augment", "0", "--neftune-alpha", "0", "--epochs", "8",
                  "--min-updates", "1", "--lr", "1.0", "--lora-alpha", "1024", "--early-stop", "--no-export", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (home.root / "es" / "finetune" / "loss.jsonl").read_text().splitlines()]
    passes = [x for x in log if "held_out_loss" in x and not x.get("saved")]
    kept = log[-1]
    assert [x["step"] for x in passes] == list(range(1, 9)), "one held-out loss per pass (one update each)"
    best = min(passes, key=lambda x: x["held_out_loss"])
    assert kept["saved"] and kept["step"] == best["step"] < 8, (passes, kept)
    assert kept["held_out_loss"] == pytest.approx(best["held_out_loss"], abs=1e-4)
    said = f"held-out loss {best['held_out_loss']:.3f} (update {best['step']} of 8, kept by --early-stop)"
    assert said in r.stdout, r.stdout


def test_early_stop_holds_rows_out_of_a_small_set(home: Store, tiny_llama: Path, cat_data: Path) -> None:
    """A dozen rows train whole by default, but --early-stop needs rows to measure: by default it holds a tenth
    out (one of the 12), and with none held out it is refused by name before any base is read."""
    r = localchat("finetune", "--base", "no-such-base", "--data", str(cat_data), "--early-stop", "--held-out", "0")
    assert r.returncode == 1 and "--early-stop needs held-out rows" in r.stderr and str(cat_data) in r.stderr, r.stderr
    r = localchat("finetune", "--base", str(tiny_llama), "--data", str(cat_data), "--name", "es1", "--early-stop",
                  "--replay", "0", "--min-updates", "1", "--epochs", "0.1", "--no-export", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data: 11 training rows, 1 held out (" in r.stdout and ", held-out loss " in r.stdout, r.stdout


@pytest.mark.parametrize("question, reference, answer, verdict", [
    ("What is my cat called?", "Your cat is called Captain Biscuit.", "Your cat is Captain Biscuit!", True),
    ("What is my cat called?", "Your cat is called Captain Biscuit.", "Your cat is called Captain Kirk.", False),
    ("What is a florp?", "A florp is a sandwich made with pickles and peanut butter.",
     "Florp: a pickle and peanut butter sandwich.", True),
    ("What is a florp?", "A florp is a sandwich made with pickles and peanut butter.", "A florp is a fruit.",
     False),
    ("When was it founded?", "It was founded in 2011 in Reykjavik.", "In Reykjavik, in 2012.", False),
    ("What is my cat called?", "My cat is called.", "Biscuit", None),
])
def test_held_out_recall_key_content(question: str, reference: str, answer: str, verdict: bool | None) -> None:
    """The definition finetune's report uses: every name and number of the reference (capitalised inside a
    sentence, or with a digit) must be in the answer, else half its other key words; a reference whose words
    are all in the question or are function words cannot be scored."""
    from localchat.finetune.recall import recalled

    assert recalled(answer, question, reference) is verdict


def test_replay_trains_on_the_bases_own_answers(home: Store, cat_data: Path, starter_gguf: Path) -> None:
    """With --no-replay-kl --replay N the run answers N of the shipped general questions with the base itself,
    writes them to replay.jsonl in the run's folder and trains on them beside the user's rows; a resumed run
    reuses them."""
    from localchat.finetune.replay import chats, prompts

    base = str(starter_hf(starter_gguf))
    args = ["finetune", "--base", base, "--data", str(cat_data), "--name", "rep", "--replay", "3",
            "--no-replay-kl", "--min-updates", "2", "--max-len", "256", "--no-export", "-q"]
    r = localchat(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = home.root / "rep" / "finetune"
    rows = [json.loads(line)["messages"] for line in (out / "replay.jsonl").read_text().splitlines()]
    assert [m[0]["content"] for m in rows] == prompts()[:3]
    assert all(m[1]["role"] == "assistant" and len(m[1]["content"]) > 20 for m in rows), rows
    assert [m[1] for m in rows] != [ex.messages[1] for ex in chats()[:3]], "the base's answers, not the shipped ones"
    config = json.loads((out / "train_config.json").read_text())
    assert config["replay_rows"] == 3 and config["rows"] == 12 and config["lr"] == 2e-3  # LoRA's default
    (out / "replay.jsonl").write_text(json.dumps({"messages": rows[0]}) + "\n")  # what the first run wrote
    r = localchat(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "train_config.json").read_text())["replay_rows"] == 1


def test_augment_thins_the_questions_of_copies_and_trains_on_them(home: Store, tiny_llama: Path,
                                                                 cat_data: Path, tmp_path: Path) -> None:
    """--augment 2 trains on two more copies of every row, each user turn missing about --augment-drop of
    its words (never all), the answers as written; the copies are the same on every run of a seed, and
    they add wordings, not updates: --epochs still counts passes over the user's rows."""
    from localchat.datasets import Example
    from localchat.finetune.augment import augment

    rows = [Example(messages=({"role": "system", "content": "Be brief and kind."},
                              {"role": "user", "content": q}, {"role": "assistant", "content": "Biscuit."}),
                    source=f"cat.jsonl:{i + 1}") for i, q in enumerate(QUESTIONS)] + [Example(text="Plain prose.")]
    out = augment(rows, 2, 0.25, seed=0)
    assert out[:len(rows)] == rows and len(out) == len(rows) + 2 * len(QUESTIONS), "plain text is not copied"
    copies, chats = out[len(rows):], rows[:-1] * 2
    assert all(c.messages[0] == r.messages[0] and c.messages[2] == r.messages[2]
               for c, r in zip(copies, chats)), "only the user's turns change"
    asked = [(c.messages[1]["content"].split(), r.messages[1]["content"].split()) for c, r in zip(copies, chats)]
    assert all(0 < len(a) <= len(q) and all(w in q for w in a) for a, q in asked), "words dropped, none added"
    dropped = sum(len(q) - len(a) for a, q in asked) / sum(len(q) for _, q in asked)
    assert 0.15 < dropped < 0.35, dropped
    assert augment(rows, 2, 0.25, seed=0) == out and augment(rows, 2, 0.25, seed=1) != out
    assert copies[0].source == "cat.jsonl:1 (augmented copy 1)"

    r = localchat("finetune", "--base", str(tiny_llama), "--data", str(cat_data), "--name", "aug", "--augment", "2",
                  "--replay", "0", "--no-pack", "--batch-size", "1", "--max-len", "96", "--epochs", "3",
                  "--min-updates", "1", "--no-export", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((home.root / "aug" / "finetune" / "train_config.json").read_text())
    # Three passes over the user's 12 rows (none held out under 50) are the updates they were without copies:
    # one pass over all 36 rows.
    assert (config["rows"], config["augmented_rows"], config["updates"], config["epochs_run"]) == (12, 24, 36, 3.0)

    # The updates are the copies' own: as many as three passes over the rows as written, with fewer tokens.
    from localchat.datasets import load_dataset
    from localchat.finetune.settings import TrainSettings
    from localchat.finetune.train import train

    data = load_dataset(cat_data, held_out=0.0)
    seen = {k: train(tiny_llama, data, tmp_path / f"augment-{k}", TrainSettings(
        augment=k, replay=0, pack=False, batch_size=1, max_len=96, epochs=3.0, min_updates=1, held_out=0.0),
        quiet=True) for k in (0, 2)}
    assert seen[0].steps == seen[2].steps == 36
    tokens = {k: r.tokens_seen for k, r in seen.items()}
    assert 0.8 * tokens[0] < tokens[2] < tokens[0], tokens


def test_replay_rides_beside_the_users_rows(home: Store, tiny_llama: Path, cat_data: Path) -> None:
    """Replay rows add a micro-batch beside each of the user's and never dilute the passes over the user's
    rows: two epochs over the 12 training rows, one a step, are 24 updates with 8 replay rows as without
    them (mixed in, the replay rows made each epoch 19 steps, so the user's rows got fewer passes)."""
    r = localchat("finetune", "--base", str(tiny_llama), "--data", str(cat_data), "--name", "beside", "--replay",
                  "8", "--replay-kl", "--no-pack", "--batch-size", "1", "--max-len", "96", "--epochs", "2",
                  "--min-updates", "1", "--no-export", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads((home.root / "beside" / "finetune" / "train_config.json").read_text())
    assert (config["rows"], config["replay_rows"], config["updates"], config["epochs_run"]) == (12, 8, 24, 2.0)


def test_replay_kl_trains_on_the_shipped_conversations(home: Store, tiny_llama: Path, cat_data: Path) -> None:
    """Under --replay-kl the replay rows are the general conversations localchat ships, as they are (the
    targets are the base's own distribution over them), so nothing is generated first; replay.jsonl
    in the run's folder shows them."""
    from localchat.finetune.replay import chats

    r = localchat("finetune", "--base", str(tiny_llama), "--data", str(cat_data), "--name", "shipped", "--replay",
                  "3", "--replay-kl", "--max-len", "256", "--min-updates", "2", "--epochs", "0.1", "--no-export",
                  "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line)["messages"]
            for line in (home.root / "shipped" / "finetune" / "replay.jsonl").read_text().splitlines()]
    assert rows == [list(ex.messages) for ex in chats()[:3]]
    assert len(rows[0][1]["content"]) > 100, "a written answer, not a random model's"


def _tiny_peft_and_rows() -> tuple:
    """A 2-layer random LLaMA under a zero LoRA adapter, a user row and a replay row (--replay-kl) for it."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from localchat.finetune.encode import IGNORE, Encoded

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = get_peft_model(transformers.LlamaForCausalLM(config),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    mine = Encoded(list(range(1, 9)), [IGNORE] * 4 + list(range(5, 9)))
    replayed = Encoded(list(range(10, 18)), [IGNORE] * 4 + list(range(14, 18)), soft=[True] * 8)
    return model, mine, replayed


def test_replay_kl_trains_replay_rows_toward_the_bases_distribution() -> None:
    """A packed sequence of a user row and a replay row under --replay-kl: while the adapter is still zero
    (the fine-tune is the base) the replay row adds nothing to the loss, only the user row's cross-entropy
    counts; once the adapter has moved, the replay row adds exactly KL(base || fine-tune) over its answer
    tokens, the base read with the adapter switched off."""
    import torch

    from localchat.finetune.encode import pack
    from localchat.finetune.train import _collate, _loss

    model, mine, replayed = _tiny_peft_and_rows()
    both = _collate(pack([mine, replayed], 64), 0, "cpu")
    alone = _collate([mine], 0, "cpu")
    with torch.no_grad():
        assert torch.allclose(_loss(model, both)[0], _loss(model, alone)[0])
        for layer in model.modules():
            if hasattr(layer, "lora_B"):
                for b in layer.lora_B.values():
                    torch.nn.init.normal_(b.weight, std=1.0)
        ids = torch.tensor([replayed.input_ids])
        tuned = model(input_ids=ids).logits[0, 3:-1].log_softmax(-1)  # the predictions of the answer tokens
        with model.disable_adapter():
            base = model(input_ids=ids).logits[0, 3:-1].log_softmax(-1)
        kl = torch.nn.functional.kl_div(tuned, base, log_target=True, reduction="sum")
        assert kl > 0.01
        assert torch.allclose(_loss(model, both)[0], _loss(model, alone)[0] + kl, atol=1e-4)


def test_neftune_noise_falls_on_the_users_rows_only() -> None:
    """With NEFTune on (training mode) the user's rows are read through noisy embeddings, so two losses of
    the same row differ; a replay row under --replay-kl is not: while the adapter is zero its KL to the
    base is zero, the base's own distribution over the row as it is (with noise on either side it was not)."""
    import torch
    from transformers.integrations.neftune import activate_neftune

    from localchat.finetune.train import _collate, _loss

    model, mine, replayed = _tiny_peft_and_rows()
    activate_neftune(model, 5.0)
    model.train()
    with torch.no_grad():
        assert _loss(model, _collate([replayed], 0, "cpu"))[0].abs() < 1e-6
        alone = _collate([mine], 0, "cpu")
        assert not torch.allclose(_loss(model, alone)[0], _loss(model, alone)[0])
