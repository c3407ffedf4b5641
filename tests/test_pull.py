"""`localchat pull` against a local stand-in for the Hub: resume, verify, atomic, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from localchat.store import STARTER, Store
from tests.fakehub import FakeHub

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"


@pytest.fixture
def hub(starter_gguf: Path, tmp_path: Path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(starter_gguf.read_bytes()[:4_000_000])
    h = FakeHub({REPO: {"smollm2-135m-instruct-q4_1.gguf": starter_gguf},
                 "someone/broken": {"model.gguf": broken}}).start()
    yield h
    h.stop()


def pull(hub: FakeHub, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    return subprocess.run([sys.executable, "-m", "localchat", "pull", *args, "-q"], capture_output=True,
                          text=True, timeout=120, env=env)


def test_pull_picks_the_gguf_verifies_and_chats(hub: FakeHub, home: Store) -> None:
    r = pull(hub, REPO, "--name", "smol-pulled")
    assert r.returncode == 0, r.stderr
    assert "sha256 verified" in r.stdout
    entry = home.get("smol-pulled")
    assert entry.sha256 == STARTER.sha256 and entry.quant == "Q4_1" and entry.source == f"hf:{REPO}"
    assert not (home.root / ".partial" / "smol-pulled").exists()
    chat = subprocess.run([sys.executable, "-m", "localchat", "chat", "--model", "smol-pulled", "-q", "-p",
                           "What is the capital of France?", "--temp", "0", "--system",
                           "You are a helpful assistant."], capture_output=True, text=True, timeout=120)
    assert "Paris" in chat.stdout, chat.stderr


def test_interrupted_pull_resumes_where_it_stopped(hub: FakeHub, home: Store) -> None:
    hub.cut_after = 30_000_000
    first = pull(hub, REPO, "smollm2-135m-instruct-q4_1.gguf", "--name", "resumed")
    assert first.returncode == 1
    assert "broke off" in first.stderr and "run the same pull again to resume" in first.stderr
    assert "resumed" not in home.models(), "nothing half-done enters the store"
    assert not (home.root / "resumed").exists() or not any((home.root / "resumed").iterdir())
    second = pull(hub, REPO, "smollm2-135m-instruct-q4_1.gguf", "--name", "resumed")
    assert second.returncode == 0, second.stderr
    start = int(hub.ranges[-1].split("=")[1].split("-")[0])
    assert start >= 29_000_000, f"the second run asked for the rest only, not {hub.ranges}"
    assert home.get("resumed").sha256 == STARTER.sha256


def test_pull_of_a_broken_gguf_is_refused(hub: FakeHub, home: Store) -> None:
    r = pull(hub, "someone/broken", "model.gguf")
    assert r.returncode == 1
    assert "past the end of the file" in r.stderr
    assert set(home.models()) == {STARTER.name}


def test_pull_missing_repo_or_file(hub: FakeHub, home: Store) -> None:
    r = pull(hub, REPO, "nope.gguf")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nope.gguf" in r.stderr
    r = pull(hub, "nobody/nothing")
    assert r.returncode == 1 and "no repository nobody/nothing" in r.stderr
