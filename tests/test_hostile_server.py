"""Hostile HTTP clients and broken model files against the real app, server and CLI: each test is one
attack or abuse case, and asserts what the user (or the attacker) sees."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import gguf
import httpx
import numpy as np
import pytest

from localchat.store import STARTER, Store
from localchat.store.importer import import_gguf

from .conftest import free_port, starter_home
from .test_server import Server

MODEL = STARTER.name
BROKEN = "broken-arch"
NONSENSE = "unknown model architecture: 'nonsense'"  # llama.cpp's own words


def cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localchat", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "LOCALCHAT_HOME": str(home)})


def nonsense_gguf(path: Path) -> Path:
    """A GGUF our header check accepts but llama.cpp refuses: an architecture it does not know."""
    w = gguf.GGUFWriter(str(path), "nonsense")
    w.add_string("general.name", "nonsense")
    w.add_tensor("token_embd.weight", np.zeros((4, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Store:
    """The starter, plus a model whose file llama.cpp cannot load."""
    s = starter_home(tmp_path_factory.mktemp("hostile-home") / "home", starter_gguf)
    import_gguf(s, nonsense_gguf(tmp_path_factory.mktemp("src") / "nonsense.gguf"), BROKEN)
    return s


@pytest.fixture(scope="module")
def server(store: Store) -> Iterator[Server]:
    srv = Server(store, max_body_bytes=200_000)
    yield srv
    srv.stop()


class UIProcess:
    """`localchat ui` as a child process on a free loopback port, without a browser."""

    def __init__(self, home: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "localchat", "ui", "--port", str(self.port), "--no-browser", "--context", "2048"],
            env={**os.environ, "LOCALCHAT_HOME": str(home)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        line = self.proc.stderr.readline()  # printed once the server is up
        assert f"127.0.0.1:{self.port}" in line, line + self.proc.stderr.read()
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def test_app_refuses_a_rebound_host_and_a_foreign_origin(tmp_path: Path, starter_gguf: Path) -> None:
    """Case: DNS rebinding / cross-site POST against `localchat ui` (it deleted the starter model)."""
    home = starter_home(tmp_path / "home", starter_gguf)
    app = UIProcess(home.root)
    try:
        delete = {"data": [MODEL, True]}
        with httpx.Client(base_url=app.base, timeout=60) as http:
            r = http.post("/gradio_api/call/do_delete", json=delete,
                          headers={"Host": "evil.example", "Origin": "http://evil.example"})
            assert r.status_code == 403, r.text
            assert "'evil.example' is not allowed" in r.text and "--allowed-host" in r.text
            r = http.post("/gradio_api/call/do_delete", json=delete, headers={"Origin": "http://evil.example"})
            assert r.status_code == 403 and "--allowed-origin" in r.text
            assert http.get("/", headers={"Host": "evil.example"}).status_code == 403
            time.sleep(1)
            assert MODEL in Store(home.root).models()  # nothing ran

            page = http.get("/", headers={"Host": f"127.0.0.1:{app.port}"})
            assert page.status_code == 200 and "localchat" in page.text
            # The same call from the app's own page goes through: the guard does not block everything.
            r = http.post("/gradio_api/call/do_delete", json=delete,
                          headers={"Host": f"localhost:{app.port}", "Origin": f"http://localhost:{app.port}"})
            assert r.status_code == 200, r.text
            events = http.get(f"/gradio_api/call/do_delete/{r.json()['event_id']}").text
            assert f"deleted {MODEL}" in events, events
            assert MODEL not in Store(home.root).models()
    finally:
        app.stop()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("prompt", ["", [""]])
def test_empty_prompt_gets_400_naming_prompt(server: Server, stream: bool, prompt: str | list[str]) -> None:
    """Case: an empty prompt on /v1/completions (was a 500, or a 200 cut off mid-stream)."""
    body = json.dumps({"model": MODEL, "prompt": prompt, "stream": stream, "max_tokens": 4}).encode()
    status, err = server.raw("POST", "/v1/completions", body)
    assert status == 400, err
    assert err["error"]["param"] == "prompt" and "prompt" in err["error"]["message"]
    assert server.raw("GET", "/health")[0] == 200


def test_malformed_json_says_the_body_is_not_json(server: Server) -> None:
    """Case: a malformed JSON body (was reported as a bad parameter named "36", a character offset)."""
    status, err = server.raw("POST", "/v1/chat/completions", b'{"model": "x", "messages": [}')
    assert status == 400, err
    assert err["error"]["param"] in (None, "body")
    assert "not valid JSON" in err["error"]["message"] and "28" in err["error"]["message"]


def test_chunked_body_over_the_limit_gets_413(server: Server) -> None:
    """Case: a 50 MB body sent chunked, without Content-Length (was a 400 instead of a 413)."""
    def body() -> Iterator[bytes]:
        yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
        for _ in range(50 * 16):
            yield b"x" * 65536
        yield b'"}'

    r = httpx.post(f"{server.base}/completions", content=body(), headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert server.raw("GET", "/health")[0] == 200


def test_import_refuses_a_gguf_without_tensors(tmp_path: Path) -> None:
    """Case: a 24-byte GGUF (header only, no tensors) imported fine, then failed to load with no reason."""
    empty = tmp_path / "hollow.gguf"
    empty.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    home = tmp_path / "home"
    r = cli("import", str(empty), home=home)
    assert r.returncode == 1
    assert "hollow.gguf" in r.stderr and "no tensors" in r.stderr, r.stderr
    assert "hollow" not in cli("list", home=home).stdout


def test_load_error_passes_llama_cpp_reason_through(server: Server, store: Store) -> None:
    """Case: a GGUF llama.cpp refuses to load: chat and the server said only "Failed to load model"."""
    r = cli("chat", "--model", BROKEN, "-p", "hi", home=store.root)
    assert r.returncode == 1
    assert NONSENSE in r.stderr and "nonsense.gguf" in r.stderr, r.stderr

    status, err = server.raw("POST", "/v1/chat/completions", json.dumps(
        {"model": BROKEN, "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert 400 <= status < 600 and status != 404, err
    assert BROKEN in err["error"]["message"] and NONSENSE in err["error"]["message"]
    assert err["error"]["code"] == "model_load_failed"
    assert server.raw("GET", "/health")[0] == 200
