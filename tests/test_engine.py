"""The llama.cpp backend and chat sessions on the real starter model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from localchat.artifacts import artifact_from_gguf
from localchat.chat import ChatSession
from localchat.engine import ContextOverflow, SamplingSettings
from localchat.engine.llamacpp import LlamaCppBackend
from localchat.hardware import probe
from localchat.planner import Overrides, plan
from localchat.store import STARTER

GREEDY = SamplingSettings(temperature=0.0, repeat_penalty=1.0, max_tokens=48)


def session(backend: LlamaCppBackend, **kw) -> ChatSession:
    return ChatSession(backend, system=kw.pop("system", STARTER.system), **kw)


def test_greedy_answer_knows_paris(starter_backend: LlamaCppBackend) -> None:
    answer = session(starter_backend).ask("What is the capital of France?", GREEDY)
    assert "Paris" in answer


def test_stream_equals_llama_cpp_non_streamed(starter_backend: LlamaCppBackend) -> None:
    """Our streamed text is exactly what llama-cpp-python's own non-streamed completion gives."""
    s = session(starter_backend)
    msgs = s.messages + [{"role": "user", "content": "Write one sentence about the sea."}]
    prompt, _ = s.fit(msgs, 64)
    chunks = list(s.stream_reply(msgs, GREEDY))
    streamed = "".join(c.text for c in chunks)
    assert len([c for c in chunks if c.text]) > 3, "the answer came in pieces"
    raw = starter_backend.llm.create_completion(prompt.text, max_tokens=GREEDY.max_tokens, temperature=0.0,
                                                repeat_penalty=1.0, stop=list(s.template.stop))
    assert streamed == raw["choices"][0]["text"].strip()
    assert chunks[-1].stats is not None
    assert chunks[-1].stats.completion_tokens == raw["usage"]["completion_tokens"]


def test_follow_up_reuses_kv_cache_and_reports_speed(starter_backend: LlamaCppBackend) -> None:
    s = session(starter_backend)
    s.ask("Name a colour.", GREEDY)
    s.ask("Name another one.", GREEDY)
    st = s.last_stats
    assert st is not None
    assert st.cached_tokens > 20  # the first turn was not evaluated again
    assert st.prompt_tokens > st.cached_tokens
    assert st.ttft_s > 0 and st.decode_tok_s > 5
    assert st.finish_reason in ("stop", "length")


def test_seeded_sampling_repeats(starter_backend: LlamaCppBackend) -> None:
    hot = SamplingSettings(temperature=0.9, seed=42, max_tokens=24)
    a = session(starter_backend).ask("Tell me a story.", hot)
    b = session(starter_backend).ask("Tell me a story.", hot)
    c = session(starter_backend).ask("Tell me a story.", SamplingSettings(temperature=0.9, seed=7, max_tokens=24))
    assert a == b
    assert a != c


def test_stop_string_ends_the_answer(starter_backend: LlamaCppBackend) -> None:
    s = session(starter_backend)
    free = s.ask("What is the capital of France?", GREEDY)
    assert "Paris" in free
    s = session(starter_backend)
    stopped = s.ask("What is the capital of France?", SamplingSettings(temperature=0.0, repeat_penalty=1.0,
                                                                      max_tokens=48, stop=("Paris",)))
    assert stopped.rstrip() == free[: free.index("Paris")].rstrip()
    assert "Paris" not in stopped
    assert s.last_stats is not None and s.last_stats.finish_reason == "stop"


def test_max_tokens_and_cancel(starter_backend: LlamaCppBackend) -> None:
    s = session(starter_backend)
    s.ask("Write a long essay about rivers.", SamplingSettings(temperature=0.0, max_tokens=5))
    assert s.last_stats.completion_tokens == 5 and s.last_stats.finish_reason == "length"
    cancel = threading.Event()
    s = session(starter_backend)
    got = []
    for chunk in s.send("Write a long essay about mountains.", SamplingSettings(max_tokens=400), cancel):
        got.append(chunk.text)
        cancel.set()  # the user pressed Stop after the first piece
    assert s.last_stats.finish_reason == "cancelled"
    assert s.last_stats.completion_tokens <= 3
    assert s.messages[-1] == {"role": "assistant", "content": "".join(got)}


def test_conversation_longer_than_context_keeps_working(starter_gguf: Path) -> None:
    p = plan(probe(), [artifact_from_gguf(starter_gguf)], Overrides(context=512))
    backend = LlamaCppBackend(p)
    try:
        s = session(backend)
        settings = SamplingSettings(temperature=0.0, max_tokens=40)
        dropped = []
        for i in range(10):
            answer = s.ask(f"Fact number {i}: the sky is blue and grass is green. "
                           f"Please repeat fact number {i} back to me in your own words.", settings)
            assert answer.strip(), f"turn {i} got an empty answer"
            dropped.append(s.last_dropped)
        assert max(dropped) > 0, "the context overflowed, so old turns must have been dropped"
        assert s.messages[0] == {"role": "system", "content": STARTER.system}
        # what the model saw still starts with the system prompt
        seen, _ = s.fit(s.messages + [{"role": "user", "content": "hi"}], 40)
        assert seen.text.startswith(f"<|im_start|>system\n{STARTER.system}")
    finally:
        backend.close()


def test_message_longer_than_context_is_a_clear_error(starter_backend: LlamaCppBackend) -> None:
    with pytest.raises(ContextOverflow, match=r"the message takes \d+ tokens .* context holds 2048"):
        session(starter_backend).ask("word " * 5000, GREEDY)


def test_models_own_template_is_used(starter_backend: LlamaCppBackend) -> None:
    s = ChatSession(starter_backend)  # no system prompt: the template adds its own
    prompt = s.render([{"role": "user", "content": "hi"}])
    assert prompt.text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                      "Hugging Face<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert starter_backend.template.source in (starter_backend.llm.metadata.get("tokenizer.chat_template"),)


def test_named_chat_format_overrides_template(starter_backend: LlamaCppBackend) -> None:
    s = ChatSession(starter_backend, chat_format="vicuna")
    assert s.render([{"role": "user", "content": "hi"}]).text.endswith("USER: hi ASSISTANT:")
    assert "USER:" in s.template.stop


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingSettings(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingSettings(max_tokens=0)



def test_temperature_applies_before_top_p(starter_backend: LlamaCppBackend) -> None:
    """Samplers run in transformers' order, temperature first: at temperature 0.2 the starter's first
    word for France's capital is "The" with about 46% ("La" 30%, "Le" 18%), so top_p 0.4 keeps only
    "The" and every seed starts with it. With top_p applied before temperature (llama.cpp's default
    order) "La" and "Le" would stay in and start about half the answers."""
    greedy = session(starter_backend).ask("What is the capital of France?", GREEDY)
    first = greedy.split()[0]
    for seed in range(8):
        s = SamplingSettings(temperature=0.2, top_p=0.4, max_tokens=1, seed=seed)
        assert session(starter_backend).ask("What is the capital of France?", s) == first
