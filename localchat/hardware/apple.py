"""Apple Silicon probe: the chip's GPU, driven by Metal, sharing the unified memory."""

from __future__ import annotations

import platform
import subprocess

from .report import Accelerator

# llama.cpp's Metal backend needs macOS 13.4 or later.
METAL_MIN_MACOS = (13, 4)


class AppleProbeError(RuntimeError):
    pass


def probe_apple() -> list[Accelerator]:
    """The Apple Silicon GPU, or [] on any other machine; raises on a macOS too old for Metal,
    so the report says why the GPU is not there."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return []

    def sysctl(name: str) -> str:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()

    version = platform.mac_ver()[0]
    major, minor = (version.split(".") + ["0", "0"])[:2]
    if (int(major), int(minor)) < METAL_MIN_MACOS:
        raise AppleProbeError(f"macOS {version}: llama.cpp's Metal backend needs "
                              f"{'.'.join(map(str, METAL_MIN_MACOS))} or later")
    memory = int(sysctl("hw.memsize"))
    # Unified memory: what is free is what RAM has free, which the planner reads from the
    # memory probe; the planner caps the GPU at Metal's working-set limit of the total.
    return [Accelerator("metal", 0, sysctl("machdep.cpu.brand_string"), memory, memory, unified=True)]
