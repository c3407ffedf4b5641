"""Which inference stacks are installed. Finds torch without importing it."""

from __future__ import annotations

import importlib.util

from .report import Runtimes


def probe_runtimes() -> Runtimes:
    llama = importlib.util.find_spec("llama_cpp") is not None
    version, offload = "", False
    if llama:
        import llama_cpp  # loads the shared library: ~0.1 s, no weights

        version = getattr(llama_cpp, "__version__", "")
        offload = bool(llama_cpp.llama_supports_gpu_offload())
    gptq = all(importlib.util.find_spec(m) is not None for m in ("torch", "gptqmodel"))
    return Runtimes(llama_cpp=llama, llama_cpp_version=version, llama_cpp_gpu_offload=offload, gptq=gptq)
