"""A GGUF model back into a Hugging Face checkpoint, so a model that exists only as GGUF in
the store can be fine-tuned.

Streamed, tensor by tensor: each GGUF tensor is read from the file (not through a mapping
that would keep every page it touched resident), dequantized by gguf-py, laid out as
transformers wants it (its own GGUF tensor processors undo llama.cpp's Q/K permutation, and
its name map gives the HF names), cast to the dtype training holds the base in, and written
(convert/to_hf.py). A 7B Q4_K_M never sits in memory as float32 (28 GB), nor on disk. The
disk is checked before anything is written.

transformers' rebuilt tokenizer keeps the vocabulary and merges but not llama.cpp's BPE
pre-tokenizer, which we restore from `tokenizer.ggml.pre` so the model tokenizes as it did.
The folder appears only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from localchat.fsutil import atomic_folder, check_disk
from localchat.gguf_file import read_gguf

from .to_hf import TensorSpec, folder_bytes, write_safetensors
from .tokenizer import pre_tokenizer_config

F16_MAX = float(torch.finfo(torch.float16).max)


class GgufToHfError(ValueError):
    """A GGUF this path cannot turn back into an HF checkpoint; the message names the file."""


def gguf_to_hf(gguf_path: Path, out: Path, dtype: torch.dtype = torch.bfloat16, quiet: bool = True) -> Path:
    """`out` as the HF checkpoint of `gguf_path`, weights in `dtype` (made once; an existing one is kept)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    header = read_gguf(gguf_path)
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):  # the model's tensor names and shapes, no memory
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    tensors = _GgufTensors(gguf_path, str(header.metadata.get("general.architecture")), config, skeleton)
    specs = {n: TensorSpec(tuple(t.shape), dtype) for n, t in skeleton.state_dict().items()
             if n in tensors.names}
    check_disk(out.parent, folder_bytes(specs),
               f"dequantizing {gguf_path.name} to {str(dtype).removeprefix('torch.')} for training")
    with atomic_folder(out) as tmp:
        write_safetensors(tmp, specs, lambda n: _cast(tensors.get(n), dtype), f"dequantizing {gguf_path.name}",
                          quiet)
        config.save_pretrained(tmp)
        skeleton.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        pre = header.metadata.get("tokenizer.ggml.pre")
        tj = tmp / "tokenizer.json"
        # BPE only: a SentencePiece vocabulary ("llama", pre "default") has no pre-tokenizer to restore.
        if header.metadata.get("tokenizer.ggml.model") == "gpt2" and isinstance(pre, str) and tj.is_file():
            data = json.loads(tj.read_text(encoding="utf-8"))
            data["pre_tokenizer"] = pre_tokenizer_config(pre)
            tj.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in `dtype`; a tensor past float16's range goes to bfloat16 (same size) instead of to inf."""
    if dtype == torch.float16 and t.numel() and float(t.abs().max()) > F16_MAX:
        return t.to(torch.bfloat16)
    return t.to(dtype)


class _GgufTensors:
    """The GGUF's tensors by HF name, each read and dequantized on request."""

    def __init__(self, path: Path, arch: str, config: Any, skeleton: torch.nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map)

        self.path = path
        self.reader = GGUFReader(path)  # header and offsets; tensor data is read per tensor below
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
        self.to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        by_name = {t.name: t for t in self.reader.tensors}
        self.by_hf = {hf: by_name[g] for g, hf in self.to_hf.items() if g in by_name}
        self.names = set(self.by_hf)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = sorted(set(skeleton.state_dict()) - self.names - tied)
        if missing:
            raise GgufToHfError(f"{path}: no GGUF tensor for {', '.join(missing[:5])}"
                                + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                                + f"; the {arch} layout cannot be turned back into a checkpoint tensor by tensor")

    def get(self, hf_name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self.by_hf[hf_name]
        raw = np.fromfile(self.path, dtype=t.data.dtype, count=t.data.size, offset=int(t.data_offset))
        done = self.processor.process(weights=dequantize(raw.reshape(t.data.shape), t.tensor_type), name=t.name,
                                      tensor_key_mapping=self.to_hf, parsed_parameters={"tensors": {}})
        if done.weights is None or done.name != t.name:  # a processor that splits or renames (MoE experts)
            raise GgufToHfError(f"{self.path}: tensor {t.name} is split or renamed on its way to transformers; "
                                "this GGUF cannot be turned back into a checkpoint tensor by tensor")
        return torch.from_numpy(np.ascontiguousarray(done.weights))
