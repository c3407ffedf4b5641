"""`localchat serve` under load: throughput and p50/p95 time to first token at 1, 4 and 16
concurrent streaming clients (official openai client, loopback only), on the starter model
or (`--model llama-1b`) a TinyLlama-shaped 1.1B Q4_K_M model with random weights, built once
with localchat's own converter and cached under tests/checkpoints.CACHE.

The baseline is the same requests (same prompts, settings and count) generated in-process
one after another on the one-sequence path (the CLI's), with no HTTP at all, alternated with
the server round by round; ratios are server / baseline of each round. The server decodes up
to --parallel requests in one llama.cpp batch (continuous batching), so at 16 clients its
aggregate rate should be well above one stream's (goal: 2.5x on the 1B model), and at one
client it should stay at or above 0.95x.

The anchor is llama.cpp's own `llama-server` (built by bench/build_llama_server.py from the
llama.cpp that the installed llama-cpp-python vendors) on the same model file, prompts, sampling
and client, with `-np` = --parallel, taking its turn in every round; where it cannot be built,
the bench says why and runs without it.

    python bench/bench_serve.py [--model llama-1b] [--clients 1 4 16] [--tokens 64] [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import socket
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from results import figure, fmt, ratio, report, take_turns

if TYPE_CHECKING:
    from localchat.planner import Plan

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONTEXT = 2048
ONE_B = "llama-1b"  # bench_convert.SHAPES: the random-weight model built for this bench


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompt(i: int) -> str:
    """Request i's prompt: raw text (the 1B model has no chat template) that the starter continues for
    hundreds of tokens (it ends a raw question at once), different per request, the same on both
    sides, so both generate the same tokens."""
    start = 7 * i % 90
    return ", ".join(str(n) for n in range(start, start + 10)) + ","


def llama_1b_store(workdir: Path) -> Path:
    """A store in `workdir` holding the 1B model: made once from a random TinyLlama-shaped checkpoint
    (bench_convert.make_checkpoint, localchat's converter, Q4_K_M) and cached; the checkpoint and F16
    file are deleted once the Q4_K_M file is there."""
    from bench_convert import make_checkpoint, ours

    from localchat.convert.quantize import quantize
    from localchat.store import Store
    from localchat.store.importer import import_gguf
    from tests.checkpoints import CACHE

    q4 = CACHE / "bench" / f"{ONE_B}-Q4_K_M.gguf"
    if not q4.is_file():
        folder, f16 = CACHE / f"{ONE_B}-shaped-random", workdir / f"{ONE_B}-F16.gguf"
        try:
            ours(make_checkpoint(folder, ONE_B), f16)
            quantize(f16, q4.with_suffix(".part"), "Q4_K_M")
            os.replace(q4.with_suffix(".part"), q4)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            f16.unlink(missing_ok=True)
    home = workdir / "home"
    import_gguf(Store(home), q4, ONE_B)
    return home


class InProcess:
    """The baseline: the same model, settings and prompts on the one-sequence path (`localchat chat`'s),
    one after another, no HTTP."""

    def __init__(self, model: str, tokens: int, context: int) -> None:
        from localchat.engine import SamplingSettings
        from localchat.planner import Overrides
        from localchat.runtime import open_model

        self.loaded = open_model(model, Overrides(context=context))
        self.settings = SamplingSettings(temperature=0.0, max_tokens=tokens, seed=0)

    def run(self, requests: int) -> dict:
        total, t0 = 0, time.perf_counter()
        for i in range(requests):
            for chunk in self.loaded.backend.stream(prompt(i), self.settings):
                if chunk.stats:
                    total += chunk.stats.completion_tokens
        return {"tok_s": total / (time.perf_counter() - t0), "tokens": total, "requests": requests}

    def close(self) -> None:
        self.loaded.backend.close()


def load(base: str, model: str, clients: int, per_client: int, tokens: int, extra: dict | None = None) -> dict:
    """`clients` concurrent streaming clients, each sending `per_client` requests in turn (`extra`:
    sampling fields outside OpenAI's API, for llama-server to sample as localchat does)."""
    import openai

    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        ttft, n = None, 0
        stream = client.completions.create(
            model=model, stream=True, max_tokens=tokens, temperature=0, seed=0,
            stream_options={"include_usage": True}, prompt=prompt(i), extra_body=extra)
        for event in stream:
            if ttft is None and event.choices and event.choices[0].text:
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
def server(port: int, context: int, parallel: int) -> Iterator[subprocess.Popen]:
    """`localchat serve` on the store in LOCALCHAT_HOME."""
    with running([sys.executable, "-m", "localchat", "serve", "--port", str(port), "--context", str(context),
                  "--parallel", str(parallel), "--kv-cache", "f16"], port) as proc:  # f16, as llama-server's
        yield proc


def llama_server_binary(build: bool) -> Path | None:
    """The built llama-server, building it first where `build` (10+ minutes); None, with the reason
    printed, where there is none."""
    import build_llama_server

    if build_llama_server.binary().is_file():
        return build_llama_server.binary()
    if not build:
        print(f"llama-server: not built ({build_llama_server.binary()} is missing; "
              "run bench/build_llama_server.py): the bench runs without it", file=sys.stderr)
        return None
    try:
        return build_llama_server.build()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"llama-server: cannot build it ({exc}): the bench runs without it", file=sys.stderr)
        return None


@contextlib.contextmanager
def llama_server(binary: Path, port: int, model: str, p: Plan, context: int, parallel: int
                 ) -> Iterator[subprocess.Popen]:
    """llama.cpp's own server on the file the in-process side runs (its plan `p`), with the same threads and
    batch size, the same context per slot (its -c is all slots' together) and `parallel` slots, answering as
    `model`."""
    from localchat.engine.llamacpp import DEFAULT_BATCH

    with running([str(binary), "-m", p.artifact.path, "-a", model, "--host", "127.0.0.1", "--port", str(port),
                  "-c", str(context * parallel), "-np", str(parallel), "-t", str(p.threads), "-tb", str(p.threads),
                  "-b", str(DEFAULT_BATCH), "-ub", str(DEFAULT_BATCH), "--no-webui"], port) as proc:
        yield proc


@contextlib.contextmanager
def running(argv: list[str], port: int) -> Iterator[subprocess.Popen]:
    """`argv` started, once its /health answers 200; stopped on the way out. Its log goes to a temp file,
    not a pipe: llama-server logs every request, and a full pipe would stall it mid-bench."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=log)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:  # (llama-server answers 503 while it loads: an HTTPError, an OSError)
                    if time.time() > deadline or proc.poll() is not None:
                        proc.kill()
                        proc.wait()
                        log.seek(0)
                        raise RuntimeError(f"{Path(argv[0]).name} did not start: "
                                           + log.read().decode(errors="replace")[-2000:])
                    time.sleep(0.2)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help=f"a store model, or {ONE_B!r}: the random-weight 1.1B model (built once, cached)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends in turn")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per client count")
    ap.add_argument("--context", type=int, default=CONTEXT, help="tokens of context per slot")
    ap.add_argument("--parallel", type=int, help="the server's slots (default: the most clients)")
    ap.add_argument("--quick", action="store_true",
                    help="one round, one request per client, 32 tokens, 1024 context: checks the bench runs "
                         "(with llama-server only where it is built already)")
    ap.add_argument("--no-llama-server", action="store_true", help="leave out the llama-server anchor")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.per_client, args.tokens, args.context = 1, 1, 32, 1024
    parallel = args.parallel or max(args.clients)

    with contextlib.ExitStack() as stack:
        if args.model == ONE_B:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-serve-")))
            os.environ["LOCALCHAT_HOME"] = str(llama_1b_store(workdir))  # the server child inherits it
        return measure(args, parallel)


def measure(args: argparse.Namespace, parallel: int) -> dict:
    from localchat.engine import SamplingSettings

    binary = None if args.no_llama_server else llama_server_binary(build=not args.quick)
    port, anchor_port = free_port(), free_port()
    base, anchor_base = f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{anchor_port}/v1"
    # llama-server samples greedily at temperature 0 too; the penalty is the one in-process applies. Every
    # round sends the same prompts, and llama-server's prompt cache (on by default) would keep each one
    # from the round before and skip its prefill, a third of the work at 16 clients; the in-process side
    # and localchat (a seeded request never reuses a cache: llamacpp.reusable_prefix) evaluate every prompt.
    same = {"repeat_penalty": SamplingSettings().repeat_penalty, "cache_prompt": False}
    inproc = InProcess(args.model, args.tokens, args.context)
    figures: dict[str, dict] = {}
    try:
        with contextlib.ExitStack() as servers:
            servers.enter_context(server(port, args.context, parallel))
            sides = {"in-process": lambda c, n: inproc.run(n),
                     "server": lambda c, n: load(base, args.model, c, args.per_client, args.tokens)}
            if binary is not None:
                servers.enter_context(llama_server(binary, anchor_port, args.model, inproc.loaded.plan,
                                                   args.context, parallel))
                sides["llama-server"] = lambda c, n: load(anchor_base, args.model, c, args.per_client, args.tokens,
                                                          same)
            # Warm-up: loads the model in the servers; one generation on each side.
            take_turns([lambda f=f: f(1, 1) for f in sides.values()], 0, warmup=1)
            anchor = "llama-server" in sides
            print(f"{'clients':>7s} {'requests':>8s} {'server tok/s':>26s} {'in-process tok/s':>26s} "
                  f"{'server / in-process':>26s} {'TTFT p50 ms':>24s} {'TTFT p95 ms':>24s}"
                  + (f" {'llama-server tok/s':>26s} {'llama-server / in-process':>26s} "
                     f"{'server / llama-server':>26s} {'its TTFT p95 ms':>24s}" if anchor else ""))
            for c in args.clients:
                n = c * args.per_client
                runs = dict(zip(sides, take_turns([lambda f=f: f(c, n) for f in sides.values()], args.rounds,
                                                  warmup=0)))
                srv, own = runs["server"], runs["in-process"]
                for name, res in runs.items():
                    if any(r["tokens"] != o["tokens"] for r, o in zip(res, own)):
                        print(f"note: {c} clients: {name} and in-process generated different token counts "
                              f"({res[0]['tokens']} / {own[0]['tokens']})", file=sys.stderr)
                f = {"server_tok_s": figure([r["tok_s"] for r in srv], "tok/s", f"{c} clients, {n} requests"),
                     "inprocess_tok_s": figure([r["tok_s"] for r in own], "tok/s", f"{n} requests in turn"),
                     "ratio": ratio([r["tok_s"] for r in srv], [r["tok_s"] for r in own],
                                    "server / in-process throughput, per round"),
                     "ttft_p50": figure([r["p50_ms"] for r in srv], "ms", "each round's p50, over rounds"),
                     "ttft_p95": figure([r["p95_ms"] for r in srv], "ms", "each round's p95, over rounds")}
                line = (f"{c:7d} {n:8d} {fmt(f['server_tok_s'], 1):>26s} {fmt(f['inprocess_tok_s'], 1):>26s} "
                        f"{fmt(f['ratio'], 3):>26s} {fmt(f['ttft_p50'], 0):>24s} {fmt(f['ttft_p95'], 0):>24s}")
                if anchor:
                    theirs = runs["llama-server"]
                    f |= {"llama_server_tok_s": figure([r["tok_s"] for r in theirs], "tok/s",
                                                       f"llama-server -np {parallel}, {c} clients"),
                          "llama_server_ratio": ratio([r["tok_s"] for r in theirs], [r["tok_s"] for r in own],
                                                      "llama-server / in-process throughput, per round"),
                          "vs_llama_server": ratio([r["tok_s"] for r in srv], [r["tok_s"] for r in theirs],
                                                   "server / llama-server throughput, per round"),
                          "llama_server_ttft_p95": figure([r["p95_ms"] for r in theirs], "ms",
                                                          "llama-server: each round's p95, over rounds")}
                    line += (f" {fmt(f['llama_server_tok_s'], 1):>26s} {fmt(f['llama_server_ratio'], 3):>26s} "
                             f"{fmt(f['vs_llama_server'], 3):>26s} {fmt(f['llama_server_ttft_p95'], 0):>24s}")
                figures.update({f"c{c}_{k}": v for k, v in f.items()})
                print(line)
    finally:
        inproc.close()
    print(f"\nmedian (min-max) of {args.rounds} rounds, sides taking turns; each round sends the same "
          f"{args.per_client} requests per client to the server ({parallel} slots)"
          + (f" and to llama-server (-np {parallel})" if binary else "") + " and, one after another, in-process")
    return report({"model": args.model, "clients": args.clients, "per_client": args.per_client,
                   "max_tokens": args.tokens, "rounds": args.rounds, "context": args.context,
                   "parallel": parallel, "quick": args.quick, "llama_server": binary is not None}, figures)


if __name__ == "__main__":
    main()
