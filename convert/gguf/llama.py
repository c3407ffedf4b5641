"""The llama family: LLaMA 1/2/3, Vicuna, Alpaca, SmolLM, TinyLlama, Coati (LlamaForCausalLM)."""

from __future__ import annotations

import math

import torch

from .base import ArchConverter

LLAMA_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF stores Q/K rows grouped as (first halves, second halves) of each head for its
    rotate-half RoPE; llama.cpp's 'normal' RoPE wants the two halves interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class LlamaConverter(ArchConverter):
    gguf_arch = "llama"
    layer_names = LLAMA_LAYER_NAMES

    def transform(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        if gguf_name.endswith("attn_q.weight"):
            return unpermute_rope(t, self.n_head)
        if gguf_name.endswith("attn_k.weight"):
            return unpermute_rope(t, self.n_head_kv)
        return t

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Llama 3.1-style rope scaling becomes a per-frequency factor tensor."""
        s = self.config.rope_scaling
        if not s or (s.get("rope_type") or s.get("type")) != "llama3":
            return {}
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_ctx = float(s["original_max_position_embeddings"])
        base = self.config.rope_theta
        # The inverse frequencies in float32, as transformers computes them for the model.
        inv_freq = 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        factors = []
        for f in inv_freq.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high:
                factors.append(1.0)
            elif wavelen > old_ctx / low:
                factors.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / factor + smooth))
        return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}
