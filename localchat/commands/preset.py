"""`localchat preset MODEL [--temp T --top-p P ...]`: show or change a model's sampling defaults.

A model's preset holds the sampling settings chat, the app and the server use for it unless the
user or a request sets their own: read from its GGUF's `general.sampling.*` keys (which
`localchat convert` fills from the checkpoint's generation_config.json) when it enters the store,
the authors' published settings for the starter. Unchanged flags keep their values; `--clear`
drops the preset, so the global defaults apply.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..engine.settings import PRESET, PRESET_FIELDS, SamplingSettings, check_preset, preset_text
from ..options import given
from ..store import ModelEntry, default_store


def preset(args: argparse.Namespace) -> int:
    store = default_store()
    changes = given(SamplingSettings, args)
    if changes or args.clear:
        check_preset(changes, "the preset")  # bounds checked before the manifest is touched

        def change(entry: ModelEntry) -> None:
            current: dict[str, Any] = {} if args.clear else dict(entry.defaults.get(PRESET) or {})
            current.update(changes)
            if current:
                entry.defaults[PRESET] = current
            else:
                entry.defaults.pop(PRESET, None)

        entry = store.update(args.model, change)
    else:
        entry = store.get(args.model)
    current = entry.defaults.get(PRESET) or {}
    check_preset(current, f"model {entry.name!r}: the preset in {store.manifest_path}")
    print(f"{entry.name}: {preset_text(current)}" + ("" if current else " (the global defaults apply)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat preset", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model in the store")
    parser.add_argument("--clear", action="store_true", help="drop the preset (flags given are the new one)")
    SamplingSettings.add_arguments(parser, only=PRESET_FIELDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    return preset(build_parser().parse_args(argv))
