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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .artifacts import Artifact
from .hardware.report import GIB, Accelerator, HardwareReport, Runtimes

CPU = "cpu"  # a backend's `library` when it runs on the CPU rather than an accelerator
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
        if self.gpu_layers:
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


def unified_budget(report: HardwareReport, gpu: Accelerator) -> int:
    """What a GPU sharing RAM may take: Metal's working-set limit of the total, and no more than RAM has."""
    frac = METAL_LARGE_FRACTION if gpu.total_bytes > METAL_LARGE_FROM else METAL_SMALL_FRACTION
    return min(int(gpu.total_bytes * frac), host_budget(report))


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


@dataclass(frozen=True)
class Device:
    """Where a backend runs on this machine: the CPU, or the best accelerator of its library."""

    name: str  # as `Measured.device` records it
    usable: int  # bytes a plan may take on it (0 on the CPU)
    where: str  # for the reasons
    unified: bool = False  # its memory is RAM too


def _fit_llamacpp(a: Artifact, context: int, host: int, on: Device, want_layers: int | None,
                  kv_cache: str = "f16", slots: int = 1) -> _Fit | None:
    """Most layers that fit on the device (all when it can), with the rest in RAM."""
    device, unified = on.usable, on.unified
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


def _fit_gptq(a: Artifact, context: int, host: int, on: Device, want_layers: int | None,
              kv_cache: str = "f16", slots: int = 1) -> _Fit | None:
    """All or nothing: the whole checkpoint on the GPU (torch keeps only a little in RAM)."""
    device = on.usable
    kv, compute = a.dims.kv_bytes(context), _compute_bytes(a, context) + GPTQ_OVERHEAD_BYTES
    need = a.size_bytes + kv + compute
    if need > device:
        return None
    return _Fit(a.dims.n_layers, MemoryEstimate(a.size_bytes, kv, compute, 512 * 1024**2, need))


def _fit_gptq_cpu(a: Artifact, context: int, host: int, on: Device, want_layers: int | None,
                  kv_cache: str = "f16", slots: int = 1) -> _Fit | None:
    kv, compute = a.dims.kv_bytes(context), _compute_bytes(a, context) + GPTQ_CPU_OVERHEAD_BYTES
    need = a.size_bytes + kv + compute
    return _Fit(0, MemoryEstimate(a.size_bytes, kv, compute, need, 0)) if need <= host else None


@dataclass(frozen=True)
class BackendSpec:
    """One way to run a model, described once: the planner and the engine registry read only this.

    Adding a backend is a row in BACKEND_TABLE plus the module that runs it.
    """

    name: str
    format: str  # the artifact it runs ("gguf", "gptq")
    library: str  # CPU, or the library of the accelerators it runs on ("cuda", "metal", "rocm")
    installed: Callable[[Runtimes], bool]  # the runtime it needs is there, built for `library`
    missing: str  # the reason when `installed` says no; {device} is the device's name
    # Memory: (artifact, context, usable RAM, device, GPU layers wanted, KV cache type, slots) -> the fit, or None.
    fit: Callable[[Artifact, int, int, Device, int | None, str, int], _Fit | None]
    explain: str  # the plan's reason: {part} layers on the GPU, {where} it runs, {limit} usable there
    engine: str  # "module:Class" that runs it, imported only when chosen (torch only for GPTQ)
    fallback: str = ""  # a CPU row's reason when it comes first and nothing else says why
    batches: bool = False  # decodes several sequences at once (`--parallel`) with a quantizable KV cache


def _llama_cpp_built_for(library: str) -> Callable[[Runtimes], bool]:
    return lambda rt: library in rt.llama_cpp_backends


def _gptq_installed(rt: Runtimes) -> bool:
    return rt.gptq


_LLAMA_CPP = "localchat.engine.llamacpp:LlamaCppBackend"
_GPTQ = "localchat.engine.gptq:GptqBackend"
_NO_GPTQ = ("the model has a GPTQ artifact, but torch + GPTQModel are not installed "
            "(pip install 'localchat[gptq]')")

