"""The decode engine (continuous batching, the per-slot prompt cache) and the quantized KV cache,
on the real starter model through llama.cpp.

Engines here run llama.cpp on one thread: with two or more, llama.cpp's threads wait for one
another at every operation, and on a machine as loaded as CI's that wait, not the model, sets
the pace. Batching is the same on any number of threads.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from localchat.artifacts import artifact_from_gguf
from localchat.chat import ChatSession
from localchat.engine import SamplingSettings
from localchat.engine.backend import Chunk, GenerationStats
from localchat.engine.batching import DecodeEngine
from localchat.engine.llamacpp import LlamaCppBackend
from localchat.hardware import probe
from localchat.planner import Overrides, gb, plan
from localchat.store import STARTER

from .conftest import TEST_CONTEXT, starter_home

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Name three fruits.",
             "What is two plus two?", "Explain gravity in one sentence.", "Who wrote Hamlet?"]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # a raw prompt the starter continues for hundreds of tokens


def load(starter_gguf: Path, **overrides: object) -> LlamaCppBackend:
    p = plan(probe(), [artifact_from_gguf(starter_gguf)], Overrides(context=TEST_CONTEXT, threads=1, **overrides))
    return LlamaCppBackend(p)


def chat_prompt(backend: LlamaCppBackend, question: str):
    """The starter's chat prompt for `question`, as `localchat chat` renders it."""
    s = ChatSession(backend, system=STARTER.system)
    return s.fit(s.messages + [{"role": "user", "content": question}], 64)[0]


def run(stream) -> tuple[str, GenerationStats]:
    chunks: list[Chunk] = list(stream)
    assert chunks[-1].stats is not None
    return "".join(c.text for c in chunks), chunks[-1].stats


@pytest.fixture
def backend(starter_gguf: Path):
    b = load(starter_gguf)
    yield b
    b.close()


def test_answers_under_load_equal_each_answer_alone(backend: LlamaCppBackend) -> None:
    """Six greedy requests of different lengths decoded together in one batch give, token for token,
    what each gives alone on the one-sequence path (the CLI's)."""
    jobs = [(chat_prompt(backend, q), SamplingSettings(temperature=0.0, seed=0, max_tokens=16 + 12 * i))
            for i, q in enumerate(QUESTIONS)]
    alone = [run(backend.stream(prompt, s)) for prompt, s in jobs]
    engine = backend.engine(len(jobs))
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: run(engine.stream(*job)), jobs))
    for (text, stats), (text_alone, stats_alone) in zip(together, alone):
        assert text == text_alone
        assert stats.completion_tokens == stats_alone.completion_tokens
    assert engine.steps < sum(s.completion_tokens for _, s in alone), "the answers shared decode steps"


def test_request_joining_mid_batch_does_not_wait_for_the_running_one(backend: LlamaCppBackend) -> None:
    """A short request sent while a 300-token answer streams gets its whole answer long before the
    long one ends: it joins the batch at the next step instead of queueing behind it."""
    engine = backend.engine(2)
    greedy = SamplingSettings(temperature=0.0, repeat_penalty=1.0, max_tokens=300)
    events: list[str] = []
    started = threading.Event()

    def long() -> GenerationStats:
        chunks = []
        for chunk in engine.stream(COUNTING, greedy, lstrip=False):
            started.set()
            chunks.append(chunk)
        events.append("long done")
        return chunks[-1].stats

    with cf.ThreadPoolExecutor(1) as pool:
        long_stats = pool.submit(long)
        assert started.wait(120)
        text, stats = run(engine.stream(chat_prompt(backend, QUESTIONS[0]), SamplingSettings(max_tokens=8)))
        events.append("short done")
        assert long_stats.result().completion_tokens == 300 and long_stats.result().finish_reason == "length"
    assert text and stats.completion_tokens <= 8
    assert events == ["short done", "long done"]


def test_cancel_frees_the_slot(backend: LlamaCppBackend) -> None:
    """With one slot, cancelling a 400-token answer after its first words ends it as "cancelled"
    and the next request gets the slot at once, not after 400 tokens."""
    engine = backend.engine(1)
    cancel = threading.Event()
    long = engine.stream(COUNTING, SamplingSettings(temperature=0.0, repeat_penalty=1.0, max_tokens=400),
                         cancel, lstrip=False)
    next(long)
    cancel.set()
    # The next request is sent before the cancelled stream is read to its end, and it is done within
    # a few dozen decode steps: the 400-token answer did not keep the only slot.
    text, stats = run(engine.stream(chat_prompt(backend, QUESTIONS[3]),
                                    SamplingSettings(temperature=0.0, max_tokens=16)))
    assert text and stats.finish_reason in ("stop", "length")
    assert engine.steps < 100, engine.steps
    _, stats = run(long)
    assert stats.finish_reason == "cancelled" and stats.completion_tokens < 50


