"""The header of a safetensors file, read and checked without torch or the safetensors package.

The format: an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape and the
byte span of its data after the header; an optional `__metadata__` of strings), then the raw tensors.
One reader for the runtime (`check-vllm`'s zero-point check reads the GPTQ `.qzeros` spans it finds)
and the converters (convert/checkpoint.py wraps it), checked as the format defines it before any tensor
is read: the library's own errors name neither the file nor the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Bits per element of each safetensors dtype.
SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
                    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
                    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


class SafetensorsError(ValueError):
    """A safetensors file we cannot read; the message names the file, the tensor and the field."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: list[int]
    start: int  # the tensor's data in the file: bytes [start, end)
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> its dtype, shape and byte span in the file; the offsets must tile the data exactly."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise SafetensorsError(f"{path}: safetensors header claims {n} bytes, the file has {size}: "
                                   "truncated or not a safetensors file")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an "
                               "object of tensor names")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise SafetensorsError(f"{path}: field '__metadata__' must map names to strings")
    out: dict[str, TensorInfo] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = _tensor_info(path, name, info)
        out[name] = TensorInfo(dtype, shape, 8 + n + start, 8 + n + end)
        if 8 + n + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {8 + n + end}, past the end "
                                   f"of the file ({size} bytes): the file is truncated")
    at, before = 8 + n, "the header"
    for name, t in sorted(out.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != at:
            how = "overlaps" if t.start < at else "leaves a gap after"
            raise SafetensorsError(f"{path}: tensor {name!r}: field 'data_offsets' [{t.start - 8 - n}, "
                                   f"{t.end - 8 - n}] {how} {before}, which ends at {at - 8 - n}")
        at, before = t.end, f"tensor {name!r}"
    if at != size:
        raise SafetensorsError(f"{path}: the tensors end at byte {at}, the file has {size} bytes: "
                               "the rest belongs to no tensor")
    return out


def _tensor_info(path: Path, name: str, info: Any) -> tuple[str, list[int], list[int]]:
    """One tensor's header entry, every field checked; the error names the tensor and the field."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise SafetensorsError(f"{where}: expected an object with fields {', '.join(TENSOR_FIELDS)}")
    for key in TENSOR_FIELDS:
        if key not in info:
            raise SafetensorsError(f"{where}: field {key!r} is missing")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_BITS:
        raise SafetensorsError(f"{where}: field 'dtype' is {dtype!r}, not a safetensors dtype")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise SafetensorsError(f"{where}: field 'shape' is {shape!r}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(o) for o in offsets):
        raise SafetensorsError(f"{where}: field 'data_offsets' is {offsets!r}, not two non-negative integers "
                               "[start, end]")
    start, end = offsets
    if end < start:
        raise SafetensorsError(f"{where}: field 'data_offsets' {offsets} ends before it starts")
    bits = math.prod(shape) * SAFETENSORS_BITS[dtype]
    if bits != 8 * (end - start):
        raise SafetensorsError(f"{where}: field 'data_offsets' {offsets} spans {end - start} bytes; its "
                               f"'shape' {shape} of {dtype} needs {bits / 8:g}")
    return dtype, shape, offsets


def _count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
