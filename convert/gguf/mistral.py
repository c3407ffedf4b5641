"""Mistral (MistralForCausalLM): llama.cpp runs it as the llama architecture."""

from __future__ import annotations

from .llama import LlamaConverter


class MistralConverter(LlamaConverter):
    gguf_arch = "llama"