def test_tenth_turn_evaluates_no_more_than_the_first_while_other_clients_chat(backend: LlamaCppBackend
                                                                                ) -> None:
    """A 10-turn conversation on a 3-slot engine while another client holds its own conversation and
    a third sends one-off chats between the turns (all with the same system prompt): turn 10 evaluates
    at most 1.5x the prompt tokens of turn 1 (its history comes from its slot's cache), and its time
    to first token stays near turn 1's."""
    backend.engine(3)
    settings = SamplingSettings(temperature=0.0, max_tokens=24)
    talk, other = ChatSession(backend, system=STARTER.system), ChatSession(backend, system=STARTER.system)
    evaluated, ttft = [], []
    for turn in range(10):
        talk.ask(f"Tell me one fact about the number {turn + 1}.", settings)
        st = talk.last_stats
        evaluated.append(st.prompt_tokens - st.cached_tokens)
        ttft.append(st.ttft_s)
        other.ask(QUESTIONS[turn % len(QUESTIONS)], settings)
        ChatSession(backend, system=STARTER.system).ask(QUESTIONS[-1 - turn % len(QUESTIONS)], settings)
    assert talk.last_stats.prompt_tokens > 4 * evaluated[0], "the history grew well past the first prompt"
    assert evaluated[-1] <= 1.5 * evaluated[0], evaluated
    assert other.last_stats.cached_tokens > 0.8 * other.last_stats.prompt_tokens
    assert ttft[-1] <= 3 * ttft[0] + 0.5, ttft  # wall time on a shared machine: generous


def kv_allocated(gguf: Path, kind: str, slots: int, check: Callable[[LlamaCppBackend, DecodeEngine], None]
                 ) -> dict[str, int]:
    """The KV cache bytes llama.cpp allocates for `slots` sequences in f16 and in `kind`, each engine
    first passing `check` (it answers)."""
    allocated = {}
    for kv in ("f16", kind):
        b = load(gguf, kv_cache=kv, parallel=slots)
        try:
            engine = b.engine(slots)
            allocated[kv] = engine.kv_bytes
            check(b, engine)
        finally:
            b.close()
    return allocated


def test_kv_cache_q8_0_halves_the_kv_memory_llama_cpp_allocates(starter_gguf: Path) -> None:
    """q8_0 KV cache: llama.cpp allocates about half the f16 buffers (34/64) for four slots, still
    answers right, and `localchat doctor --kv-cache q8_0 --parallel 4` shows the KV memory llama.cpp
    allocates."""
    def answers(b: LlamaCppBackend, engine: DecodeEngine) -> None:
        assert engine.kv_bytes == pytest.approx(4 * b.kv_bytes, rel=1e-3)  # llama.cpp logs MiB, 2 decimals
        greedy = SamplingSettings(temperature=0.0, repeat_penalty=1.0, max_tokens=24)
        assert "Paris" in run(engine.stream(chat_prompt(b, QUESTIONS[0]), greedy))[0]

    allocated = kv_allocated(starter_gguf, "q8_0", 4, answers)
    assert 0.5 <= allocated["q8_0"] / allocated["f16"] <= 0.56
    r = subprocess.run([sys.executable, "-m", "localchat", "doctor", "--model", str(starter_gguf), "--ctx",
                        str(TEST_CONTEXT), "--kv-cache", "q8_0", "--parallel", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"KV cache {gb(allocated['q8_0'])} q8_0" in r.stdout
    assert f"context: {TEST_CONTEXT} tokens in each of 4 parallel slots" in r.stdout


def test_kv_cache_q4_0_decodes_through_the_engine(starter_gguf: Path) -> None:
    """`--kv-cache q4_0` (a quantized V cache, which llama.cpp allows only with flash attention, so the
    backend turns that on): the batching engine's own context gets it too, allocates about a quarter
    (18/64) of the f16 cache for two slots, and two requests decoded together both answer."""
    def both_answer(b: LlamaCppBackend, engine: DecodeEngine) -> None:
        greedy = SamplingSettings(temperature=0.0, max_tokens=12)
        with cf.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda q: run(engine.stream(chat_prompt(b, q), greedy)), QUESTIONS[:2]))
        for text, stats in answers:
            assert text.strip() and stats.completion_tokens > 0

    allocated = kv_allocated(starter_gguf, "q4_0", 2, both_answer)
    assert 0.25 <= allocated["q4_0"] / allocated["f16"] <= 0.31, allocated


