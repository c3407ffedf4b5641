"""A checkpoint as a plain Hugging Face folder (safetensors shards, config, tokenizer), streamed.

What writes one: fine-tuning's `--save-merged` (base + adapter, merged tensor by tensor by the
checkpoint loader), GPTQ's clean copy of inputs GPTQModel cannot read as they are, and a
GGUF-only base dequantized for training (from_gguf.py). None of them holds the model: shards
are planned from shapes alone (huggingface_hub's splitter, on meta tensors), then each shard's
tensors are made, written and dropped before the next, so peak memory is about one shard
(SHARD_BYTES), not the model. The folder appears only when complete (`atomic_folder`).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from localchat.fsutil import HEADROOM, atomic_folder, check_disk

from .checkpoint import Checkpoint, safetensors_header

SHARD_BYTES = 1 << 30  # 7B in bf16: 14 shards, at most ~1 GB of them in memory at once
# Files that make a folder load as the model it came from, beside its weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
CONFIG_FILES = ("config.json", "generation_config.json")
# safetensors dtype names -> torch (the ones a checkpoint's own weights come in).
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the folder to write, before it exists: enough to plan shards and disk."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def folder_bytes(specs: dict[str, TensorSpec]) -> int:
    """Disk the weights of a folder need, with headroom for headers, config and tokenizer."""
    return sum(s.nbytes for s in specs.values()) + HEADROOM


def stored_specs(ckpt: Checkpoint) -> dict[str, TensorSpec]:
    """Each tensor of `ckpt` in the dtype its source file stores it in (read from the safetensors
    headers, no weight read): a merge computed in float32 is written back in the base's own dtype."""
    headers: dict[Path, dict[str, tuple[str, list[int]]]] = {}
    specs = {}
    for name in ckpt.names():
        src = ckpt.sources[name]
        if src.file.suffix == ".safetensors":
            if src.file not in headers:
                headers[src.file] = safetensors_header(src.file)
            dtype = TORCH_DTYPES.get(headers[src.file][src.key][0], torch.float32)
        else:  # a .bin shard is in memory whole anyway
            dtype = ckpt.get(name).dtype
        specs[name] = TensorSpec(tuple(ckpt.shape(name)), dtype)
    return specs


def write_safetensors(folder: Path, specs: dict[str, TensorSpec], get: Callable[[str], torch.Tensor],
                      desc: str = "writing", quiet: bool = True) -> None:
    """`model.safetensors` (or shards and their index) in `folder`, each tensor from `get(name)`,
    which returns it in its spec's dtype (or another of the same size, e.g. bf16 for f16)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(
        {n: torch.empty(s.shape, dtype=s.dtype, device="meta") for n, s in specs.items()},
        filename_pattern="model{suffix}.safetensors", max_shard_size=SHARD_BYTES)
    bar = tqdm(total=sum(s.nbytes for s in specs.values()), unit="B", unit_scale=True, desc=desc, disable=quiet)
    for file, names in split.filename_to_tensors.items():
        shard = {}
        for name in names:
            t = get(name).contiguous()
            spec = specs[name]
            if tuple(t.shape) != spec.shape or t.dtype.itemsize != spec.dtype.itemsize:
                raise ValueError(f"tensor {name}: {t.dtype} {list(t.shape)} differs from the planned "
                                 f"{spec.dtype} {list(spec.shape)}")
            shard[name] = t
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        bar.update(sum(t.nbytes for t in shard.values()))
        del shard
    bar.close()
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(ckpt: Checkpoint, out: Path, what: str, quiet: bool = True) -> Path:
    """`ckpt` as the loader sees it (adapter merged, wrapper prefix stripped, value head dropped)
    written to `out` as a plain folder, every tensor in the dtype its source stores it in; the disk
    is checked first ("needs X, has Y")."""
    specs = stored_specs(ckpt)
    check_disk(out.parent, folder_bytes(specs), what)
    with atomic_folder(out) as tmp:
        write_safetensors(tmp, specs, lambda n: ckpt.get(n).to(specs[n].dtype), f"writing {out.name}", quiet)
        tokenizer_dir = ckpt.tokenizer_dir or ckpt.folder  # an adapter's own tokenizer wins over its base's
        for names, folders in ((CONFIG_FILES, (ckpt.folder,)), (TOKENIZER_FILES, (tokenizer_dir, ckpt.folder))):
            for name in names:
                found = next((f / name for f in folders if (f / name).is_file()), None)
                if found:
                    shutil.copyfile(found, tmp / name)
    return out
