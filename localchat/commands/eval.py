"""`localchat eval MODEL --text FILE`: perplexity, and KL divergence against a reference
(`--base`, e.g. the F16 conversion), so a user sees what a quant type costs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..evaluation import DEFAULT_CHUNK, chat_eval_text, evaluate
from ..planner import KV_CACHE_TYPES
from ..store import default_store, resolve_model


def _scored(spec: str) -> Path:
    """A GGUF file (llama.cpp scores it) or an HF / GPTQ folder (torch scores it)."""
    if Path(spec).is_dir():
        return Path(spec)
    model = resolve_model(spec, default_store())
    if not model.artifacts:
        raise ValueError(f"{spec}: nothing to evaluate")
    ggufs = [a for a in model.artifacts if a.format == "gguf"]
    return Path(min(ggufs or model.artifacts, key=lambda a: a.size_bytes).path)


def eval_command(args: argparse.Namespace) -> int:
    if args.save and args.kv_cache != "f16":
        raise ValueError("--save stores the model's own figures: measure them with --kv-cache f16")
    model = _scored(args.model)
    base = _scored(args.base) if args.base else None
    text = Path(args.text).read_text(encoding="utf-8") if args.text else chat_eval_text(base or model)
    result = evaluate(model, text, base=base, chunk=args.chunk, threads=args.threads, kv_cache=args.kv_cache)
    print(result.summary())
    if args.save:
        default_store().update_eval(args.model, result.figures())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model in the store, a GGUF file, or a GPTQ / HF folder")
    parser.add_argument("--text", help="a UTF-8 text file (default: the shipped chat conversations)")
    parser.add_argument("--base", help="reference model for KL divergence (e.g. the F16 GGUF, or the HF "
                                       "folder a GPTQ model came from)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="tokens per evaluation window")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--kv-cache", choices=KV_CACHE_TYPES, default="f16",
                        help="KV cache type to score MODEL with (--base is scored with f16): what it costs")
    parser.add_argument("--save", action="store_true", help="store the figures in the manifest")
    return parser


def main(argv: list[str] | None = None) -> int:
    return eval_command(build_parser().parse_args(argv))
