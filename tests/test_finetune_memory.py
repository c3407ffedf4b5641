"""The training memory estimate: checked against a real run's peak RSS, used to choose the
shape on a GPU and to refuse before loading anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from localchat.finetune.memory import GIB, ModelShape, NotEnoughMemory, check, choose_shape, estimate
from localchat.store import Store

from .checkpoints import starter_hf

LLAMA_7B = ModelShape.from_config(transformers.LlamaConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, architectures=["LlamaForCausalLM"]))
CARD_8GB_FREE = int(7.6 * GIB)  # what an 8 GB card has free with a desktop running


def _need(shape: ModelShape, max_len: int, batch: int, qlora: bool):
    """The default run's estimate: replay with its KL target on."""
    return estimate(shape, shape.default_targets, 16, max_len, batch, qlora=qlora, weight_bytes=2, checkpointing=True,
                    device="cuda", replay_kl=True)


def test_llama_7b_qlora_fits_an_8gb_card_and_plain_lora_is_refused() -> None:
    assert 6.4e9 < LLAMA_7B.linear_params < 6.6e9  # the 7B shape: 6.5B in the linear layers
    budget = int(CARD_8GB_FREE * 0.9)
    shape = choose_shape(lambda n, b: _need(LLAMA_7B, n, b, True).total <= budget, None, None)
    # 512 x 2, which peaked at 5.5 GiB in torch's allocator on an H200 (README, bench/gpu_memory_fit.py); 1024 x 2
    # peaked at 7.4 GiB there, too much beside an 8 GB card's CUDA context.
    assert shape == (512, 2), shape
    need = _need(LLAMA_7B, *shape, True)
    assert 3.4 * GIB < need.weights < 3.8 * GIB  # NF4 base: ~0.52 bytes a weight
    assert need.total < 8 * GIB
    with pytest.raises(NotEnoughMemory, match=r"training needs 1[0-9]\.\d\d GiB, has 6\.84 GiB free on the GPU"):
        check(_need(LLAMA_7B, 512, 1, False), budget, "on the GPU")


# Published MoE shapes and total parameter counts.
MOE = {
    "mixtral-8x7b": (transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, architectures=["MixtralForCausalLM"]),
        46.7e9),
    "qwen3-30b-a3b": (transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, architectures=["Qwen3MoeForCausalLM"]), 30.5e9),
}


@pytest.mark.parametrize("model", list(MOE))
def test_moe_estimate_holds_every_expert_and_adapts_attention(model: str) -> None:
    """An MoE model is fine-tuned on its attention projections (the family's LoRA modules), but the
    estimate holds the whole base, experts included (QLoRA quantizes linear layers only, so they stay at
    two bytes a weight): even QLoRA is refused on a 24 GB card, naming what the run needs."""
    shape = ModelShape.from_config(MOE[model][0])
    assert shape.default_targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert abs(shape.linear_params + shape.other_params - MOE[model][1]) < 0.01 * MOE[model][1]
    need = _need(shape, 512, 1, qlora=True)
    assert need.weights > 2 * 0.99 * (MOE[model][1] - shape.linear_params)  # all but attention at 2 bytes
    with pytest.raises(NotEnoughMemory, match=rf"training needs {need.total / GIB:.2f} GiB, has 22\.00 GiB free"):
        check(need, 22 * GIB, "on the GPU", qlora=True)


def test_a_user_shape_is_kept() -> None:
    assert choose_shape(lambda n, b: True, 300, None) == (300, 8)
    assert choose_shape(lambda n, b: n * b <= 1024, None, 1) == (1024, 1)
    assert choose_shape(lambda n, b: False, None, None) is None


def test_estimate_is_within_a_quarter_of_a_real_runs_peak(tmp_path: Path, starter_gguf: Path) -> None:
    """The default CPU run (one packed 512-token row a step) on the starter, in its own process."""
    data = tmp_path / "chats.jsonl"
    data.write_text(Path(__file__).parents[1].joinpath("localchat/data/eval_chats.jsonl").read_text() * 2)
    out = tmp_path / "out"
    code = ("import sys; from pathlib import Path; from localchat.datasets import load_dataset; "
            "from localchat.finetune.settings import TrainSettings; from localchat.finetune.train import train; "
            "train(Path(sys.argv[1]), load_dataset(sys.argv[2], held_out=0.0), Path(sys.argv[3]), "
            "TrainSettings(epochs=1.0, min_updates=1, held_out=0.0), quiet=True); "
            "from localchat.hardware.memory import peak_rss; print(peak_rss())")
    # The child's own high-water mark (VmHWM, from its exec on): getrusage's ru_maxrss would also count
    # the pytest process it was forked from, gigabytes late in the suite.
    proc = subprocess.run([sys.executable, "-c", code, str(starter_hf(starter_gguf)), str(data), str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.split()[-1])
    config = json.loads((out / "train_config.json").read_text())
    assert (config["max_len"], config["batch_size"]) == (512, 1)
    ratio = config["memory_estimate_bytes"] / peak
    assert 0.8 < ratio < 1.25, (ratio, config["memory_estimate"], peak / GIB)
    # The peak the run reports is its own (read before it saved the adapter), not its parent's: pytest's.
    assert 0.9 * peak <= config["memory_peak_bytes"] <= peak, (config["memory_peak_bytes"] / GIB, peak / GIB)


def test_a_run_that_cannot_fit_is_refused_before_loading(home: Store, tmp_path: Path, starter_gguf: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n' * 4)
    r = subprocess.run([sys.executable, "-m", "localchat", "finetune", "--base", str(starter_hf(starter_gguf)),
                        "--data", str(data), "--name", "huge", "--max-len", "131072", "--batch-size", "64", "-q"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "training needs" in r.stderr and "GiB free in RAM" in r.stderr and "lower --max-len" in r.stderr
    assert not (home.root / "huge" / "finetune" / "adapter").exists()


def test_resume_keeps_the_shape_the_run_started_with(tmp_path: Path) -> None:
    """Free memory or localchat's defaults may differ at --resume; the shape, the rows and their order must not."""
    from localchat.finetune.settings import TrainSettings
    from localchat.finetune.train import shape_of_run

    (tmp_path / "train_config.json").write_text(json.dumps({"max_len": 1024, "batch_size": 2}))
    s = shape_of_run(tmp_path, TrainSettings())
    assert (s.max_len, s.batch_size) == (1024, 2)
    assert shape_of_run(tmp_path, TrainSettings(batch_size=3)).batch_size == 3  # the user's flag wins
    assert shape_of_run(tmp_path / "none", TrainSettings()).max_len is None
    # What decides the rows and their updates is the run's own, whatever today's defaults: a run from before
    # --augment had none, and its 30 updates stay 30.
    (tmp_path / "train_config.json").write_text(json.dumps({"max_len": 1024, "batch_size": 2, "min_updates": 30}))
    s = shape_of_run(tmp_path, TrainSettings())
    assert (s.augment, s.min_updates, s.epochs, s.seed) == (0, 30, 3.0, 0)
    (tmp_path / "train_config.json").write_text(json.dumps({"augment": 2, "augment_drop": 0.5, "seed": 7}))
    s = shape_of_run(tmp_path, TrainSettings())
    assert (s.augment, s.augment_drop, s.seed) == (2, 0.5, 7)
    # A run that held out a tenth of its 24 rows (the default then) keeps them out when resumed.
    (tmp_path / "train_config.json").write_text(json.dumps({"held_out": 0.1}))
    assert shape_of_run(tmp_path, TrainSettings()).held_out == 0.1
