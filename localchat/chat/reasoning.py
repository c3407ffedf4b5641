"""A reasoning model's thoughts apart from its answer.

Reasoning models (DeepSeek-R1, Qwen3, QwQ, ...) write their thoughts as ``<think>…</think>``
before the answer; some chat templates open the ``<think>`` in the prompt, so the answer
starts inside the thoughts. The API hands thoughts out as ``reasoning_content``, and they
never go back into the model's context or into a training set: an earlier turn's thoughts
would take context for nothing and teach the model to answer from stale reasoning.
"""

from __future__ import annotations

from typing import Any

OPEN, CLOSE = "<think>", "</think>"


def opens_thoughts(prompt_text: str) -> bool:
    """Whether a prompt ends inside an opened ``<think>`` (the template starts the thoughts)."""
    return prompt_text.rstrip().endswith(OPEN)


class ThoughtSplitter:
    """Splits an answer, fed piece by piece as it streams, into (thoughts, text).

    Only a ``<think>`` block at the very start of the answer is thoughts; a tag later on is
    text the model wrote about tags. A piece that may be the start of a tag (or space
    before one) is held back until the next one says whether it is.
    """

    def __init__(self, thinking: bool = False) -> None:
        self.state = "thinking" if thinking else "start"  # start -> thinking -> text, or start -> text
        self._held = ""
        self._trim = True  # the blank lines that open the thoughts or the answer are neither

    def feed(self, piece: str) -> tuple[str, str]:
        buf, self._held = self._held + piece, ""
        thoughts = ""
        if self.state == "start":
            head = buf.lstrip()
            if OPEN.startswith(head):  # nothing yet, or part of "<think>": wait
                self._held = buf
                return "", ""
            if not head.startswith(OPEN):
                self.state, self._trim = "text", False
                return "", buf
            self.state, buf = "thinking", head[len(OPEN):]
        if self.state == "thinking":
            buf = self._trimmed(buf)
            end = buf.find(CLOSE)
            if end < 0:
                out = buf[:len(buf) - _partial_tag(buf, CLOSE)].rstrip()  # the space before a close is neither
                self._held = buf[len(out):]
                return out, ""
            thoughts, buf = buf[:end].rstrip(), buf[end + len(CLOSE):]
            self.state, self._trim = "text", True
        return thoughts, self._trimmed(buf)

    def _trimmed(self, buf: str) -> str:
        if self._trim:
            buf = buf.lstrip()
            self._trim = not buf
        return buf

    def finish(self) -> tuple[str, str]:
        """What was held back: unfinished thoughts stay thoughts, a lone partial tag is text."""
        held, self._held = self._held, ""
        return (held, "") if self.state == "thinking" else ("", held)


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a start of `tag` (text to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def split_thoughts(text: str) -> tuple[str, str]:
    """A whole answer as (thoughts, text)."""
    splitter = ThoughtSplitter()
    thoughts, answer = splitter.feed(text)
    more_thoughts, more = splitter.finish()
    return thoughts + more_thoughts, answer + more


def without_thoughts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with the thoughts cut out of every assistant turn (and any reasoning field dropped)."""
    out = []
    for m in messages:
        if m.get("role") == "assistant":
            m = {k: v for k, v in m.items() if k not in ("reasoning_content", "thinking")}
            if isinstance(m.get("content"), str):
                m["content"] = split_thoughts(m["content"])[1]
        out.append(m)
    return out
