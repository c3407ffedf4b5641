"""`localchat bench MODEL`: decode speed of every backend that can run MODEL on this machine.

The figures go into the model's store entry, and from then on the planner ranks the
measured backends by them and says so in its reasons ("measured decode speed: ..."): on
a CUDA machine with both a GPTQ checkpoint and a GGUF, whichever decodes faster on that
card runs, instead of a rule written without that card at hand.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from datetime import date

from ..chat import ChatSession
from ..engine.registry import load_backend
from ..engine.settings import SamplingSettings
from ..hardware import HardwareReport, probe
from ..planner import BACKENDS, Measured, Overrides, Plan, PlanError, device_name, plan
from ..store import Store, default_store, resolve_model
from ..store.resolve import SPEEDS

DEFAULT_TOKENS = 128
WARMUP_TOKENS = 8
PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. "
          "Describe the sea, the weather and the town.")


@dataclass(frozen=True)
class BenchRow:
    measured: Measured
    prompt_tok_s: float
    tokens: int


@dataclass(frozen=True)
class BenchRun:
    rows: list[BenchRow]
    failures: list[str]  # "backend: why", one per backend that could not be timed


def runnable_plans(report: HardwareReport, spec: str, store: Store) -> list[Plan]:
    """One plan per backend that can run the model here (the planner's own fit checks)."""
    model = resolve_model(spec, store)
    plans = []
    for backend in BACKENDS:
        try:
            plans.append(plan(report, model.artifacts, Overrides(backend=backend, in_process=True)))
        except PlanError:
            continue
    return plans


def measure(p: Plan, device: str, tokens: int) -> BenchRow:
    """Greedy decode of `tokens` tokens after a short warm-up, on a freshly loaded backend."""
    backend = load_backend(p)
    try:
        session = ChatSession(backend, settings=SamplingSettings(temperature=0.0, max_tokens=tokens))
        messages = [{"role": "user", "content": PROMPT}]
        for _ in session.stream_reply(messages, SamplingSettings(temperature=0.0, max_tokens=WARMUP_TOKENS)):
            pass
        for _ in session.stream_reply(messages):
            pass
        stats = session.last_stats
        assert stats is not None
        if stats.completion_tokens < 2:
            raise RuntimeError(f"{p.backend}: the model stopped after {stats.completion_tokens} token(s)")
        return BenchRow(Measured(p.backend, device, round(stats.decode_tok_s, 2), date.today().isoformat()),
                        stats.prompt_tok_s, stats.completion_tokens)
    finally:
        backend.close()


def bench(spec: str, store: Store, tokens: int = DEFAULT_TOKENS, backends: list[str] | None = None,
          save: bool = True, report: HardwareReport | None = None) -> BenchRun:
    """Measure each runnable backend (or the named ones) and record the figures in the store."""
    report = report or probe()
    plans = [p for p in runnable_plans(report, spec, store) if not backends or p.backend in backends]
    if not plans:
        raise PlanError(f"{spec}: no backend can run it here" + (f" among {', '.join(backends)}" if backends else ""))
    run = BenchRun([], [])
    for p in plans:  # one backend failing to load (a broken install, say) does not stop the others
        try:
            run.rows.append(measure(p, device_name(report, p.backend), tokens))
        except (RuntimeError, OSError, ValueError, ImportError) as exc:
            run.failures.append(f"{p.backend}: {exc}")
    if not run.rows:
        raise RuntimeError("every backend failed: " + "; ".join(run.failures))
    if save and spec in store.models():
        store.update(spec, lambda entry: _record(entry.extra, run.rows))
    return run


def _record(extra: dict, rows: list[BenchRow]) -> None:
    """New figures replace those of the same backend and device; other devices' stay."""
    new = {(r.measured.backend, r.measured.device) for r in rows}
    kept = [d for d in extra.get(SPEEDS, []) if (d["backend"], d["device"]) not in new]
    extra[SPEEDS] = kept + [asdict(r.measured) for r in rows]


def command(args: argparse.Namespace) -> int:
    store, report = default_store(), probe()
    run = bench(args.model, store, args.tokens, args.backend, save=not args.no_save, report=report)
    for line in run.failures:
        print(f"localchat bench: {line}", file=sys.stderr)
    print(f"{'backend':<16} {'device':<40} {'decode tok/s':>12} {'prompt tok/s':>12} {'tokens':>6}")
    for r in run.rows:
        m = r.measured
        print(f"{m.backend:<16} {m.device[:40]:<40} {m.decode_tok_s:>12.1f} {r.prompt_tok_s:>12.1f} {r.tokens:>6}")
    if args.model in store.models() and not args.no_save:
        from ..runtime import plan_model

        _, chosen = plan_model(args.model, store=store, report=report)
        print(f"saved in the store; the planner now picks {chosen.backend} for {args.model}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model in the store (figures are saved), a GGUF file or a model folder")
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens to decode per backend")
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="measure only this backend (repeatable; default: every one that can run it)")
    parser.add_argument("--no-save", action="store_true", help="print the figures without storing them")
    return parser


def main(argv: list[str] | None = None) -> int:
    return command(build_parser().parse_args(argv))
