"""System RAM probe, and this process's own peak RSS."""

from __future__ import annotations

import sys

import psutil

from .report import MemoryInfo


def probe_memory() -> MemoryInfo:
    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available))


def peak_rss() -> int:
    """This process's peak RSS in bytes. On Linux that is VmHWM, counted from the process's exec:
    getrusage's ru_maxrss of a forked child starts at its parent's peak (the app's, a test runner's)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # no /proc (macOS, where ru_maxrss is in bytes)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
