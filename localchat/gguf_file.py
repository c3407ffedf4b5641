"""Read and check a GGUF file's header without loading its weights.

llama.cpp trusts the file it is given: a truncated download or a corrupted header can
crash the process. Every GGUF goes through :func:`read_gguf` first, which checks the
magic, version, counts, metadata types and that every tensor lies inside the file, and
raises :class:`GGUFError` naming the file and the byte offset otherwise.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"
STOP_KEY = "localchat.stop"  # stop strings that `localchat convert --template` writes with the template
IMATRIX_SUFFIX = ".imatrix.gguf"  # an importance matrix kept beside a model (convert/imatrix.py): not a model
# The model authors' recommended sampler settings, under the keys llama.cpp's gguf-py defines
# (gguf.Keys.General.SAMPLING_*), by the name of the SamplingSettings field each one sets.
SAMPLING_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repeat_penalty": "general.sampling.penalty_repeat",
}
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
# Sanity bounds: far above any real model, low enough to stop a garbage header early.
MAX_KEY_LENGTH = 65_536
MAX_DIM = 1 << 40

# ggml tensor types: id -> (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# llama.cpp's `general.file_type` (enum llama_ftype) -> the quant name people use.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}

# GGUF metadata value types: id -> (name, struct format or None for string/array).
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file that llama.cpp must not be given; the message names file and offset."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int  # absolute offset in the file
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    array_lengths: dict[str, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A per-architecture key such as ``llama.block_count``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def quant(self) -> str:
        ftype = self.metadata.get("general.file_type")
        if isinstance(ftype, int) and ftype in FILE_TYPES:
            return FILE_TYPES[ftype]
        # No file_type: name it after the most common weight type.
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.nbytes
        return max(counts, key=counts.__getitem__) if counts else "unknown"

    @property
    def n_params(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def weights_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings written by `localchat convert --template` (STOP_KEY)."""
        value = self.metadata.get(STOP_KEY)
        return tuple(v for v in value if isinstance(v, str) and v) if isinstance(value, list) else ()

    @property
    def sampling(self) -> dict[str, float | int]:
        """The file's recommended sampling settings (SAMPLING_KEYS), by SamplingSettings field name."""
        found = {name: self.metadata.get(key) for name, key in SAMPLING_KEYS.items()}
        # float32 in the file: 0.2 reads as 0.20000000298, so keep the digits a float32 holds
        return {name: float(f"{v:.7g}") if isinstance(v, float) else v for name, v in found.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def token(self, key: str) -> str | None:
        """The text of a special token (``bos``, ``eos``) named by its id key."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tokens, list) and isinstance(token_id, int) and 0 <= token_id < len(tokens):
            return tokens[token_id]
        return None


class _Reader:
    """Bounds-checked little-endian reads that report the offset of what went wrong."""

    def __init__(self, fh: BinaryIO, path: Path, size: int) -> None:
        self.fh, self.path, self.size, self.pos = fh, path, size, 0

    def fail(self, message: str, at: int | None = None) -> GGUFError:
        where = self.pos if at is None else at
        return GGUFError(f"{self.path}: at byte {where}: {message}")

    def read(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated: {what} needs {n} bytes, the file has {self.size - self.pos} left "
                f"(file size {self.size}); the download or conversion was probably cut short"
            )
        data = self.fh.read(n)
        if len(data) != n:
            raise self.fail(f"short read of {what}")
        self.pos += n
        return data

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        start = self.pos
        length = self.scalar("<Q", f"length of {what}")
        if length > self.size - self.pos:
            raise self.fail(f"{what} claims {length} bytes but only {self.size - self.pos} remain "
                            "(truncated or corrupted file)", start)
        raw = self.read(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason})", start) from None


def _read_value(r: _Reader, vtype: int, key: str) -> Any:
    if vtype in _SCALARS:
        name, fmt = _SCALARS[vtype]
        return r.scalar(fmt, f"value of {key!r} ({name})")
    if vtype == _STRING:
        return r.string(f"value of {key!r}")
    if vtype == _ARRAY:
        start = r.pos
        item_type = r.scalar("<I", f"item type of array {key!r}")
        count = r.scalar("<Q", f"length of array {key!r}")
        if item_type == _ARRAY:
            raise r.fail(f"array {key!r} nests arrays, which no GGUF writer produces", start)
        if item_type in _SCALARS:
            _, fmt = _SCALARS[item_type]
            width = struct.calcsize(fmt)
            if count * width > r.size - r.pos:
                raise r.fail(f"array {key!r} claims {count} items, more than the rest of the file "
                             "holds (truncated or corrupted file)", start)
            raw = r.read(count * width, f"items of array {key!r}")
            return list(struct.unpack(f"<{count}{fmt[1]}", raw))
        if item_type == _STRING:
            if count * 8 > r.size - r.pos:
                raise r.fail(f"array {key!r} claims {count} strings, more than the rest of the file "
                             "holds (truncated or corrupted file)", start)
            return [r.string(f"item {i} of array {key!r}") for i in range(count)]
        raise r.fail(f"array {key!r} has unknown item type {item_type}", start)
    raise r.fail(f"metadata {key!r} has unknown value type {vtype} (valid: 0-12)")


def read_gguf(path: str | os.PathLike[str]) -> GGUFHeader:
    """Parse and check the header of a GGUF file; raise GGUFError if llama.cpp must not see it."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise GGUFError(f"{path}: the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        r = _Reader(fh, path, size)
        if size < 4:
            raise GGUFError(f"{path}: {size} bytes is too short for a GGUF file")
        magic = r.read(4, "magic")
        if magic != GGUF_MAGIC:
            raise r.fail(f"not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}", 0)
        version = r.scalar("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
                raise r.fail("big-endian GGUF files are not supported on this machine", 4)
            raise r.fail(f"GGUF version {version} is not supported (supported: 2, 3)", 4)
        n_tensors = r.scalar("<Q", "tensor count")
        n_kv = r.scalar("<Q", "metadata count")
        # Each metadata pair needs >= 8+1+4+1 bytes and each tensor info >= 8+1+4+8+4+8.
        if n_kv * 14 > size or n_tensors * 33 > size:
            raise r.fail(
                f"header claims {n_tensors} tensors and {n_kv} metadata entries, "
                f"impossible in a {size}-byte file (truncated or corrupted header)", 8)
        if n_tensors == 0:  # llama.cpp would only say "failed to load model"
            raise r.fail("the file holds no tensors, so no weights to run (a bare header, or a "
                         "vocabulary-only GGUF): not a model", 8)

        metadata: dict[str, Any] = {}
        array_lengths: dict[str, int] = {}
        for i in range(n_kv):
            start = r.pos
            key = r.string(f"key of metadata entry {i}")
            if not key or len(key) > MAX_KEY_LENGTH:
                raise r.fail(f"metadata entry {i} has an empty or oversized key", start)
            if key in metadata:
                raise r.fail(f"metadata key {key!r} appears twice", start)
            vtype = r.scalar("<I", f"type of {key!r}")
            metadata[key] = _read_value(r, vtype, key)
            if isinstance(metadata[key], list):
                array_lengths[key] = len(metadata[key])

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{path}: general.alignment is {alignment!r}, not a power of two")

        raw_tensors: list[tuple[str, tuple[int, ...], int, int, int]] = []
        names: set[str] = set()
        for i in range(n_tensors):
            start = r.pos
            name = r.string(f"name of tensor {i}")
            if name in names:
                raise r.fail(f"tensor {name!r} appears twice", start)
            names.add(name)
            n_dims = r.scalar("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {n_dims} dimensions (valid: 1-{GGML_MAX_DIMS})", start)
            shape = tuple(r.scalar("<Q", f"dimension of {name!r}") for _ in range(n_dims))
            if any(d == 0 or d > MAX_DIM for d in shape):
                raise r.fail(f"tensor {name!r} has an impossible shape {shape}", start)
            ttype = r.scalar("<I", f"type of {name!r}")
            if ttype not in GGML_TYPES:
                raise r.fail(f"tensor {name!r} has unknown ggml type {ttype}", start)
            offset = r.scalar("<Q", f"offset of {name!r}")
            raw_tensors.append((name, shape, ttype, offset, start))

        data_offset = -(-r.pos // alignment) * alignment
        tensors: list[TensorInfo] = []
        for name, shape, ttype, offset, start in raw_tensors:
            type_name, block, type_size = GGML_TYPES[ttype]
            if shape[0] % block:
                raise GGUFError(
                    f"{path}: tensor {name!r} ({type_name}) has row length {shape[0]}, "
                    f"not a multiple of its block size {block}")
            n = 1
            for d in shape:
                n *= d
            nbytes = n // block * type_size
            if offset % alignment:
                raise GGUFError(f"{path}: tensor {name!r} offset {offset} is not aligned to {alignment}")
            end = data_offset + offset + nbytes
            if end > size:
                raise GGUFError(
                    f"{path}: tensor {name!r} ends at byte {end}, past the end of the file "
                    f"({size} bytes): the file is truncated")
            tensors.append(TensorInfo(name, shape, type_name, data_offset + offset, nbytes))

        ordered = sorted(tensors, key=lambda t: t.offset)
        for a, b in zip(ordered, ordered[1:]):
            if a.offset + a.nbytes > b.offset:
                raise GGUFError(f"{path}: tensors {a.name!r} and {b.name!r} overlap")

    return GGUFHeader(path, version, metadata, tensors, data_offset, size, array_lengths)