# Rows in order of preference, among the GPU rows and among the CPU rows; the planner tries
# every GPU row before any CPU row (new rows go at the end).
BACKEND_TABLE: tuple[BackendSpec, ...] = (
    BackendSpec("gptq-cuda", "gptq", "cuda", _gptq_installed, _NO_GPTQ, _fit_gptq,
                explain="CUDA GPU and a GPTQ checkpoint that fits in VRAM: {where}", engine=_GPTQ),
    BackendSpec("llamacpp-cuda", "gguf", "cuda", _llama_cpp_built_for("cuda"),
                "{device} found, but llama-cpp-python was built without GPU support "
                "(reinstall with CMAKE_ARGS=-DGGML_CUDA=on)", _fit_llamacpp,
                explain="{part} layers offloaded to {where}", engine=_LLAMA_CPP, batches=True),
    BackendSpec("llamacpp-metal", "gguf", "metal", _llama_cpp_built_for("metal"),
                "{device} found, but llama-cpp-python was built without Metal", _fit_llamacpp,
                explain="Apple Silicon: {part} layers on Metal, within its {limit} working-set limit",
                engine=_LLAMA_CPP, batches=True),
    BackendSpec("llamacpp-cpu", "gguf", CPU, _llama_cpp_built_for(CPU), "llama-cpp-python is not installed",
                _fit_llamacpp, explain="weights and KV cache in RAM", engine=_LLAMA_CPP, batches=True,
                fallback="no GPU found (no NVIDIA or AMD GPU, not Apple Silicon): llama.cpp on the CPU"),
    # Last on the CPU: slow, but the same checkpoint runs everywhere (and `localchat bench` can time it).
    BackendSpec("gptq-cpu", "gptq", CPU, _gptq_installed, _NO_GPTQ, _fit_gptq_cpu,
                explain="GPTQ weights dequantized by torch on the CPU, KV cache in RAM", engine=_GPTQ,
                fallback="no CUDA GPU for the GPTQ checkpoint: it runs on the CPU through torch, slowly "
                         "(convert the source to GGUF for speed)"),
    BackendSpec("llamacpp-rocm", "gguf", "rocm", _llama_cpp_built_for("rocm"),
                "{device} found, but llama-cpp-python was built without ROCm "
                "(reinstall with CMAKE_ARGS=-DGGML_HIP=on)", _fit_llamacpp,
                explain="{part} layers offloaded to {where}", engine=_LLAMA_CPP, batches=True),
)
BACKENDS = tuple(spec.name for spec in BACKEND_TABLE)  # for command-line choices


def backend_spec(name: str) -> BackendSpec:
    """The table's row for a backend; ValueError naming the valid ones."""
    for spec in BACKEND_TABLE:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown backend {name!r}; valid: {', '.join(s.name for s in BACKEND_TABLE)}")


def _device(report: HardwareReport, spec: BackendSpec) -> Device | None:
    """Where the backend would run here (the accelerator of its library with most memory free),
    and how much it may take there; None when this machine has no such accelerator."""
    if spec.library == CPU:
        return Device(report.cpu.model, 0, "CPU")
    gpu = max(report.on(spec.library), key=lambda g: g.free_bytes, default=None)
    if gpu is None:
        return None
    if gpu.unified:
        usable = unified_budget(report, gpu)
        return Device(gpu.name, usable, f"{gpu.name} ({gb(usable)} of unified memory usable)", True)
    return Device(gpu.name, gpu.free_bytes - VRAM_RESERVE_BYTES, f"{gpu.name} ({gb(gpu.free_bytes)} VRAM free)")


