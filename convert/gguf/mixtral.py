"""Mixtral (MixtralForCausalLM): Mistral's attention with a mixture of experts in place of the MLP.
llama.cpp runs it as the llama architecture with expert tensors: Q/K rows reordered for its RoPE as
LLaMA's, each layer's eight (w1 gate, w3 up, w2 down) expert matrices stacked, the router as
ffn_gate_inp. The top-k weights are always renormalized, in transformers and llama.cpp alike."""

from __future__ import annotations

from .llama import LLAMA_LAYER_NAMES, LlamaConverter
from .moe import MoeConverter


class MixtralConverter(MoeConverter, LlamaConverter):
    gguf_arch = "llama"
    layer_names = {
        **{k: v for k, v in LLAMA_LAYER_NAMES.items() if not k.startswith("mlp.")},
        "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    }
    expert_names = {
        "block_sparse_moe.experts.*.w1.weight": "ffn_gate_exps.weight",
        "block_sparse_moe.experts.*.w3.weight": "ffn_up_exps.weight",
        "block_sparse_moe.experts.*.w2.weight": "ffn_down_exps.weight",
    }
