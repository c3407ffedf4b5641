"""GGUF quantization with llama.cpp's own quantizer (`llama_model_quantize`), with or without an
importance matrix (convert/imatrix.py), which it takes through `llama_model_quantize_params.imatrix`."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from localchat.fsutil import HEADROOM, atomic_path, check_disk
from localchat.gguf_file import read_gguf
from localchat.quant_types import NEEDS_IMATRIX, QUANT_TYPES, USES_IMATRIX  # noqa: F401 (their home)

if TYPE_CHECKING:
    from .imatrix import Imatrix

IMATRIX_KV = "quantize.imatrix."  # llama-quantize's metadata keys for the matrix a file was quantized with


class QuantizeError(RuntimeError):
    pass


def quant_name(q: str) -> str:
    name = q.upper()
    if name not in QUANT_TYPES:
        raise QuantizeError(f"unknown quant type {q!r}; valid: {', '.join(QUANT_TYPES)}")
    return name


def check_imatrix(quant: str, have: bool) -> None:
    """Refuse a type that is offered only with an importance matrix when there is none."""
    q = quant_name(quant)
    if q in NEEDS_IMATRIX and not have:
        raise QuantizeError(f"{q} needs an importance matrix: leave out --no-imatrix (one is computed from the "
                            f"calibration set), or choose a type that does not need one (Q4_K_M, Q5_K_M, ...)")


def quantized_bytes(n_params: int, quant: str) -> int:
    """Disk a `quant` GGUF of `n_params` weights needs, headroom included."""
    return int(n_params * QUANT_TYPES[quant_name(quant)][1] / 8) + HEADROOM


def _with_imatrix(params: object, im: Imatrix) -> list:
    """Point `params` at llama.cpp's `llama_model_imatrix_data` array (name, values, size; a null
    name ends it) and at metadata keys that record it in the file, as llama-quantize writes them.
    Returns the objects the pointers point into, which must outlive the call."""
    import llama_cpp

    means = im.means()
    keep: list = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    for i, (name, values) in enumerate(sorted(means.items())):
        v = np.ascontiguousarray(values, dtype=np.float32)
        b = name.encode()
        keep += [v, b]
        arr[i].name, arr[i].data, arr[i].size = b, v.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), v.size
    kv = (llama_cpp.llama_model_kv_override * 4)()  # an empty key ends the list
    for o, (key, value) in zip(kv, ((IMATRIX_KV + "entries_count", len(means)),
                                    (IMATRIX_KV + "chunks_count", im.chunk_count),
                                    (IMATRIX_KV + "dataset", im.dataset))):
        o.key = key.encode()
        if isinstance(value, int):
            o.tag, o.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            o.tag, o.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
    params.imatrix, params.kv_overrides = arr, kv
    return keep + [arr, kv]


def _with_types(params: object, types: dict[str, str]) -> list:
    """Point `params` at llama.cpp's tensor type overrides (an exact-name pattern each; a null
    pattern ends them); returns what they point into."""
    import re

    import llama_cpp
    from gguf import GGMLQuantizationType

    arr = (llama_cpp.llama_model_tensor_override * (len(types) + 1))()
    keep: list = [arr]
    for o, (name, t) in zip(arr, sorted(types.items())):
        pattern = f"^{re.escape(name)}$".encode()
        keep.append(pattern)
        o.pattern, o.type = pattern, int(GGMLQuantizationType[t])
    params.tt_overrides = arr
    return keep


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], quant: str,
             threads: int | None = None, verbose: bool = False,
             imatrix: Imatrix | None = None, types: dict[str, str] | None = None) -> Path:
    """Write `dst` as `src` quantized to `quant`; `dst` appears only when complete.

    `imatrix` weighs each tensor's rounding error by its columns' importance; llama.cpp chooses
    the same per-tensor types either way, and records the matrix under `quantize.imatrix.*`.
    `types` (tensor name -> ggml type name, `automix.plan_mix`) overrides its choices."""
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
    _keep = _with_imatrix(params, imatrix) if imatrix is not None else []  # noqa: F841 - alive for the call
    if types:
        _keep += _with_types(params, types)
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
