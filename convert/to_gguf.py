"""A checkpoint to an F16 (or F32) GGUF file, streamed tensor by tensor.

Tensor infos are planned from the safetensors headers first, so the writer knows every
offset before it reads a weight; then each tensor is read, laid out for llama.cpp and
written, and dropped. A GGUF tensor stacked from many HF ones (an MoE layer's experts) is
filled slice by slice into one array of the output type. Peak memory is about one (stacked)
tensor, not the model. The file is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
import torch
from tqdm import tqdm

from localchat.fsutil import HEADROOM, atomic_path, check_disk
from localchat.engine.settings import preset_text
from localchat.gguf_file import SAMPLING_KEYS, STOP_KEY
from localchat.templates import get_format

from .checkpoint import Checkpoint, CheckpointError, read_generation_preset
from .gguf import ArchConverter, converter_for
from .tokenizer import load_vocab, write_vocab

OUTTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}


@dataclass
class ConvertResult:
    path: Path
    tensors: int
    report: list[str]


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor and where its data comes from."""

    name: str
    sources: tuple[str, ...]  # HF tensors: the one copied, or each slice of a stack; none for an extra
    shape: list[int]
    stacked: bool = False  # the sources stacked along a new first axis (an MoE layer's experts)


@dataclass
class GgufPlan:
    """Everything about a GGUF but its tensor data: the header is complete, so its size is known
    before a byte is written (a conversion checks the disk for all its steps up front)."""

    ckpt: Checkpoint
    conv: ArchConverter
    writer: gguf.GGUFWriter
    tensors: list[PlannedTensor]
    extras: dict[str, torch.Tensor]
    outtype: str
    report: list[str]
    nbytes: int  # tensor data

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)


def _out_dtype(conv: ArchConverter, name: str, ndim: int, outtype: str) -> type:
    # Norms, biases and rope factors stay F32, as llama.cpp expects; so do the family's keep_f32
    # matrices (an MoE router); other matrices take the outtype.
    return OUTTYPES[outtype][0] if ndim >= 2 and not name.endswith(conv.keep_f32) else np.float32


def _plan_tensors(ckpt: Checkpoint, conv: ArchConverter, report: list[str]) -> list[PlannedTensor]:
    """Each GGUF tensor with the HF tensors it is made of, in checkpoint order (a stack where its first
    slice is); a stack must have every slice, all of one shape. Reads no weights."""
    plan: dict[str, PlannedTensor | None] = {}
    stacks: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    for hf_name in ckpt.names():
        if slot := conv.stack_slot(hf_name):
            g, index, sizes[g] = slot
            plan.setdefault(g, None)
            stacks.setdefault(g, {})[index] = hf_name
            continue
        g = conv.gguf_name(hf_name)
        if g is None:
            report.append(f"left out {hf_name} (tied to the embeddings)")
            continue
        plan[g] = PlannedTensor(g, (hf_name,), ckpt.shape(hf_name))
    for g, slices in stacks.items():
        first = slices[min(slices)]
        missing = [str(i) for i in range(sizes[g]) if i not in slices]
        if missing:
            raise CheckpointError(f"{ckpt.folder}: {g} stacks {sizes[g]} tensors like {first!r}, but "
                                  f"number(s) {', '.join(missing)} are missing from the checkpoint")
        names = tuple(slices[i] for i in range(sizes[g]))
        for name in names:
            if ckpt.shape(name) != ckpt.shape(first):
                raise CheckpointError(f"{ckpt.folder}: tensor {name!r} has shape {ckpt.shape(name)}, but "
                                      f"{first!r}, stacked with it into {g}, has {ckpt.shape(first)}")
        plan[g] = PlannedTensor(g, names, [len(names), *ckpt.shape(first)], stacked=True)
    return [t for t in plan.values() if t is not None]


