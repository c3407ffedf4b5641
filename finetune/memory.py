"""How much memory a LoRA / QLoRA run takes, before it starts: to pick the sequence length
and batch from the memory at hand, and to refuse with "needs X, has Y" instead of dying
of an out-of-memory error an hour in.

The estimate is the frozen base as stored (NF4 for QLoRA: 4 bits plus a scale per 64
weights, and a second-level scale for those), the LoRA weights with their gradients and
Adam state (16 bytes per parameter), the activations autograd keeps (all layers', or one
layer's plus the checkpointed inputs), the output layer on the trained positions, and
the runtime itself. It errs high: refusing a run that would have fitted costs a smaller
batch, the other mistake costs the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localchat.hardware.report import GIB

NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits; an 8-bit scale per 64; fp32 per 256 scales
LORA_STATE_BYTES = 4 + 4 + 8  # float32 weight, gradient, Adam's two moments
# Per token and layer, in activations of the compute dtype: q/k/v/o and MLP outputs, norms,
# attention output, the LoRA dropout masks and copies of each adapted input. Fitted to the
# peak RSS of starter runs from 512 to 4096 tokens a step, with and without checkpointing
# and QLoRA (within 10% there; tests/test_finetune_memory.py keeps one such check).
ACT_PER_HIDDEN = 30
ACT_PER_INTERMEDIATE = 8
LOGIT_BYTES = 4 + 4 + 4  # float32 logits, log-softmax, its gradient (the bf16 matmul output aside)
# Replay with a KL target (--replay-kl) also holds the base's distribution over a replay micro-batch: its
# logits, their float32 copy, log-softmax and probabilities. Fitted on an H200 (bench/gpu_memory_fit.py): a
# LLaMA-2-7B-shaped QLoRA run at 1024 x 2 tokens allocated 0.95 GiB more with replay than without (16 bytes
# a token and vocabulary entry), and torch's allocator kept up to 1.55 GiB more than it allocated.
REPLAY_KL_LOGIT_BYTES = 16
# The CUDA context and cuBLAS workspace; on a CPU torch, transformers and the loading of the base.
RUNTIME_BYTES = {"cuda": 700 * 1024**2, "cpu": 1200 * 1024**2}
# Shapes tried, largest first: (tokens per sequence, sequences per step).
SHAPES = ((2048, 8), (2048, 4), (1024, 4), (1024, 2), (512, 2), (512, 1), (256, 1))


class NotEnoughMemory(RuntimeError):
    """The run does not fit; the message says what it needs and what there is."""


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int  # MLP activations a token makes in a block (an MoE block: those of its top-k experts)
    vocab: int
    tied: bool
    modules: tuple[tuple[str, int, int], ...]  # (name, in, out) of each linear layer in a block
    # Weights per block in matrices that are no LoRA modules (an MoE block's experts and router): they
    # stay in the base's dtype under QLoRA too, since bitsandbytes quantizes linear layers only.
    frozen: int = 0

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelShape":
        """From a transformers config (or config.json's dict); the block's linear layers are the ones
        its architecture declares (localchat.convert.gguf), so a fused or renamed layer is counted right,
        and so are the weights beside them (MoE experts) and the MLP width a token activates."""
        from localchat.convert.checkpoint import HFConfig
        from localchat.convert.gguf import converter_for

        data = cfg if isinstance(cfg, dict) else cfg.to_dict()
        conv = converter_for(HFConfig(Path(str(data.get("_name_or_path") or ".")) / "config.json", data))
        modules = tuple((name, a, b) for name, (a, b) in conv.lora_modules().items())
        return cls(layers=conv.n_layers, hidden=conv.n_embd, intermediate=conv.mlp_width(),
                   vocab=int(conv.config.require("vocab_size")), tied=conv.tied, modules=modules,
                   frozen=conv.block_weights() - sum(a * b for _, a, b in modules))

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelShape":
        from localchat.convert.checkpoint import read_config

        return cls.from_config(read_config(folder).data | {"_name_or_path": str(folder)})

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in a block, by the names LoRA targets."""
        return {name: (a, b) for name, a, b in self.modules}

    @property
    def default_targets(self) -> tuple[str, ...]:
        """Every linear layer of a block: what `localchat finetune` adapts unless told otherwise."""
        return tuple(name for name, _, _ in self.modules)

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.module_shapes().values())

    @property
    def other_params(self) -> int:
        """Embeddings (and an untied output layer), norms and a block's other matrices: never quantized."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * (2 * self.hidden + self.frozen) + self.hidden


@dataclass(frozen=True)
class TrainMemory:
    weights: int
    lora: int
    activations: int
    logits: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.lora + self.activations + self.logits + self.runtime

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GIB:.2f}" for k in
                          ("weights", "lora", "activations", "logits", "runtime"))
        return f"{self.total / GIB:.2f} GiB ({parts})"


def estimate(shape: ModelShape, targets: tuple[str, ...], rank: int, max_len: int, batch: int, *,
             qlora: bool, weight_bytes: int, checkpointing: bool, device: str,
             replay_kl: bool = False) -> TrainMemory:
    """Peak memory of one training step; `weight_bytes` is 2 for a bf16/fp16 base, 4 for float32."""
    modules = shape.module_shapes()
    unknown = [t for t in targets if t not in modules]
    if unknown:  # a user's target that is no linear layer of a block: assume the widest
        widest = max(modules.values(), key=lambda s: s[0] + s[1])
        modules = {**modules, **{t: widest for t in unknown}}
    lora_params = shape.layers * sum(rank * sum(modules[t]) for t in targets)
    if qlora:
        weights = int(shape.linear_params * NF4_BYTES_PER_WEIGHT) + shape.other_params * weight_bytes
    else:
        weights = (shape.linear_params + shape.other_params) * weight_bytes
    tokens = max_len * batch
    act_bytes = 2 if (qlora or weight_bytes == 2) else 4
    per_layer = tokens * (ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.intermediate) * act_bytes
    if checkpointing:  # each block's input kept, one block's activations alive at a time
        activations = shape.layers * tokens * shape.hidden * act_bytes + per_layer
    else:
        activations = shape.layers * per_layer
    logits = tokens * shape.vocab * (LOGIT_BYTES + (REPLAY_KL_LOGIT_BYTES if replay_kl else 0))
    return TrainMemory(weights, lora_params * LORA_STATE_BYTES, activations, logits, RUNTIME_BYTES[device])


def choose_shape(fits: Any, max_len: int | None, batch: int | None,
                 shapes: tuple[tuple[int, int], ...] = SHAPES) -> tuple[int, int] | None:
    """The largest (max_len, batch) for which `fits(max_len, batch)` holds; the user's values stay."""
    for length, size in shapes:
        length, size = max_len or length, batch or size
        if fits(length, size):
            return length, size
    return None


def check(need: TrainMemory, has: int, where: str, qlora: bool = False) -> None:
    if need.total > has:
        raise NotEnoughMemory(f"training needs {need.total / GIB:.2f} GiB, has {has / GIB:.2f} GiB free {where} "
                              f"({need.describe()}); lower --max-len or --batch-size"
                              + ("" if qlora else ", or use --qlora"))
