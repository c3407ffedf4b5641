"""`localchat info FILE`: a GGUF file's metadata and tensors, or a GPTQ folder's settings and
whether vLLM serves it with Marlin, read without loading weights."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..artifacts import artifact_from_gptq, dims_from_gguf
from ..engine.settings import preset_text
from ..engine.vllm_check import check_folder
from ..fsutil import human
from ..gguf_file import GGUFHeader, read_gguf


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, list):
        head = ", ".join(repr(v) for v in value[:4])
        return f"[{len(value)} items: {head}{', ...' if len(value) > 4 else ''}]"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary(h: GGUFHeader) -> dict[str, Any]:
    d = dims_from_gguf(h)
    return {
        "file": str(h.path), "size": h.file_size, "gguf_version": h.version,
        "architecture": h.architecture, "name": h.metadata.get("general.name", ""),
        "quant": h.quant, "parameters": h.n_params, "tensors": len(h.tensors),
        "layers": d.n_layers, "context_length": d.n_ctx_train, "embedding": d.n_embd,
        "heads": d.n_head, "kv_heads": d.n_head_kv, "vocab": d.n_vocab,
        "tokenizer": h.metadata.get("tokenizer.ggml.model", ""),
        "chat_template": bool(h.chat_template),
        "sampling": h.sampling,
    }


def gptq_info(folder: Path, as_json: bool) -> int:
    """A GPTQ folder: its shape, quantization and the vLLM verdict (`localchat check-vllm` has the
    details)."""
    a = artifact_from_gptq(folder)
    verdict = check_folder(folder)
    if as_json:
        print(json.dumps({"folder": str(folder), "size": a.size_bytes, "architecture": a.architecture,
                          "quant": a.quant, "layers": a.dims.n_layers, "quantization_config": verdict.config,
                          "vllm_marlin": verdict.ok, "vllm_problems": verdict.problems}, indent=2))
        return 0
    print(f"{folder}: GPTQ folder, {human(a.size_bytes)}")
    print(f"  {a.architecture or '(no architecture)'}: {a.quant}, {a.dims.n_layers} layers, "
          f"context {a.dims.n_ctx_train}, embedding {a.dims.n_embd}, vocab {a.dims.n_vocab}")
    print(f"  {verdict.summary()}")
    return 0


def info(args: argparse.Namespace) -> int:
    if Path(args.file).is_dir():
        return gptq_info(Path(args.file), args.json)
    h = read_gguf(args.file)
    s = summary(h)
    if args.json:
        s["metadata"] = {k: (f"<array of {len(v)}>" if isinstance(v, list) and len(v) > 16 else v)
                         for k, v in h.metadata.items()}
        if args.tensors:
            s["tensor_list"] = [{"name": t.name, "shape": t.shape, "type": t.type_name} for t in h.tensors]
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['file']}: GGUF v{s['gguf_version']}, {human(s['size'])}")
    print(f"  {s['name'] or '(no name)'}: {s['architecture']}, {s['parameters'] / 1e6:.1f}M parameters, "
          f"{s['quant']}")
    print(f"  {s['layers']} layers, context {s['context_length']}, embedding {s['embedding']}, "
          f"heads {s['heads']} (KV {s['kv_heads']}), vocab {s['vocab']} ({s['tokenizer']})")
    print(f"  chat template: {'yes' if s['chat_template'] else 'none (pass --chat-format when chatting)'}")
    print(f"  sampling defaults: {preset_text(s['sampling']) if s['sampling'] else 'none (general.sampling.*)'}")
    if args.metadata:
        for k, v in h.metadata.items():
            print(f"  {k} = {_short(v)}")
    if args.tensors:
        for t in h.tensors:
            print(f"  {t.name:40s} {t.type_name:8s} {'x'.join(map(str, t.shape))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat info", description=__doc__)
    parser.add_argument("file", help="a GGUF file or a GPTQ folder")
    parser.add_argument("--metadata", action="store_true", help="print every metadata key")
    parser.add_argument("--tensors", action="store_true", help="print every tensor")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return info(build_parser().parse_args(argv))
