"""Qwen2 (Qwen2ForCausalLM): biased Q/K/V projections and NeoX-style RoPE, so no reordering."""

from __future__ import annotations

from .base import ArchConverter
from .llama import LLAMA_LAYER_NAMES


class Qwen2Converter(ArchConverter):
    gguf_arch = "qwen2"
    layer_names = {
        **LLAMA_LAYER_NAMES,
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
    }
