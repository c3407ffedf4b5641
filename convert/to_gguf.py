"""A checkpoint to an F16 (or F32) GGUF file, streamed tensor by tensor.

Tensor infos are planned from the safetensors headers first, so the writer knows every
offset before it reads a weight; then each tensor is read, laid out for llama.cpp and
written, and dropped. Peak memory is about one tensor, not the model. The file is
written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from localchat.fsutil import HEADROOM, atomic_path, check_disk
from localchat.engine.settings import preset_text
from localchat.gguf_file import SAMPLING_KEYS, STOP_KEY
from localchat.templates import get_format

from .checkpoint import Checkpoint, read_generation_preset
from .gguf import ArchConverter, converter_for
from .tokenizer import load_vocab, write_vocab

OUTTYPES = {"f32": (np.float32, gguf.LlamaFileType.ALL_F32), "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16)}


@dataclass
class ConvertResult:
    path: Path
    tensors: int
    report: list[str]


@dataclass
class GgufPlan:
    """Everything about a GGUF but its tensor data: the header is complete, so its size is known
    before a byte is written (a conversion checks the disk for all its steps up front)."""

    ckpt: Checkpoint
    conv: ArchConverter
    writer: gguf.GGUFWriter
    tensors: list[tuple[str, str | None, list[int]]]  # (gguf name, hf name or None for an extra, shape)
    extras: dict[str, torch.Tensor]
    outtype: str
    report: list[str]
    nbytes: int  # tensor data

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(shape)) for _, _, shape in self.tensors)


def _out_dtype(ndim: int, outtype: str) -> type:
    # Norms, biases and rope factors stay F32, as llama.cpp expects; matrices take the outtype.
    return OUTTYPES[outtype][0] if ndim >= 2 else np.float32


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

    plan: list[tuple[str, str | None, list[int]]] = []
    for hf_name in ckpt.names():
        g = conv.gguf_name(hf_name)
        if g is None:
            report.append(f"left out {hf_name} (tied to the embeddings)")
            continue
        plan.append((g, hf_name, ckpt.shape(hf_name)))
    extras = conv.extra_tensors()
    plan += [(g, None, list(t.shape)) for g, t in extras.items()]

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
    for g, hf_name, shape in plan:
        dtype = _out_dtype(len(shape), outtype)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        total += nbytes
        w.add_tensor_info(g, shape, np.dtype(dtype), nbytes)
    return GgufPlan(ckpt, conv, w, plan, extras, outtype, report, total)


def write_gguf(plan: GgufPlan, out: str | os.PathLike[str], quiet: bool = False) -> ConvertResult:
    """Stream the planned tensors into `out`, which appears only when complete."""
    out = Path(out)
    conv = plan.conv
    check_disk(out.parent if out.parent.exists() else Path.cwd(), plan.nbytes + HEADROOM, f"writing {out.name}")
    w = plan.writer
    with atomic_path(out) as tmp:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"converting to {out.name}", disable=quiet)
        for g, hf_name, shape in plan.tensors:
            t = plan.extras[g] if hf_name is None else conv.transform(g, plan.ckpt.get(hf_name))
            arr = t.to(torch.float32).numpy().astype(_out_dtype(len(shape), plan.outtype), copy=False)
            if list(arr.shape) != list(shape):
                raise ValueError(f"tensor {hf_name or g}: shape {list(arr.shape)} differs from its header {shape}")
            w.write_tensor_data(arr)
            bar.update(arr.nbytes)
            del t, arr
        bar.close()
        w.close()
    return ConvertResult(out, len(plan.tensors), plan.report)


def convert_to_gguf(ckpt: Checkpoint, out: str | os.PathLike[str], outtype: str = "f16",
                    template: str | None = None, name: str | None = None, quiet: bool = False) -> ConvertResult:
    return write_gguf(plan_gguf(ckpt, outtype, template, name), out, quiet)
