"""Qwen3 (Qwen3ForCausalLM): per-head RMS norms on Q and K before RoPE, no Q/K/V bias, an explicit
head_dim, NeoX-style RoPE (so no row reordering), tied embeddings on the small sizes."""

from __future__ import annotations

from .base import ArchConverter
from .llama import LLAMA_LAYER_NAMES


class Qwen3Converter(ArchConverter):
    gguf_arch = "qwen3"
    layer_names = {
        **LLAMA_LAYER_NAMES,
        "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight",
    }