def device_name(report: HardwareReport, backend: str) -> str:
    """The device a backend runs on here, named as `Measured.device` records it."""
    device = _device(report, backend_spec(backend))
    return device.name if device else report.cpu.model


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
    on_cpu = {b for b in order if backend_spec(b).library == CPU}
    for group in ([b for b in order if b not in on_cpu], [b for b in order if b in on_cpu]):
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
    """Backends worth trying on this machine, best first, with the reasons for skipping others.

    A row is worth trying when the model has its artifact format, the machine has its device and
    its runtime is installed for that device; GPU rows go before CPU rows, each in table order.
    """
    formats = {a.format for a in artifacts}
    order: list[BackendSpec] = []
    for spec in sorted(BACKEND_TABLE, key=lambda s: s.library == CPU):
        device = _device(report, spec)
        if spec.format not in formats or device is None:
            continue
        if spec.installed(report.runtimes):
            order.append(spec)
        elif (why := spec.missing.format(device=device.name)) not in reasons:
            reasons.append(why)
    names = [spec.name for spec in order]
    if o.backend:
        try:
            backend_spec(o.backend)
        except ValueError as exc:
            raise PlanError(str(exc)) from None
        if o.backend not in names:
            raise PlanError(f"backend {o.backend!r} is not possible here: "
                            + ("; ".join(reasons) or f"possible: {', '.join(names) or 'none'}"))
        reasons.append(f"backend {o.backend} chosen by the user")
        return [o.backend]
    if order and order[0].library == CPU and order[0].fallback and not reasons:
        reasons.append(order[0].fallback)
    return names


def _explain(spec: BackendSpec, a: Artifact, fit: _Fit, device: Device) -> str:
    n = a.dims.n_layers
    part = "all" if fit.gpu_layers >= n else f"{fit.gpu_layers} of {n}"
    return spec.explain.format(part=part, where=device.where, limit=gb(device.usable))


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
            spec = backend_spec(backend)
            on_gpu = spec.library != CPU
            if full_offload and not on_gpu:
                continue
            device = _device(report, spec)
            kv = (kv_cache, slots) if spec.batches else ("f16", 1)  # what this backend's KV cache will be
            assert device is not None  # `_candidates` keeps only backends with a device here
            # All on the GPU: best quality (biggest file) first. Otherwise decoding is bound by
            # CPU memory bandwidth, so the smallest file is the fastest.
            options = sorted((a for a in artifacts if a.format == spec.format), key=lambda a: a.size_bytes,
                             reverse=full_offload)
            for a in options:
                want = min(o.context or DEFAULT_CONTEXT, a.dims.n_ctx_train or DEFAULT_CONTEXT)
                for ctx in (_contexts(want)[1:] if shrink else [want]):
                    fit = spec.fit(a, ctx, host, device, o.gpu_layers if on_gpu else 0, *kv)
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
                    why.append(_explain(spec, a, fit, device))
                    if len(options) > 1:
                        why.append(f"{a.quant} chosen: " + (
                            "the best quality that fits entirely on the GPU" if full_offload else
                            "the smallest file, as memory is tight" if shrink else
                            "the smallest file, as decoding speed follows the bytes read from RAM")
                            + "; --quant picks another")
                    why.append(f"needs {gb(fit.memory.host_bytes)} RAM of {gb(host)} usable"
                               + (f", {gb(fit.memory.device_bytes)} GPU of {gb(device.usable)} usable"
                                  if fit.memory.device_bytes else ""))
                    why.append(f"{threads} threads ({report.cpu.physical_cores} physical cores)")
                    if slots > 1 or kv_cache != "f16":
                        why.append(f"KV cache {gb(fit.memory.kv_bytes)}: {slots} slot(s) of {ctx} tokens in "
                                   f"{kv_cache}" + (" (with flash attention)" if kv_cache != "f16" else "")
                                   if spec.batches else
                                   f"{backend} decodes one sequence at a time with an f16 KV cache")
                    return Plan(backend, a, ctx, fit.gpu_layers, threads, fit.memory, tuple(why),
                                *kv)
            if full_offload:
                reasons.append(f"{backend} cannot hold the whole model on {device.where}")

    smallest = min(a.size_bytes + a.dims.kv_bytes(MIN_CONTEXT) + _compute_bytes(a, MIN_CONTEXT)
                   for a in artifacts)
    raise PlanError(f"needs {gb(smallest)}, has {gb(host)} usable RAM "
                    f"({gb(report.memory.available_bytes)} available, some kept for the system): "
                    f"even the smallest artifact at {MIN_CONTEXT} tokens of context does not fit"
                    + ("; " + "; ".join(reasons) if reasons else ""))
