"""The interface every inference backend implements (llama.cpp now, GPTQ on CUDA later).

A backend turns a rendered prompt into a stream of text chunks and reports timing; the
chat layer above it owns templates, turns and context fitting, so each backend stays small.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from .settings import SamplingSettings


@dataclass(frozen=True)
class ModelTemplate:
    """What the chat layer needs to turn messages into this model's prompt."""

    source: str | None  # the model's own jinja chat template, if it has one
    bos_token: str
    eos_token: str
    origin: str  # names the model in errors
    stop: tuple[str, ...] = ()  # stop strings the file carries with its template


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    cached_tokens: int  # prompt tokens reused from the previous turn's KV cache
    completion_tokens: int
    ttft_s: float  # time to first token
    decode_s: float  # from the first token to the last
    finish_reason: str  # "stop", "length" or "cancelled"

    @property
    def prompt_tok_s(self) -> float:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.ttft_s if self.ttft_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return (self.completion_tokens - 1) / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (f"{self.completion_tokens} tokens, {self.decode_tok_s:.1f} tok/s, "
                f"first token {self.ttft_s * 1000:.0f} ms, prompt {self.prompt_tokens} tokens "
                f"({self.prompt_tok_s:.0f} tok/s, {self.cached_tokens} cached), {self.finish_reason}")


@dataclass(frozen=True)
class Chunk:
    text: str
    stats: GenerationStats | None = None  # set on the last chunk only


class ContextOverflow(ValueError):
    """The prompt alone does not fit the context window."""


class Backend(ABC):
    name: str
    n_ctx: int
    template: ModelTemplate

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes as a prompt (special tokens parsed)."""

    @abstractmethod
    def stream(self, prompt: str, settings: SamplingSettings, cancel: threading.Event | None = None,
               lstrip: bool = True) -> Iterator[Chunk]:
        """Generate from `prompt`, yielding text as it comes; the last chunk carries stats.

        `lstrip` drops the whitespace a new answer starts with; continuing a cut-off answer
        keeps it, or "sails" + " of" would print as "sailsof".
        """

    def complete(self, prompt: str, settings: SamplingSettings) -> tuple[str, GenerationStats]:
        parts, stats = [], None
        for chunk in self.stream(prompt, settings):
            parts.append(chunk.text)
            stats = chunk.stats or stats
        assert stats is not None
        return "".join(parts), stats

    def close(self) -> None:
        """Free the model's memory."""
