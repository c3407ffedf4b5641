"""Ollama's API on `localchat serve`, with the official `ollama` Python client against the real starter model."""

from __future__ import annotations

import math
import time

import httpx
import ollama
import pytest

from localchat import __version__
from localchat.store import STARTER, Store

from .test_server import QUESTION, Server

MODEL = STARTER.name
GREEDY = {"temperature": 0, "num_predict": 48}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, starter_gguf) -> Store:
    from .conftest import starter_home

    return starter_home(tmp_path_factory.mktemp("ollama-home"), starter_gguf)


@pytest.fixture(scope="module")
def server(home: Store) -> Server:
    srv = Server(home, max_body_bytes=200_000)
    yield srv
    srv.stop()


def client(srv: Server, **kw: object) -> ollama.Client:
    return ollama.Client(host=f"http://127.0.0.1:{srv.settings.port}", timeout=300, **kw)


def loaded(srv: Server) -> list[str]:
    return [m.model for m in client(srv).ps().models]


def wait_until_unloaded(srv: Server, seconds: float = 10) -> float:
    """Seconds until /api/ps lists no model (fails the test after `seconds`)."""
    start = time.monotonic()
    while loaded(srv):
        assert time.monotonic() - start < seconds, f"still loaded after {seconds} s: {loaded(srv)}"
        time.sleep(0.1)
    return time.monotonic() - start


def test_list_shows_the_store_models(server: Server) -> None:
    """/api/tags: the starter with its size, digest and details (format, family, size, quantization)."""
    models = client(server).list().models
    assert [m.model for m in models] == [MODEL]
    m = models[0]
    assert m.size == server.app.state.manager.store.get(MODEL).size and len(m.digest) == 64
    assert (m.details.format, m.details.family, m.details.quantization_level) == ("gguf", "llama", "Q4_1")
    assert m.details.parameter_size == "135M"


def test_show_gives_template_preset_and_model_info(server: Server) -> None:
    """/api/show: the chat template, the model's preset as parameters, model_info and capabilities;
    an unknown model is a 404 naming it."""
    r = client(server).show(MODEL)
    assert "<|im_start|>" in r.template
    assert "temperature 0.2" in r.parameters
    assert r.modelinfo["llama.context_length"] == 8192 and r.modelinfo["general.parameter_count"] > 1e8
    assert {"completion", "embedding"} <= set(r.capabilities)
    with pytest.raises(ollama.ResponseError) as exc:
        client(server).show("no-such-model")
    assert exc.value.status_code == 404 and "'no-such-model'" in exc.value.error


def test_chat_non_streamed_answers_as_the_openai_route_does(server: Server) -> None:
    """/api/chat, not streamed: the greedy answer says Paris, equals the OpenAI route's answer to the same
    request, and carries Ollama's done fields (done_reason, token counts, durations)."""
    r = client(server).chat(MODEL, messages=[{"role": "user", "content": QUESTION}], options=GREEDY)
    assert "Paris" in r.message.content and r.message.role == "assistant"
    assert r.done and r.done_reason == "stop"
    assert r.prompt_eval_count > 10 and 0 < r.eval_count < 48 and r.eval_duration > 0 and r.total_duration > 0
    same = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}],
                                                   temperature=0, max_tokens=48)
    assert same.choices[0].message.content == r.message.content


def test_chat_streamed_equals_non_streamed(server: Server) -> None:
    """/api/chat streamed as NDJSON: the parts join to the non-streamed answer, only the last is done and
    carries the counts."""
    messages = [{"role": "user", "content": QUESTION}]
    whole = client(server).chat(MODEL, messages=messages, options=GREEDY).message.content
    parts = list(client(server).chat(MODEL, messages=messages, options=GREEDY, stream=True))
    assert len(parts) > 3
    assert "".join(p.message.content for p in parts) == whole
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count > 0 and parts[-1].done_reason == "stop"


def test_generate_templates_the_prompt_and_raw_does_not(server: Server) -> None:
    """/api/generate: a prompt goes through the chat template (the chat answer), streamed and not;
    raw=True continues the text as given; num_predict cuts the answer (done_reason length)."""
    c = client(server)
    chat = c.chat(MODEL, messages=[{"role": "user", "content": QUESTION}], options=GREEDY).message.content
    r = c.generate(MODEL, prompt=QUESTION, options=GREEDY)
    assert r.response == chat and r.done_reason == "stop"
    assert "".join(p.response for p in c.generate(MODEL, prompt=QUESTION, options=GREEDY, stream=True)) == chat
    raw = c.generate(MODEL, prompt="The capital of France is", raw=True, options={"temperature": 0, "num_predict": 3})
    assert raw.eval_count == 3 and raw.done_reason == "length"
    assert "Paris" in raw.response