def test_kv_cache_q8_0_changes_perplexity_by_under_one_percent(starter_gguf: Path) -> None:
    """`localchat eval --kv-cache q8_0 --base` (the same file with an f16 cache) reports a perplexity
    within 1% of the f16 cache's."""
    text = Path(__file__).with_name("data_eval_prose.txt")
    r = subprocess.run([sys.executable, "-m", "localchat", "eval", str(starter_gguf), "--base", str(starter_gguf),
                        "--text", str(text), "--kv-cache", "q8_0", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    change = float(re.search(r"reference perplexity [\d.]+ \(([-+\d.]+)%\)", r.stdout).group(1))
    assert abs(change) < 1.0, r.stdout


def test_server_answers_a_short_request_while_a_long_one_streams(tmp_path: Path, starter_gguf: Path) -> None:
    """`localchat serve --parallel 2`: a short chat request sent while a 300-token completion streams
    comes back before that completion's last token (the server used to queue it behind)."""
    from .test_server import Server

    srv = Server(starter_home(tmp_path / "home", starter_gguf), parallel=2, threads=1)
    try:
        client = srv.client(timeout=300)
        stream = client.completions.create(model=STARTER.name, prompt=COUNTING, max_tokens=300, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"repeat_penalty": 1.0})
        events = iter(stream)
        next(events)

        def read_rest() -> tuple[float, int]:
            usage = [e.usage for e in events if e.usage]
            return time.perf_counter(), usage[0].completion_tokens

        with cf.ThreadPoolExecutor(1) as pool:
            long = pool.submit(read_rest)
            short = client.chat.completions.create(model=STARTER.name, max_tokens=8, temperature=0,
                                                   messages=[{"role": "user", "content": QUESTIONS[0]}])
            short_done = time.perf_counter()
            long_done, long_tokens = long.result()
        assert short.choices[0].message.content
        assert long_tokens == 300
        assert short_done < long_done
    finally:
        srv.stop()


def test_server_loads_a_model_as_the_planner_plans_it_with_the_slots_memory_holds(
        tmp_path: Path, starter_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`localchat serve --kv-cache f16` with no --parallel on a machine whose free memory holds the
    starter and the KV cache of two full contexts, not four: `localchat doctor` plans two slots, and the
    server loads the model through the same runtime path, decoding with those two slots (it used to take
    four and halve the context)."""
    import os
    from dataclasses import replace

    from localchat.hardware import ENV_REPORT, MemoryInfo
    from localchat.planner import kv_cache_bytes

    from .test_server import Server

    a = artifact_from_gguf(starter_gguf)
    one = plan(probe(), [a], Overrides(context=TEST_CONTEXT, parallel=1, kv_cache="f16"))
    spare = one.memory.host_bytes + kv_cache_bytes(a, TEST_CONTEXT) * 3 // 2  # one slot and a half more
    report = tmp_path / "tight.json"  # of 4 GiB, the planner keeps 1 GiB back for the system
    report.write_text(replace(probe(), memory=MemoryInfo(4 << 30, (1 << 30) + spare)).to_json())
    monkeypatch.setenv(ENV_REPORT, str(report))
    store = starter_home(tmp_path / "home", starter_gguf)
    r = subprocess.run([sys.executable, "-m", "localchat", "doctor", "--ctx", str(TEST_CONTEXT), "--kv-cache",
                        "f16"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "LOCALCHAT_HOME": str(store.root)})
    assert f"context: {TEST_CONTEXT} tokens in each of 2 parallel slots" in r.stdout, r.stdout + r.stderr
    srv = Server(store, kv_cache="f16", threads=1)
    try:
        reply = srv.client(timeout=300).chat.completions.create(
            model=STARTER.name, max_tokens=8, temperature=0, messages=[{"role": "user", "content": QUESTIONS[0]}])
        assert reply.choices[0].message.content
        served = srv.app.state.manager.loaded[STARTER.name]
        assert (served.plan.slots, served.plan.context, served.engine.slots) == (2, TEST_CONTEXT, 2)
    finally:
        srv.stop()
