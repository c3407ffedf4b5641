"""`localchat import FILE.gguf [--name NAME]`: add a GGUF you already have to the store."""

from __future__ import annotations

import argparse

from ..fsutil import human
from ..store import default_store
from ..store.importer import import_gguf


def import_command(args: argparse.Namespace) -> int:
    e = import_gguf(default_store(), args.file, args.name)
    print(f"imported {e.name}: {e.quant}, {human(e.size)} -> `localchat chat --model {e.name}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat import", description=__doc__)
    parser.add_argument("file", help="a .gguf file (it is copied; the original stays)")
    parser.add_argument("--name", help="name in the store (default: from the file name)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return import_command(build_parser().parse_args(argv))
