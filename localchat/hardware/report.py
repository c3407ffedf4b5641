"""What the probes found, as plain data the planner reads.

Every GPU, whoever made it, is one `Accelerator` in one list, named by the GPU library that
drives it ("cuda", "metal", "rocm", ...), as Ollama's discovery hands its scheduler one
uniform list: the planner matches a backend's library against it and never asks about
vendors. A report built by hand (tests, `--report FILE`) is as good as one probed, which
keeps the planner a pure function. Discovery errors are data too.
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
class Accelerator:
    """One GPU as the planner sees it."""

    library: str  # the GPU library that drives it: "cuda", "metal", "rocm", "vulkan"
    index: int  # its number among the GPUs of that library
    name: str
    total_bytes: int
    free_bytes: int
    compute: str = ""  # what kernels check: CUDA compute capability ("8.6"), AMD gfx target
    driver: str = ""
    unified: bool = False  # memory shared with the CPU (Apple Silicon): what it takes is RAM too


@dataclass(frozen=True)
class Runtimes:
    """Which inference stacks are installed, and what they were built for."""

    llama_cpp: bool = False
    llama_cpp_version: str = ""
    # The ggml backends the installed llama.cpp was built with, lower case: "cpu", and "cuda",
    # "metal", "rocm", "vulkan", "blas" ... where built in (ggml's backend registry).
    llama_cpp_backends: tuple[str, ...] = ()
    gptq: bool = False  # torch and gptqmodel importable
    vllm: str = ""  # the Python of the vLLM environment (`localchat setup-vllm`) that imports vllm; "" if none


@dataclass(frozen=True)
class ProbeError:
    probe: str
    message: str


@dataclass(frozen=True)
class HardwareReport:
    cpu: CpuInfo
    memory: MemoryInfo
    accelerators: tuple[Accelerator, ...] = ()
    runtimes: Runtimes = field(default_factory=Runtimes)
    errors: tuple[ProbeError, ...] = ()

    def on(self, library: str) -> tuple[Accelerator, ...]:
        """The accelerators a GPU library drives here."""
        return tuple(a for a in self.accelerators if a.library == library)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HardwareReport":
        cpu = dict(data["cpu"])
        cpu["simd"] = tuple(cpu.get("simd", ()))
        accelerators = [Accelerator(**a) for a in data.get("accelerators", ())] + _old_gpus(data)
        runtimes = dict(data.get("runtimes", {}))
        if "llama_cpp_gpu_offload" in runtimes:
            runtimes = _old_runtimes(runtimes, accelerators)
        runtimes["llama_cpp_backends"] = tuple(runtimes.get("llama_cpp_backends", ()))
        return cls(
            cpu=CpuInfo(**cpu),
            memory=MemoryInfo(**data["memory"]),
            accelerators=tuple(accelerators),
            runtimes=Runtimes(**runtimes),
            errors=tuple(ProbeError(**e) for e in data.get("errors", ())),
        )


def _old_gpus(data: dict[str, Any]) -> list[Accelerator]:
    """The GPUs of a report saved before the accelerator list (`doctor --json > box.json`, which
    the README suggests keeping): an `nvidia` list and an optional `apple` entry."""
    gpus = [Accelerator("cuda", g["index"], g["name"], g["vram_total_bytes"], g["vram_free_bytes"],
                        g.get("compute_capability", ""), g.get("driver", ""))
            for g in data.get("nvidia", ())]
    apple = data.get("apple")
    if apple and apple.get("metal"):
        mem = apple["unified_memory_bytes"]
        gpus.append(Accelerator("metal", 0, apple["chip"], mem, mem, unified=True))
    return gpus


def _old_runtimes(old: dict[str, Any], accelerators: list[Accelerator]) -> dict[str, Any]:
    """An old report's one `llama_cpp_gpu_offload` bool as the libraries it meant on that machine."""
    new = {k: v for k, v in old.items() if k != "llama_cpp_gpu_offload"}
    gpu_libs = sorted({a.library for a in accelerators}) if old["llama_cpp_gpu_offload"] else []
    new["llama_cpp_backends"] = (["cpu"] if old.get("llama_cpp") else []) + gpu_libs
    return new
