"""`localchat preset MODEL [--temp T --top-p P ...]`: show or change a model's sampling defaults.

A model's preset holds the sampling settings chat, the app and the server use for it unless the
user or a request sets their own: read from its GGUF's `general.sampling.*` keys (which
`localchat convert` fills from the checkpoint's generation_config.json) when it enters the store,
the authors' published settings for the starter. Unchanged flags keep their values; `--clear`
drops the preset, so the global defaults apply.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterable

from ..engine.settings import PRESET, PRESET_FIELDS, SamplingSettings, check_preset, preset_text
from ..options import given
from ..store import ModelEntry, Store, default_store


def set_preset(store: Store, name: str, changes: dict[str, Any], clear: bool = False,
               unset: Iterable[str] = ()) -> ModelEntry:
    """Change model `name`'s preset under the store's lock: `clear` starts from none, `unset` drops
    those fields first (the app's sliders: a slider back at the default leaves the preset, the fields
    it has no slider for stay). The CLI and the app's Chat tab both save a preset through here."""
    check_preset(changes, "the preset")  # bounds checked before the manifest is touched

    def change(entry: ModelEntry) -> None:
        current: dict[str, Any] = {} if clear else dict(entry.defaults.get(PRESET) or {})
        for field in unset:
            current.pop(field, None)
        current.update(changes)
        if current:
            entry.defaults[PRESET] = current
        else:
            entry.defaults.pop(PRESET, None)

    return store.update(name, change)


def preset(args: argparse.Namespace) -> int:
    store = default_store()
    changes = given(SamplingSettings, args)
    if changes or args.clear:
        entry = set_preset(store, args.model, changes, args.clear)
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
