"""Rows to token ids and labels, rendered with the base model's own chat template.

Loss falls on assistant tokens only: the character spans of the assistant turns are found
by rendering the conversation up to each turn, and tokens whose characters lie outside
them get the label -100. Templates run in localchat's sandbox, like at chat time, so the
model learns exactly the prompt format it will be asked in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from localchat.templates import render_chat

from .data import DatasetError, Example

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def _render(template: str, messages: list[dict[str, str]], tok: Any, generation_prompt: bool) -> str:
    return render_chat(template, messages, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
                       add_generation_prompt=generation_prompt, origin="the base model's chat template")


def assistant_spans(template: str, messages: list[dict[str, str]], tok: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    full = _render(template, messages, tok, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(template, messages[:i], tok, True)
        end = _render(template, messages[: i + 1], tok, False)
        if not (full.startswith(end) and end.startswith(start)):
            raise DatasetError("the chat template renders a conversation differently from its beginning, "
                               "so assistant turns cannot be located; pick another --chat-format")
        # The turn ends at its end-of-turn marker; the newline a template puts after it is layout.
        spans.append((len(start), len(start) + len(end[len(start):].rstrip())))
    return full, spans


def encode(ex: Example, tok: Any, template: str | None, max_len: int) -> Encoded:
    """Token ids and labels for one example, cut to `max_len` tokens."""
    if ex.text:
        ids = tok(ex.text + (tok.eos_token or ""), add_special_tokens=True)["input_ids"][:max_len]
        return Encoded(ids, list(ids))
    if not template:
        raise DatasetError("the base model has no chat template; pass --chat-format NAME")
    text, spans = assistant_spans(template, list(ex.messages), tok)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [t if any(a <= s < b for a, b in spans) and e > s else IGNORE
              for t, (s, e) in zip(ids, offsets)]
    ids, labels = ids[:max_len], labels[:max_len]
    if all(x == IGNORE for x in labels):
        raise DatasetError(f"{ex.source}: no assistant token fits in {max_len} tokens; shorten the row "
                           "or raise --max-len")
    return Encoded(ids, labels)


def pack(rows: list[Encoded], max_len: int) -> list[Encoded]:
    """Concatenate rows into sequences of up to `max_len` tokens (no padding to waste)."""
    packed: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    for r in rows:
        if ids and len(ids) + len(r.input_ids) > max_len:
            packed.append(Encoded(ids, labels))
            ids, labels = [], []
        ids, labels = ids + r.input_ids, labels + r.labels
    if ids:
        packed.append(Encoded(ids, labels))
    return packed
