"""CPU probe: cores and the SIMD extensions llama.cpp's kernels care about."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import psutil

from .report import CpuInfo

# The flags that change llama.cpp's speed; the rest of /proc/cpuinfo is noise here.
INTERESTING_SIMD = (
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c",
    "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
    "neon", "asimd", "asimddp", "sve", "i8mm", "dotprod",
)


def _linux_cpu() -> tuple[str, set[str]]:
    text = Path("/proc/cpuinfo").read_text(errors="replace")
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _mac_cpu() -> tuple[str, set[str]]:
    def sysctl(name: str) -> str:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    model = sysctl("machdep.cpu.brand_string")
    flags: set[str] = set()
    if platform.machine() == "arm64":
        flags.update({"neon", "asimd"})
        if sysctl("hw.optional.arm.FEAT_DotProd") == "1":
            flags.add("dotprod")
        if sysctl("hw.optional.arm.FEAT_I8MM") == "1":
            flags.add("i8mm")
    else:
        flags.update(f.lower().replace(".", "_") for f in sysctl("machdep.cpu.features").split())
        flags.update(f.lower() for f in sysctl("machdep.cpu.leaf7_features").split())
    return model, flags


def probe_cpu() -> CpuInfo:
    system = platform.system()
    if system == "Linux":
        model, flags = _linux_cpu()
    elif system == "Darwin":
        model, flags = _mac_cpu()
    else:
        model, flags = platform.processor(), set()
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    return CpuInfo(
        model=model or platform.processor() or "unknown",
        physical_cores=physical,
        logical_cores=logical,
        arch=platform.machine(),
        simd=tuple(f for f in INTERESTING_SIMD if f in flags),
    )
