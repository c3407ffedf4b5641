"""What every benchmark shares: where and with what a figure was measured, how contender and
baseline take turns, and the record a figure is kept as in bench/results.json.

A figure is {value: median, spread: [lo, hi], n, unit, note}: the median over n repeats and
their range, so a reader sees how noisy the machine was. Single measurements (a perplexity,
a file size) have n = 1 and a zero-width spread.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

ROOT = Path(__file__).resolve().parents[1]
# Distributions whose version can move a figure; those not installed are left out.
PACKAGES = ("llama_cpp_python", "numpy", "torch", "transformers", "peft", "gptqmodel", "bitsandbytes",
            "gradio", "fastapi", "uvicorn", "playwright")

T = TypeVar("T")


def machine() -> dict[str, Any]:
    """CPU, cores, memory and accelerators, from localchat's own hardware probe."""
    from localchat.hardware import GIB, probe_machine

    hw = probe_machine()  # this machine, whatever LOCALCHAT_HARDWARE_REPORT says
    return {
        "cpu": hw.cpu.model,
        "physical_cores": hw.cpu.physical_cores,
        "logical_cores": hw.cpu.logical_cores,
        "arch": hw.cpu.arch,
        "memory_gib": round(hw.memory.total_bytes / GIB, 1),
        "gpus": [f"{g.name} ({g.library}, {g.total_bytes / GIB:.0f} GiB)" for g in hw.accelerators],
        "os": platform.platform(terse=True),
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def versions() -> dict[str, str]:
    """Python, localchat's commit (with "+dirty" when the code has uncommitted changes: the
    results file and the README this run rewrites do not count) and the installed versions of
    the libraries in PACKAGES, read without importing them."""
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results.json", ":!README.md"):
        commit += "+dirty"
    found = {"python": platform.python_version(), "localchat": commit}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def take_turns(sides: Sequence[Callable[[], T]], rounds: int, warmup: int = 1) -> list[list[T]]:
    """Run every side `warmup` times (discarded), then `rounds` times each, reversing the order
    every round, so a machine that speeds up or slows down during the run (page cache,
    thermal limits, a neighbour's job) weighs on all sides alike.

    Returns one list per side, of its results in round order (round i of each side ran
    back to back, so results of the same index pair up).
    """
    for _ in range(warmup):
        for side in sides:
            side()
    results: list[list[T]] = [[] for _ in sides]
    order = list(range(len(sides)))
    for r in range(rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            results[i].append(sides[i]())
    return results


def alternate(contender: Callable[[], T], baseline: Callable[[], T], rounds: int,
              warmup: int = 1) -> tuple[list[T], list[T]]:
    """`take_turns` for a contender and its baseline (the baseline goes first in round one);
    returns (contender results, baseline results)."""
    theirs, ours = take_turns([baseline, contender], rounds, warmup)
    return ours, theirs


def _clean(x: float) -> float:
    """Round to 5 significant digits: more than any of these measurements can resolve."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, max(0, 4 - int(math.floor(math.log10(abs(x))))))


def figure(values: Sequence[float] | float, unit: str, note: str = "") -> dict[str, Any]:
    """The record of one figure: median and range of `values` (or one value)."""
    vals = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if not vals:
        raise ValueError("a figure needs at least one measurement")
    return {"value": _clean(statistics.median(vals)), "spread": [_clean(min(vals)), _clean(max(vals))],
            "n": len(vals), "unit": unit, "note": note}


def ratio(contender: Sequence[float], baseline: Sequence[float], note: str = "") -> dict[str, Any]:
    """Contender / baseline of each round (paired, as `alternate` returns them), as a figure."""
    if len(contender) != len(baseline):
        raise ValueError("a ratio pairs contender and baseline rounds one to one")
    return figure([c / b for c, b in zip(contender, baseline)], "x", note)


def report(settings: dict[str, Any], figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a bench's main() returns: the settings it ran with and its figures."""
    return {"settings": settings, "figures": figures}


def fmt(record: dict[str, Any], digits: int = 2, spread: bool = True) -> str:
    """A figure as the README and the tables print it: "1.02x (0.98–1.05, n=5)"."""
    unit = record["unit"]
    sep = "" if unit in ("x", "%") else " "
    text = f"{record['value']:.{digits}f}{sep}{unit}" if unit else f"{record['value']:.{digits}f}"
    lo, hi = record["spread"]
    if spread and record["n"] > 1:
        text += f" ({lo:.{digits}f}–{hi:.{digits}f}, n={record['n']})"
    return text
