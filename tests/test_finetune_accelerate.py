"""`localchat finetune` unchanged under `accelerate launch --num_processes 2` on the CPU (DDP, FSDP with
docs/accelerate/fsdp.yaml, and DeepSpeed ZeRO-2 and ZeRO-3 with docs/accelerate/deepspeed-zero*.yaml where
deepspeed is importable, over gloo) on the starter checkpoint: the global loss curve equals one process's
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

# Four updates of four one-row micro-batches, no dropout, no NEFTune noise (each process would draw its own)
# and the rows as written: the two runs see the same rows per update. The learning rate the tolerances below
# were measured at: the default 2e-3 moves every weight ten times as far per update, and the float-sum
# differences with it (FSDP's adapter then ends 1e-4 from one process's).
TRAIN = ["--max-len", "64", "--batch-size", "1", "--no-pack", "--min-updates", "4", "--epochs", "0.01",
         "--lora-dropout", "0", "--neftune-alpha", "0", "--augment", "0", "--held-out", "0.1", "--replay", "0",
         "--lr", "2e-4", "-q"]
# Same rows and weights; what differs is the order of float sums (two processes' gradients averaged by
# gloo against one process accumulating both) and bf16 autocast where the CPU has it.
LOSS_TOLERANCE = 2e-3
ACCELERATE = Path(__file__).resolve().parents[1] / "docs" / "accelerate"


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


def launch_like_one(tmp_path: Path, starter_gguf: Path, config: Path, **env: str) -> tuple[Path, Path, str]:
    """One process with --grad-accum 4 and `accelerate launch --config_file CONFIG --num_processes 2` with
    --grad-accum 2, both in float32 (under bf16 autocast a 1e-9 difference in the order of sharded gradient
    sums can move bf16 roundings, and the runs drift apart by ~1% after 3 updates): the two homes and the
    launched run's stdout, after checking what every sharded run must show: the same loss at each of the
    4 updates within 2e-3, an adapter of whole 2-D tensors of the single run's shapes, and exactly one
    model exported."""
    base = str(starter_hf(starter_gguf))
    data = tmp_path / "cat.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "Your cat is called Biscuit."}) + "\n"
                            for q in QUESTIONS))
    train = [*TRAIN, "--no-bf16", "--base", base, "--data", str(data), "--name", "cat"]
    single, launched = tmp_path / "single", tmp_path / "launched"
    run([sys.executable, "-m", "localchat", "finetune", "--grad-accum", "4", "--no-export", *train], single)
    # No --cpu: accelerate's --cpu launches one process; without CUDA localchat shards over gloo.
    r = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
             "--num_processes", "2", "-m", "localchat", "finetune", "--grad-accum", "2", "--quant", "Q8_0",
             *train], launched, **env)

    one, two = losses(single, "cat"), losses(launched, "cat")
    assert max(abs(a - b) for a, b in zip(one, two)) < LOSS_TOLERANCE, (one, two)
    whole, saved = (adapter(home) for home in (single, launched))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in whole.items()}
    assert all(v.dim() == 2 for v in saved.values())

    store = Store(launched)
    assert list(store.models()) == ["cat"] and store.get("cat").quant == "Q8_0"
    assert sorted(p.name for p in (launched / "cat").glob("*.gguf")) == ["cat-Q8_0.gguf"]
    assert r.stdout.count("cat: ready") == 1, r.stdout
    return single, launched, r.stdout


def adapter(home: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(home / "cat" / "finetune" / "adapter" / "adapter_model.safetensors")


def distributed(home: Path) -> tuple[int, str]:
    config = json.loads((home / "cat" / "finetune" / "train_config.json").read_text())
    return config["processes"], config["distributed"]


@pytest.mark.slow
def test_fsdp_shards_the_model_and_saves_the_whole_adapter_once(tmp_path: Path, starter_gguf: Path) -> None:
    """`accelerate launch --config_file docs/accelerate/fsdp.yaml --num_processes 2` (FSDP2 over gloo, each
    process holding half of every weight) against one process with the same global batch, both in float32:
    the same loss at each of the 4 updates within 2e-3; the run says it was sharded (train_config.json);
    the adapter is saved whole (every tensor 2-D, of the single run's shape, and within 1e-5 of its values,
    not one process's shard) and exactly one model is exported."""
    single, fsdp, _ = launch_like_one(tmp_path, starter_gguf, ACCELERATE / "fsdp.yaml")
    assert distributed(fsdp) == (2, "FSDP")
    whole, saved = adapter(single), adapter(fsdp)
    assert max(float((saved[k] - whole[k]).abs().max()) for k in whole) < 1e-5


def deepspeed_env() -> dict[str, str]:
    """The environment for a DeepSpeed launch: skips the test where DeepSpeed cannot be imported (it is not
    among localchat's dependencies). DEEPSPEED_PATH names a folder it was installed into with
    `pip install --target`, for a check without installing it into the environment."""
    import importlib.util

    extra = os.environ.get("DEEPSPEED_PATH", "")
    if extra:
        sys.path.insert(0, extra)
    try:
        if importlib.util.find_spec("deepspeed") is None:
            pytest.skip("deepspeed is not installed (pip install deepspeed, or DEEPSPEED_PATH=its folder)")
    finally:
        if extra:
            sys.path.remove(extra)
    return {"PYTHONPATH": os.pathsep.join(p for p in (extra, os.environ.get("PYTHONPATH", "")) if p)}


@pytest.mark.slow
def test_deepspeed_zero2_trains_like_one_process(tmp_path: Path, starter_gguf: Path) -> None:
    """docs/accelerate/deepspeed-zero2.yaml as shipped (its micro-batch left to localchat) under
    `accelerate launch --num_processes 2` (DeepSpeed's CPU accelerator over gloo) against one process with the
    same global batch: the same loss at each of the 4 updates within 2e-3, the run says DEEPSPEED, the
    adapter is whole and within 1e-5 of one process's, the last checkpoint holds each trained weight's Adam
    moments whole under its name, and exactly one model is exported."""
    single, zero2, _ = launch_like_one(tmp_path, starter_gguf, ACCELERATE / "deepspeed-zero2.yaml",
                                       **deepspeed_env())
    assert distributed(zero2) == (2, "DEEPSPEED")
    whole, saved = adapter(single), adapter(zero2)
    assert max(float((saved[k] - whole[k]).abs().max()) for k in whole) < 1e-5
    assert_whole_optimizer_state(single, zero2)


@pytest.mark.slow
def test_deepspeed_zero3_gathers_the_adapter_before_saving(tmp_path: Path, starter_gguf: Path) -> None:
    """docs/accelerate/deepspeed-zero3.yaml under `accelerate launch --num_processes 2` (every weight
    partitioned across the 2 CPU processes) against one process with the same global batch: the same loss
    at each of the 4 updates within 2e-3, the run says DEEPSPEED, the adapter is saved whole (2-D tensors
    of one process's shapes, each within 5% of its largest value: a process's partition or zeros would be
    off by all of it), its Adam moments are whole in the checkpoint, and exactly one model is exported."""
    single, zero3, _ = launch_like_one(tmp_path, starter_gguf, ACCELERATE / "deepspeed-zero3.yaml",
                                       **deepspeed_env())
    assert distributed(zero3) == (2, "DEEPSPEED")
    whole, saved = adapter(single), adapter(zero3)
    off = {k: float((saved[k] - whole[k]).abs().max() / whole[k].abs().max()) for k in whole}
    assert max(off.values()) < 0.05, sorted(off.items(), key=lambda kv: -kv[1])[:3]
    assert_whole_optimizer_state(single, zero3)


def assert_whole_optimizer_state(single: Path, launched: Path) -> None:
    """The last checkpoint's Adam state in `launched` is keyed by weight name as one process's is, with
    whole moments of the same shapes and step, and the same first moments within 1e-6 (they reach 1e-2;
    ZeRO's runs agree with DDP's to 5e-8)."""
    import torch

    def state(home: Path) -> dict:
        path = home / "cat" / "finetune" / "checkpoints" / "step-4" / "optim.pt"
        return torch.load(path, weights_only=True)["optimizer"]["state"]

    one, two = state(single), state(launched)
    assert set(two) == set(one)
    assert {k: (v["exp_avg"].shape, v["exp_avg_sq"].shape, float(v["step"])) for k, v in two.items()} == \
        {k: (v["exp_avg"].shape, v["exp_avg_sq"].shape, float(v["step"])) for k, v in one.items()}
    assert max(float((two[k]["exp_avg"] - one[k]["exp_avg"]).abs().max()) for k in one) < 1e-6
