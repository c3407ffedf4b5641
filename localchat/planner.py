"""Choose how to run a model on this hardware, and say why.

`plan()` is a pure function of (hardware report, the model's artifacts, user overrides,
decode speeds measured on this machine by `localchat bench`): no probing, no file reads,
so every machine we do not have can be tested with a report written by hand. Where two
backends could run the model and both were measured on this device, the faster goes
first, and the reasons give the figures.

It estimates memory as weights + KV cache for the context + compute buffers, shrinks the
context or offloads fewer layers when that does not fit, and refuses with "needs X GB,
has Y GB" rather than letting the OS kill the process mid-load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .artifacts import Artifact
from .hardware.report import GIB, HardwareReport, NvidiaGpu

BACKENDS = ("gptq-cuda", "llamacpp-cuda", "llamacpp-metal", "llamacpp-cpu", "gptq-cpu")
ON_CPU = ("llamacpp-cpu", "gptq-cpu")
DEFAULT_CONTEXT = 4096
MIN_CONTEXT = 512
DEFAULT_BATCH = 512
# Left for the OS and other programs: the larger of these, out of total RAM.
RAM_RESERVE_BYTES = 1 * GIB
RAM_RESERVE_FRACTION = 0.10
# CUDA context, cuBLAS workspace and fragmentation.
VRAM_RESERVE_BYTES = 512 * 1024**2
COMPUTE_BASE_BYTES = 128 * 1024**2
# Metal may wire about 2/3 of unified memory on machines up to 36 GB, about 3/4 above
# (Apple's recommendedMaxWorkingSetSize, which llama.cpp obeys).
METAL_SMALL_FRACTION, METAL_LARGE_FRACTION, METAL_LARGE_FROM = 0.66, 0.75, 36 * GIB
# torch's own CUDA context and allocator slack for the GPTQ backend.
GPTQ_OVERHEAD_BYTES = 700 * 1024**2
# torch, transformers and GPTQModel loaded in the process, for GPTQ on the CPU.
GPTQ_CPU_OVERHEAD_BYTES = 1024**3
# Bytes per value of llama.cpp's KV cache types (a q8_0 block: 32 values in 34 bytes, q4_0: in 18).
# Quantized V needs flash attention, which the llama.cpp backend turns on for these.
KV_CACHE_TYPES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


class PlanError(RuntimeError):
    """No way to run the model here; the message says what it needs and what there is."""


@dataclass(frozen=True)
class Overrides:
    backend: str | None = None
    context: int | None = None
    gpu_layers: int | None = None
    threads: int | None = None
    quant: str | None = None  # pick the artifact with this quant (e.g. "Q4_K_M")
    kv_cache: str | None = None  # a KV_CACHE_TYPES name (llama.cpp only); default f16
    parallel: int | None = None  # sequences decoded at once (`localchat serve`), each with the full context


@dataclass(frozen=True)
class Measured:
    """A decode speed `localchat bench` took for one model on one backend and device."""

    backend: str
    device: str  # the GPU's name, the Apple chip, or the CPU model, as the hardware report has it
    decode_tok_s: float
    when: str = ""  # ISO date

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> "Measured":
        return cls(str(d["backend"]), str(d["device"]), float(d["decode_tok_s"]), str(d.get("when", "")))


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    host_bytes: int  # RAM this plan takes
    device_bytes: int  # VRAM (or Metal working set) this plan takes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


@dataclass(frozen=True)
class Plan:
    backend: str
    artifact: Artifact
    context: int
    gpu_layers: int  # layers on the GPU; == n_layers means all (output layer too)
    threads: int
    memory: MemoryEstimate
    reasons: tuple[str, ...] = field(default_factory=tuple)
    kv_cache: str = "f16"  # the KV cache's type (KV_CACHE_TYPES)
    slots: int = 1  # sequences decoded at once, each with `context` tokens of KV cache

    def describe(self) -> str:
        slots = f" in each of {self.slots} parallel slots" if self.slots > 1 else ""
        lines = [f"backend: {self.backend}", f"model:   {self.artifact.label}",
                 f"context: {self.context} tokens{slots}", f"threads: {self.threads}"]
        if self.backend != "llamacpp-cpu":
            lines.append(f"gpu layers: {self.gpu_layers}/{self.artifact.dims.n_layers}")
        m = self.memory
        lines.append(f"memory:  {gb(m.total_bytes)} (weights {gb(m.weights_bytes)}, KV cache "
                     f"{gb(m.kv_bytes)} {self.kv_cache}, compute {gb(m.compute_bytes)}); RAM {gb(m.host_bytes)}, "
                     f"GPU {gb(m.device_bytes)}")
        lines += [f"why:     {r}" for r in self.reasons]
        return "\n".join(lines)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def kv_cache_bytes(a: Artifact, context: int, kv_cache: str = "f16", slots: int = 1) -> int:
    """The KV cache of `slots` sequences of `context` tokens each, in the given cache type."""
    return int(a.dims.kv_bytes(context, 1) * KV_CACHE_TYPES[kv_cache]) * slots


def _compute_bytes(a: Artifact, context: int) -> int:
    # Logits for one batch plus activations: small next to weights, but not zero.
    batch = min(context, DEFAULT_BATCH)
    return COMPUTE_BASE_BYTES + a.dims.n_vocab * batch * 4 + a.dims.n_embd * batch * 4 * 8


def host_budget(report: HardwareReport) -> int:
    reserve = max(RAM_RESERVE_BYTES, int(report.memory.total_bytes * RAM_RESERVE_FRACTION))
    return max(report.memory.available_bytes - reserve, 0)


def metal_budget(report: HardwareReport) -> int:
    assert report.apple is not None
    total = report.apple.unified_memory_bytes
    frac = METAL_LARGE_FRACTION if total > METAL_LARGE_FROM else METAL_SMALL_FRACTION
    return min(int(total * frac), host_budget(report))


def _contexts(start: int) -> list[int]:
    sizes = [start]
    while sizes[-1] // 2 >= MIN_CONTEXT:
        sizes.append(sizes[-1] // 2)
    if sizes[-1] > MIN_CONTEXT:
        sizes.append(MIN_CONTEXT)
    return sizes


@dataclass(frozen=True)
class _Fit:
    gpu_layers: int
    memory: MemoryEstimate


def _fit_llamacpp(a: Artifact, context: int, host: int, device: int, unified: bool,
                  want_layers: int | None, kv_cache: str = "f16", slots: int = 1) -> _Fit | None:
    """Most layers that fit on the device (all when it can), with the rest in RAM."""
    n = a.dims.n_layers or 1
    kv = kv_cache_bytes(a, context, kv_cache, slots)
    compute = _compute_bytes(a, context)
    other = max(a.size_bytes - a.layer_bytes * n, 0)  # embeddings and output head
    per_layer = a.layer_bytes + kv // n
    top = n if want_layers is None else max(0, min(want_layers, n))
    for layers in range(top, -1, -1) if device > 0 else [0]:
        on_device = layers * per_layer + (other + compute if layers == n else 0)
        if layers and on_device > device:
            continue
        total = a.size_bytes + kv + compute
        on_host = total if unified else total - on_device
        if on_host > host:
            return None  # fewer layers on the GPU only moves more to RAM
        return _Fit(layers, MemoryEstimate(a.size_bytes, kv, compute, on_host,
                                           on_device if layers else 0))
    return None


def _fit_gptq(a: Artifact, context: int, device: int) -> _Fit | None:
    kv, compute = a.dims.kv_bytes(context), _compute_bytes(a, context) + GPTQ_OVERHEAD_BYTES
    need = a.size_bytes + kv + compute
    if need > device:
        return None
    return _Fit(a.dims.n_layers, MemoryEstimate(a.size_bytes, kv, compute, 512 * 1024**2, need))


def _fit_gptq_cpu(a: Artifact, context: int, host: int) -> _Fit | None:
    kv, compute = a.dims.kv_bytes(context), _compute_bytes(a, context) + GPTQ_CPU_OVERHEAD_BYTES
    need = a.size_bytes + kv + compute
    return _Fit(0, MemoryEstimate(a.size_bytes, kv, compute, need, 0)) if need <= host else None


def _best_gpu(report: HardwareReport) -> NvidiaGpu | None:
    return max(report.nvidia, key=lambda g: g.vram_free_bytes, default=None)


def device_name(report: HardwareReport, backend: str) -> str:
    """The device a backend runs on here, named as `Measured.device` records it."""
    gpu = _best_gpu(report)
    if backend in ("gptq-cuda", "llamacpp-cuda") and gpu is not None:
        return gpu.name
    if backend == "llamacpp-metal" and report.apple is not None:
        return report.apple.chip
    return report.cpu.model


def _by_measured_speed(report: HardwareReport, order: list[str], measured: Sequence[Measured],
                       reasons: list[str]) -> list[str]:
    """Measured GPU backends fastest first in the places they held, and likewise on the CPU.

    GPU and CPU backends are ranked apart: the passes in `plan` try the whole model on the
    GPU before anything else, so a ranking across them would not be what runs.
    """
    speed: dict[str, Measured] = {}
    for m in measured:
        if m.backend in order and m.device == device_name(report, m.backend):
            speed[m.backend] = m  # the last record for a backend wins
    new = list(order)
    for group in ([b for b in order if b not in ON_CPU], [b for b in order if b in ON_CPU]):
        timed = [b for b in group if b in speed]
        if len(timed) < 2:
            continue
        ranked = sorted(timed, key=lambda b: -speed[b].decode_tok_s)
        slots = [i for i, b in enumerate(new) if b in timed]
        for i, b in zip(slots, ranked):
            new[i] = b
        figures = ", ".join(f"{b} {speed[b].decode_tok_s:.0f} tok/s on {speed[b].device}" for b in ranked)
        when = max(speed[b].when for b in ranked)
        verdict = f"{ranked[0]} first" + (" (ahead of the default order)" if ranked != timed else "")
        reasons.append(f"measured decode speed: {figures} (`localchat bench`{', ' + when if when else ''}): "
                       f"{verdict}")
    return new


def _candidates(report: HardwareReport, artifacts: list[Artifact], o: Overrides,
                reasons: list[str]) -> list[str]:
    """Backends worth trying on this machine, best first, with the reasons for skipping others."""
    has_gguf = any(a.format == "gguf" for a in artifacts)
    has_gptq = any(a.format == "gptq" for a in artifacts)
    rt, gpu = report.runtimes, _best_gpu(report)
    order: list[str] = []
    if gpu is not None:
        if not has_gptq:
            pass
        elif not rt.gptq:
            reasons.append("the model has a GPTQ artifact, but torch + GPTQModel are not installed "
                           "(pip install 'localchat[gptq]')")
        else:
            order.append("gptq-cuda")
        if has_gguf and rt.llama_cpp_gpu_offload:
            order.append("llamacpp-cuda")
        elif has_gguf:
            reasons.append(f"{gpu.name} found, but llama-cpp-python was built without GPU support "
                           "(reinstall with CMAKE_ARGS=-DGGML_CUDA=on)")
    elif report.apple is not None and report.apple.metal and has_gguf:
        if rt.llama_cpp_gpu_offload:
            order.append("llamacpp-metal")
        else:
            reasons.append("Apple Silicon found, but llama-cpp-python was built without Metal")
    if has_gguf:
        order.append("llamacpp-cpu")
    if has_gptq and rt.gptq:
        # Last: slow, but the same checkpoint runs everywhere (and `localchat bench` can time it).
        order.append("gptq-cpu")
        if gpu is None and not has_gguf:
            reasons.append("no CUDA GPU for the GPTQ checkpoint: it runs on the CPU through torch, "
                           "slowly (convert the source to GGUF for speed)")
    if o.backend:
        if o.backend not in BACKENDS:
            raise PlanError(f"unknown backend {o.backend!r}; valid: {', '.join(BACKENDS)}")
        if o.backend not in order:
            raise PlanError(f"backend {o.backend!r} is not possible here: "
                            + ("; ".join(reasons) or f"possible: {', '.join(order) or 'none'}"))
        reasons.append(f"backend {o.backend} chosen by the user")
        return [o.backend]
    if gpu is None and report.apple is None and has_gguf:
        reasons.append("no NVIDIA GPU and not Apple Silicon: llama.cpp on the CPU")
    return order


def _device(report: HardwareReport, backend: str) -> tuple[int, str]:
    """Bytes usable on the backend's device, and its name for the reasons."""
    gpu = _best_gpu(report)
    if backend in ("gptq-cuda", "llamacpp-cuda") and gpu is not None:
        return gpu.vram_free_bytes - VRAM_RESERVE_BYTES, f"{gpu.name} ({gb(gpu.vram_free_bytes)} VRAM free)"
    if backend == "llamacpp-metal" and report.apple is not None:
        return metal_budget(report), f"{report.apple.chip} Metal"
    return 0, "CPU"