def plan_gguf(ckpt: Checkpoint, outtype: str = "f16", template: str | None = None,
              name: str | None = None) -> GgufPlan:
    """Names, shapes, metadata and vocabulary of the GGUF `ckpt` becomes; reads no weights."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)} (quantize from f16)")
    conv = converter_for(ckpt.config)
    vocab = load_vocab(ckpt.tokenizer_dir or ckpt.folder, ckpt.config.data)
    report = list(ckpt.report) + vocab.notes
    stops: tuple[str, ...] = ()
    if template:
        fmt = get_format(template)
        vocab.chat_template, stops = fmt.template, fmt.stop
        report.append(f"embedded the {fmt.name!r} chat template with stop strings {list(fmt.stop)}")
    elif not vocab.chat_template:
        report.append("the checkpoint has no chat template; pass --template NAME to embed one")

    preset = read_generation_preset(ckpt.folder) or read_generation_preset(ckpt.tokenizer_dir or ckpt.folder)
    if preset:
        report.append(f"sampling defaults from generation_config.json: {preset_text(preset)}")

    plan = _plan_tensors(ckpt, conv, report)
    extras = conv.extra_tensors()
    plan += [PlannedTensor(g, (), list(t.shape)) for g, t in extras.items()]

    w = gguf.GGUFWriter(None, conv.gguf_arch)
    w.add_name(name or ckpt.folder.name)
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    conv.add_metadata(w)
    write_vocab(w, vocab)
    if stops:
        w.add_array(STOP_KEY, list(stops))
    for field_name, value in preset.items():  # general.sampling.*, as llama.cpp's gguf-py names them
        (w.add_int32 if field_name == "top_k" else w.add_float32)(SAMPLING_KEYS[field_name], value)
    total = 0
    for t in plan:
        dtype = _out_dtype(conv, t.name, len(t.shape), outtype)
        nbytes = int(np.prod(t.shape)) * np.dtype(dtype).itemsize
        total += nbytes
        w.add_tensor_info(t.name, t.shape, np.dtype(dtype), nbytes)
    return GgufPlan(ckpt, conv, w, plan, extras, outtype, report, total)


class RowBlocks:
    """A tensor converted to the file's type a block of rows at a time as it is written.

    GGUFWriter.write_tensor_data reads only an array's `nbytes` and calls its `tofile`, so this stands in for
    the converted array without ever holding it: converting a whole 151936 x 4096 bf16 embedding (Qwen3-8B)
    through float32 took 3.7 GB beside the tensor itself, and the conversion peaked at 5.2 GB of RSS. A
    stacked tensor (an MoE layer's experts) is its slices one after another, each read only when its turn
    to be written comes, so the stack never exists in memory: filling a whole stack first left two 32 MB
    stacks resident at times (glibc keeps a freed block that size on its heap).
    """

    BLOCK_BYTES = 32 * 1024**2  # of float32 per block

    def __init__(self, parts: Sequence[Callable[[], torch.Tensor]], shape: Sequence[int], dtype: type) -> None:
        self.parts, self.dtype = parts, np.dtype(dtype)
        self.nbytes = math.prod(shape) * self.dtype.itemsize

    def tofile(self, f: BinaryIO) -> None:
        for part in self.parts:
            t = part()
            row = max(1, t[0].numel() if t.ndim > 1 else 1)
            for block in t.split(max(1, self.BLOCK_BYTES // (4 * row))):
                block.to(torch.float32).numpy().astype(self.dtype, copy=False).tofile(f)
            del t


def write_gguf(plan: GgufPlan, out: str | os.PathLike[str], quiet: bool = False) -> ConvertResult:
    """Stream the planned tensors into `out`, which appears only when complete."""
    out = Path(out)
    check_disk(out.parent if out.parent.exists() else Path.cwd(), plan.nbytes + HEADROOM, f"writing {out.name}")
    w = plan.writer
    with atomic_path(out) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"converting to {out.name}", disable=quiet)
        for t in plan.tensors:
            arr = _tensor_data(plan, t)
            w.write_tensor_data(arr)  # type: ignore[arg-type]
            bar.update(arr.nbytes)
            del arr
        bar.close()
        w.close()
    return ConvertResult(out, len(plan.tensors), plan.report)


def _tensor_data(plan: GgufPlan, t: PlannedTensor) -> RowBlocks:
    """The GGUF tensor `t` in its output type, laid out for llama.cpp. A plain tensor is converted a block of
    rows at a time as it is written (RowBlocks); a stack is written one slice after another, each read when
    its turn comes, so it never exists whole in memory."""
    dtype = _out_dtype(plan.conv, t.name, len(t.shape), plan.outtype)

    def read(x: torch.Tensor, shape: list[int], what: str) -> torch.Tensor:
        if list(x.shape) != list(shape):
            raise ValueError(f"tensor {what}: shape {list(x.shape)} differs from its header {shape}")
        return x

    if not t.sources:
        x = read(plan.extras[t.name], t.shape, t.name)
        return RowBlocks([lambda: x], t.shape, dtype)
    if not t.stacked:
        x = read(plan.conv.transform(t.name, plan.ckpt.get(t.sources[0])), t.shape, t.sources[0])
        return RowBlocks([lambda: x], t.shape, dtype)

    def slice_of(name: str) -> Callable[[], torch.Tensor]:
        return lambda: read(plan.conv.transform(t.name, plan.ckpt.get(name)), t.shape[1:], name)

    return RowBlocks([slice_of(name) for name in t.sources], t.shape, dtype)


def convert_to_gguf(ckpt: Checkpoint, out: str | os.PathLike[str], outtype: str = "f16",
                    template: str | None = None, name: str | None = None, quiet: bool = False) -> ConvertResult:
    return write_gguf(plan_gguf(ckpt, outtype, template, name), out, quiet)
