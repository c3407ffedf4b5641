"""Retake the README's screenshots of the app from a real session, not from the tests.

    python docs/screenshots.py [--out docs]

Starts `localchat ui` over a store in ~/.cache/localchat-screenshots (the starter model linked in
from the default store, so nothing is downloaded), asks for a piece of code in Chromium at
1280x800 and shoots each tab. The store lives under the home folder, so the header shows it as
`~/…`: no machine or temp path reaches the README.
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
TABS = {"chat": "Chat", "models": "Models", "finetune": "Fine-tune"}
_DONE = re.compile(r"\d+ tokens, .*(stop|length)")


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def take(out: Path, home: Path | None = None) -> dict[str, str]:
    """Shoot each tab into `out`/ui-<tab>.png; returns each page's text as shot (for checks)."""
    from playwright.sync_api import sync_playwright

    home = home or Path.home()
    store = screenshot_store(home)
    port = _free_port()
    env = {**os.environ, "LOCALCHAT_HOME": str(store), "HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "localchat", "ui", "--port", str(port), "--no-browser"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    texts: dict[str, str] = {}
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
            page.fill("#message textarea", QUESTION)
            page.click("#send")
            deadline = time.time() + 300
            while not _DONE.search(page.inner_text("#chat-status")):
                if time.time() > deadline:
                    raise RuntimeError(f"no answer: {page.inner_text('#chat-status')}")
                time.sleep(0.2)
            for name, tab in TABS.items():
                page.get_by_role("tab", name=tab).first.click()
                page.wait_for_timeout(1000)
                page.screenshot(path=str(out / f"ui-{name}.png"))
                texts[name] = page.inner_text("body")
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