def test_options_map_onto_sampling(server: Server) -> None:
    """options: stop ends the answer before the stop string; a seed at temperature 1 repeats its answer;
    a wrongly typed option is a 400 naming it."""
    c = client(server)
    messages = [{"role": "user", "content": QUESTION}]
    stopped = c.chat(MODEL, messages=messages, options={**GREEDY, "stop": ["Paris"]}).message.content
    assert "Paris" not in stopped and stopped
    hot = {"temperature": 1.0, "top_k": 100, "top_p": 1.0, "seed": 7, "num_predict": 24}
    assert c.chat(MODEL, messages=messages, options=hot).message.content == \
        c.chat(MODEL, messages=messages, options=hot).message.content
    with pytest.raises(ollama.ResponseError) as exc:
        c.chat(MODEL, messages=messages, options={"temperature": "hot"})
    assert exc.value.status_code == 400 and "options.temperature" in exc.value.error


def test_embed_ranks_a_paraphrase_above_an_unrelated_sentence(server: Server) -> None:
    """/api/embed: one unit-length vector per input; the paraphrase is nearer than the unrelated
    sentence; the legacy /api/embeddings gives the same vector."""
    c = client(server)
    texts = ["The cat sat on the mat.", "A cat was sitting on the rug.", "Stock markets fell sharply on Monday."]
    r = c.embed(MODEL, input=texts)
    assert len(r.embeddings) == 3 and r.prompt_eval_count > 0
    for v in r.embeddings:
        assert len(v) == 576 and math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4)
    cos = [sum(a * b for a, b in zip(r.embeddings[0], v)) for v in r.embeddings[1:]]
    assert cos[0] > cos[1]
    legacy = c.embeddings(MODEL, prompt=texts[0]).embedding
    assert max(abs(a - b) for a, b in zip(legacy, r.embeddings[0])) < 1e-4
    with pytest.raises(ollama.ResponseError) as exc:  # the same input rules as /v1/embeddings
        c.embed(MODEL, input=[])
    assert exc.value.status_code == 400 and "input" in exc.value.error, exc.value


def test_keep_alive_zero_unloads_and_ps_shows_it(server: Server) -> None:
    """keep_alive: a chat with keep_alive 0 leaves the model unloaded once it has answered (/api/ps
    empty); an empty generate with '10m' loads it and ps shows it expiring in about 10 minutes; an empty
    generate with keep_alive 0 unloads it at once (done_reason unload)."""
    c = client(server)
    r = c.chat(MODEL, messages=[{"role": "user", "content": QUESTION}], options=GREEDY, keep_alive=0)
    assert "Paris" in r.message.content
    wait_until_unloaded(server)
    loaded_r = c.generate(MODEL, keep_alive="10m")
    assert loaded_r.done_reason == "load"
    [m] = c.ps().models
    assert m.model == MODEL and m.context_length == 2048 and m.size > 0 and m.size_vram == 0
    left = m.expires_at.timestamp() - time.time()
    assert 9 * 60 < left <= 10 * 60
    r = c.generate(MODEL, keep_alive=0)
    assert r.done and r.done_reason == "unload"
    assert loaded(server) == []


def test_idle_models_unload_after_the_server_keep_alive(home: Store) -> None:
    """--keep-alive: a model idle for longer than the server's keep-alive (1 s here) is unloaded."""
    srv = Server(home, keep_alive=1.0)
    try:
        client(srv).generate(MODEL, prompt="Hi", options={"num_predict": 2})
        assert loaded(srv) == [MODEL]
        assert wait_until_unloaded(srv) < 5
    finally:
        srv.stop()


def test_version(server: Server) -> None:
    """/api/version answers localchat's version."""
    r = httpx.get(f"http://127.0.0.1:{server.settings.port}/api/version")
    assert r.json() == {"version": __version__}


def test_bad_requests_get_ollama_errors(server: Server) -> None:
    """Ollama's error shape ({"error": text}, which its client reads) naming the field: an unknown model (404),
    a keep_alive that is no duration, images for a text model, a body over the size limit (413)."""
    c = client(server)
    cases = [
        (dict(model="no-such-model", messages=[{"role": "user", "content": "hi"}]), 404, "'no-such-model'"),
        (dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], keep_alive="5 parsecs"), 400, "keep_alive"),
        (dict(model=MODEL, messages=[{"role": "user", "content": "hi", "images": ["aGk="]}]), 400, "images"),
        (dict(model=MODEL, messages=[{"role": "user", "content": "x" * 300_000}]), 413, "bytes"),
    ]
    for kw, status, named in cases:
        with pytest.raises(ollama.ResponseError) as exc:
            c.chat(**kw)
        assert exc.value.status_code == status and named in exc.value.error, exc.value


def test_guard_applies_to_ollama_routes(home: Store) -> None:
    """The OpenAI routes' guard covers /api/*: a foreign Host is refused (403), a server with an API key
    answers 401 without it and the list with it."""
    srv = Server(home, api_key="sekrit")
    try:
        with pytest.raises(ollama.ResponseError) as exc:
            client(srv).list()
        assert exc.value.status_code == 401 and "API key" in exc.value.error
        assert [m.model for m in client(srv, headers={"Authorization": "Bearer sekrit"}).list().models] == [MODEL]
        r = httpx.get(f"http://127.0.0.1:{srv.settings.port}/api/tags",
                      headers={"Host": "evil.example", "Authorization": "Bearer sekrit"})
        assert r.status_code == 403 and "evil.example" in r.json()["error"]
    finally:
        srv.stop()
