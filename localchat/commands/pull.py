"""`localchat pull REPO [FILE]`: download a model from the Hugging Face Hub into the store."""

from __future__ import annotations

import argparse

from ..fsutil import human
from ..store.pull import pull


def pull_command(args: argparse.Namespace) -> int:
    entry = pull(args.repo, args.file, name=args.name, revision=args.revision, quiet=args.quiet)
    print(f"pulled {entry.name}: {entry.format} {entry.quant}, {human(entry.size)}, sha256 verified")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat pull", description=__doc__)
    parser.add_argument("repo", help="OWNER/NAME on the Hugging Face Hub")
    parser.add_argument("file", nargs="?", help="file in the repo (default: its GGUF, preferring Q4_K_M, "
                                                "or its safetensors checkpoint)")
    parser.add_argument("--name", help="name in the store (default: from the file name)")
    parser.add_argument("--revision", help="branch, tag or commit")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    return pull_command(build_parser().parse_args(argv))
