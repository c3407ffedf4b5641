"""A reasoning model's <think>…</think> split from its answer as it streams, and kept out of later turns."""

from __future__ import annotations

import pytest

from localchat.chat.reasoning import ThoughtSplitter, opens_thoughts, split_thoughts, without_thoughts

ANSWER = "<think>\nThe user asks 2+2. A stray </thi is still thought.\n</think>\n\nIt is 4. A later <think> is text."


def stream(splitter: ThoughtSplitter, text: str, size: int) -> tuple[str, str]:
    thoughts = answer = ""
    for i in range(0, len(text), size):
        t, a = splitter.feed(text[i:i + size])
        thoughts, answer = thoughts + t, answer + a
    t, a = splitter.finish()
    return thoughts + t, answer + a


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, len(ANSWER)])
def test_thoughts_split_off_however_the_answer_is_chunked(size: int) -> None:
    """Tags cut across chunks at any place still split; the blank lines around the thoughts belong to neither;
    a <think> once the answer has begun is text."""
    assert stream(ThoughtSplitter(), ANSWER, size) == (
        "The user asks 2+2. A stray </thi is still thought.", "It is 4. A later <think> is text.")


@pytest.mark.parametrize("size", [1, 4, 100])
def test_a_template_that_opens_the_thoughts(size: int) -> None:
    """A prompt ending in <think> starts the answer inside the thoughts; thoughts never closed stay thoughts."""
    assert opens_thoughts("<|im_start|>assistant\n<think>\n") and not opens_thoughts("<|im_start|>assistant\n")
    assert stream(ThoughtSplitter(thinking=True), "Hmm, 2+2.</think>4", size) == ("Hmm, 2+2.", "4")
    assert stream(ThoughtSplitter(thinking=True), "still thinking <", size) == ("still thinking <", "")


def test_answers_without_thoughts_pass_unchanged() -> None:
    """Plain answers, leading space and a lone '<' included, come through as they are."""
    for text in ("Paris.", "  <b>bold</b>", "<", "<thin air", "\n"):
        assert split_thoughts(text) == ("", text)


def test_without_thoughts_cuts_assistant_turns_only() -> None:
    """Earlier answers lose their thoughts and reasoning fields; a user may write the tag and keep it."""
    messages = [{"role": "user", "content": "<think>mine</think> hi"},
                {"role": "assistant", "content": "<think>x</think>Hello.", "reasoning_content": "x"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]
    assert without_thoughts(messages) == [messages[0], {"role": "assistant", "content": "Hello."}, messages[2]]
