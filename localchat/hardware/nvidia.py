"""NVIDIA probe through `nvidia-smi`, so finding a GPU never imports torch."""

from __future__ import annotations

import os
import shutil
import subprocess

from .report import Accelerator

QUERY = "index,name,memory.total,memory.free,compute_cap,driver_version"
MIB = 1024**2


class NvidiaProbeError(RuntimeError):
    pass


def parse_nvidia_smi(csv_text: str) -> list[Accelerator]:
    """Parse `nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits` output."""
    gpus = []
    for lineno, line in enumerate(csv_text.strip().splitlines(), 1):
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 6:
            raise NvidiaProbeError(f"nvidia-smi line {lineno}: expected 6 fields, got {line!r}")
        index, name, total, free, cc, driver = fields
        try:
            gpus.append(Accelerator("cuda", index=int(index), name=name, total_bytes=int(float(total)) * MIB,
                                    free_bytes=int(float(free)) * MIB, compute=cc, driver=driver))
        except ValueError as exc:
            raise NvidiaProbeError(f"nvidia-smi line {lineno}: {exc} in {line!r}") from None
    return gpus


def probe_nvidia() -> list[Accelerator]:
    """The NVIDIA GPUs present; [] when there is no driver. Raises when the driver misbehaves."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        raise NvidiaProbeError("nvidia-smi did not answer within 15 s") from None
    if out.returncode != 0:
        raise NvidiaProbeError(f"nvidia-smi exited {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
    return visible(parse_nvidia_smi(out.stdout), os.environ.get("CUDA_VISIBLE_DEVICES"))


def visible(gpus: list[Accelerator], env: str | None) -> list[Accelerator]:
    """The GPUs CUDA programs (llama.cpp, torch, vLLM) see under $CUDA_VISIBLE_DEVICES, as nvidia-smi,
    which ignores it, numbers them; a list of UUIDs or MIG names is left to CUDA (all are kept)."""
    if env is None:
        return gpus
    wanted = [v.strip() for v in env.split(",") if v.strip()]
    if not all(v.isdigit() for v in wanted):
        return gpus
    by_index = {g.index: g for g in gpus}
    return [by_index[int(v)] for v in wanted if int(v) in by_index]
