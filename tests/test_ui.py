"""`localchat ui` in a real browser: headless Debian Chromium driven by Playwright, against
the app running as its own process on the real starter model.

Screenshots of each tab land in a temp folder, or in docs/ with LOCALCHAT_SCREENSHOTS=docs
(`make screenshots`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

from localchat.store import Store  # noqa: E402
from localchat.store.importer import import_gguf  # noqa: E402
from localchat.ui.settings import UISettings  # noqa: E402

from .conftest import free_port, starter_home  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                 reason="Debian chromium is not installed (`make test` installs it)")]
DOCS = Path(__file__).resolve().parents[1] / "docs"
FINAL = re.compile(r"\d+ tokens, .*(stop|length|cancelled)")
SECOND = "second-model"


class App:
    """`localchat ui` as a child process on a free loopback port."""

    def __init__(self, home: Path) -> None:
        self.home, self.proc, self.port = home, None, 0

    def start(self) -> None:
        self.port = free_port()
        env = {**os.environ, "LOCALCHAT_HOME": str(self.home)}
        self.proc = subprocess.Popen([sys.executable, "-m", "localchat", "ui", "--port", str(self.port),
                                      "--no-browser", "--context", "2048"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # printed once the server is up
        assert f"127.0.0.1:{self.port}" in line, line + self.proc.stderr.read()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Path:
    store = starter_home(tmp_path_factory.mktemp("ui") / "home", starter_gguf)
    import_gguf(store, starter_gguf, name=SECOND)
    return store.root


@pytest.fixture(scope="module")
def app(ui_home: Path) -> Iterator[App]:
    a = App(ui_home)
    a.start()
    yield a
    a.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture
def page(browser: object, app: App) -> Iterator[object]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(app.url)
    pg.wait_for_selector("#message textarea")
    yield pg
    ctx.close()


def shot(page: object, name: str, tmp_path: Path) -> Path:
    folder = DOCS if os.environ.get("LOCALCHAT_SCREENSHOTS") == "docs" else tmp_path
    folder.mkdir(exist_ok=True)
    path = folder / f"ui-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def set_number(page: object, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} input[type=number]")
    box.fill(value)
    box.press("Enter")


def open_settings(page: object) -> None:
    page.get_by_text("System prompt and sampling").click()
    page.wait_for_selector("#temperature input[type=number]")


def status(page: object) -> str:
    return page.inner_text("#chat-status")


def last_answer(page: object) -> str:
    bots = page.locator("#chatbot [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def ask(page: object, text: str, watch: bool = False) -> tuple[str, list[str]]:
    """Send `text`; return the final answer and, with `watch`, the partial answers seen."""
    before = status(page)
    page.fill("#message textarea", text)
    page.click("#send")
    seen: list[str] = []
    deadline = time.time() + 120
    while time.time() < deadline:
        s = status(page)
        if FINAL.search(s) and s != before:
            break
        if watch:
            part = last_answer(page)
            if part and (not seen or part != seen[-1]):
                seen.append(part)
        time.sleep(0.03)
    else:
        raise AssertionError(f"no answer: status {status(page)!r}")
    return last_answer(page), seen


def pick(page: object, elem: str, option: str) -> None:
    page.click(f"#{elem} input")
    page.get_by_role("option", name=option, exact=False).first.click()


def test_ui_binds_loopback_only() -> None:
    with pytest.raises(ValueError, match="--allow-remote"):
        UISettings(host="0.0.0.0")
    assert UISettings().host == "127.0.0.1"


def test_streamed_answer_and_saved_chat(page: object, tmp_path: Path) -> None:
    open_settings(page)
    set_number(page, "temperature", "0")
    answer, seen = ask(page, "What is the capital of France? Tell me about the city.", watch=True)
    assert "Paris" in answer
    assert len(seen) >= 3 and len(seen[0]) < len(answer), f"not streamed: {seen}"
    assert re.search(r"smollm2-135m-instruct on llamacpp-cpu: \d+ tokens, [\d.]+ tok/s", status(page))
    assert "context:" in page.inner_text("#budget-box") and "system prompt is kept" in page.inner_text("#budget-box")
    assert "What is the capital of France?" in page.input_value("#chat-title textarea")
    shot(page, "chat", tmp_path)


def test_stop_ends_a_long_answer(page: object) -> None:
    open_settings(page)
    set_number(page, "max-tokens", "2048")
    page.fill("#message textarea", "Write a very long story about a dragon who learns to cook. Make it long.")
    page.click("#send")
    page.wait_for_function("document.querySelector('#chat-status').innerText.includes('generating')")
    time.sleep(1.0)
    t = time.time()
    page.click("#stop")
    page.wait_for_function("document.querySelector('#chat-status').innerText.startsWith('Stopped')",
                           timeout=15_000)
    assert time.time() - t < 10
    m = re.search(r"(\d+) tokens", status(page))
    assert m and 0 < int(m.group(1)) < 2048 and "cancelled" in status(page)
    assert len(last_answer(page)) > 20  # the part written before Stop is kept


def test_regenerate_continue_and_edit(page: object) -> None:
    open_settings(page)
    set_number(page, "max-tokens", "16")
    first, _ = ask(page, "Write a long poem about the sea.")
    assert "length" in status(page)  # cut at 16 tokens: something to continue
    page.click("#continue")
    page.wait_for_function("(() => { const b = document.querySelectorAll('#chatbot [data-testid=bot]');"
                           f" return b.length && b[b.length - 1].innerText.length > {len(first)}; }})()")
    page.wait_for_function("/tokens, .*(stop|length)/.test(document.querySelector('#chat-status').innerText)")
    longer = last_answer(page)
    assert longer.startswith(first.strip()[:10]) and len(longer) > len(first), status(page)
    page.click("#edit-last")
    page.wait_for_function("document.querySelector('#message textarea').value === 'Write a long poem about the sea.'")
    assert page.locator("#chatbot [data-testid='bot']").count() == 0
    page.fill("#message textarea", "Name three colours.")
    page.click("#send")
    page.wait_for_function("/tokens, .*(stop|length)/.test(document.querySelector('#chat-status').innerText)"
                           " && document.querySelector('#chatbot').innerText.includes('colours')")
    before = status(page)
    page.click("#regenerate")
    page.wait_for_function(f"document.querySelector('#chat-status').innerText !== {json.dumps(before)}"
                           " && /tokens, .*(stop|length)/.test(document.querySelector('#chat-status').innerText)")
    assert page.locator("#chatbot [data-testid='user']").count() == 1
    assert page.locator("#chatbot [data-testid='bot']").count() == 1


def test_switch_model(page: object) -> None:
    pick(page, "model-picker", SECOND)
    page.get_by_text("Plan: how this model runs here").click()
    page.wait_for_function(f"(document.querySelector('#plan') || {{innerText: ''}}).innerText.includes('{SECOND}')")
    assert "llamacpp-cpu" in page.inner_text("#plan")
    ask(page, "Say hello.")
    assert status(page).startswith(f"{SECOND} on llamacpp-cpu")


def test_saved_chat_survives_restart_and_exports_markdown(app: App, browser: object, tmp_path: Path) -> None:
    ctx = browser.new_context(accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(app.url)
    pg.wait_for_selector("#message textarea")
    open_settings(pg)
    set_number(pg, "temperature", "0")
    answer, _ = ask(pg, "What is the capital of Italy?")
    ctx.close()

    app.stop()
    app.start()
    ctx = browser.new_context(accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(app.url)
    pg.wait_for_selector("#message textarea")
    pick(pg, "chat-list", "What is the capital of Italy?")
    pg.wait_for_function("document.querySelector('#chatbot').innerText.includes('capital of Italy')")
    assert answer.strip()[:20] in pg.inner_text("#chatbot")
    pg.click("#export-chat")
    link = pg.locator("#export-file a").first
    link.wait_for()
    with pg.expect_download() as dl:
        link.click()
    text = Path(dl.value.path()).read_text(encoding="utf-8")
    assert "What is the capital of Italy?" in text and answer.strip()[:20] in text and "**You:**" in text
    ctx.close()


def test_models_tab_shows_the_store_and_refuses_escaping_names(page: object, app: App, starter_gguf: Path,
                                                                tmp_path: Path) -> None:
    page.get_by_role("tab", name="Models").click()
    page.wait_for_selector("#models-table")
    table = page.inner_text("#models-table")
    assert "smollm2-135m-instruct" in table and SECOND in table and "llamacpp-cpu" in table
    page.get_by_role("tab", name="Import GGUF").click()
    page.set_input_files("#import-file input[type=file]", str(starter_gguf))  # a real GGUF, a hostile name
    page.fill("#import-name textarea, #import-name input", "../evil")
    page.wait_for_timeout(500)  # the upload finishes before the click is handled
    page.click("#import")
    page.wait_for_function("document.querySelector('#models-note').innerText.includes('not allowed')")
    assert not (app.home.parent / "evil").exists() and not list(app.home.parent.glob("evil*"))
    assert "evil" not in Store(app.home).models()
    page.get_by_role("tab", name="Pull").click()
    page.fill("#pull-repo textarea, #pull-repo input", "../../etc")
    page.click("#pull")
    page.wait_for_function("document.querySelector('#models-note').innerText.includes('OWNER/NAME')")
    shot(page, "models", tmp_path)


def test_finetune_tab_shows_the_line_of_a_bad_dataset(page: object, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Fine-tune").click()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "no closing brace"}\n')
    page.set_input_files("#dataset-file input[type=file]", str(bad))
    page.wait_for_function("document.querySelector('#dataset-check').innerText.includes('bad.jsonl:2')")
    assert "not valid JSON" in page.inner_text("#dataset-check")

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(3)))
    page.reload()  # a File box that holds a file has no file input until cleared
    page.get_by_role("tab", name="Fine-tune").click()
    page.set_input_files("#dataset-file input[type=file]", str(good))
    page.wait_for_function("document.querySelector('#dataset-check').innerText.includes('3 rows')")
    page.fill("#finetune-name textarea, #finetune-name input", "../evil")
    page.click("#finetune-start")
    page.wait_for_function("document.querySelector('#dataset-check').innerText.includes('not allowed')")
    assert "no job running" in page.inner_text("#finetune-job-status")
    shot(page, "finetune", tmp_path)


def test_import_runs_as_a_job_and_lands_in_the_model_list(page: object, starter_gguf: Path) -> None:
    page.get_by_role("tab", name="Models").click()
    page.get_by_role("tab", name="Import GGUF").click()
    page.set_input_files("#import-file input[type=file]", str(starter_gguf))
    page.fill("#import-name textarea, #import-name input", "imported")
    page.wait_for_timeout(500)  # the upload finishes before the click is handled
    page.click("#import")
    page.wait_for_function("document.querySelector('#models-job-status').innerText.includes('done in')",
                           timeout=120_000)
    page.wait_for_function("document.querySelector('#models-table').innerText.includes('imported')")
    page.get_by_role("tab", name="Chat").click()
    page.click("#refresh-models")
    pick(page, "model-picker", "imported")
