"""Shared fixtures: the real starter model, installed once per machine in the default store
(`make test` runs `localchat setup` first), and throwaway stores for tests that write."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from localchat.artifacts import artifact_from_gguf
from localchat.engine.llamacpp import LlamaCppBackend
from localchat.hardware import ENV_REPORT, HardwareReport, probe, probe_machine
from localchat.planner import Overrides, plan
from localchat.store import STARTER, Store, install_starter, store_root
from localchat.store.manifest import ModelEntry

TEST_CONTEXT = 2048


def cpu_only(report: HardwareReport) -> HardwareReport:
    """This machine as a CPU-only one: no GPU, and a llama.cpp built for the CPU alone."""
    from dataclasses import replace

    return replace(report, accelerators=(), runtimes=replace(report.runtimes, llama_cpp_backends=("cpu",)))


@pytest.fixture(scope="session", autouse=True)
def hardware_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test, and every `localchat` child it starts, plans for this machine as a CPU-only
    one (through $LOCALCHAT_HARDWARE_REPORT), so no result depends on whether a GPU is there.
    Tests of GPU plans build their reports by hand (tests/test_planner.py)."""
    path = tmp_path_factory.mktemp("hardware") / "cpu-only.json"
    path.write_text(cpu_only(probe_machine()).to_json())
    old = os.environ.get(ENV_REPORT)
    os.environ[ENV_REPORT] = str(path)
    yield path
    if old is None:
        os.environ.pop(ENV_REPORT, None)
    else:
        os.environ[ENV_REPORT] = old


@pytest.fixture(scope="session")
def starter_entry() -> ModelEntry:
    return install_starter(Store(store_root()), quiet=True)


@pytest.fixture(scope="session")
def starter_gguf(starter_entry: ModelEntry) -> Path:
    return Store(store_root()).path_of(starter_entry.files[0].path)


def starter_home(root: Path, starter_gguf: Path) -> Store:
    """A store at `root` holding only the starter (hard-linked, not copied, where possible)."""
    target = root / STARTER.name / starter_gguf.name
    target.parent.mkdir(parents=True)
    link_or_copy(starter_gguf, target)
    store = Store(root)
    install_starter(store)  # finds the verified file and writes the manifest entry
    return store


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (the starter is 98 MB), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path: Path, starter_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """An empty-but-for-the-starter store in LOCALCHAT_HOME."""
    store = starter_home(tmp_path / "home", starter_gguf)
    monkeypatch.setenv("LOCALCHAT_HOME", str(store.root))
    return store


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A real 200 MB file system (tmpfs), so free space is what the kernel says, not a mock."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small file system")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture(scope="session")
def starter_backend(starter_gguf: Path) -> LlamaCppBackend:
    p = plan(probe(), [artifact_from_gguf(starter_gguf)], Overrides(context=TEST_CONTEXT))
    backend = LlamaCppBackend(p)
    yield backend
    backend.close()
