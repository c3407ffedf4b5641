"""`localchat rm NAME`: delete a model from the store."""

from __future__ import annotations

import argparse

from ..fsutil import human
from ..store import default_store


def rm(args: argparse.Namespace) -> int:
    store = default_store()
    for name in args.names:
        entry = store.remove(name)
        print(f"removed {name} ({human(entry.size)})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat rm", description=__doc__)
    parser.add_argument("names", nargs="+", metavar="NAME")
    return parser


def main(argv: list[str] | None = None) -> int:
    return rm(build_parser().parse_args(argv))
