"""Hardware discovery: one probe per vendor, combined into one report with one list of
accelerators (each GPU with the library that drives it, its memory, free and total).

A probe that fails is recorded in ``report.errors`` instead of being swallowed, so
`localchat doctor` can say why a GPU was not used. `$LOCALCHAT_HARDWARE_REPORT` names a
saved report (`localchat doctor --json`) to plan with instead of probing: every command
then plans as if on that machine (the tests pin a CPU-only report this way).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, TypeVar

from .amd import probe_amd
from .apple import probe_apple
from .cpu import probe_cpu
from .memory import probe_memory
from .nvidia import probe_nvidia
from .report import GIB, Accelerator, CpuInfo, HardwareReport, MemoryInfo, ProbeError, Runtimes
from .runtimes import probe_llama_cpp_backends, probe_runtimes

T = TypeVar("T")

__all__ = ["ENV_REPORT", "GIB", "Accelerator", "CpuInfo", "HardwareReport", "MemoryInfo", "ProbeError",
           "Runtimes", "load_report", "probe", "probe_machine"]

ENV_REPORT = "LOCALCHAT_HARDWARE_REPORT"


def _run(name: str, fn: Callable[[], T], fallback: T, errors: list[ProbeError]) -> T:
    try:
        return fn()
    except Exception as exc:  # a probe's failure is reported, never fatal
        errors.append(ProbeError(name, f"{type(exc).__name__}: {exc}"))
        return fallback


def load_report(path: str | Path) -> HardwareReport:
    """A report saved by `localchat doctor --json`; a bad file is named in the error."""
    try:
        return HardwareReport.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a hardware report ({type(exc).__name__}: {exc})") from None


def probe() -> HardwareReport:
    """The report to plan with: $LOCALCHAT_HARDWARE_REPORT's file if set, else this machine's."""
    path = os.environ.get(ENV_REPORT)
    return load_report(path) if path else probe_machine()


def probe_machine() -> HardwareReport:
    """Probe this machine."""
    errors: list[ProbeError] = []
    cpu = _run("cpu", probe_cpu, CpuInfo("unknown", 1, 1, "unknown"), errors)
    memory = _run("memory", probe_memory, MemoryInfo(0, 0), errors)
    accelerators = [*_run("nvidia", probe_nvidia, [], errors), *_run("amd", probe_amd, [], errors),
                    *_run("apple", probe_apple, [], errors)]
    runtimes = _run("runtimes", probe_runtimes, Runtimes(), errors)
    if runtimes.llama_cpp:  # llama.cpp always has its CPU backend; which GPU ones is the question
        runtimes = replace(runtimes, llama_cpp_backends=_run("llama.cpp backends", probe_llama_cpp_backends,
                                                             ("cpu",), errors))
    return HardwareReport(cpu=cpu, memory=memory, accelerators=tuple(accelerators), runtimes=runtimes,
                          errors=tuple(errors))
