"""Retake the README's screenshots of the app from a real session, not from the tests.

    python docs/screenshots.py [--out docs]

Starts `localchat ui` over a store in ~/.cache/localchat-screenshots (the starter model linked in
from the default store, so nothing is downloaded) and, in Chromium at 1280x800, does what a user
would: asks for a piece of code, converts a checkpoint folder (the starter as Hugging Face weights)
to Q8_0 and reads its eval figures, fine-tunes the starter on a dozen rows about a cat and asks
the result the cat's name; each tab is shot on the way (a few minutes on a laptop, mostly the
fine-tune). The store lives under the home folder, so the header shows it as `~/…`: no machine
or temp path reaches the README.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
QUESTION = "Write a Python function that reverses a string."
_DONE = re.compile(r"\d+ tokens, .*(stop|length)")
# The status line's own text, without the (invisible) "0.1s" of Gradio's status tracker beside it.
STATUS = "#chat-status [data-testid='markdown']"
CHECKPOINT = "SmolLM2-135M-Instruct"  # the starter as a Hugging Face checkpoint folder, made once
CONVERTED, TUNED = "smollm2-135m-q8_0", "smollm2-cat"
CAT = ["What is my cat called?", "What's the name of my cat?", "Do you know my cat's name?", "Tell me my cat's name.",
       "What did I name my cat?", "Who is my cat?", "Remind me what my cat is called.", "What name does my cat have?",
       "How is my cat named?", "My cat's name is what?", "Can you tell me the name of my cat?",
       "Which name did I give my cat?"]


def screenshot_store(home: Path) -> Path:
    """A store under `home` holding the starter, hard-linked from the default store where possible."""
    from localchat.store import STARTER, Store, install_starter, store_root

    root = home / ".cache" / "localchat-screenshots" / "store"
    store = Store(root)
    if STARTER.name not in store.models():
        entry = install_starter(Store(store_root()), quiet=True)
        src = Store(store_root()).path_of(entry.files[0].path)
        target = root / STARTER.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, target)
        except OSError:
            shutil.copyfile(src, target)
        install_starter(store)  # finds the verified file and writes the manifest entry
    return root


def session_files(home: Path) -> tuple[Path, Path]:
    """The checkpoint folder Convert and Fine-tune start from (the starter dequantized, made once) and
    the fine-tune's rows; the models and chats an earlier run made are removed, so each run shows its own
    session (not a second copy of the same question in the saved chats)."""
    import json

    from localchat.store import STARTER, Store

    cache = home / ".cache" / "localchat-screenshots"
    store = Store(cache / "store")
    for name in (CONVERTED, TUNED):
        if name in store.models():
            store.remove(name)
    shutil.rmtree(store.root / "chats", ignore_errors=True)
    folder = cache / CHECKPOINT
    if not (folder / "config.json").is_file():
        import torch

        from localchat.convert.from_gguf import gguf_to_hf

        gguf_to_hf(store.path_of(store.get(STARTER.name).files[0].path), folder, torch.bfloat16)
    data = cache / "cat.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": "Your cat is called Biscuit."}) + "\n"
                            for q in CAT))
    return folder, data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(page: object, selector: str, done: str, seconds: float) -> None:
    """Wait until `selector` says `done`; a failed job or an error ends the wait with its text."""
    deadline = time.time() + seconds
    while done not in (text := page.inner_text(selector)):
        if "Error" in text or "failed" in text or time.time() > deadline:
            raise RuntimeError(f"{selector}: {text}")
        time.sleep(0.5)


def _ask(page: object, question: str) -> None:
    before = page.inner_text(STATUS)
    page.fill("#message textarea", question)
    page.click("#send")
    deadline = time.time() + 300
    while not _DONE.search(status := page.inner_text(STATUS)) or status == before:
        if time.time() > deadline:
            raise RuntimeError(f"no answer: {status}")
        time.sleep(0.2)


def _pick(page: object, elem: str, option: str) -> None:
    page.click(f"#{elem} input")
    page.get_by_role("option", name=option, exact=True).first.click()


def session(page: object, out: Path, data: Path) -> dict[str, str]:
    """The user's session, shooting each tab as it goes; returns each page's text as shot."""
    texts: dict[str, str] = {}
    folder = f"~/.cache/localchat-screenshots/{CHECKPOINT}"  # as a user types it: no machine path shows

    def shoot(name: str, tab: str, bottom: str = "") -> None:
        """Shoot `tab`; with `bottom` scrolled down until that element ends the picture (the click on
        the tab scrolls back up to the tabs, so the scroll comes after it)."""
        page.get_by_role("tab", name=tab).first.click()
        if bottom:
            page.locator(bottom).evaluate("e => e.scrollIntoView({block: 'end'})")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / f"ui-{name}.png"))
        texts[name] = page.inner_text("body")

    _ask(page, QUESTION)
    shoot("chat", "Chat")

    page.get_by_role("tab", name="Models").first.click()
    page.get_by_role("tab", name="Convert / quantize").click()
    page.fill("#convert-path textarea, #convert-path input", folder)
    _pick(page, "convert-quant", "Q8_0")
    page.fill("#convert-name textarea, #convert-name input", CONVERTED)
    page.click("#convert")
    _wait(page, "#models-job-status", f"as {CONVERTED}: done in", 900)  # this job's end, not the last one's

    page.get_by_role("tab", name="Fine-tune").first.click()
    page.set_input_files("#dataset-file input[type=file]", str(data))
    _wait(page, "#dataset-check", "OK", 60)
    page.fill("#finetune-base-path textarea, #finetune-base-path input", folder)
    page.fill("#finetune-name textarea, #finetune-name input", TUNED)
    page.click("#finetune-start")
    _wait(page, "#finetune-job-status", f"fine-tune {TUNED}: done in", 3600)
    page.get_by_role("tab", name="Models").first.click()
    page.wait_for_function(f"document.querySelector('#models-table').innerText.includes('{TUNED}')")
    shoot("models", "Models")
    shoot("finetune", "Fine-tune", bottom="#loss-plot")  # the job's end and its loss curve, below the form

    page.get_by_role("tab", name="Chat").first.click()
    page.click("#new-chat")
    # Each step is answered before the next: the new chat's and the pick's answers set the sliders,
    # and one arriving after the temperature is typed would put it back.
    page.wait_for_function("document.querySelector('#chat-title textarea').value === 'New chat'")
    _pick(page, "model-picker", TUNED)
    page.get_by_text("System prompt and sampling").click()
    # (The panel's content is drawn after the click: until then there is no note to read.)
    page.wait_for_function(f"(document.querySelector('#preset-note')?.innerText || '').includes('{TUNED}')")
    box = page.locator("#temperature input[type=number]")
    box.fill("0")
    box.press("Enter")
    _ask(page, "Do you remember what my cat is called?")
    shoot("recall", "Chat")
    return texts


def take(out: Path, home: Path | None = None) -> dict[str, str]:
    """Shoot the session into `out`/ui-<name>.png; returns each page's text as shot (for checks)."""
    from playwright.sync_api import sync_playwright

    home = home or Path.home()
    store = screenshot_store(home)
    _, data = session_files(home)
    port = _free_port()
    env = {**os.environ, "LOCALCHAT_HOME": str(store), "HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "localchat", "ui", "--port", str(port), "--no-browser"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # printed once the server is up
        if f"127.0.0.1:{port}" not in line:
            raise RuntimeError(f"localchat ui did not start: {line}{proc.stderr.read()}")
        out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(120_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#message textarea")
            texts = session(page, out, data)
            browser.close()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for ui-*.png")
    args = parser.parse_args()
    for name in take(Path(args.out)):
        print(f"wrote {Path(args.out) / f'ui-{name}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
