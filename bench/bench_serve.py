"""`localchat serve` under load: throughput and p50/p95 time to first token at 1, 4 and 16
concurrent streaming clients (official openai client, real starter model, loopback only).

The baseline, measured in the same run, is the same generations done in-process with no
HTTP at all; ratios are server / baseline. Requests to one model queue fairly, so time to
first token grows with the queue while throughput should stay near the baseline.

    python bench/bench_serve.py [--clients 1 4 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import socket
import statistics
import subprocess
import sys
import time

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Name three fruits.",
             "What is two plus two?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def baseline(model: str, tokens: int, n: int) -> float:
    """Completion tokens per second for `n` generations in-process."""
    from localchat.chat import ChatSession
    from localchat.engine import SamplingSettings
    from localchat.planner import Overrides
    from localchat.runtime import open_model

    loaded = open_model(model, Overrides(context=2048))
    session = ChatSession(loaded.backend, system=loaded.model.defaults.get("system"))
    settings = SamplingSettings(temperature=0.0, max_tokens=tokens, seed=0)
    total, t0 = 0, time.perf_counter()
    for i in range(n):
        for _ in session.stream_reply([{"role": "system", "content": "You are a helpful assistant."},
                                       {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], settings):
            pass
        total += session.last_stats.completion_tokens
    elapsed = time.perf_counter() - t0
    loaded.backend.close()
    return total / elapsed


def load(base: str, model: str, clients: int, per_client: int, tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft, n = None, 0
        stream = client.chat.completions.create(
            model=model, stream=True, max_tokens=tokens, temperature=0, seed=0,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
        for event in stream:
            if ttft is None and event.choices and event.choices[0].delta.content:
                ttft = time.perf_counter() - t0
            if event.usage:
                n = event.usage.completion_tokens
        return ttft or 0.0, n

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * per_client)))
    elapsed = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {"tok_s": sum(r[1] for r in results) / elapsed,
            "p50_ms": statistics.median(ttfts) * 1000,
            "p95_ms": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))] * 1000,
            "requests": len(results)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends in turn")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)

    base_tok_s = baseline(args.model, args.tokens, 8)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "localchat", "serve", "--port", str(port),
                               "--context", "2048"], env=os.environ.copy(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        import urllib.request

        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit(f"server did not start: {server.stderr.read().decode() if server.stderr else ''}")
                time.sleep(0.2)
        load(base, args.model, 1, 1, 8)  # warm-up: loads the model
        print(f"baseline (in-process, no HTTP): {base_tok_s:.1f} tok/s\n")
        print(f"{'clients':>7s} {'requests':>8s} {'tok/s':>8s} {'vs base':>8s} {'TTFT p50 ms':>12s} {'TTFT p95 ms':>12s}")
        for c in args.clients:
            r = load(base, args.model, c, args.per_client, args.tokens)
            print(f"{c:7d} {r['requests']:8d} {r['tok_s']:8.1f} {r['tok_s'] / base_tok_s:8.3f} "
                  f"{r['p50_ms']:12.0f} {r['p95_ms']:12.0f}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
