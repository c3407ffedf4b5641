"""Options shared by the commands that run a model."""

from __future__ import annotations

import argparse

from ..planner import BACKENDS, KV_CACHE_TYPES, Overrides
from ..store import DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"a model in the store, a GGUF file, or a model folder (default: {DEFAULT_MODEL})")
    g.add_argument("--backend", choices=BACKENDS, help="force a backend instead of the planner's choice")
    g.add_argument("--ctx", type=int, help="context size in tokens (default: planner's choice)")
    g.add_argument("--gpu-layers", type=int, help="layers to offload to the GPU")
    g.add_argument("--threads", type=int, help="CPU threads (default: physical cores)")
    g.add_argument("--quant", help="pick the model's artifact with this quant type (e.g. Q4_K_M)")
    g.add_argument("--kv-cache", choices=KV_CACHE_TYPES, help="KV cache type (llama.cpp; default f16): q8_0 and "
                   "q4_0 take about 1/2 and 1/4 of the memory, with flash attention")
    g.add_argument("--parallel", type=int, help="answers decoded at once, each with the full context "
                   "(as `localchat serve --parallel`; the plan counts their KV cache)")


def overrides_from(args: argparse.Namespace) -> Overrides:
    return Overrides(backend=args.backend, context=args.ctx, gpu_layers=args.gpu_layers,
                     threads=args.threads, quant=args.quant, kv_cache=args.kv_cache, parallel=args.parallel)
