"""`--quant auto --size 4.0GB`: a per-tensor type mix chosen by measured sensitivity to fit a size.

Each layer weight's sensitivity to a type is measured on the calibration data: the weight is
quantized with llama.cpp's own kernels (`ggml_quantize_chunk`, weighted by the importance
matrix), dequantized (gguf-py), and the error is weighed by the importance matrix, which makes
it the mean squared error of that layer's output over the calibration activations. Starting
from every weight at its smallest type, the upgrade that removes the most error per byte is
taken until the size budget is spent. Token embeddings and the output layer keep the types
llama.cpp's Q4_K_M gives them. The result is a map of tensor name to type that
`llama_model_quantize` applies as tensor type overrides, so the file is a normal GGUF.
"""

from __future__ import annotations

import ctypes
import heapq
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localchat.fsutil import human

from .imatrix import Imatrix

# Types a layer weight may take, by row width: K-quants need rows of 256, the rest rows of 32.
K_LADDER = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
LEGACY_LADDER = ("IQ4_NL", "Q5_0", "Q8_0")
METADATA_SLACK = 64 * 1024  # the quantizer's own keys and alignment padding beside the F16's header
SAMPLE_ROWS = 128  # rows of each weight measured; the error is scaled to all its rows
SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class MixError(ValueError):
    pass


def parse_size(text: str) -> int:
    """"4.0GB", "3.5GiB", "900MB" -> bytes; a clear error otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m:
        raise MixError(f"--size {text!r}: give a size such as 4.0GB, 3.5GiB or 900MB")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2) or ""])


def _ggml() -> ctypes.CDLL:
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


@dataclass
class Choice:
    name: str
    ladder: tuple[str, ...]
    nbytes: list[int]  # per ladder step
    error: list[float]  # per ladder step
    step: int = 0


def _measure(lib: ctypes.CDLL, name: str, w: np.ndarray, imp: np.ndarray, ladder: tuple[str, ...]) -> Choice:
    """Bytes and importance-weighted squared error of `w` (rows sampled) at each type of `ladder`."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, cols = w.shape
    pick = np.linspace(0, rows - 1, min(rows, SAMPLE_ROWS)).astype(int)
    sample = np.ascontiguousarray(w[pick], dtype=np.float32)
    imp = np.ascontiguousarray(imp, dtype=np.float32)
    sizes, errors = [], []
    for t in ladder:
        qt = GGMLQuantizationType[t]
        row = lib.ggml_row_size(int(qt), cols)
        buf = np.empty(row * len(pick), dtype=np.uint8)
        lib.ggml_quantize_chunk(int(qt), sample.ctypes.data, buf.ctypes.data, 0, len(pick), cols, imp.ctypes.data)
        back = dequantize(buf.reshape(len(pick), row), qt).reshape(len(pick), cols)
        errors.append(float((((sample - back) ** 2) * imp).sum()) * rows / len(pick))
        sizes.append(row * rows)
    return Choice(name, ladder, sizes, errors)


def plan_mix(f16: str | Path, im: Imatrix, size: int) -> tuple[dict[str, str], int]:
    """Tensor name -> ggml type for every layer weight of the F16 GGUF `f16`, chosen to fit the file
    in `size` bytes; returns the map and the planned file size."""
    from gguf import GGMLQuantizationType, GGUFReader

    r = GGUFReader(f16)
    lib = _ggml()
    means = im.means()
    fixed = Path(f16).stat().st_size - sum(int(t.n_bytes) for t in r.tensors)  # header, vocabulary
    names = {t.name for t in r.tensors}
    choices: list[Choice] = []
    pinned: dict[str, str] = {}
    for t in r.tensors:
        cols = int(t.shape[0])
        if len(t.data.shape) != 2 or t.name not in means and not t.name.startswith(("token_embd", "output.")):
            fixed += int(t.n_bytes)
            continue
        k = cols % 256 == 0
        if t.name not in means:  # as llama.cpp's Q4_K_M: Q6_K for the output (or tied embeddings), Q4_K else
            out = t.name.startswith("output.") or "output.weight" not in names
            pinned[t.name] = ("Q6_K" if k else "Q8_0") if out else ("Q4_K" if k else "Q5_0")
            fixed += lib.ggml_row_size(int(GGMLQuantizationType[pinned[t.name]]), cols) * int(t.data.shape[0])
            continue
        choices.append(_measure(lib, t.name, t.data, means[t.name], K_LADDER if k else LEGACY_LADDER))
    total = fixed + METADATA_SLACK + sum(c.nbytes[0] for c in choices)
    if total > size:
        raise MixError(f"the smallest mix of this model is {human(total)}; ask for at least that with --size")
    heap = [(-_gain(c), i) for i, c in enumerate(choices) if c.step + 1 < len(c.ladder)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        c = choices[i]
        extra = c.nbytes[c.step + 1] - c.nbytes[c.step]
        if total + extra > size:
            continue
        total += extra
        c.step += 1
        if c.step + 1 < len(c.ladder):
            heapq.heappush(heap, (-_gain(c), i))
    return {**pinned, **{c.name: c.ladder[c.step] for c in choices}}, total


def _gain(c: Choice) -> float:
    """Error removed per byte by the next step up the ladder."""
    return (c.error[c.step] - c.error[c.step + 1]) / max(c.nbytes[c.step + 1] - c.nbytes[c.step], 1)
