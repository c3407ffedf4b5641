"""What the probes found, as plain data the planner reads.

Each vendor has its own type; a report built by hand (tests, `--report FILE`) is as good as
one probed, which keeps the planner a pure function. Discovery errors are data too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cores: int
    arch: str
    simd: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class NvidiaGpu:
    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int
    compute_capability: str  # "8.6"
    driver: str = ""


@dataclass(frozen=True)
class AppleSilicon:
    chip: str
    unified_memory_bytes: int
    metal: bool


@dataclass(frozen=True)
class Runtimes:
    """Which inference stacks are installed, and what they were built for."""

    llama_cpp: bool = False
    llama_cpp_version: str = ""
    llama_cpp_gpu_offload: bool = False
    gptq: bool = False  # torch and gptqmodel importable


@dataclass(frozen=True)
class ProbeError:
    probe: str
    message: str


@dataclass(frozen=True)
class HardwareReport:
    cpu: CpuInfo
    memory: MemoryInfo
    nvidia: tuple[NvidiaGpu, ...] = ()
    apple: AppleSilicon | None = None
    runtimes: Runtimes = field(default_factory=Runtimes)
    errors: tuple[ProbeError, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HardwareReport":
        cpu = dict(data["cpu"])
        cpu["simd"] = tuple(cpu.get("simd", ()))
        apple = data.get("apple")
        return cls(
            cpu=CpuInfo(**cpu),
            memory=MemoryInfo(**data["memory"]),
            nvidia=tuple(NvidiaGpu(**g) for g in data.get("nvidia", ())),
            apple=AppleSilicon(**apple) if apple else None,
            runtimes=Runtimes(**data.get("runtimes", {})),
            errors=tuple(ProbeError(**e) for e in data.get("errors", ())),
        )
