"""A rendered chat prompt that knows which of its characters are message text.

A chat template mixes its own markup (``<|im_start|>user``) with the messages' text. A
tokenizer told to parse special tokens in the whole prompt would read ``<|im_end|>`` typed
into a message as the real control token, so a message could close its own turn and open a
forged system turn. `render_prompt` records where message text lies (`Prompt.spans`), and
the backend tokenizes those characters as plain text; only the template's markup can make
control tokens.

How the spans are found: the template is rendered twice, once as usual and once with each
message's text replaced by a marker, a private-use character that no message holds. What lies
between the markers is the template's own markup. Walking both renders side by side, each
marker must be followed in the real render by the message's text (or the text stripped, as
``| trim`` does) and then the same markup. A template that changes message text in other
ways, or branches on it, leaves the spans unknown (`spans=None`); the backend then refuses
a message that holds a control-token string rather than guess where it is.

Only conversations with a control-token string in some message need the spans, so the
others render once, and tokenize exactly as they always did.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .sandbox import TemplateError, TemplateLimitError, TemplateSecurityError, render_chat

_FIRST_MARK = 0xF0000  # Supplementary Private Use Area-A: U+F0000..U+FFFFD, one marker per message
_N_MARKS = 0xFFFE
_MARKS = re.compile("[\U000F0000-\U000FFFFD]")

Span = tuple[int, int]


@dataclass(frozen=True)
class Prompt:
    """`text` to tokenize; message text lies at `spans` ([start, end) offsets, sorted, disjoint),
    at least every message text that holds a control-token string.

    `spans` is None when the template's output could not be matched to the messages; the
    backend checks the messages' `texts` then.
    """

    text: str
    spans: tuple[Span, ...] | None = ()
    texts: tuple[str, ...] = ()

    @classmethod
    def message_text(cls, text: str) -> Prompt:
        """`text` that is all message text (an unfinished answer to continue, say)."""
        return cls(text, ((0, len(text)),) if text else (), (text,))

    def __add__(self, other: Prompt) -> Prompt:
        if not isinstance(other, Prompt):
            return NotImplemented
        spans = None if self.spans is None or other.spans is None else \
            self.spans + tuple((s + len(self.text), e + len(self.text)) for s, e in other.spans)
        return Prompt(self.text + other.text, spans, self.texts + other.texts)


def render_prompt(source: str, messages: Sequence[dict[str, str]], *, locate: Callable[[str], bool] = bool,
                  **kwargs: Any) -> Prompt:
    """`render_chat`, keeping where each message's text landed in the prompt.

    `locate` says which message texts need finding: the backend passes "holds a control-token
    string", so an ordinary conversation renders once and gets no spans (no message text
    there can make a control token).
    """
    text = render_chat(source, messages, **kwargs)
    contents = [m.get("content") for m in messages]
    texts = tuple(c for c in contents if isinstance(c, str) and c)
    if not any(map(locate, texts)):
        return Prompt(text, (), texts)
    if len(contents) > _N_MARKS or _MARKS.search(source) or any(_MARKS.search(t) for t in texts):
        return Prompt(text, None, texts)
    marked = [dict(m, content=chr(_FIRST_MARK + i)) if isinstance(m.get("content"), str) and m["content"] else m
              for i, m in enumerate(messages)]
    try:
        skeleton = render_chat(source, marked, **kwargs)
    except (TemplateLimitError, TemplateSecurityError):
        raise
    except TemplateError:  # the template objects to a marker: treat it as one that branches on text
        return Prompt(text, None, texts)
    spans = _align(text, skeleton, [m.get("content") or "" for m in messages])
    return Prompt(text, spans, texts)


def _align(text: str, skeleton: str, contents: list[str]) -> tuple[Span, ...] | None:
    """Where message text lies in `text`, given the same render with markers for the messages."""
    marks = list(_MARKS.finditer(skeleton))
    head = skeleton[:marks[0].start()] if marks else skeleton
    if not text.startswith(head):
        return None
    pos, spans = len(head), []
    for k, mark in enumerate(marks):
        i = ord(mark.group()) - _FIRST_MARK
        if i >= len(contents):  # a marker the messages did not put there
            return None
        markup = skeleton[mark.end():marks[k + 1].start() if k + 1 < len(marks) else len(skeleton)]
        content = contents[i]
        for variant in (content, content.strip(), content.lstrip(), content.rstrip()):
            if text.startswith(variant, pos) and text.startswith(markup, pos + len(variant)):
                break
        else:
            return None
        if variant:
            spans.append((pos, pos + len(variant)))
        pos += len(variant) + len(markup)
    return tuple(spans) if pos == len(text) else None
