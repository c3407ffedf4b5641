"""Decode speed inside the desktop app against the same generation without it, in one run.

The app (its own process) answers in headless Chromium, so the browser's rendering and
Gradio's streaming share the cores with the decode, as on a user's laptop. The baseline
is the same greedy answer through `ChatSession` in a plain process. Runs alternate, after
one warm-up of each. The CPU the browser spends per second of answer (in cores) is reported
too: what the page takes from the decode, a figure other work on the machine moves far less
than the tok/s ratio.

    python bench/bench_ui.py [--rounds 5] [--tokens 256]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import alternate, figure, fmt, ratio, report  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper and his cat."
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def baseline(tokens: int) -> float:
    code = (
        "from localchat.runtime import open_model\n"
        "from localchat.planner import Overrides\n"
        "from localchat.chat import ChatSession\n"
        "from localchat.engine import SamplingSettings\n"
        "m = open_model('smollm2-135m-instruct', Overrides(context=2048))\n"
        "s = ChatSession(m.backend, system='You are a helpful assistant.')\n"
        f"s.ask({PROMPT!r}, SamplingSettings(temperature=0, max_tokens={tokens}, seed=1))\n"
        "print(s.last_stats.decode_tok_s)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def browser_cpu_s() -> float:
    """CPU seconds used so far by the browser's processes (children of this one)."""
    import psutil

    total = 0.0
    for proc in psutil.Process().children(recursive=True):
        try:
            if "chrom" in proc.name():
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def in_app(page, tokens: int) -> tuple[float, float]:  # noqa: ANN001
    """The answer's decode tok/s, and the browser's CPU per second of answer (in cores)."""
    page.reload()
    page.wait_for_selector("#message textarea")
    page.get_by_text("System prompt and sampling").click()
    for elem, value in (("temperature", "0"), ("max-tokens", str(tokens))):
        box = page.locator(f"#{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.fill("#message textarea", PROMPT)
    cpu, t0 = browser_cpu_s(), time.perf_counter()
    page.click("#send")
    # Polled 10 times a second, not at every animation frame (Playwright's default): that would have the
    # browser draw 60 frames a second for the whole answer, a cost of the bench and not of the app.
    page.wait_for_function("/tokens, [\\d.]+ tok\\/s.*(stop|length)/.test(document.querySelector('#chat-status').innerText)",
                           timeout=300_000, polling=100)
    cores = (browser_cpu_s() - cpu) / (time.perf_counter() - t0)
    status = page.inner_text("#chat-status")
    return float(re.search(r"tokens, ([\d.]+) tok/s", status).group(1)), cores


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from localchat.store import Store, default_store, install_starter
    from localchat.store.starter import copy_starter

    install_starter(default_store(), quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        copy_starter(default_store(), Store(home))
        env = {**os.environ, "LOCALCHAT_HOME": str(home)}
        app = subprocess.Popen([sys.executable, "-m", "localchat", "ui", "--port", "0", "--no-browser",
                                "--context", "2048"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            url = re.search(r"(http://\S+)", app.stderr.readline()).group(1)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
                page = browser.new_page()
                page.goto(url)
                ui_runs, raw_rates = alternate(lambda: in_app(page, args.tokens), lambda: baseline(args.tokens),
                                               args.rounds, warmup=1)
                browser.close()
        finally:
            app.terminate()
            app.wait()
    ui_rates = [rate for rate, _ in ui_runs]
    figures = {"plain_tok_s": figure(raw_rates, "tok/s", "ChatSession in a plain process"),
               "app_tok_s": figure(ui_rates, "tok/s", "in the app, answered in headless Chromium"),
               "ratio": ratio(ui_rates, raw_rates, "app / plain decode tok/s, per round"),
               "browser_cores": figure([cores for _, cores in ui_runs], "cores",
                                       "CPU the browser spends per second of answer")}
    print(f"decode tok/s, median (min-max) of {args.rounds} alternating rounds after a warm-up: "
          f"plain {fmt(figures['plain_tok_s'], 1)}, in the app with Chromium {fmt(figures['app_tok_s'], 1)} "
          f"-> {fmt(figures['ratio'])}; the browser meanwhile used {fmt(figures['browser_cores'], 3)} "
          f"(load average {os.getloadavg()[0]:.1f})")
    return report({"model": "smollm2-135m-instruct", "max_tokens": args.tokens, "rounds": args.rounds}, figures)


if __name__ == "__main__":
    main()
