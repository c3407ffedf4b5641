"""The interface every inference backend implements (llama.cpp, GPTQ).

A backend turns a rendered prompt into a stream of text chunks and reports timing; the
chat layer above it owns templates, turns and context fitting, so each backend stays small.
A prompt is a plain str (a raw completion prompt: the caller's own markup, control tokens
parsed everywhere) or a chat `Prompt`, whose message text is tokenized as text.
"""

from __future__ import annotations

import bisect
import re
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Union

from ..templates.prompt import Prompt
from .settings import SamplingSettings

PromptLike = Union[str, Prompt]
_SPACE = " \t\n\v\f\r"  # C isspace, as llama.cpp strips around lstrip/rstrip tokens


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


class CannotEmbed(ValueError):
    """The model's backend gives no embeddings."""


class SpecialTokens:
    """The strings a tokenizer reads as control tokens only when told to parse special tokens.

    `split` cuts a chat prompt at those that lie outside message text, so that the text
    pieces can be tokenized with special-token parsing off and the markup's control tokens
    put in as ids: the same fragments the tokenizer itself makes when it parses a whole
    prompt (it splits at control tokens and tokenizes each piece of text alone), minus the
    ones a message typed.
    """

    def __init__(self, ids: Mapping[str, int], lstrip: Iterable[str] = (), rstrip: Iterable[str] = ()) -> None:
        self.ids = {text: i for text, i in ids.items() if text}
        self.lstrip, self.rstrip = frozenset(lstrip), frozenset(rstrip)
        longest_first = sorted(self.ids, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, longest_first))) if self.ids else None

    def find(self, text: str) -> list[tuple[int, int]]:
        """[start, end) of the control-token strings in `text`, leftmost first, the longest at a
        place. (llama.cpp takes the longest token first wherever it is; the two differ only for
        token strings that overlap one another, which vocabularies do not have.)"""
        return [m.span() for m in self._pattern.finditer(text)] if self._pattern else []

    def first_in(self, text: str) -> str | None:
        found = self._pattern.search(text) if self._pattern else None
        return found.group() if found else None

    def occurs_in(self, text: str) -> bool:
        return self.first_in(text) is not None

    def split(self, prompt: Prompt) -> list[str | int] | None:
        """`prompt` as text pieces and control-token ids; None when no message text holds a
        control-token string, so tokenizing the whole text with special tokens parsed is right
        (and gives the ids it always gave)."""
        if prompt.spans is None:
            for text in prompt.texts:
                if token := self.first_in(text):
                    raise ValueError(f"a message holds {token!r}, a control token of this model, and localchat "
                                     "cannot tell where message text lies in what the chat template made of it "
                                     "(the template rewrites or branches on message text), so it cannot keep it "
                                     "as plain text; refused")
            return None
        text, spans = prompt.text, prompt.spans
        ends = [e for _, e in spans]

        def in_message(s: int, e: int) -> bool:
            j = bisect.bisect_right(ends, s)
            return j < len(spans) and spans[j][0] < e

        found = self.find(text)
        if not any(in_message(s, e) for s, e in found):
            return None
        pieces: list[str | int] = []
        pos = 0
        for s, e in found:
            if s < pos or in_message(s, e):  # (s < pos: inside the space an rstrip token took)
                continue
            token, left = text[s:e], text[pos:s]
            if token in self.lstrip:
                left = left.rstrip(_SPACE)
            if left:
                pieces.append(left)
            pieces.append(self.ids[token])
            pos = e
            if token in self.rstrip:
                while pos < len(text) and text[pos] in _SPACE:
                    pos += 1
        if pos < len(text):
            pieces.append(text[pos:])
        return pieces


class Backend(ABC):
    name: str
    n_ctx: int
    template: ModelTemplate
    special: SpecialTokens

    def tokenize(self, prompt: PromptLike) -> list[int]:
        """Token ids of `prompt`: a str with control tokens parsed everywhere; a chat Prompt
        with its message text as plain text."""
        if isinstance(prompt, str):
            return self._encode(prompt)
        pieces = self.special.split(prompt)
        return self._encode(prompt.text) if pieces is None else self._encode_pieces(pieces)

    @abstractmethod
    def _encode(self, text: str) -> list[int]:
        """`text` as the tokenizer reads a whole prompt, control tokens parsed."""

    @abstractmethod
    def _encode_pieces(self, pieces: list[str | int]) -> list[int]:
        """A prompt given as pieces (`SpecialTokens.split`): str pieces as plain text, ids as they
        are, with what `_encode` adds around a whole prompt (a BOS, say)."""

    def count_tokens(self, prompt: PromptLike) -> int:
        """Tokens `prompt` takes."""
        return len(self.tokenize(prompt))

    @abstractmethod
    def stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None = None,
               lstrip: bool = True, grammar: str | None = None) -> Iterator[Chunk]:
        """Generate from `prompt`, yielding text as it comes; the last chunk carries stats.

        `lstrip` drops the whitespace a new answer starts with; continuing a cut-off answer
        keeps it, or "sails" + " of" would print as "sailsof". `grammar` (GBNF, root rule
        "root") constrains the answer: JSON to a schema, a tool call.
        """

    def complete(self, prompt: PromptLike, settings: SamplingSettings) -> tuple[str, GenerationStats]:
        parts, stats = [], None
        for chunk in self.stream(prompt, settings):
            parts.append(chunk.text)
            stats = chunk.stats or stats
        assert stats is not None
        return "".join(parts), stats

    def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        """Unit-length embeddings of `texts` and the tokens they took; ValueError names the input
        (``input[i]``) that is too long (unless `truncate`) or empty. CannotEmbed where the
        backend has no pooled output."""
        raise CannotEmbed(f"the {self.name} backend gives no embeddings")

    def engine(self, slots: int) -> Any:
        """What decodes for many callers (the server, the app): here one answer at a time, in order;
        the llama.cpp backend batches up to `slots` (engine/batching.py)."""
        from .batching import SerialEngine

        return SerialEngine(self)

    def close(self) -> None:
        """Free the model's memory."""