def _explain(backend: str, a: Artifact, fit: _Fit, where: str, device: int) -> str:
    n = a.dims.n_layers
    part = "all" if fit.gpu_layers >= n else f"{fit.gpu_layers} of {n}"
    if backend == "gptq-cuda":
        return f"CUDA GPU and a GPTQ checkpoint that fits in VRAM: {where}"
    if backend == "llamacpp-cuda":
        return f"{part} layers offloaded to {where}"
    if backend == "llamacpp-metal":
        return f"Apple Silicon: {part} layers on Metal, within its {gb(device)} working-set limit"
    if backend == "gptq-cpu":
        return "GPTQ weights dequantized by torch on the CPU, KV cache in RAM"
    return "weights and KV cache in RAM"


# (shrink the context?, whole model on the GPU?), tried in this order.
_PASSES = ((False, True), (False, False), (True, False))


def plan(report: HardwareReport, artifacts: list[Artifact], overrides: Overrides | None = None,
         measured: Sequence[Measured] = ()) -> Plan:
    """Choose backend, artifact, context, GPU layers and threads; raise PlanError if nothing fits.

    Passes, each over the backends best first: (1) the whole model on the GPU at the wanted
    context; (2) partial offload or the CPU at the wanted context; (3) the same with the
    context halved down to MIN_CONTEXT. So a GPU backend that fits only with a tiny
    context loses to partial offload at the full context.
    """
    o = overrides or Overrides()
    if not artifacts:
        raise PlanError("the model has no runnable artifact (no GGUF file or GPTQ folder)")
    if o.quant:
        chosen = [a for a in artifacts if a.quant.lower() == o.quant.lower()]
        if not chosen:
            raise PlanError(f"no artifact with quant {o.quant!r}; the model has: "
                            + ", ".join(a.quant for a in artifacts))
        artifacts = chosen
    kv_cache = o.kv_cache or "f16"
    if kv_cache not in KV_CACHE_TYPES:
        raise PlanError(f"unknown KV cache type {kv_cache!r}; valid: {', '.join(KV_CACHE_TYPES)}")
    slots = o.parallel or 1
    if slots < 1:
        raise PlanError(f"parallel must be at least 1, got {slots}")
    reasons: list[str] = []
    order = _candidates(report, artifacts, o, reasons)
    if not o.backend:
        order = _by_measured_speed(report, order, measured, reasons)
    if not order:
        raise PlanError("nothing here can run this model: " + "; ".join(reasons))
    threads = o.threads or report.cpu.physical_cores
    host = host_budget(report)

    for shrink, full_offload in _PASSES:
        for backend in order:
            on_gpu = backend not in ON_CPU
            if (full_offload and not on_gpu) or (not full_offload and backend == "gptq-cuda" and not shrink):
                continue
            device, where = _device(report, backend)
            fmt = "gptq" if backend.startswith("gptq") else "gguf"
            # All on the GPU: best quality (biggest file) first. Otherwise decoding is bound by
            # CPU memory bandwidth, so the smallest file is the fastest.
            options = sorted((a for a in artifacts if a.format == fmt), key=lambda a: a.size_bytes,
                             reverse=full_offload)
            for a in options:
                want = min(o.context or DEFAULT_CONTEXT, a.dims.n_ctx_train or DEFAULT_CONTEXT)
                for ctx in (_contexts(want)[1:] if shrink else [want]):
                    if backend == "gptq-cuda":
                        fit = _fit_gptq(a, ctx, device)
                    elif backend == "gptq-cpu":
                        fit = _fit_gptq_cpu(a, ctx, host)
                    else:
                        layers = 0 if not on_gpu else o.gpu_layers
                        fit = _fit_llamacpp(a, ctx, host, device, backend == "llamacpp-metal", layers,
                                            kv_cache, slots)
                    # A GPU backend with nothing on the GPU is the CPU backend: leave it to that.
                    if fit is None or (on_gpu and fit.gpu_layers == 0):
                        continue
                    if full_offload and fit.gpu_layers < min(a.dims.n_layers, o.gpu_layers or a.dims.n_layers):
                        continue
                    why = list(reasons)
                    if o.context and o.context > want:
                        why.append(f"context {o.context} capped at the model's trained length {want}")
                    if ctx < want:
                        why.append(f"context shrunk from {want} to {ctx} tokens to fit memory")
                    why.append(_explain(backend, a, fit, where, device))
                    if len(options) > 1:
                        why.append(f"{a.quant} chosen: " + (
                            "the best quality that fits entirely on the GPU" if full_offload else
                            "the smallest file, as memory is tight" if shrink else
                            "the smallest file, as decoding speed follows the bytes read from RAM")
                            + "; --quant picks another")
                    why.append(f"needs {gb(fit.memory.host_bytes)} RAM of {gb(host)} usable"
                               + (f", {gb(fit.memory.device_bytes)} GPU of {gb(device)} usable"
                                  if fit.memory.device_bytes else ""))
                    why.append(f"{threads} threads ({report.cpu.physical_cores} physical cores)")
                    llama = backend.startswith("llamacpp")
                    if llama and (slots > 1 or kv_cache != "f16"):
                        why.append(f"KV cache {gb(fit.memory.kv_bytes)}: {slots} slot(s) of {ctx} tokens in "
                                   f"{kv_cache}" + (" (with flash attention)" if kv_cache != "f16" else ""))
                    elif not llama and (slots > 1 or kv_cache != "f16"):
                        why.append(f"{backend} decodes one sequence at a time with an f16 KV cache")
                    return Plan(backend, a, ctx, fit.gpu_layers, threads, fit.memory, tuple(why),
                                kv_cache if llama else "f16", slots if llama else 1)
            if full_offload:
                reasons.append(f"{backend} cannot hold the whole model on {where}")

    smallest = min(a.size_bytes + a.dims.kv_bytes(MIN_CONTEXT) + _compute_bytes(a, MIN_CONTEXT)
                   for a in artifacts)
    raise PlanError(f"needs {gb(smallest)}, has {gb(host)} usable RAM "
                    f"({gb(report.memory.available_bytes)} available, some kept for the system): "
                    f"even the smallest artifact at {MIN_CONTEXT} tokens of context does not fit"
                    + ("; " + "; ".join(reasons) if reasons else ""))
