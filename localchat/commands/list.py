"""`localchat list`: the models in the store."""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata

from ..engine.settings import PRESET, preset_text
from ..fsutil import human
from ..store import ModelEntry, default_store
from ..store.orphans import find_orphans

# Control, format (bidi overrides, zero-width), separator, surrogate and unassigned characters.
_HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}


def printable(text: str) -> str:
    """Untrusted text (an imported file's name, a converted folder's name) as one visible line:
    characters that break a row, reorder what the terminal shows or hide are written as
    escapes (a newline as \\n, U+202E as \\u202e)."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _HIDDEN else c
                   for c in text)


def eval_text(e: ModelEntry) -> str:
    parts = []
    if "ppl" in e.eval:
        parts.append(f"ppl {e.eval['ppl']:.2f}")
    if "kld" in e.eval:
        parts.append(f"KLD {e.eval['kld']:.4f}")
    return ", ".join(parts) or "-"


def format_table(entries: list[ModelEntry]) -> str:
    rows = [("NAME", "FORMAT", "QUANT", "SIZE", "EVAL", "PRESET", "SOURCE")]
    rows += [tuple(map(printable, (e.name, e.format, e.quant, human(e.size), eval_text(e),
                                   preset_text(e.defaults.get(PRESET) or {}), e.source)))
             for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def list_models(args: argparse.Namespace) -> int:
    store = default_store()
    entries = list(store.models().values())
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
    elif not entries:
        print(f"no models in {store.root}; `localchat setup` installs the starter model")
    else:
        print(format_table(entries))
    stray = find_orphans(store)
    if stray and not args.json:
        print(f"{len(stray)} stray item(s) in the store ({human(sum(o.size for o in stray))}) that no model owns: "
              "`localchat doctor` lists them, `localchat doctor --clean` removes them", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat list", description=__doc__)
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return list_models(build_parser().parse_args(argv))
