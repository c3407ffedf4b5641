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
from .runtimes import probe_llama_cpp_backends, probe_runtimes, probe_vllm

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


# One probe per GPU library: the vendor's discovery that finds its accelerators.
# (Looked up when called, so a test can stand in for one vendor's probe.)
VENDOR_PROBES: dict[str, tuple[str, Callable[[], list[Accelerator]]]] = {
    "cuda": ("nvidia", lambda: probe_nvidia()), "rocm": ("amd", lambda: probe_amd()),
    "metal": ("apple", lambda: probe_apple())}


def probe(libraries: tuple[str, ...] | None = None, llama_cpp: bool = True, vllm: bool = False) -> HardwareReport:
    """The report to plan with: $LOCALCHAT_HARDWARE_REPORT's file if set, else this machine's
    (only the accelerators of `libraries`, without llama.cpp, with vLLM when asked: see `probe_machine`)."""
    path = os.environ.get(ENV_REPORT)
    return load_report(path) if path else probe_machine(libraries, llama_cpp, vllm)


def probe_machine(libraries: tuple[str, ...] | None = None, llama_cpp: bool = True,
                  vllm: bool = False) -> HardwareReport:
    """Probe this machine: every GPU library's accelerators, or those of `libraries` only, and the
    installed runtimes (llama.cpp's load is skipped without `llama_cpp`), so a command that runs one
    backend probes what that backend needs (`serve --engine vllm`: CUDA, RAM, vLLM). The vLLM
    environment is asked (a child Python) only with `vllm`: `doctor` and `serve --engine vllm`, the
    commands that can run it; every other front end loads its model in-process, where vLLM never runs."""
    errors: list[ProbeError] = []
    cpu = _run("cpu", probe_cpu, CpuInfo("unknown", 1, 1, "unknown"), errors)
    memory = _run("memory", probe_memory, MemoryInfo(0, 0), errors)
    accelerators = [gpu for library, (vendor, find) in VENDOR_PROBES.items()
                    if libraries is None or library in libraries for gpu in _run(vendor, find, [], errors)]
    runtimes = _run("runtimes", lambda: probe_runtimes(llama_cpp), Runtimes(), errors)
    if runtimes.llama_cpp:  # llama.cpp always has its CPU backend; which GPU ones is the question
        runtimes = replace(runtimes, llama_cpp_backends=_run("llama.cpp backends", probe_llama_cpp_backends,
                                                             ("cpu",), errors))
    if vllm:
        runtimes = replace(runtimes, vllm=_run("vllm", probe_vllm, "", errors))
    return HardwareReport(cpu=cpu, memory=memory, accelerators=tuple(accelerators), runtimes=runtimes,
                          errors=tuple(errors))
