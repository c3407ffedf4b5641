"""`localchat import`: a GGUF the user has is checked, copied atomically and registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from localchat.cli import main as cli
from localchat.gguf_file import GGUFError
from localchat.store import Store, UnsafeNameError
from localchat.store.importer import import_gguf


def test_import_registers_a_runnable_copy(home: Store, starter_gguf: Path) -> None:
    e = import_gguf(home, starter_gguf, name="second")
    assert e.format == "gguf" and e.quant == "Q4_1" and e.size == starter_gguf.stat().st_size
    assert home.path_of(e.files[0].path).parent == home.root / "second"
    with pytest.raises(FileExistsError, match="already has a model named 'second'"):
        import_gguf(home, starter_gguf, name="second")


def test_import_refuses_bad_files_and_names(home: Store, tmp_path: Path, starter_gguf: Path) -> None:
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFError, match="notes.gguf"):
        import_gguf(home, bad)
    with pytest.raises(UnsafeNameError):
        import_gguf(home, starter_gguf, name="../outside")
    assert set(home.models()) == {"smollm2-135m-instruct"}
    assert not (home.root.parent / "outside").exists()


def test_import_command(home: Store, starter_gguf: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["import", str(starter_gguf), "--name", "mine"]) == 0
    assert "imported mine: Q4_1" in capsys.readouterr().out
    assert "mine" in home.models()
