"""Sampling settings: one typed model that also generates its CLI flags, so the CLI, the UI
and the server cannot drift apart on names, defaults or bounds."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEFAULT_MAX_TOKENS = 512


def _opt(default: Any, help: str, lo: float | None = None, hi: float | None = None, flag: str = "") -> Any:
    return field(default=default, metadata={"help": help, "min": lo, "max": hi, "flag": flag})


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = _opt(0.7, "sampling temperature; 0 is greedy", 0.0, 5.0, "--temp")
    top_p: float = _opt(0.95, "nucleus sampling: keep the smallest set of tokens with this mass", 0.0, 1.0)
    top_k: int = _opt(40, "sample from the k most likely tokens (0: all)", 0, 100_000)
    min_p: float = _opt(0.05, "drop tokens less likely than min_p times the best one", 0.0, 1.0)
    repeat_penalty: float = _opt(1.1, "penalty for repeating recent tokens (1: none)", 0.0, 10.0)
    max_tokens: int = _opt(DEFAULT_MAX_TOKENS, "most tokens in one answer", 1, 1_000_000)
    seed: int | None = _opt(None, "random seed, for answers you can reproduce", 0, 2**32 - 1)
    stop: tuple[str, ...] = _opt((), "extra stop string (repeatable)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if value is None or isinstance(value, tuple):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ValueError(f"{f.name}={value!r} is out of range [{lo}, {hi}]")

    def with_stops(self, extra: tuple[str, ...]) -> "SamplingSettings":
        return replace(self, stop=tuple(dict.fromkeys(self.stop + extra)))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("sampling")
        for f in fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            kind = f.type if isinstance(f.type, type) else str(f.type)
            if f.name == "stop":
                group.add_argument(flag, dest=f.name, action="append", default=None, help=f.metadata["help"])
                continue
            conv = int if "int" in str(kind) else float
            group.add_argument(flag, dest=f.name, type=conv, default=None,
                               help=f"{f.metadata['help']} (default: {f.default})")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "SamplingSettings":
        values: dict[str, Any] = {}
        for f in fields(cls):
            v = getattr(args, f.name, None)
            if v is not None:
                values[f.name] = tuple(v) if f.name == "stop" else v
        values.update(overrides)
        return cls(**values)
