"""Hugging Face architectures -> GGUF, one module per family, found through this table."""

from __future__ import annotations

import importlib

from ..checkpoint import CheckpointError, HFConfig
from .base import ArchConverter

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "localchat.convert.gguf.llama:LlamaConverter",
    "MistralForCausalLM": "localchat.convert.gguf.mistral:MistralConverter",
    "Qwen2ForCausalLM": "localchat.convert.gguf.qwen2:Qwen2Converter",
    "Qwen3ForCausalLM": "localchat.convert.gguf.qwen3:Qwen3Converter",
    "Phi3ForCausalLM": "localchat.convert.gguf.phi3:Phi3Converter",
    "Gemma2ForCausalLM": "localchat.convert.gguf.gemma:Gemma2Converter",
    "Gemma3ForCausalLM": "localchat.convert.gguf.gemma:Gemma3Converter",
    "Qwen3MoeForCausalLM": "localchat.convert.gguf.qwen3moe:Qwen3MoeConverter",
    "MixtralForCausalLM": "localchat.convert.gguf.mixtral:MixtralConverter",
}


def converter_for(config: HFConfig) -> ArchConverter:
    arch = config.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{config.path}: architecture {arch!r} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(module), cls)(config)
