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


def test_earlier_thoughts_stay_out_of_a_chat_sessions_context(starter_backend) -> None:
    """ChatSession (the CLI's and the app's path): an earlier answer's thoughts take no tokens of the prompt."""
    from localchat.chat import ChatSession
    from localchat.engine.settings import SamplingSettings

    session = ChatSession(starter_backend)
    one = SamplingSettings(max_tokens=1, temperature=0)

    def prompt_tokens(answer: str) -> int:
        turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer},
                 {"role": "user", "content": "And now?"}]
        list(session.stream_reply(turns, one))
        return session.last_stats.prompt_tokens

    assert prompt_tokens("<think>\nA greeting; answer kindly and at length.\n</think>\n\nHello!") == \
        prompt_tokens("Hello!")


def test_the_app_folds_thoughts_into_their_own_bubble() -> None:
    """The app's chat shows a saved answer's thoughts in a folded "Thoughts" bubble before the answer."""
    from localchat.store.chats import Conversation
    from localchat.ui.chat_tab import _bubbles

    conv = Conversation(messages=[{"role": "user", "content": "2+2?"},
                                  {"role": "assistant", "content": "<think>Add them.</think>\n4"}])
    assert _bubbles(conv) == [{"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "Add them.",
                               "metadata": {"title": "Thoughts", "status": "done"}},
                              {"role": "assistant", "content": "4"}]
