"""Hostile prompts (issue #19): chat templates that run away.

A copy of the starter whose chat template misbehaves on cue (the last message names the
attack) runs in a real server beside the normal starter.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from localchat.store import STARTER, Store
from localchat.store.importer import import_gguf

from .conftest import starter_home
from .gguf_edit import rewrite_gguf
from .test_server import Server

HOSTILE = "evil"
# ChatML like the starter's, unless the last message asks for an attack.
HOSTILE_TEMPLATE = (
    "{% set ask = messages[-1]['content'] %}"
    "{% if ask == 'loop' %}"  # hours of nested loops; the body keeps each step slow, so the clock stops it
    "{% for i in range(100000) %}{% for j in range(100000) %}{% set s = range(1000)|join %}{% endfor %}{% endfor %}"
    "{% elif ask == 'range' %}{{ range(10**12)|length }}"
    "{% elif ask == 'string' %}{{ 'x' * 10**10 }}"
    "{% elif ask == 'recurse' %}{% macro down(n) %}{{ down(n + 1) }}{% endmacro %}{{ down(0) }}"
    "{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "<|im_start|>assistant\n"
)
LOOP_TEMPLATE = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Store:
    root = tmp_path_factory.mktemp("hostile")
    store = starter_home(root / "home", starter_gguf)
    evil = rewrite_gguf(starter_gguf, root / "evil.gguf", {"tokenizer.chat_template": HOSTILE_TEMPLATE})
    import_gguf(store, evil, HOSTILE)
    evil.unlink()
    return store


@pytest.fixture(scope="module")
def server(hostile_store: Store):
    srv = Server(hostile_store)
    yield srv
    srv.stop()


def chat(client: httpx.Client, model: str, content: str, **kw: object) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "temperature": 0, "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": content}], **kw})


def refusal(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert f"model {HOSTILE!r}" in message and "chat template of" in message
    return message


def test_looping_template_does_not_stall_the_server(server: Server) -> None:
    """Case 1: a template that loops for hours is stopped, and meanwhile /health and another
    model answer within a second."""
    base = f"http://127.0.0.1:{server.settings.port}"
    with httpx.Client(base_url=base, timeout=60) as warm:
        assert chat(warm, STARTER.name, "Hi").status_code == 200  # both models loaded, the starter's cache warm
        assert chat(warm, HOSTILE, "hello").status_code == 200
    with httpx.Client(base_url=base, timeout=30) as slow, httpx.Client(base_url=base, timeout=1.0) as fast, \
            cf.ThreadPoolExecutor(1) as pool:
        hostile = pool.submit(chat, slow, HOSTILE, "loop")
        time.sleep(0.3)  # the hostile template is rendering now
        t0 = time.monotonic()
        assert fast.get("/health").status_code == 200
        assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert chat(fast, STARTER.name, "Hi").status_code == 200
        assert time.monotonic() - t0 < 1.0
        assert not hostile.done(), "the checks ran while the hostile template was rendering"
        message = refusal(hostile.result())
    assert "was stopped: it ran" in message


def test_huge_range_is_a_clear_4xx(server: Server) -> None:
    """Case 1: range(10**12) is refused with a 4xx naming the model, not a 500."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server.settings.port}", timeout=60) as client:
        assert "1000000000000" in refusal(chat(client, HOSTILE, "range"))


def test_huge_string_is_refused_before_it_is_made(server: Server) -> None:
    """Case 1: 'x' * 10**10 is refused before it allocates (no MemoryError, no 10 GB)."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server.settings.port}", timeout=60) as client:
        t0 = time.monotonic()
        message = refusal(chat(client, HOSTILE, "string"))
        assert time.monotonic() - t0 < 10
    assert "a string of 10000000000 characters" in message


def test_recursive_macro_names_the_template(server: Server) -> None:
    """Case 1: a macro that calls itself forever gives an error naming the template."""
    with httpx.Client(base_url=f"http://127.0.0.1:{server.settings.port}", timeout=60) as client:
        message = refusal(chat(client, HOSTILE, "recurse"))
    assert "evil" in message and "recursed too deep" in message


def test_chat_command_on_a_looping_template_exits_quickly(tmp_path: Path, starter_gguf: Path) -> None:
    """Case 1: `localchat chat -p` on a model whose template loops ends with a clear error."""
    loops = rewrite_gguf(starter_gguf, tmp_path / "loops.gguf", {"tokenizer.chat_template": LOOP_TEMPLATE})
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "localchat", "chat", "--model", str(loops), "-p", "hi"],
                       capture_output=True, text=True, timeout=90, env={**os.environ})
    assert r.returncode == 1
    assert "loops.gguf was stopped: it ran" in r.stderr
    assert time.monotonic() - t0 < 60
