"""`localchat finetune` unchanged under `accelerate launch --num_processes 2` on the CPU (DDP over gloo) on the
starter checkpoint: the global loss curve equals one process's with the same global batch, gradients are
all-reduced once per update however many micro-batches it accumulates, and only the main process writes
(one loss log, one adapter, one model exported to the store)."""

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

# Four updates of four one-row micro-batches, no dropout: the two runs see the same rows per update.
TRAIN = ["--max-len", "64", "--batch-size", "1", "--no-pack", "--min-updates", "4", "--epochs", "0.01",
         "--lora-dropout", "0", "--held-out", "0.1", "--replay", "0", "-q"]
# Same rows and weights; what differs is the order of float sums (two processes' gradients averaged by
# gloo against one process accumulating both) and bf16 autocast where the CPU has it.
LOSS_TOLERANCE = 2e-3


# Loaded into the launched processes (PYTHONPATH): every DDP module writes a line per gradient sync (at
# its last bucket) to a file per process, and still all-reduces every bucket (torch's own hook).
COUNT_SYNCS = """
import os
if os.environ.get("COUNT_DDP_SYNCS"):
    import torch.nn.parallel
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    DDP = torch.nn.parallel.DistributedDataParallel
    init = DDP.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)

        def hook(state, bucket):
            if bucket.is_last():  # one gradient sync, however many buckets it takes
                with open(os.path.join(os.environ["COUNT_DDP_SYNCS"], str(os.getpid())), "a") as f:
                    f.write("allreduce\\n")
            return allreduce_hook(state, bucket)

        self.register_comm_hook(None, hook)

    DDP.__init__ = counting_init
"""


def run(cmd: list[str], home: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCALCHAT_HOME": str(home), "OMP_NUM_THREADS": "1", **extra_env}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(home: Path, name: str) -> list[float]:
    rows = [json.loads(line) for line in (home / name / "finetune" / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4], rows
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path: Path, starter_gguf: Path) -> None:
    """One process with --grad-accum 4 against `accelerate launch --num_processes 2` (CPU, gloo) with
    --grad-accum 2: the same loss at each of the 4 updates within 2e-3; each process all-reduces its
    gradients once per update (4 times, not once per micro-batch); the launched run exports exactly one
    model (one GGUF, one adapter, one 'ready' line) and its log has each update once."""
    base = str(starter_hf(starter_gguf))
    data = tmp_path / "cat.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "Your cat is called Biscuit."}) + "\n"
                            for q in QUESTIONS))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, "-m", "localchat", "finetune", "--base", base, "--data", str(data), "--name", "cat",
         "--grad-accum", "4", "--no-export", *TRAIN], single)
    hooks, syncs = tmp_path / "hooks", tmp_path / "syncs"
    hooks.mkdir()
    syncs.mkdir()
    (hooks / "sitecustomize.py").write_text(COUNT_SYNCS)
    path = os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH", "")) if p)
    # accelerate 1.x's `--cpu --num_processes 2` starts one process unless MPI is set up; its torchrun
    # path (--multi_gpu) starts two, and localchat joins them over gloo when there is no CUDA.
    r = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "-m", "localchat", "finetune", "--base", base, "--data", str(data), "--name", "cat",
             "--grad-accum", "2", "--quant", "Q8_0", *TRAIN], ddp, PYTHONPATH=path, COUNT_DDP_SYNCS=str(syncs))

    one, two = losses(single, "cat"), losses(ddp, "cat")
    assert max(abs(a - b) for a, b in zip(one, two)) < LOSS_TOLERANCE, (one, two)
    assert json.loads((ddp / "cat" / "finetune" / "train_config.json").read_text())["processes"] == 2
    # One gradient sync per update and process, not one per micro-batch (8).
    counts = sorted(len(f.read_text().splitlines()) for f in syncs.iterdir())
    assert counts == [4, 4], counts

    store = Store(ddp)
    assert list(store.models()) == ["cat"] and store.get("cat").quant == "Q8_0"
    assert sorted(p.name for p in (ddp / "cat").glob("*.gguf")) == ["cat-Q8_0.gguf"]
    assert r.stdout.count("cat: ready") == 1, r.stdout
    assert not list((ddp / "cat" / "finetune").glob("*.tmp")), "no half-written adapter left"
