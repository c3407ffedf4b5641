"""`localchat finetune` on CPU with the real checkpoint built from the starter model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("peft")

from localchat.store import Store  # noqa: E402
from tests.checkpoints import starter_hf  # noqa: E402

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


def localchat(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localchat", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_a_dozen_rows_teach_a_fact_and_keep_paris(home: Store, cat_data: Path) -> None:
    t0 = time.time()  # the base is the starter as the store has it: GGUF only, dequantized once
    r = localchat("finetune", "--base", "smollm2-135m-instruct", "--data", str(cat_data), "--name", "cat",
                  "--quant", "Q8_0", "--lora-gguf", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.time() - t0 < 300, "a couple of minutes on two cores"
    assert "GPT-QModel" not in r.stdout + r.stderr, "fine-tuning and GGUF export must not import GPTQModel"
    entry = home.get("cat")
    assert entry.source.startswith("finetune:") and entry.quant == "Q8_0"
    assert (home.root / "smollm2-135m-instruct" / "hf" / "model.safetensors").is_file()
    out = home.root / "cat" / "finetune"
    for f in ("adapter/adapter_config.json", "merged/config.json", "train_config.json", "loss.jsonl", "loss.png"):
        assert (out / f).is_file(), f
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert losses[-1]["held_out_loss"] < 0.5 and losses[0]["loss"] > losses[-2]["loss"]
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
    """QLoRA's path (NF4 base through bitsandbytes, LoRA in float32) runs for real on the CPU too."""
    pytest.importorskip("bitsandbytes")
    r = localchat("finetune", "--base", str(starter_hf(starter_gguf)), "--data", str(cat_data), "--name", "catq",
                  "--qlora", "--quant", "Q8_0", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    out = home.root / "catq" / "finetune"
    config = json.loads((out / "train_config.json").read_text())
    assert config["qlora"] is True
    # 4-bit layers: under 0.62x of the bf16 size, with the 28M-parameter embedding still in bf16.
    params = 134_515_008
    assert config["base_bytes"] < 0.62 * 2 * params, config["base_bytes"]
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert losses[-1]["held_out_loss"] < 0.5 and losses[0]["loss"] > losses[-2]["loss"]
    # The adapter learned over the 4-bit base merges into the full-precision one and keeps the fact.
    answer = localchat("chat", "--model", "catq", "-q", "--temp", "0", "-p", "Do you remember what my cat is called?")
    assert "Biscuit" in answer.stdout, answer.stdout


def test_ctrl_c_saves_and_resume_continues(home: Store, cat_data: Path, starter_gguf: Path) -> None:
    base = starter_hf(starter_gguf)
    args = ["-m", "localchat", "finetune", "--base", str(base), "--data", str(cat_data), "--name", "cat2",
            "--save-every", "5", "--no-export", "-q", "--no-pack"]
    log = home.root / "cat2" / "finetune" / "loss.jsonl"
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())
    deadline = time.time() + 240
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 7):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "checkpoint saved, continue with --resume" in err
    stopped = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert 7 <= stopped[-1] < 30
    r = subprocess.run([sys.executable, *args, "--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from update {stopped[-1]}" in r.stdout
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if "loss" in json.loads(line)]
    assert steps == list(range(1, 31)), "the same 30 updates, none repeated, none skipped"


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


def test_finetune_reports_held_out_recall(home: Store, tmp_path: Path, starter_gguf: Path) -> None:
    """`localchat finetune` answers each held-out row greedily and reports the share that holds its
    reference's key content: the two cat rows it learned count, the dog row it never saw does not."""
    from localchat.finetune.data import load_dataset

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


@pytest.mark.parametrize("question, reference, answer, verdict", [
    ("What is my cat called?", "Your cat is called Captain Biscuit.", "Your cat is Captain Biscuit!", True),
    ("What is my cat called?", "Your cat is called Captain Biscuit.", "Your cat is called Captain Kirk.", False),
    ("What is a florp?", "A florp is a sandwich made with pickles and peanut butter.",
     "Florp: a pickle and peanut butter sandwich.", True),
    ("What is a florp?", "A florp is a sandwich made with pickles and peanut butter.", "A florp is a fruit.", False),
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
    """With --replay N the run answers N of the shipped general prompts with the base itself, writes them to
    replay.jsonl in the run's folder and trains on them beside the user's rows; a resumed run reuses them."""
    from localchat.finetune.replay import prompts

    base = str(starter_hf(starter_gguf))
    args = ["finetune", "--base", base, "--data", str(cat_data), "--name", "rep", "--replay", "3",
            "--min-updates", "2", "--max-len", "256", "--no-export", "-q"]
    r = localchat(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = home.root / "rep" / "finetune"
    rows = [json.loads(line)["messages"] for line in (out / "replay.jsonl").read_text().splitlines()]
    assert [m[0]["content"] for m in rows] == prompts()[:3]
    assert all(m[1]["role"] == "assistant" and len(m[1]["content"]) > 20 for m in rows), rows
    config = json.loads((out / "train_config.json").read_text())
    assert config["replay_rows"] == 3 and config["rows"] == 11
    (out / "replay.jsonl").write_text(json.dumps({"messages": rows[0]}) + "\n")  # what the first run wrote
    r = localchat(*args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "train_config.json").read_text())["replay_rows"] == 1
