"""The runnable files a model has (a GGUF file, a GPTQ folder) and the shapes the planner
needs to size memory: read from headers and configs, never by loading weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .gguf_file import GGUFHeader, read_gguf

Format = Literal["gguf", "gptq", "hf"]  # "hf": an unquantized safetensors checkpoint


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int

    def kv_bytes(self, context: int, bytes_per_value: int = 2) -> int:
        """K and V caches for `context` tokens (f16 by default, as llama.cpp and torch keep them)."""
        return 2 * self.n_layers * self.n_head_kv * self.head_dim * context * bytes_per_value


@dataclass(frozen=True)
class Artifact:
    format: Format
    path: str
    size_bytes: int  # weights as they load
    layer_bytes: int  # weights of one repeating block (what GPU offload moves)
    quant: str
    dims: ModelDims
    architecture: str = ""
    lora_path: str | None = None  # a GGUF LoRA adapter llama.cpp applies on top at load time

    @property
    def label(self) -> str:
        lora = f" + LoRA {Path(self.lora_path).name}" if self.lora_path else ""
        return f"{self.format.upper()} {self.quant} ({Path(self.path).name}){lora}"


def dims_from_gguf(h: GGUFHeader) -> ModelDims:
    n_layers = int(h.arch_value("block_count", 0))
    n_embd = int(h.arch_value("embedding_length", 0))
    n_head = int(h.arch_value("attention.head_count", 1) or 1)
    n_head_kv = h.arch_value("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):  # per-layer counts in some architectures
        n_head_kv = max(n_head_kv)
    head_dim = int(h.arch_value("attention.key_length", 0) or (n_embd // n_head if n_head else 0))
    n_vocab = int(h.arch_value("vocab_size", 0) or h.array_lengths.get("tokenizer.ggml.tokens", 0))
    return ModelDims(n_layers=n_layers, n_ctx_train=int(h.arch_value("context_length", 2048)),
                     n_embd=n_embd, n_head=n_head, n_head_kv=int(n_head_kv), head_dim=head_dim,
                     n_vocab=n_vocab)


def artifact_from_gguf(path: str | Path, header: GGUFHeader | None = None) -> Artifact:
    h = header or read_gguf(path)
    dims = dims_from_gguf(h)
    blocks = sum(t.nbytes for t in h.tensors if t.name.startswith("blk."))
    layer = blocks // dims.n_layers if dims.n_layers else h.weights_bytes
    return Artifact(format="gguf", path=str(Path(path)), size_bytes=h.weights_bytes,
                    layer_bytes=layer, quant=h.quant, dims=dims, architecture=h.architecture)


def _json_object(path: Path) -> dict[str, Any]:
    """A JSON object file; {} when it is absent, ValueError naming the file when it is not an object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def quantization_config(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """A model folder's quantization settings, as vLLM and transformers read them: config.json's
    `quantization_config` first, else quantize_config.json (AutoGPTQ's file); {} for an unquantized
    checkpoint. A note when both files exist and disagree on a field a GPTQ kernel reads. The one
    reader of these files for the planner's artifacts, the store's resolver and `check-vllm`."""
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: no config.json: not a Hugging Face model folder")
    hf = _json_object(folder / "config.json").get("quantization_config") or {}
    qfile = _json_object(folder / "quantize_config.json")
    notes = []
    if hf and qfile:
        for key in ("bits", "group_size", "sym", "desc_act", "checkpoint_format"):
            if key in qfile and hf.get(key) != qfile[key]:
                notes.append(f"config.json says {key}={hf.get(key)!r} but quantize_config.json says "
                             f"{qfile[key]!r}; vLLM reads config.json")
    return (hf or qfile), notes


def _artifact_of_folder(folder: Path, fmt: Format, quant: str, embed_bytes_per_value: int) -> Artifact:
    """Sizes from a folder's safetensors files, shapes from its config.json."""
    cfg = _json_object(folder / "config.json")
    n_layers = int(cfg.get("num_hidden_layers", 0))
    n_head = int(cfg.get("num_attention_heads", 1))
    n_embd = int(cfg.get("hidden_size", 0))
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    dims = ModelDims(n_layers=n_layers, n_ctx_train=int(cfg.get("max_position_embeddings", 2048)),
                     n_embd=n_embd, n_head=n_head,
                     n_head_kv=int(cfg.get("num_key_value_heads", n_head)),
                     head_dim=int(cfg.get("head_dim") or n_embd // n_head),
                     n_vocab=int(cfg.get("vocab_size", 0)))
    embed = 2 * dims.n_vocab * n_embd * embed_bytes_per_value  # embedding and head: not in the layers
    layer = max(size - embed, 0) // n_layers if n_layers else size
    arch = (cfg.get("architectures") or [""])[0]
    return Artifact(format=fmt, path=str(folder), size_bytes=size, layer_bytes=layer, quant=quant, dims=dims,
                    architecture=arch)


def artifact_from_gptq(folder: str | Path) -> Artifact:
    """A GPTQ checkpoint folder: sizes from its safetensors files, shapes from config.json."""
    folder = Path(folder)
    qcfg, _ = quantization_config(folder)
    # fp16 embedding and head stay unquantized
    return _artifact_of_folder(folder, "gptq", f"GPTQ-{qcfg.get('bits', 4)}bit-g{qcfg.get('group_size', 128)}", 2)


HF_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
HF_WIDTHS = dict(HF_DTYPES.values())  # an HF checkpoint's quant (its dtype) -> bytes per weight
HF_DEFAULT_WIDTH = 2  # a dtype not in HF_DTYPES is sized as 16-bit


def artifact_from_hf(folder: str | Path) -> Artifact:
    """An unquantized Hugging Face checkpoint (config.json + safetensors), which only vLLM runs as it is;
    the other backends need `localchat convert` first. Its quant is the dtype it is stored in."""
    folder = Path(folder)
    cfg = _json_object(folder / "config.json")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    quant, width = HF_DTYPES.get(dtype, (dtype.upper(), HF_DEFAULT_WIDTH))
    return _artifact_of_folder(folder, "hf", quant, width)
