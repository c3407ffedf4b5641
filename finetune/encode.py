"""Rows to token ids and labels, rendered with the base model's own chat template.

Loss falls on assistant tokens only: the character spans of the assistant turns are found
by rendering the conversation up to each turn, and tokens whose characters lie outside
them get the label -100. Templates run in localchat's sandbox, like at chat time, so the
model learns exactly the prompt format it will be asked in.

Only the first `max_len` tokens of a row are kept, so only the text that can reach them is
rendered and tokenized (`clip`): a 50 MB row or one of 10,000 turns costs what a row of
`max_len` tokens costs, not gigabytes and minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from localchat.datasets import DatasetError, Example
from localchat.templates import TemplateError, render_chat

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    # Packed rows only: each token's position within its own row. The model sees each row
    # alone (positions restart, attention stays inside the row), as it will at chat time.
    positions: list[int] | None = None
    # Per token: its target is the base model's whole next-token distribution rather than the
    # label (replay rows under --replay-kl); None when no token's is.
    soft: list[bool] | None = None

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@lru_cache(maxsize=4)
def max_token_chars(tok: Any) -> int:
    """The most characters one token of `tok` can cover: its longest vocabulary entry (byte-level
    entries spell one byte per character, and a character is at least a byte)."""
    return max(map(len, tok.get_vocab()), default=1)


def clip(messages: list[dict[str, str]], max_len: int, per_token: int) -> list[dict[str, str]]:
    """The part of a conversation that can reach into its first `max_len` tokens: at most `max_len`
    turns (each renders to a token at least), their texts cut at `max_len * per_token` characters
    in all. Turns after the last assistant one that is left are dropped: nothing learns from them."""
    budget, out = max_len * per_token, []
    for m in messages[:max_len]:
        if budget <= 0:
            break
        out.append(m if len(m["content"]) <= budget else {**m, "content": m["content"][:budget]})
        budget -= len(m["content"])
    while len(out) < len(messages) and out and out[-1]["role"] != "assistant":
        out.pop()
    return out


def _render(template: str, messages: list[dict[str, str]], tok: Any, generation_prompt: bool) -> str:
    return render_chat(template, messages, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
                       add_generation_prompt=generation_prompt, origin="the base model's chat template")


def assistant_spans(template: str, messages: list[dict[str, str]], tok: Any, full: str,
                    until: int | None = None) -> list[tuple[int, int]]:
    """The character spans of the assistant turns in `full`, the rendered conversation, that start
    before character `until`: each needs a render of the turns before it, so the turns past the
    tokens kept are not rendered again."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(template, messages[:i], tok, True)
        if until is not None and len(start) >= until:
            break
        end = _render(template, messages[: i + 1], tok, False)
        if not (full.startswith(end) and end.startswith(start)):
            raise DatasetError("the chat template renders a conversation differently from its beginning, "
                               "so assistant turns cannot be located; pick another --chat-format")
        # The turn ends at its end-of-turn marker; the newline a template puts after it is layout.
        spans.append((len(start), len(start) + len(end[len(start):].rstrip())))
    return spans


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Each token id where its first character lies in an assistant span, else IGNORE (one pass:
    offsets and spans are both in order)."""
    labels, k = [], 0
    for t, (s, e) in zip(ids, offsets):
        while k < len(spans) and spans[k][1] <= s:
            k += 1
        labels.append(t if k < len(spans) and spans[k][0] <= s < e else IGNORE)
    return labels


def encode(ex: Example, tok: Any, template: str | None, max_len: int) -> Encoded:
    """Token ids and labels for one example, cut to `max_len` tokens."""
    limit = max_len * max_token_chars(tok)
    if ex.text:  # the end-of-text token only where the text really ends
        text = ex.text[:limit] if len(ex.text) > limit else ex.text + (tok.eos_token or "")
        ids = tok(text, add_special_tokens=True)["input_ids"][:max_len]
        return Encoded(ids, list(ids))
    if not template:
        raise DatasetError("the base model has no chat template; pass --chat-format NAME")
    messages = clip(list(ex.messages), max_len, max_token_chars(tok))
    try:
        text = _render(template, messages, tok, False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]
        spans = assistant_spans(template, messages, tok, text, offsets[-1][1] if offsets else 0)
    except (TemplateError, DatasetError) as exc:
        raise DatasetError(f"{ex.source}: {exc}" if ex.source else str(exc)) from None
    labels = _labels(ids, offsets, spans)
    if all(x == IGNORE for x in labels):
        raise DatasetError(f"{ex.source}: no assistant token fits in {max_len} tokens; shorten the row "
                           "or raise --max-len")
    return Encoded(ids, labels)


def pack(rows: list[Encoded], max_len: int) -> list[Encoded]:
    """Concatenate rows into sequences of up to `max_len` tokens (no padding to waste).

    Each row keeps its own positions, so training can keep rows apart: a row that could read
    the row before it learns to copy a fact from its context instead of storing it, and then
    fails when asked alone (measured in bench/bench_recall.py).
    """
    packed: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    soft: list[bool] = []
    any_soft = any(r.soft for r in rows)

    def close() -> None:
        packed.append(Encoded(ids, labels, positions, soft if any_soft else None))

    for r in rows:
        if ids and len(ids) + len(r.input_ids) > max_len:
            close()
            ids, labels, positions, soft = [], [], [], []
        ids, labels = ids + r.input_ids, labels + r.labels
        positions = positions + list(range(len(r.input_ids)))
        soft = soft + (r.soft or [False] * len(r.input_ids))
    if ids:
        close()
    return packed
