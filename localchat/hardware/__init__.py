"""Hardware discovery: one probe per vendor, combined into one report.

A probe that fails is recorded in ``report.errors`` instead of being swallowed, so
`localchat doctor` can say why a GPU was not used.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from .apple import probe_apple
from .cpu import probe_cpu
from .memory import probe_memory
from .nvidia import probe_nvidia
from .report import (GIB, AppleSilicon, CpuInfo, HardwareReport, MemoryInfo, NvidiaGpu,
                     ProbeError, Runtimes)
from .runtimes import probe_runtimes

T = TypeVar("T")

__all__ = ["GIB", "AppleSilicon", "CpuInfo", "HardwareReport", "MemoryInfo", "NvidiaGpu",
           "ProbeError", "Runtimes", "probe"]


def _run(name: str, fn: Callable[[], T], fallback: T, errors: list[ProbeError]) -> T:
    try:
        return fn()
    except Exception as exc:  # a probe's failure is reported, never fatal
        errors.append(ProbeError(name, f"{type(exc).__name__}: {exc}"))
        return fallback


def probe() -> HardwareReport:
    """Probe this machine."""
    errors: list[ProbeError] = []
    cpu = _run("cpu", probe_cpu, CpuInfo("unknown", 1, 1, "unknown"), errors)
    memory = _run("memory", probe_memory, MemoryInfo(0, 0), errors)
    nvidia = _run("nvidia", probe_nvidia, [], errors)
    apple = _run("apple", probe_apple, None, errors)
    runtimes = _run("runtimes", probe_runtimes, Runtimes(), errors)
    return HardwareReport(cpu=cpu, memory=memory, nvidia=tuple(nvidia), apple=apple,
                          runtimes=runtimes, errors=tuple(errors))
