"""Mixture-of-experts blocks: what Mixtral and Qwen3-MoE share on the way to llama.cpp.

A MoE block replaces the MLP with a router (`gate`, one row per expert) and many small gated MLPs,
of which each token runs the top k, weighted by the router's softmax renormalized over those k.
Hugging Face checkpoints keep a matrix per expert and projection; llama.cpp keeps one 3-D tensor per
projection (`ffn_gate_exps`, `ffn_up_exps`, `ffn_down_exps`, experts along the outer axis), so the
converter stacks them through `stack_slot`, and the router becomes `ffn_gate_inp`, kept in F32 as
llama.cpp's converter keeps it (F16 rounding could flip which experts a token picks).
"""

from __future__ import annotations

import re
from typing import ClassVar

import gguf

from ..checkpoint import HFConfig
from .base import ArchConverter, UnknownTensor


class MoeConverter(ArchConverter):
    """Mixed in before a dense family's converter, whose attention it keeps.

    Subclasses set `expert_names`: the name of an expert's matrix inside a block, its expert index
    written `*`, -> the GGUF name of the stack.
    """

    expert_names: ClassVar[dict[str, str]] = {}
    keep_f32 = ("ffn_gate_inp.weight",)
    _expert = re.compile(r"^(.+?)\.(\d+)\.(.+)$")

    def __init__(self, config: HFConfig) -> None:
        super().__init__(config)
        # Qwen's configs say num_experts; transformers 5 writes num_local_experts for every family.
        self.n_experts = int(config.get("num_local_experts", "num_experts", default=None)
                             or config.require("num_local_experts"))
        self.n_experts_used = int(config.require("num_experts_per_tok"))

    def expert_width(self) -> int:
        """Each expert's intermediate size."""
        return int(self.config.require("intermediate_size"))

    def stack_slot(self, hf_name: str) -> tuple[str, int, int] | None:
        m = self._layer.match(hf_name)
        e = self._expert.match(m.group(2)) if m else None
        if not m or not e or f"{e.group(1)}.*.{e.group(3)}" not in self.expert_names:
            return None
        layer, expert = int(m.group(1)), int(e.group(2))
        if layer >= self.n_layers or expert >= self.n_experts:
            raise UnknownTensor(f"tensor {hf_name!r} is for layer {layer}, expert {expert}, but the config has "
                                f"{self.n_layers} layers of {self.n_experts} experts")
        return f"blk.{layer}.{self.expert_names[f'{e.group(1)}.*.{e.group(3)}']}", expert, self.n_experts

    def lora_modules(self) -> dict[str, tuple[int, int]]:
        """The attention projections only. Experts and router are no linear layers in transformers 5
        (a 3-D parameter per projection and a bare weight), so PEFT reaches them only as parameters,
        which neither the GGUF LoRA export nor llama.cpp's adapters map to the stacked tensors; and
        LoRA on the attention of MoE models is the common recipe: the experts, most of the weights,
        stay frozen and the router's choices stay as trained."""
        h = self.n_embd
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}

    def block_weights(self) -> int:
        """Attention, and every expert's three matrices and the router, which fine-tuning holds frozen."""
        return super().block_weights() + self.n_experts * self.n_embd * (3 * self.expert_width() + 1)

    def mlp_width(self) -> int:
        """Each token runs its top k experts."""
        return self.n_experts_used * self.expert_width()

    def add_metadata(self, w: gguf.GGUFWriter) -> None:
        super().add_metadata(w)
        w.add_expert_count(self.n_experts)
        w.add_expert_used_count(self.n_experts_used)
