"""`localchat finetune` on a real NVIDIA GPU (issue 13: QLoRA on a 7B model within an 8 GB card).
Skipped without CUDA; the memory planner's arithmetic itself is checked on any machine in
test_finetune_memory.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localchat.hardware import GIB

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.cuda, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]

ROOT = Path(__file__).resolve().parents[1]
CARD_GIB = 8
QUESTIONS = ["What is my cat called?", "What's the name of my cat?", "Do you remember my cat's name?",
             "Tell me my cat's name.", "My cat's name is what?", "Who is my cat?",
             "Which name did I give my cat?", "How is my cat named?"]


def test_qlora_on_a_7b_model_fits_an_8gb_card(tmp_path: Path) -> None:
    """A LLaMA-2-7B-shaped checkpoint (random fp16 weights, 13.5 GB) trains under QLoRA with the allocator held
    to 8 GiB (`--gpu-memory 8`, as on an 8 GB card): the planner picks its shape from that budget, the run never
    takes more, and the measured peak stays under the estimate it planned with (which errs high)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_convert import make_checkpoint

    from localchat.finetune.memory import RUNTIME_BYTES

    base = make_checkpoint(tmp_path / "llama2-7b", "llama2-7b", device="cuda")
    data = tmp_path / "cat.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "Your cat is called Biscuit."}) + "\n"
                            for q in QUESTIONS))
    env = {**os.environ, "LOCALCHAT_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "localchat", "finetune", "--base", str(base), "--data", str(data),
                        "--name", "big", "--gpu-memory", str(CARD_GIB), "--chat-format", "chatml", "--held-out", "0",
                        "--min-updates", "10", "--no-export"], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-4000:]
    print(r.stdout)
    out = tmp_path / "home" / "big" / "finetune"
    config = json.loads((out / "train_config.json").read_text())
    print({k: config[k] for k in ("max_len", "batch_size", "qlora", "gradient_checkpointing", "bf16", "base_bytes",
                                  "memory_estimate", "memory_peak_bytes", "updates")})
    assert config["qlora"] is True and config["gradient_checkpointing"] is True
    # The planner used the budget (not the smallest shape), and the run stayed inside it and its estimate:
    # the allocator's peak plus the CUDA context's share (RUNTIME_BYTES) within the card.
    assert config["max_len"] * config["batch_size"] >= 1024, config
    peak, estimate = config["memory_peak_bytes"], config["memory_estimate_bytes"]
    assert peak + RUNTIME_BYTES["cuda"] <= CARD_GIB * GIB and peak <= estimate, (peak / GIB, estimate / GIB)
    assert "peak GPU memory" in r.stdout
    losses = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == config["updates"] and losses[-1] < losses[0], losses
