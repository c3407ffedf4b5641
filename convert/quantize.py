"""GGUF quantization with llama.cpp's own quantizer (`llama_model_quantize`)."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from localchat.fsutil import HEADROOM, atomic_path, check_disk
from localchat.gguf_file import read_gguf

# Quant name -> (llama_ftype, approximate bits per weight, for the disk check).
QUANT_TYPES: dict[str, tuple[str, float]] = {
    "F16": ("LLAMA_FTYPE_MOSTLY_F16", 16.0),
    "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8.5),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", 6.6),
    "Q5_K_M": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7),
    "Q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", 5.5),
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9),
    "Q4_K_S": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.6),
    "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4.5),
}


class QuantizeError(RuntimeError):
    pass


def quant_name(q: str) -> str:
    name = q.upper()
    if name not in QUANT_TYPES:
        raise QuantizeError(f"unknown quant type {q!r}; valid: {', '.join(QUANT_TYPES)}")
    return name


def quantized_bytes(n_params: int, quant: str) -> int:
    """Disk a `quant` GGUF of `n_params` weights needs, headroom included."""
    return int(n_params * QUANT_TYPES[quant_name(quant)][1] / 8) + HEADROOM


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], quant: str,
             threads: int | None = None, verbose: bool = False) -> Path:
    """Write `dst` as `src` quantized to `quant`; `dst` appears only when complete."""
    import llama_cpp
    import llama_cpp.llama  # noqa: F401 - routes llama.cpp's log through the "llama-cpp-python" logger

    q = quant_name(quant)
    src, dst = Path(src), Path(dst)
    header = read_gguf(src)  # a bad input never reaches the quantizer
    check_disk(dst.parent, quantized_bytes(header.n_params, q), f"quantizing to {q}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[q][0])
    params.nthread = threads or os.cpu_count() or 1
    params.allow_requantize = False
    log = logging.getLogger("llama-cpp-python")  # llama.cpp's own log: errors only, unless asked
    level = log.level
    log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        with atomic_path(dst) as tmp:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise QuantizeError(f"llama.cpp could not quantize {src} to {q} (code {rc})")
    finally:
        log.setLevel(level)
    return dst


def fallback_note(src: str | os.PathLike[str], quant: str) -> str | None:
    """Say how many tensors a K-quant cannot use (rows not a multiple of 256) and so fall back."""
    q = quant_name(quant)
    if "_K" not in q:
        return None
    h = read_gguf(src)
    n = sum(1 for t in h.tensors if len(t.shape) >= 2 and t.shape[0] % 256)
    if not n:
        return None
    return (f"{n} of {len(h.tensors)} tensors have rows that are not a multiple of 256, so llama.cpp "
            f"stored them in a fallback type (Q5_0/Q8_0) instead of {q}'s K-quants")
