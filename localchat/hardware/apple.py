"""Apple Silicon probe: chip name, unified memory, Metal."""

from __future__ import annotations

import platform
import subprocess

from .report import AppleSilicon


def probe_apple() -> AppleSilicon | None:
    """The Apple Silicon chip, or None on any other machine."""
    if platform.system() != "Darwin" or platform.machine() != "arm64":
        return None

    def sysctl(name: str) -> str:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()

    # Every Apple Silicon GPU runs Metal; llama.cpp's Metal backend needs macOS 13.4+.
    major, minor = (platform.mac_ver()[0].split(".") + ["0", "0"])[:2]
    metal = (int(major), int(minor)) >= (13, 4)
    return AppleSilicon(chip=sysctl("machdep.cpu.brand_string"),
                        unified_memory_bytes=int(sysctl("hw.memsize")), metal=metal)
