"""The GGUF pre-check: real files parse like the reference reader; broken ones get a clear
error naming the file, and never reach llama.cpp."""

from __future__ import annotations

import random
import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from localchat.gguf_file import GGML_TYPES, GGUFError, read_gguf


def write_tiny_gguf(path: Path) -> Path:
    """A small valid GGUF written by the reference `gguf` package."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_string("general.name", "tiny test")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((4, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    w.add_tensor("blk.1.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def test_type_table_matches_reference() -> None:
    for type_id, (name, block, size) in GGML_TYPES.items():
        ref = gguf.GGMLQuantizationType(type_id)
        assert ref.name == name
        assert gguf.GGML_QUANT_SIZES[ref] == (block, size), name


def test_matches_reference_reader(tiny: Path) -> None:
    ours = read_gguf(tiny)
    ref = gguf.GGUFReader(str(tiny))
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for mine, theirs in zip(ours.tensors, ref.tensors):
        assert mine.offset == theirs.data_offset
        assert mine.nbytes == theirs.n_bytes
        assert mine.shape == tuple(int(d) for d in theirs.shape)
    assert ours.metadata["general.name"] == "tiny test"
    assert ours.metadata["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a", "b"]
    assert ours.metadata["llama.block_count"] == 2
    assert ours.chat_template and "messages" in ours.chat_template


def test_starter_model_header(starter_gguf: Path) -> None:
    h = read_gguf(starter_gguf)
    assert h.architecture == "llama"
    assert h.quant == "Q4_1"
    assert len(h.tensors) == 272
    assert h.arch_value("block_count") == 30
    assert h.token("eos") == "<|im_end|>"
    assert 130e6 < h.n_params < 140e6
    assert h.data_offset + h.weights_bytes <= h.file_size


def test_zero_length(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match=r"empty\.gguf: the file is empty"):
        read_gguf(empty)


def test_not_gguf(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match=r"model\.gguf: at byte 0: not a GGUF file"):
        read_gguf(f)


@pytest.mark.parametrize("keep", [3, 10, 30, 200, 0.5, -1])
def test_truncated(tiny: Path, tmp_path: Path, keep: float) -> None:
    data = tiny.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:n])
    with pytest.raises(GGUFError, match=r"cut\.gguf: .*(truncated|too short|past the end)"):
        read_gguf(cut)


def test_truncated_real_model(starter_gguf: Path, tmp_path: Path) -> None:
    cut = tmp_path / "half.gguf"
    with open(starter_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(starter_gguf.stat().st_size // 2))
    with pytest.raises(GGUFError, match=r"half\.gguf: tensor .* past the end of the file"):
        read_gguf(cut)


def _patch(src: Path, dst: Path, offset: int, value: bytes) -> Path:
    data = bytearray(src.read_bytes())
    data[offset:offset + len(value)] = value
    dst.write_bytes(bytes(data))
    return dst


def test_bad_version(tiny: Path, tmp_path: Path) -> None:
    f = _patch(tiny, tmp_path / "v9.gguf", 4, struct.pack("<I", 9))
    with pytest.raises(GGUFError, match="version 9 is not supported"):
        read_gguf(f)


def test_absurd_counts(tiny: Path, tmp_path: Path) -> None:
    f = _patch(tiny, tmp_path / "counts.gguf", 8, struct.pack("<Q", 1 << 50))
    with pytest.raises(GGUFError, match="impossible"):
        read_gguf(f)


def test_bad_value_type(tiny: Path, tmp_path: Path) -> None:
    # The first metadata entry's type follows the key: 24-byte header, 8-byte length, key.
    key_len = struct.unpack_from("<Q", tiny.read_bytes(), 24)[0]
    f = _patch(tiny, tmp_path / "vtype.gguf", 32 + key_len, struct.pack("<I", 99))
    with pytest.raises(GGUFError, match="unknown value type 99"):
        read_gguf(f)


def test_tensor_offset_outside_file(tiny: Path, tmp_path: Path) -> None:
    h = read_gguf(tiny)
    data = tiny.read_bytes()
    # The last tensor info ends with its 8-byte offset, just before the alignment padding.
    name = h.tensors[-1].name.encode()
    at = data.rindex(name) + len(name) + 4 + 8 * 2 + 4
    f = _patch(tiny, tmp_path / "offset.gguf", at, struct.pack("<Q", 1 << 30))
    with pytest.raises(GGUFError, match="past the end of the file"):
        read_gguf(f)


def test_random_corruption_never_crashes(tiny: Path, tmp_path: Path) -> None:
    """Flipping header bytes gives a clean parse or a GGUFError, nothing else."""
    h = read_gguf(tiny)
    data = tiny.read_bytes()
    rng = random.Random(1234)
    errors = 0
    for i in range(300):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(h.data_offset)] = rng.randrange(256)
        f = tmp_path / f"fuzz{i}.gguf"
        f.write_bytes(bytes(buf))
        try:
            read_gguf(f)
        except GGUFError as exc:
            assert str(f) in str(exc)
            errors += 1
        f.unlink()
    assert errors > 50  # most corruptions of a header are caught


def test_backend_refuses_bad_file_before_llama_cpp(starter_gguf: Path, tmp_path: Path) -> None:
    from localchat.artifacts import artifact_from_gguf
    from localchat.engine.llamacpp import LlamaCppBackend
    from localchat.hardware import probe
    from localchat.planner import plan

    good = tmp_path / "model.gguf"
    shutil.copyfile(starter_gguf, good)
    p = plan(probe(), [artifact_from_gguf(good)])
    with open(good, "r+b") as fh:  # corrupted after planning, as a disk error would
        fh.truncate(good.stat().st_size - 4096)
    with pytest.raises(GGUFError, match=r"model\.gguf: tensor .* past the end"):
        LlamaCppBackend(p)
