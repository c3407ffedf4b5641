"""`localchat finetune` unchanged under `accelerate launch --num_processes 2` on the CPU (DDP over gloo) on the
starter checkpoint: the global loss curve equals one process's with the same global batch, and only the
main process writes (one loss log, one adapter, one model exported to the store)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from localchat.store import Store  # noqa: E402
from tests.checkpoints import starter_hf  # noqa: E402
from tests.test_finetune import QUESTIONS  # noqa: E402

# Four updates of two one-row micro-batches, no dropout: the two runs see the same rows per update.
TRAIN = ["--max-len", "64", "--batch-size", "1", "--no-pack", "--min-updates", "4", "--epochs", "0.01",
         "--lora-dropout", "0", "--held-out", "0.1", "--replay", "0", "-q"]
# Same rows and weights; what differs is the order of float sums (two processes' gradients averaged by
# gloo against one process accumulating both) and bf16 autocast where the CPU has it.
LOSS_TOLERANCE = 2e-3


def run(cmd: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCALCHAT_HOME": str(home), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(home: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (home / name / "finetune" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4], rows
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path, starter_gguf: Path) -> None:
    """One process with --grad-accum 2 against `accelerate launch --num_processes 2` (CPU, gloo) with
    --grad-accum 1: the same loss at each of the 4 updates within 2e-3; the launched run exports exactly
    one model (one GGUF, one adapter, one 'ready' line) and its log has each update once."""
    base = str(starter_hf(starter_gguf))
    data = tmp_path / "cat.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "Your cat is called Biscuit."}) + "\n"
                            for q in QUESTIONS))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, "-m", "localchat", "finetune", "--base", base, "--data", str(data), "--name", "cat",
         "--grad-accum", "2", "--no-export", *TRAIN], single)
    # accelerate 1.x's `--cpu --num_processes 2` starts one process unless MPI is set up; its torchrun
    # path (--multi_gpu) starts two, and localchat joins them over gloo when there is no CUDA.
    r = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "-m", "localchat", "finetune", "--base", base, "--data", str(data), "--name", "cat",
             "--grad-accum", "1", "--quant", "Q8_0", *TRAIN], ddp)

    one, two = losses(single, "cat"), losses(ddp, "cat")
    assert max(abs(a - b) for a, b in zip(one, two)) < LOSS_TOLERANCE, (one, two)
    assert json.loads((ddp / "cat" / "finetune" / "train_config.json").read_text())["processes"] == 2

    store = Store(ddp)
    assert list(store.models()) == ["cat"] and store.get("cat").quant == "Q8_0"
    assert sorted(p.name for p in (ddp / "cat").glob("*.gguf")) == ["cat-Q8_0.gguf"]
    assert r.stdout.count("cat: ready") == 1, r.stdout
    assert not list((ddp / "cat" / "finetune").glob("*.tmp")), "no half-written adapter left"
