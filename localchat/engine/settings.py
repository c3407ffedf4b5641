"""Sampling settings: one typed model that also generates its CLI flags, so the CLI, the UI
and the server cannot drift apart on names, defaults or bounds."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..options import Options, option

DEFAULT_MAX_TOKENS = 512


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


