"""localchat's llama.cpp path against raw llama-cpp-python, same model, threads and prompt.

Each side runs in its own process (so peak RSS is its own), the sides alternate over
several rounds (this machine is noisy), and the table prints localchat / raw ratios
measured in this run. The raw baseline is the tightest loop llama-cpp-python offers:
`Llama.generate` with an end-of-generation check and nothing else.

    python bench/bench_runtime.py [--model NAME_OR_PATH] [--rounds 5] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from results import alternate, figure, fmt, ratio, report

PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather, the town and the people in it. ") * 3
SYSTEM = "You are a helpful assistant."


def _setup(model: str, threads: int, ctx: int):
    from localchat.chat import ChatSession
    from localchat.engine.llamacpp import LlamaCppBackend
    from localchat.hardware import probe
    from localchat.planner import Overrides, plan
    from localchat.store import default_store, resolve_model

    resolved = resolve_model(model, default_store())
    p = plan(probe(), resolved.artifacts, Overrides(threads=threads, context=ctx, backend="llamacpp-cpu"))
    return p, ChatSession, LlamaCppBackend


def worker_raw(model: str, threads: int, ctx: int, tokens: int, reps: int) -> dict:
    import llama_cpp

    from localchat.gguf_file import read_gguf
    from localchat.templates import render_chat

    p, _, _ = _setup(model, threads, ctx)
    # The same prompt text localchat sends, rendered without loading the model twice.
    h = read_gguf(p.artifact.path)
    prompt = render_chat(h.chat_template or "", [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": PROMPT}],
                         bos_token=h.token("bos") or "", eos_token=h.token("eos") or "")
    llm = llama_cpp.Llama(model_path=p.artifact.path, n_ctx=ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, n_gpu_layers=0, verbose=False)
    vocab = llm._model.vocab
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    runs = []
    for rep in range(reps + 1):  # the first is warm-up
        llm.reset()
        t0 = time.perf_counter()
        n, t_first = 0, t0
        for tok in llm.generate(ids, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
            if n == 0:
                t_first = time.perf_counter()
            if llama_cpp.llama_vocab_is_eog(vocab, tok):
                break
            llm.detokenize([tok])
            n += 1
            if n >= tokens:
                break
        t_end = time.perf_counter()
        if rep:
            runs.append((len(ids), n, t_first - t0, t_end - t_first))
    return {**_summary(runs), "quant": p.artifact.quant}


def worker_localchat(model: str, threads: int, ctx: int, tokens: int, reps: int) -> dict:
    from localchat.engine import SamplingSettings

    p, ChatSession, LlamaCppBackend = _setup(model, threads, ctx)
    backend = LlamaCppBackend(p)
    session = ChatSession(backend, system=SYSTEM)
    settings = SamplingSettings(temperature=0.0, repeat_penalty=1.0, max_tokens=tokens, seed=0)
    msgs = session.messages + [{"role": "user", "content": PROMPT}]
    runs = []
    for rep in range(reps + 1):
        for _ in session.stream_reply(msgs, settings):  # seed set: the prompt is evaluated afresh
            pass
        st = session.last_stats
        if rep:
            runs.append((st.prompt_tokens, st.completion_tokens, st.ttft_s, st.decode_s))
    return _summary(runs)


def _summary(runs: list[tuple[int, int, float, float]]) -> dict:
    return {
        "prompt_tokens": runs[0][0],
        "completion_tokens": runs[0][1],
        "prompt_tok_s": statistics.median(pt / ttft for pt, _, ttft, _ in runs),
        "decode_tok_s": statistics.median((n - 1) / d for _, n, _, d in runs),
        "ttft_ms": statistics.median(ttft for _, _, ttft, _ in runs) * 1000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


WORKERS = {"raw": worker_raw, "localchat": worker_localchat}
METRICS = (("decode_tok_s", "decode tok/s", "higher"), ("prompt_tok_s", "prompt tok/s", "higher"),
           ("ttft_ms", "first token ms", "lower"), ("peak_rss_mb", "peak RSS MB", "lower"))
UNITS = {"decode_tok_s": "tok/s", "prompt_tok_s": "tok/s", "ttft_ms": "ms", "peak_rss_mb": "MB"}


def run_worker(side: str, args: argparse.Namespace) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", side, "--model", args.model,
                          "--threads", str(args.threads), "--ctx", str(args.ctx),
                          "--tokens", str(args.tokens), "--reps", str(args.reps)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} worker failed: {out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{side:9s} {r['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="measured generations per process, after one warm-up")
    ap.add_argument("--rounds", type=int, default=5, help="processes per side, alternating")
    ap.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads is None:
        import psutil

        args.threads = psutil.cpu_count(logical=False) or 1
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.model, args.threads, args.ctx, args.tokens, args.reps)))
        return {}

    # Each process warms up with its first generation, so no process is thrown away here.
    ours, raw = alternate(lambda: run_worker("localchat", args), lambda: run_worker("raw", args),
                          args.rounds, warmup=0)
    quant = raw[0]["quant"]
    figures: dict[str, dict] = {}
    for key, _, better in METRICS:
        figures[f"raw_{key}"] = figure([r[key] for r in raw], UNITS[key], "raw llama-cpp-python")
        figures[f"localchat_{key}"] = figure([r[key] for r in ours], UNITS[key], "localchat")
        figures[f"ratio_{key}"] = ratio([r[key] for r in ours], [r[key] for r in raw],
                                        f"localchat / raw, per round; {better} is better")
    settings = {"model": args.model, "quant": quant, "threads": args.threads, "ctx": args.ctx,
                "max_tokens": args.tokens, "reps": args.reps, "rounds": args.rounds,
                "prompt_tokens": raw[0]["prompt_tokens"], "completion_tokens": raw[0]["completion_tokens"]}
    print(f"\nmodel {args.model} ({quant}), {args.threads} threads, prompt {settings['prompt_tokens']} tokens, "
          f"{settings['completion_tokens']} generated; median (min-max) of {args.rounds} processes a side, "
          f"each the median of {args.reps} runs after a warm-up")
    print(f"{'metric':16s} {'raw llama-cpp':>24s} {'localchat':>24s} {'localchat / raw':>26s}")
    for key, label, better in METRICS:
        print(f"{label:16s} {fmt(figures['raw_' + key], 1):>24s} {fmt(figures['localchat_' + key], 1):>24s} "
              f"{fmt(figures['ratio_' + key], 3):>26s}  ({better} is better)")
    r = figures["ratio_decode_tok_s"]["value"]
    print(f"\ndecode speed ratio {r:.3f} (goal >= 0.97): {'PASS' if r >= 0.97 else 'FAIL'}")
    return report(settings, figures)


if __name__ == "__main__":
    main()
