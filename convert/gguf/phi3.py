"""Phi-3 (Phi-3/3.5 mini and medium, Phi-4-mini: Phi3ForCausalLM).

The block fuses Q, K and V into one `qkv_proj` and the MLP's gate and up into one `gate_up_proj`;
llama.cpp keeps both fused (attn_qkv, and ffn_up at twice the MLP width, gate half first) and rotates
NeoX-style, so tensors are copied as they are. Long-context models carry LongRoPE: per-frequency
factors for short and long contexts (llama.cpp picks one by n_ctx against the original context, as
transformers does by sequence length) and an attention scale from the context extension. Phi-4-mini
rotates only part of each head (`partial_rotary_factor`) and ties its embeddings.
"""

from __future__ import annotations

import math
from typing import Any

import gguf
import torch

from ..checkpoint import CheckpointError
from .base import ArchConverter


class Phi3Converter(ArchConverter):
    gguf_arch = "phi3"
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }

    def _rope(self, key: str, default: Any = None) -> Any:
        """A rope setting from rope_scaling/rope_parameters or, in older configs, the top level."""
        params = self.config.data.get("rope_parameters") or self.config.data.get("rope_scaling") or {}
        return params[key] if params.get(key) is not None else self.config.get(key, default=default)

    def lora_modules(self) -> dict[str, tuple[int, int]]:
        h, i = self.n_embd, int(self.config.require("intermediate_size"))
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}

    def rope_dims(self) -> int:
        return int(float(self._rope("partial_rotary_factor", 1.0)) * self.n_embd) // self.n_head

    def _orig_ctx(self) -> int:
        return int(self._rope("original_max_position_embeddings",
                              self.config.get("max_position_embeddings", default=4096)))

    def _longrope(self) -> tuple[list[float], list[float]] | None:
        """(long, short) factors, checked against the rotated dimensions; None without LongRoPE."""
        s = self.config.rope_scaling
        if not s or not s.get("long_factor"):
            return None
        kind = s.get("rope_type") or s.get("type")
        if kind not in ("longrope", "su"):
            raise CheckpointError(f"{self.config.path}: rope scaling {kind!r} is not supported for Phi-3")
        long, short = s.get("long_factor"), s.get("short_factor")
        n = self.rope_dims() // 2
        for key, f in (("long_factor", long), ("short_factor", short)):
            if not isinstance(f, list) or len(f) != n:
                raise CheckpointError(f"{self.config.path}: rope_scaling.{key} must list {n} factors "
                                      f"(half of the {self.rope_dims()} rotated dimensions)")
        return [float(x) for x in long], [float(x) for x in short]

    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        super().add_metadata(w)
        # llama.cpp runs Phi-3's sliding window as full attention; 0 marks "none", as its converter writes.
        w.add_sliding_window(int(self.config.get("sliding_window", default=None) or 0))

    def add_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_orig_ctx_len(self._orig_ctx())
        if self._longrope() is None:
            return
        scale = int(self.config.require("max_position_embeddings")) / self._orig_ctx()
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(self._orig_ctx()))
                                        if scale > 1.0 else 1.0)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        factors = self._longrope()
        if factors is None:
            return {}
        return {"rope_factors_long.weight": torch.tensor(factors[0], dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(factors[1], dtype=torch.float32)}
