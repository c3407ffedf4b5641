"""`localchat serve` under load: throughput and p50/p95 time to first token at 1, 4 and 16
concurrent streaming clients (official openai client, real starter model, loopback only).

The baseline is the same requests (same conversations, settings and count) generated
in-process one after another with no HTTP at all, alternated with the server round by
round; ratios are server / baseline of each round. Requests to one model queue fairly, so
time to first token grows with the queue while throughput should stay near the baseline.

    python bench/bench_serve.py [--clients 1 4 16] [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

from results import alternate, figure, fmt, ratio, report

QUESTIONS = ["What is the capital of France?", "Write a haiku about rain.", "Name three fruits.",
             "What is two plus two?"]
SYSTEM = "You are a helpful assistant."
CONTEXT = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(i: int) -> list[dict]:
    """Request i's conversation: the same on both sides, so both generate the same tokens."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


class InProcess:
    """The baseline: the same model, settings and conversations through `ChatSession`, one
    after another (the server answers one model's requests in turn too), no HTTP."""

    def __init__(self, model: str, tokens: int) -> None:
        from localchat.chat import ChatSession
        from localchat.engine import SamplingSettings
        from localchat.planner import Overrides
        from localchat.runtime import open_model

        self.loaded = open_model(model, Overrides(context=CONTEXT))
        self.session = ChatSession(self.loaded.backend)
        self.settings = SamplingSettings(temperature=0.0, max_tokens=tokens, seed=0)

    def run(self, requests: int) -> dict:
        total, t0 = 0, time.perf_counter()
        for i in range(requests):
            for _ in self.session.stream_reply(messages(i), self.settings):
                pass
            total += self.session.last_stats.completion_tokens
        return {"tok_s": total / (time.perf_counter() - t0), "tokens": total, "requests": requests}

    def close(self) -> None:
        self.loaded.backend.close()


def load(base: str, model: str, clients: int, per_client: int, tokens: int) -> dict:
    """`clients` concurrent streaming clients, each sending `per_client` requests in turn."""
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft, n = None, 0
        stream = client.chat.completions.create(
            model=model, stream=True, max_tokens=tokens, temperature=0, seed=0,
            stream_options={"include_usage": True}, messages=messages(i))
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
    return {"tok_s": sum(r[1] for r in results) / elapsed, "tokens": sum(r[1] for r in results),
            "p50_ms": statistics.median(ttfts) * 1000,
            "p95_ms": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))] * 1000,
            "requests": len(results)}


@contextlib.contextmanager
def server(port: int) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-m", "localchat", "serve", "--port", str(port),
                             "--context", str(CONTEXT)], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    proc.kill()
                    raise RuntimeError("server did not start: "
                                       + (proc.stderr.read().decode()[-2000:] if proc.stderr else ""))
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends in turn")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per client count")
    args = ap.parse_args(argv)

    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    inproc = InProcess(args.model, args.tokens)
    figures: dict[str, dict] = {}
    try:
        with server(port):
            # Warm-up: loads the model in the server; one generation on each side.
            alternate(lambda: load(base, args.model, 1, 1, args.tokens), lambda: inproc.run(1), 0, warmup=1)
            print(f"{'clients':>7s} {'requests':>8s} {'server tok/s':>26s} {'in-process tok/s':>26s} "
                  f"{'server / in-process':>26s} {'TTFT p50 ms':>24s} {'TTFT p95 ms':>24s}")
            for c in args.clients:
                n = c * args.per_client
                srv, own = alternate(lambda: load(base, args.model, c, args.per_client, args.tokens),
                                     lambda: inproc.run(n), args.rounds, warmup=0)
                if any(s["tokens"] != o["tokens"] for s, o in zip(srv, own)):
                    print(f"note: {c} clients: server and in-process generated different token counts "
                          f"({srv[0]['tokens']} / {own[0]['tokens']})", file=sys.stderr)
                f = {"server_tok_s": figure([r["tok_s"] for r in srv], "tok/s", f"{c} clients, {n} requests"),
                     "inprocess_tok_s": figure([r["tok_s"] for r in own], "tok/s", f"{n} requests in turn"),
                     "ratio": ratio([r["tok_s"] for r in srv], [r["tok_s"] for r in own],
                                    "server / in-process throughput, per round"),
                     "ttft_p50": figure([r["p50_ms"] for r in srv], "ms", "each round's p50, over rounds"),
                     "ttft_p95": figure([r["p95_ms"] for r in srv], "ms", "each round's p95, over rounds")}
                figures.update({f"c{c}_{k}": v for k, v in f.items()})
                print(f"{c:7d} {n:8d} {fmt(f['server_tok_s'], 1):>26s} {fmt(f['inprocess_tok_s'], 1):>26s} "
                      f"{fmt(f['ratio'], 3):>26s} {fmt(f['ttft_p50'], 0):>24s} {fmt(f['ttft_p95'], 0):>24s}")
    finally:
        inproc.close()
    print(f"\nmedian (min-max) of {args.rounds} alternating rounds; each round sends the same "
          f"{args.per_client} requests per client to the server and, one after another, in-process")
    return report({"model": args.model, "clients": args.clients, "per_client": args.per_client,
                   "max_tokens": args.tokens, "rounds": args.rounds, "context": CONTEXT}, figures)


if __name__ == "__main__":
    main()
