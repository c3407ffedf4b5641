"""`localchat finetune` unchanged under `accelerate launch --num_processes 2` on the CPU (DDP, and FSDP with
docs/accelerate/fsdp.yaml, over gloo) on the starter checkpoint: the global loss curve equals one process's
with the same global batch, gradients are all-reduced once per update however many micro-batches it
accumulates, and only the main process writes (one loss log, one whole adapter, one model exported)."""

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
         "--lora-dropout", "0", "--held-out", "0.1", "-q"]
# Same rows and weights; what differs is the order of float sums (two processes' gradients averaged by
# gloo against one process accumulating both) and bf16 autocast where the CPU has it.
LOSS_TOLERANCE = 2e-3
FSDP_CONFIG = Path(__file__).resolve().parents[1] / "docs" / "accelerate" / "fsdp.yaml"


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


@pytest.mark.slow
def test_fsdp_shards_the_model_and_saves_the_whole_adapter_once(tmp_path: Path, starter_gguf: Path) -> None:
    """`accelerate launch --config_file docs/accelerate/fsdp.yaml --num_processes 2` (FSDP2 over gloo, each
    process holding half of every weight) against one process with the same global batch, both in float32:
    the same loss at each of the 4 updates within 2e-3; the run says it was sharded (train_config.json);
    the adapter is saved whole (every tensor 2-D, of the single run's shape, and within 1e-5 of its values,
    not one process's shard) and exactly one model is exported."""
    from safetensors.torch import load_file

    base = str(starter_hf(starter_gguf))
    data = tmp_path / "cat.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "Your cat is called Biscuit."}) + "\n"
                            for q in QUESTIONS))
    # float32: under bf16 autocast a 1e-9 difference in the order of FSDP's gradient sums can move bf16
    # roundings, and the runs drift apart by ~1% after 3 updates; in float32 they agree to 1e-5.
    train = [*TRAIN, "--no-bf16", "--base", base, "--data", str(data), "--name", "cat"]
    single, fsdp = tmp_path / "single", tmp_path / "fsdp"
    run([sys.executable, "-m", "localchat", "finetune", "--grad-accum", "4", "--no-export", *train], single)
    # No --cpu: accelerate's --cpu launches one process; without CUDA localchat shards over gloo.
    r = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
             "--num_processes", "2", "-m", "localchat", "finetune", "--grad-accum", "2", "--quant", "Q8_0",
             *train], fsdp)

    one, two = losses(single, "cat"), losses(fsdp, "cat")
    assert max(abs(a - b) for a, b in zip(one, two)) < LOSS_TOLERANCE, (one, two)
    config = json.loads((fsdp / "cat" / "finetune" / "train_config.json").read_text())
    assert (config["processes"], config["distributed"]) == (2, "FSDP")

    whole = load_file(single / "cat" / "finetune" / "adapter" / "adapter_model.safetensors")
    saved = load_file(fsdp / "cat" / "finetune" / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in whole.items()}
    assert all(v.dim() == 2 for v in saved.values())
    assert max(float((saved[k] - whole[k]).abs().max()) for k in whole) < 1e-5

    store = Store(fsdp)
    assert list(store.models()) == ["cat"] and store.get("cat").quant == "Q8_0"
    assert sorted(p.name for p in (fsdp / "cat").glob("*.gguf")) == ["cat-Q8_0.gguf"]
    assert r.stdout.count("cat: ready") == 1, r.stdout
