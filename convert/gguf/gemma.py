"""Gemma 2 and Gemma 3 text models (Gemma2ForCausalLM, Gemma3ForCausalLM).

Both keep RMSNorm weights as offsets from 1 (the norm multiplies by 1 + w), which llama.cpp wants
added back; scale the embeddings by sqrt(hidden) (llama.cpp does that itself); norm the attention and
MLP outputs again after each (post norms) and the MLP's input separately (pre-feedforward norm); mix
sliding-window and global layers (Gemma 2 alternates, Gemma 3 has five local to one global, with its
own RoPE base on the local ones); tie the output layer to the embeddings; rotate NeoX-style.
Gemma 2 soft-caps attention scores and final logits; Gemma 3 drops the attention cap and adds per-head
RMS norms on Q and K. llama.cpp scales queries by 1/sqrt(head_dim) (by hidden/heads for the 27B
sizes) and reads no setting for it, so a `query_pre_attn_scalar` that disagrees is refused.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gguf
import torch

from ..checkpoint import CheckpointError, HFConfig
from .base import ArchConverter
from .llama import LLAMA_LAYER_NAMES

GEMMA2_LAYER_NAMES = {
    **LLAMA_LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


class Gemma2Converter(ArchConverter):
    gguf_arch = "gemma2"
    layer_names = GEMMA2_LAYER_NAMES
    # Layer counts of the sizes whose queries llama.cpp scales by hidden/heads instead of head_dim.
    wide_scale_layers: ClassVar[tuple[int, ...]] = (46,)

    def __init__(self, config: HFConfig) -> None:
        super().__init__(config)
        if not self.tied:
            raise CheckpointError(f"{config.path}: tie_word_embeddings is false, but llama.cpp's {self.gguf_arch} "
                                  "always computes logits from the token embeddings")
        scalar = config.get("query_pre_attn_scalar", default=None)
        want = self.n_embd // self.n_head if self.n_layers in self.wide_scale_layers else self.head_dim
        if scalar is not None and int(scalar) != want:
            raise CheckpointError(f"{config.path}: query_pre_attn_scalar is {scalar}, but llama.cpp scales "
                                  f"queries of a {self.n_layers}-layer {self.gguf_arch} model by 1/sqrt({want})")

    def transform(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        return t.float() + 1 if gguf_name.endswith("norm.weight") else t

    def gguf_name(self, hf_name: str) -> str | None:
        return None if hf_name == "lm_head.weight" else super().gguf_name(hf_name)

    def _layer_types(self) -> list[str] | None:
        types = self.config.get("layer_types", default=None)
        if types is not None and len(types) != self.n_layers:
            raise CheckpointError(f"{self.config.path}: layer_types lists {len(types)} layers, "
                                  f"num_hidden_layers is {self.n_layers}")
        return types

    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        super().add_metadata(w)
        c = self.config
        if (cap := c.get("attn_logit_softcapping", default=None)) is not None:
            w.add_attn_logit_softcapping(float(cap))
        if (cap := c.get("final_logit_softcapping", default=None)) is not None:
            w.add_final_logit_softcapping(float(cap))
        types = self._layer_types()
        if types is None or "sliding_attention" in types:
            w.add_sliding_window(int(c.require("sliding_window")))
        if types is not None:  # which layers slide, rather than llama.cpp's default pattern
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])


class Gemma3Converter(Gemma2Converter):
    gguf_arch = "gemma3"
    layer_names = {
        **GEMMA2_LAYER_NAMES,
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
    }
    wide_scale_layers = (62,)

    def _rope_params(self, kind: str) -> dict[str, Any]:
        """RoPE settings of the global ('full_attention') or local ('sliding_attention') layers:
        transformers 5 nests them in rope_parameters, older configs keep rope_theta/rope_scaling and
        rope_local_base_freq at the top level."""
        params = self.config.data.get("rope_parameters") or {}
        if kind in params:
            return params[kind]
        if kind == "sliding_attention":
            return {"rope_theta": self.config.get("rope_local_base_freq", default=10000.0)}
        return {**(self.config.data.get("rope_scaling") or {}), "rope_theta": self.config.rope_theta}

    def rope_theta(self) -> float:
        return float(self._rope_params("full_attention").get("rope_theta") or 1_000_000.0)

    def add_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        w.add_rope_freq_base_swa(float(self._rope_params("sliding_attention")["rope_theta"]))
        scaling = self._rope_params("full_attention")
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind == "linear":  # the 4B-27B sizes stretch only the global layers' positions
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        elif kind not in (None, "default"):
            raise CheckpointError(f"{self.config.path}: rope scaling {kind!r} is not supported for Gemma 3")
