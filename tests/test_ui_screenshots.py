"""The README's screenshots come from docs/screenshots.py, a real session over a store in the home
folder: the pages it shoots name no temp or machine path (the header shows the store as ~/…)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("playwright.sync_api")

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "screenshots.py"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian chromium is not installed (`make test` installs it)")]


def test_screenshot_script_shows_no_temp_path(tmp_path: Path, starter_gguf: Path) -> None:
    """Each tab is shot from a real session (a code answer, a checkpoint folder converted with its eval
    figures, a finished fine-tune with its loss curve, the fine-tuned model asked what it learned); each
    page's text holds the store as ~/… and no temp path."""
    spec = importlib.util.spec_from_file_location("screenshots", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "shots"
    texts = script.take(out, home=tmp_path / "home")
    assert set(texts) == {"chat", "models", "finetune", "recall"}
    assert "smollm2-135m-q8_0" in texts["models"] and "KLD" in texts["models"] and "smollm2-cat" in texts["models"]
    assert "fine-tune smollm2-cat: done in" in texts["finetune"]
    for name, text in texts.items():
        assert (out / f"ui-{name}.png").stat().st_size > 10_000
        assert "store: ~/.cache/localchat-screenshots/store" in text, text[:300]
        for bad in (str(tmp_path), "/tmp/", "pytest-of-"):
            assert bad not in text, f"ui-{name}.png shows {bad!r}"
