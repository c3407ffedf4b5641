"""The small interface each architecture implements to become GGUF."""

from __future__ import annotations

import re
from typing import ClassVar

import gguf
import torch

from ..checkpoint import CheckpointError, HFConfig


class UnknownTensor(CheckpointError):
    pass


class ArchConverter:
    """Everything the project knows about one HF architecture: llama.cpp's tensor names and
    layouts and metadata for conversion, and the block's linear layers for LoRA fine-tuning.

    Subclasses set `gguf_arch`, the top-level and per-layer name tables, override `transform`
    where llama.cpp wants a tensor laid out differently, `stack_slot` where llama.cpp stacks several
    HF tensors into one (an MoE layer's experts), and `lora_modules` where a block's linear layers are
    not LLaMA's.
    """

    gguf_arch: ClassVar[str]
    top_names: ClassVar[dict[str, str]] = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names: ClassVar[dict[str, str]] = {}
    # GGUF matrices (by name suffix) llama.cpp keeps in F32 whatever the file type.
    keep_f32: ClassVar[tuple[str, ...]] = ()
    _layer = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

    def __init__(self, config: HFConfig) -> None:
        self.config = config
        c = config
        self.n_layers = int(c.require("num_hidden_layers"))
        self.n_embd = int(c.require("hidden_size"))
        self.n_head = int(c.require("num_attention_heads"))
        self.n_head_kv = int(c.get("num_key_value_heads", default=self.n_head))
        self.head_dim = int(c.get("head_dim", default=self.n_embd // self.n_head))
        self.tied = bool(c.get("tie_word_embeddings", default=False))

    def lora_modules(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of a block, by the module names PEFT targets:
        fine-tuning adapts these by default and its memory estimate counts them. This is LLaMA's
        block (attention projections and a gated MLP); families with fused or other layers override it."""
        h, i = self.n_embd, int(self.config.require("intermediate_size"))
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def block_weights(self) -> int:
        """Weights in a block's matrices, adapted or not: the frozen base fine-tuning holds per layer.
        A block whose matrices are all LoRA modules holds just those."""
        return sum(a * b for a, b in self.lora_modules().values())

    def mlp_width(self) -> int:
        """How many MLP activations one token makes in a block (fine-tuning's activation estimate)."""
        return int(self.config.require("intermediate_size"))

    def stack_slot(self, hf_name: str) -> tuple[str, int, int] | None:
        """For an HF tensor that is one slice of a GGUF tensor stacked from several: (the GGUF name,
        the slice's index along the stack's new first axis, how many slices the stack holds). None for
        a tensor that becomes a GGUF tensor of its own through `gguf_name`, as in dense families."""
        return None

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of an HF tensor, None to leave it out, UnknownTensor if unexpected."""
        if hf_name == "lm_head.weight" and self.tied:
            return None  # llama.cpp reuses token_embd for a tied output layer
        if hf_name in self.top_names:
            return self.top_names[hf_name]
        m = self._layer.match(hf_name)
        if m and m.group(2) in self.layer_names:
            if int(m.group(1)) >= self.n_layers:
                raise UnknownTensor(f"tensor {hf_name!r} is for layer {m.group(1)}, but the config has "
                                    f"{self.n_layers} layers")
            return f"blk.{m.group(1)}.{self.layer_names[m.group(2)]}"
        raise UnknownTensor(f"tensor {hf_name!r} is not part of a {self.config.architecture} model")

    def transform(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` laid out as llama.cpp wants `gguf_name` (each slice on its own, for a stacked tensor)."""
        return t

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors llama.cpp needs that the checkpoint does not hold (e.g. rope factors)."""
        return {}

    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        w.add_context_length(int(c.get("max_position_embeddings", default=2048)))
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layers)
        w.add_feed_forward_length(int(c.require("intermediate_size")))
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(self.rope_theta())
        w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", default=1e-6)))
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_vocab_size(int(c.require("vocab_size")))
        w.add_rope_dimension_count(self.rope_dims())
        self.add_rope_scaling(w)

    def rope_theta(self) -> float:
        """RoPE's base frequency (of the global layers, where a family has local ones too)."""
        return self.config.rope_theta

    def rope_dims(self) -> int:
        """How many of each head's dimensions RoPE rotates: all of them unless a family rotates part."""
        return self.head_dim

    def add_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        """Metadata for the config's rope scaling; families with their own kind of scaling override it."""
        c = self.config
        scaling = c.rope_scaling
        kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))  # type: ignore[index]
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(scaling["factor"]))  # type: ignore[index]
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))  # type: ignore[index]
        elif kind not in (None, "llama3"):
            raise CheckpointError(f"{c.path}: rope scaling {kind!r} is not supported yet")
