"""Which inference stacks are installed. Finds torch without importing it."""

from __future__ import annotations

import ctypes
import importlib.util

from .report import Runtimes


def probe_runtimes(llama_cpp: bool = True) -> Runtimes:
    """What is installed; `llama_cpp_backends` and `vllm` are filled by probes of their own, so a
    failure there is reported without losing the rest. Without `llama_cpp`, llama.cpp is not loaded
    (`serve --engine vllm` does not run it)."""
    llama = llama_cpp and importlib.util.find_spec("llama_cpp") is not None
    version = ""
    if llama:
        import llama_cpp  # loads the shared library: ~0.1 s, no weights

        version = getattr(llama_cpp, "__version__", "")
    gptq = all(importlib.util.find_spec(m) is not None for m in ("torch", "gptqmodel"))
    return Runtimes(llama_cpp=llama, llama_cpp_version=version, gptq=gptq)


def probe_llama_cpp_backends() -> tuple[str, ...]:
    """The ggml backends the installed llama.cpp registered, lower case ("cpu", "cuda", "metal",
    "rocm", "vulkan", ...), from ggml's backend registry: which GPU library a build drives, where
    `llama_supports_gpu_offload` only says that it drives one. llama-cpp-python binds no registry
    function, so this loads ggml (already loaded by llama.cpp) with llama-cpp-python's own loader."""
    from llama_cpp import llama_cpp
    from llama_cpp._ctypes_extensions import load_shared_library

    ggml = load_shared_library("ggml", llama_cpp._base_path)
    count, get, name = ggml.ggml_backend_reg_count, ggml.ggml_backend_reg_get, ggml.ggml_backend_reg_name
    count.restype, count.argtypes = ctypes.c_size_t, []
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    return tuple(name(get(i)).decode().lower() for i in range(count()))


def probe_vllm() -> str:
    """The Python of the vLLM environment, "" when none was made or pointed at; raises (so the report's
    errors say why) when one was, but has no Python or cannot import vllm. vLLM lives in its own
    environment, so this asks that Python in a child process and never imports vLLM here."""
    from ..engine.vllm import find_vllm_python, vllm_configured

    return str(find_vllm_python()) if vllm_configured() else ""
