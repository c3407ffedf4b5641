"""AMD probe through the amdgpu driver's files in sysfs, so finding a GPU needs no ROCm tool.

Each GPU is a /sys/class/drm/cardN/device with PCI vendor 0x1002 and the driver's VRAM
counters (`mem_info_vram_total`, `mem_info_vram_used`, bytes); `product_name` where the
board has one. Display connectors (card0-DP-1) are not cards and have no `device/vendor`.
"""

from __future__ import annotations

import re
from pathlib import Path

from .report import Accelerator

SYSFS_DRM = Path("/sys/class/drm")
AMD_VENDOR = "0x1002"


class AmdProbeError(RuntimeError):
    pass


def _read(path: Path) -> str:
    return path.read_text(errors="replace").strip()


def probe_amd(root: Path = SYSFS_DRM) -> list[Accelerator]:
    """The AMD GPUs the amdgpu driver runs, as ROCm sees them; [] without one."""
    cards = sorted((p for p in root.glob("card*") if re.fullmatch(r"card\d+", p.name)),
                   key=lambda p: int(p.name[4:]))
    gpus = []
    for card in cards:
        dev = card / "device"
        vendor = dev / "vendor"
        if not vendor.is_file() or _read(vendor) != AMD_VENDOR or not (dev / "mem_info_vram_total").is_file():
            continue
        try:
            total = int(_read(dev / "mem_info_vram_total"))
            used = int(_read(dev / "mem_info_vram_used"))
        except (OSError, ValueError) as exc:
            raise AmdProbeError(f"{dev}: cannot read the VRAM counters: {exc}") from None
        name_file = dev / "product_name"
        name = (_read(name_file) if name_file.is_file() else "") or f"AMD GPU {_read(dev / 'device')}"
        gpus.append(Accelerator("rocm", len(gpus), name, total, max(total - used, 0)))
    return gpus
