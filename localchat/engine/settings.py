"""Sampling settings: one typed model that also generates its CLI flags, so the CLI, the UI
and the server cannot drift apart on names, defaults or bounds.

A model can carry its own defaults (its preset: the store entry's ``defaults["sampling"]``,
read from the GGUF's ``general.sampling.*`` keys or set with `localchat preset`); every front
end starts from `model_settings` and lets the user or the request override single fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from typing import Any, Mapping

from ..options import Options, option

DEFAULT_MAX_TOKENS = 512
PRESET = "sampling"  # the key of a model's preset in its store entry's defaults


@dataclass(frozen=True)
class SamplingSettings(Options):
    option_group = "sampling"
    temperature: float = option(0.7, "sampling temperature; 0 is greedy", 0.0, 5.0, "--temp")
    top_p: float = option(0.95, "nucleus sampling: keep the smallest set of tokens with this mass", 0.0, 1.0)
    top_k: int = option(40, "sample from the k most likely tokens (0: all)", 0, 100_000)
    min_p: float = option(0.05, "drop tokens less likely than min_p times the best one", 0.0, 1.0)
    repeat_penalty: float = option(1.1, "penalty for repeating recent tokens (1: none)", 0.0, 10.0)
    presence_penalty: float = option(0.0, "penalty for any token already in the text", -2.0, 2.0)
    frequency_penalty: float = option(0.0, "penalty growing with how often a token appeared", -2.0, 2.0)
    max_tokens: int = option(DEFAULT_MAX_TOKENS, "most tokens in one answer", 1, 1_000_000)
    seed: int | None = option(None, "random seed, for answers you can reproduce", 0, 2**32 - 1)
    stop: tuple[str, ...] = option((), "extra stop string")

    def with_stops(self, extra: tuple[str, ...]) -> "SamplingSettings":
        return replace(self, stop=tuple(dict.fromkeys(self.stop + extra)))


# What a preset may set: how a model samples, not what one request asks for (a seed, stops).
PRESET_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingSettings) if f.name not in ("seed", "stop"))


def check_preset(preset: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`preset` as a plain dict, or ValueError naming `where` and the field that is unknown or out
    of range (a hand-edited manifest, a checkpoint's generation_config.json)."""
    if not isinstance(preset, Mapping):
        raise ValueError(f"{where}: the sampling preset must be an object, got {preset!r}")
    for name in preset:
        if name not in PRESET_FIELDS:
            raise ValueError(f"{where}: {name!r} is not a preset setting; valid: {', '.join(PRESET_FIELDS)}")
    try:
        SamplingSettings(**preset)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return dict(preset)


def model_settings(defaults: Mapping[str, Any], where: str = "the model's preset") -> SamplingSettings:
    """The settings a model answers with unless told otherwise: the global defaults, with the
    fields its preset (``defaults["sampling"]``) sets taken from there."""
    return SamplingSettings(**check_preset(defaults.get(PRESET) or {}, where))


def preset_text(preset: Mapping[str, Any]) -> str:
    """A preset in one short line, e.g. "temp 0.2, top_p 0.9" ("-" for none)."""
    names = {"temperature": "temp"}
    return ", ".join(f"{names.get(k, k)} {v:g}" for k, v in preset.items()) or "-"
