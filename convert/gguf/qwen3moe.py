"""Qwen3-MoE (Qwen3MoeForCausalLM: Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (per-head Q/K norms,
explicit head_dim, NeoX RoPE) with a mixture of experts in every block; no shared expert. Each
expert's width is `moe_intermediate_size`.

llama.cpp's qwen3moe always renormalizes the top-k router weights and makes every block sparse, so a
config that turns either off (norm_topk_prob false; mlp_only_layers or decoder_sparse_step leaving
dense blocks) is refused, naming the field, rather than converted into a model that answers differently.
"""

from __future__ import annotations

import gguf

from ..checkpoint import CheckpointError, HFConfig
from .moe import MoeConverter
from .qwen3 import Qwen3Converter


class Qwen3MoeConverter(MoeConverter, Qwen3Converter):
    gguf_arch = "qwen3moe"
    layer_names = {
        **{k: v for k, v in Qwen3Converter.layer_names.items() if not k.startswith("mlp.")},
        "mlp.gate.weight": "ffn_gate_inp.weight",
    }
    expert_names = {
        "mlp.experts.*.gate_proj.weight": "ffn_gate_exps.weight",
        "mlp.experts.*.up_proj.weight": "ffn_up_exps.weight",
        "mlp.experts.*.down_proj.weight": "ffn_down_exps.weight",
    }

    def __init__(self, config: HFConfig) -> None:
        super().__init__(config)
        # transformers' defaults where the field is missing: no renormalization, every block sparse.
        if not config.get("norm_topk_prob", default=False):
            raise CheckpointError(f"{config.path}: norm_topk_prob is false, but llama.cpp's qwen3moe always "
                                  "renormalizes the chosen experts' weights")
        if dense := config.get("mlp_only_layers", default=[]):
            raise CheckpointError(f"{config.path}: mlp_only_layers makes blocks {dense} dense, but llama.cpp's "
                                  "qwen3moe has experts in every block")
        if (step := int(config.get("decoder_sparse_step", default=1))) != 1:
            raise CheckpointError(f"{config.path}: decoder_sparse_step is {step}, so only every {step}th block "
                                  "has experts, but llama.cpp's qwen3moe has them in every block")

    def expert_width(self) -> int:
        return int(self.config.require("moe_intermediate_size"))

    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        super().add_metadata(w)
        w.add_expert_feed_forward_length(self.expert_width())
