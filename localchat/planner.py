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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .artifacts import HF_DEFAULT_WIDTH, HF_WIDTHS, Artifact
from .hardware.report import GIB, Accelerator, HardwareReport, Runtimes
from .options import Options, internal, option

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
# vLLM: the share of each GPU's total memory it takes (its --gpu-memory-utilization default), what each
# tensor-parallel rank spends beside weights and KV cache (CUDA context, activations, CUDA graphs), the
# RAM its server process holds, and the concurrent sequences from which it is worth its start-up.
VLLM_GPU_MEMORY_UTILIZATION = 0.90
VLLM_RANK_OVERHEAD_BYTES = 1536 * 1024**2
VLLM_HOST_BYTES = 3 * 1024**3
VLLM_MIN_PARALLEL = 16
# vLLM's CPU build: an explicit KV cache (else it takes 92% of the RAM), at least one full sequence.
VLLM_CPU_KV_CACHE_BYTES = 512 * 1024**2
FORMAT_NAMES = {"gguf": "a GGUF file", "gptq": "a GPTQ folder", "hf": "a Hugging Face checkpoint"}
# Tried in this order when the user names none: q8_0 changes perplexity by well under 1% and halves the
# memory; q4_0 costs more quality, so only a user's choice.
AUTO_KV_CACHE = ("f16", "q8_0")
# Parallel slots the planner gives a batching backend by itself (llama-server's automatic count too):
# 4 sequences decode at about 1.5x one on a CPU (#15), and each slot holds a full context of KV cache.
AUTO_SLOTS = 4


class PlanError(RuntimeError):
    """No way to run the model here; the message says what it needs and what there is."""


@dataclass(frozen=True)
class RunOptions(Options):
    """How to run any model, where the user pins it (None: the planner's choice). Typed once, so `chat`,
    `doctor`, `serve` and `ui` take the same flags with the same bounds (`Overrides.of`)."""

    option_group = "model"
    context: int | None = option(None, "context size in tokens (default: the model's trained length up to "
                                       f"{DEFAULT_CONTEXT}, less where memory is short)", 128, 1 << 20,
                                 aliases=("--ctx",))
    threads: int | None = option(None, "CPU threads (default: physical cores)", 1, 1024)
    parallel: int | None = option(None, "answers decoded at once (llama.cpp), each slot with the full context "
                                        f"of KV cache (default: as many as the memory left holds, up to "
                                        f"{AUTO_SLOTS})",
                                  1, 256)
    kv_cache: str | None = option(None, "KV cache type (llama.cpp): q8_0 and q4_0 take about 1/2 and 1/4 of f16's "
                                        "memory, with flash attention (default: f16, q8_0 where memory is short)",
                                  choices=tuple(KV_CACHE_TYPES))


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
    tensor_parallel: int = 1  # GPUs the weights are split over (vLLM)

    def describe(self) -> str:
        slots = f" in each of {self.slots} parallel slots" if self.slots > 1 else ""
        lines = [f"backend: {self.backend}", f"model:   {self.artifact.label}",
                 f"context: {self.context} tokens{slots}", f"threads: {self.threads}"]
        if self.gpu_layers:
            lines.append(f"gpu layers: {self.gpu_layers}/{self.artifact.dims.n_layers}")
        if self.tensor_parallel > 1:
            lines.append(f"tensor parallel: {self.tensor_parallel} GPUs")
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
    tensor_parallel: int = 1
    note: str = ""  # what the fit chose that the row's explain line shows as {note}


@dataclass(frozen=True)
class Device:
    """Where a backend runs on this machine: the CPU, or the best accelerator of its library."""

    name: str  # as `Measured.device` records it
    usable: int  # bytes a plan may take on it (0 on the CPU)
    where: str  # for the reasons
    unified: bool = False  # its memory is RAM too
    gpus: tuple[Accelerator, ...] = ()  # every accelerator of its library here, most memory free first


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




def tensor_parallel_size(gpus: int, n_heads: int) -> int:
    """The most GPUs, a power of two, that split the attention heads evenly (what vLLM's tensor
    parallelism and its all-reduce kernels want); 1 without GPUs."""
    tp = 1
    while tp * 2 <= gpus and n_heads % (tp * 2) == 0:
        tp *= 2
    return tp


def _fit_vllm(a: Artifact, context: int, host: int, on: Device, want_layers: int | None,
              kv_cache: str = "f16", slots: int = 1) -> _Fit | None:
    """Weights split over `tp` GPUs plus at least one full-context sequence of KV cache (vLLM refuses to
    start otherwise); vLLM then takes its share of every rank's GPU and pages the rest as KV cache for
    as many sequences as it holds. A rank has as much as the smallest of the GPUs it runs on."""
    tp = tensor_parallel_size(len(on.gpus), a.dims.n_head)
    ranks = on.gpus[:tp]
    have = tp * min(min(int(g.total_bytes * VLLM_GPU_MEMORY_UTILIZATION), g.free_bytes) for g in ranks)
    overhead = tp * VLLM_RANK_OVERHEAD_BYTES
    one = a.dims.kv_bytes(context)
    if a.size_bytes + one + overhead > have or VLLM_HOST_BYTES > host:
        return None
    pool = have - a.size_bytes - overhead
    split = "" if tp == len(on.gpus) else f", the {a.dims.n_head} attention heads split evenly over {tp}"
    note = (f"tensor parallel over {tp} of {len(on.gpus)} {ranks[0].library.upper()} GPU(s){split}; "
            f"{gb(pool)} of KV cache paged among the users (room for {pool // max(one, 1)} full "
            f"{context}-token sequences at once)")
    return _Fit(a.dims.n_layers, MemoryEstimate(a.size_bytes, pool, overhead, VLLM_HOST_BYTES, have), tp, note)


def _fit_vllm_cpu(a: Artifact, context: int, host: int, on: Device, want_layers: int | None,
                  kv_cache: str = "f16", slots: int = 1) -> _Fit | None:
    """vLLM's CPU build: an unquantized checkpoint in float32, a KV cache of its own that holds at least
    one full-context sequence, and the server process, all in RAM."""
    width = HF_WIDTHS.get(a.quant, HF_DEFAULT_WIDTH)
    weights = a.size_bytes * 4 // width if a.format == "hf" else a.size_bytes
    kv = max(VLLM_CPU_KV_CACHE_BYTES, a.dims.kv_bytes(context, 4))
    need = weights + kv + VLLM_HOST_BYTES
    if need > host:
        return None
    return _Fit(0, MemoryEstimate(weights, kv, VLLM_HOST_BYTES, need, 0),
                note="float32" if a.format == "hf" else "GPTQ on its CPU kernels")


@dataclass(frozen=True)
class BackendSpec:
    """One way to run a model, described once: the planner and the engine registry read only this.

    Adding a backend is a row in BACKEND_TABLE plus the module that runs it.
    """

    name: str
    format: str | tuple[str, ...]  # the artifact formats it runs ("gguf", "gptq", "hf"), preferred first
    library: str  # CPU, or the library of the accelerators it runs on ("cuda", "metal", "rocm")
    installed: Callable[[Runtimes], bool]  # the runtime it needs is there, built for `library`
    missing: str  # the reason when `installed` says no; {device} is the device's name
    # Memory: (artifact, context, usable RAM, device, GPU layers wanted, KV cache type, slots) -> the fit, or None.
    fit: Callable[[Artifact, int, int, Device, int | None, str, int], _Fit | None]
    explain: str  # the plan's reason: {part} layers on the GPU, {where} it runs, {limit} usable there
    engine: str  # "module:Class" that runs it, imported only when chosen (torch only for GPTQ)
    fallback: str = ""  # a CPU row's reason when it comes first and nothing else says why
    batches: bool = False  # decodes several sequences at once (`--parallel`) with a quantizable KV cache
    # Chosen unasked only for at least this many concurrent sequences (`--parallel`), and then ahead of
    # the rows on its device; None: only when named (`--backend`, `serve --engine vllm`).
    min_parallel: int | None = 1
    how_to_get: str = ""  # for a refusal when the model has none of its formats
    own_server: str = ""  # it runs as a server of its own, started by this command; "" when loaded in-process

    @property
    def formats(self) -> tuple[str, ...]:
        return self.format if isinstance(self.format, tuple) else (self.format,)

    def wanted(self, slots: int) -> bool:
        """Whether the planner may choose it unasked for `slots` concurrent sequences."""
        return self.min_parallel is not None and slots >= self.min_parallel


def _llama_cpp_built_for(library: str) -> Callable[[Runtimes], bool]:
    return lambda rt: library in rt.llama_cpp_backends


def _gptq_installed(rt: Runtimes) -> bool:
    return rt.gptq


def _vllm_installed(rt: Runtimes) -> bool:
    return bool(rt.vllm)


_LLAMA_CPP = "localchat.engine.llamacpp:LlamaCppBackend"
_GPTQ = "localchat.engine.gptq:GptqBackend"
_NO_GPTQ = ("the model has a GPTQ artifact, but torch + GPTQModel are not installed "
            "(pip install 'localchat[gptq]')")
_VLLM = "localchat.engine.vllm:VllmServer"
_NO_VLLM = ("{device} found, but no vLLM environment: make one with `localchat setup-vllm` "
            "(or point $LOCALCHAT_VLLM_PYTHON at a Python that has vLLM)")
_VLLM_FORMATS = ("gptq", "hf")
_SERVE_VLLM = "localchat serve --engine vllm --model NAME"
_GET_GPTQ = "convert the source to a GPTQ folder: `localchat convert HF_CHECKPOINT --to gptq --name NAME`"

# Rows in order of preference, among the GPU rows and among the CPU rows; the planner tries
# every GPU row before any CPU row (new rows go at the end), and a row wanted for as many users
# as were asked for (`min_parallel`) before the others.
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
    # vLLM's OpenAI server (`localchat serve --engine vllm`), its own process: for many concurrent users.
    BackendSpec("vllm-cuda", _VLLM_FORMATS, "cuda", _vllm_installed, _NO_VLLM, _fit_vllm,
                explain="vLLM for many concurrent users: {note}", engine=_VLLM, batches=True,
                min_parallel=VLLM_MIN_PARALLEL, how_to_get=_GET_GPTQ, own_server=_SERVE_VLLM),
    BackendSpec("vllm-cpu", _VLLM_FORMATS, CPU, _vllm_installed, _NO_VLLM.replace("{device} found, but no", "no"),
                _fit_vllm_cpu, explain="vLLM's CPU build ({note}): slow, the same server and API",
                engine=_VLLM, batches=True, min_parallel=None, how_to_get=_GET_GPTQ, own_server=_SERVE_VLLM),
    BackendSpec("llamacpp-rocm", "gguf", "rocm", _llama_cpp_built_for("rocm"),
                "{device} found, but llama-cpp-python was built without ROCm "
                "(reinstall with CMAKE_ARGS=-DGGML_HIP=on)", _fit_llamacpp,
                explain="{part} layers offloaded to {where}", engine=_LLAMA_CPP, batches=True),
)
BACKENDS = tuple(spec.name for spec in BACKEND_TABLE)  # for command-line choices


@dataclass(frozen=True)
class Overrides(RunOptions):
    """What the user pins of one model's plan: RunOptions, and which backend, artifact and GPU layers."""

    backend: str | None = option(None, f"force a backend instead of the planner's choice: {', '.join(BACKENDS)}")
    gpu_layers: int | None = option(None, "layers to offload to the GPU (default: as many as fit)", 0, 100_000)
    quant: str | None = option(None, "pick the model's artifact with this quant type (e.g. Q4_K_M)")
    # `backend`: a row's name, or a family of rows by its prefix ("vllm": vllm-cuda or vllm-cpu, as this
    # machine has). `in_process`: the caller loads the backend into its own process (`chat`, `serve`'s own
    # engine, `bench`, the app), so rows that run as a server of their own are left out, with the reason.
    in_process: bool = internal(False)

    @classmethod
    def of(cls, options: RunOptions, **pinned: object) -> "Overrides":
        """The overrides a front end's settings (ServerSettings, UISettings: RunOptions) give every model."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(RunOptions)}, **pinned)


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
    gpus = tuple(sorted(report.on(spec.library), key=lambda g: -g.free_bytes))
    if not gpus:
        return None
    gpu = gpus[0]
    if gpu.unified:
        usable = unified_budget(report, gpu)
        return Device(gpu.name, usable, f"{gpu.name} ({gb(usable)} of unified memory usable)", True, gpus)
    return Device(gpu.name, gpu.free_bytes - VRAM_RESERVE_BYTES, f"{gpu.name} ({gb(gpu.free_bytes)} VRAM free)",
                  gpus=gpus)


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


def _named(name: str) -> list[BackendSpec]:
    """The rows a user's backend name means: the row of that name, or a family ("vllm": vllm-cuda and
    vllm-cpu); PlanError naming the valid ones."""
    rows = [s for s in BACKEND_TABLE if s.name == name or s.name.startswith(name + "-")]
    if not rows:
        raise PlanError(f"unknown backend {name!r}; valid: {', '.join(s.name for s in BACKEND_TABLE)}")
    return rows


def _candidates(report: HardwareReport, artifacts: list[Artifact], o: Overrides,
                reasons: list[str]) -> list[str]:
    """Backends worth trying on this machine, best first, with the reasons for skipping others.

    A row is worth trying when the model has its artifact format, the machine has its device and
    its runtime is installed for that device, and it is wanted for this many users (or named); GPU
    rows go before CPU rows, a row wanted for many users before the others, each in table order.
    """
    formats = {a.format for a in artifacts}
    named = _named(o.backend) if o.backend else []
    slots = o.parallel or 1
    if named and not formats & {f for spec in named for f in spec.formats}:
        wants = " or ".join(dict.fromkeys(FORMAT_NAMES.get(f, f) for spec in named for f in spec.formats))
        hint = next((spec.how_to_get for spec in named if spec.how_to_get), "")
        raise PlanError(f"backend {o.backend!r} runs {wants}; the model has only "
                        + ", ".join(a.label for a in artifacts) + (f": {hint}" if hint else ""))
    order: list[BackendSpec] = []
    unasked: list[str] = []
    rows = sorted(BACKEND_TABLE, key=lambda s: (s.library == CPU, not (s.wanted(slots) and s.min_parallel > 1)))
    for spec in rows:
        device = _device(report, spec)
        if not formats & set(spec.formats) or device is None or (named and spec not in named):
            continue
        if spec.own_server and o.in_process:
            if named:
                raise PlanError(f"backend {spec.name} runs as its own server, not in this command: "
                                f"`{spec.own_server}`")
            if spec.wanted(slots) and spec.installed(report.runtimes):
                unasked.append(f"{spec.name} not chosen: it runs as its own server (`{spec.own_server}`)")
            continue
        if not named and not spec.wanted(slots):
            if spec.installed(report.runtimes):
                ask = f"--parallel {spec.min_parallel} or more, or " if spec.min_parallel else ""
                unasked.append(f"{spec.name} not chosen: it is for many concurrent users ({ask}"
                               f"`--backend {spec.name}`)")
            continue
        if spec.installed(report.runtimes):
            order.append(spec)
        elif (why := spec.missing.format(device=device.name)) not in reasons:
            reasons.append(why)
    names = [spec.name for spec in order]
    if named:
        if not names:
            raise PlanError(f"backend {o.backend!r} is not possible here: "
                            + ("; ".join(reasons) or f"it needs {' or '.join(s.library for s in named)}"))
        reasons.append(f"backend {names[0] if len(named) > 1 else o.backend} chosen by the user")
        return names[:1]
    if order and order[0].library == CPU and order[0].fallback and not reasons:
        reasons.append(order[0].fallback)
    reasons += unasked
    return names


def _explain(spec: BackendSpec, a: Artifact, fit: _Fit, device: Device) -> str:
    n = a.dims.n_layers
    part = "all" if fit.gpu_layers >= n else f"{fit.gpu_layers} of {n}"
    return spec.explain.format(part=part, where=device.where, limit=gb(device.usable), note=fit.note)


@dataclass(frozen=True)
class _KvFit:
    fit: _Fit
    kv_cache: str
    slots: int
    why: str


def _fit_kv(spec: BackendSpec, a: Artifact, ctx: int, host: int, device: Device, want_layers: int | None,
            o: Overrides, least_layers: int) -> _KvFit | None:
    """The fit at `ctx` with its KV cache type and parallel slots, or None when not even one slot fits
    with at least `least_layers` on the GPU.

    What the user pinned stays; otherwise the most slots up to AUTO_SLOTS that the memory left holds,
    f16 first and q8_0 where that holds more (or f16 holds none), and never a slot that pushes a layer
    off the GPU (the one answer a user waits for would decode slower). A backend that does not batch
    decodes one sequence with an f16 cache.
    """
    if not spec.batches or spec.own_server:  # one sequence, or a server that pages its own KV cache
        slots = o.parallel or 1 if spec.own_server else 1
        fit = spec.fit(a, ctx, host, device, want_layers, "f16", slots)
        return _KvFit(fit, "f16", slots, "") if fit is not None and fit.gpu_layers >= least_layers else None
    held: dict[str, int] = {}  # slots each KV cache type holds here
    best: _KvFit | None = None
    for kv in [o.kv_cache] if o.kv_cache else AUTO_KV_CACHE:
        one = spec.fit(a, ctx, host, device, want_layers, kv, 1)
        for n in [o.parallel] if o.parallel else range(AUTO_SLOTS, 0, -1):
            fit = spec.fit(a, ctx, host, device, want_layers, kv, n)
            if one is None or fit is None or fit.gpu_layers < least_layers:
                continue
            if o.parallel or fit.gpu_layers >= one.gpu_layers:
                held[kv] = n
                if best is None or n > best.slots:
                    best = _KvFit(fit, kv, n, "")
                break
        if best is not None and best.slots == (o.parallel or AUTO_SLOTS):
            break
    if best is None:
        return None
    n, kv = best.slots, best.kv_cache
    if o.parallel:
        slots = "--parallel"
    elif n == AUTO_SLOTS:
        slots = "the most the planner gives; --parallel sets more"
    else:
        slots = "as many as the memory left holds" + (
            " without taking layers off the GPU" if device.usable else "")
    if o.kv_cache:
        kind = "--kv-cache"
    elif kv == "f16":
        kind = "the default"
    else:
        kind = f"f16 holds only {held['f16']} slot(s)" if "f16" in held else "f16 holds no slot at this context"
    flash = " with flash attention" if kv != "f16" else ""
    why = (f"KV cache {gb(best.fit.memory.kv_bytes)} at {ctx} tokens: {n} parallel slot{'s' if n > 1 else ''} "
           f"({slots}), "
           f"{kv}{flash} ({kind})")
    return _KvFit(best.fit, kv, n, why)


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
    reasons: list[str] = []
    order = _candidates(report, artifacts, o, reasons)
    if not o.backend:
        order = _by_measured_speed(report, order, measured, reasons)
    if not order:
        raise PlanError("nothing here can run this model: " + "; ".join(reasons))
    threads = o.threads or report.cpu.physical_cores
    host = host_budget(report)

    misfits: list[str] = []
    for shrink, full_offload in _PASSES:
        for backend in order:
            spec = backend_spec(backend)
            on_gpu = spec.library != CPU
            if full_offload and not on_gpu:
                continue
            device = _device(report, spec)
            assert device is not None  # `_candidates` keeps only backends with a device here
            # All on the GPU: best quality (biggest file) first. Otherwise decoding is bound by
            # CPU memory bandwidth, so the smallest file is the fastest.
            options = sorted((a for a in artifacts if a.format in spec.formats), key=lambda a: a.size_bytes,
                             reverse=full_offload)
            for a in options:
                want = min(o.context or DEFAULT_CONTEXT, a.dims.n_ctx_train or DEFAULT_CONTEXT)
                for ctx in (_contexts(want)[1:] if shrink else [want]):
                    # On the GPU: all layers in the first pass, at least one after (none: the CPU backend's job).
                    least = min(a.dims.n_layers, o.gpu_layers or a.dims.n_layers) if full_offload else int(on_gpu)
                    kv = _fit_kv(spec, a, ctx, host, device, o.gpu_layers if on_gpu else 0, o, least)
                    if kv is None:
                        continue
                    fit = kv.fit
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
                    if kv.why:
                        why.append(kv.why)
                    elif not spec.batches and (o.parallel or o.kv_cache):
                        why.append(f"{backend} decodes one sequence at a time with an f16 KV cache")
                    return Plan(backend, a, ctx, fit.gpu_layers, threads, fit.memory, tuple(why), kv.kv_cache,
                                kv.slots, tensor_parallel=fit.tensor_parallel)
            if full_offload:
                smallest = min(a.size_bytes for a in options)
                misfits.append(f"{backend} cannot hold the whole model on {device.where}"
                               + (f" ({len(device.gpus)} of them)" if len(device.gpus) > 1 else "")
                               + f": needs more than its {gb(smallest)} of weights")
                reasons.append(misfits[-1])

    if all(backend_spec(b).library != CPU for b in order):  # only GPU backends were possible
        raise PlanError("the model does not fit the GPU: " + "; ".join(misfits))
    smallest = min(a.size_bytes + a.dims.kv_bytes(MIN_CONTEXT) + _compute_bytes(a, MIN_CONTEXT)
                   for a in artifacts)
    raise PlanError(f"needs {gb(smallest)}, has {gb(host)} usable RAM "
                    f"({gb(report.memory.available_bytes)} available, some kept for the system): "
                    f"even the smallest artifact at {MIN_CONTEXT} tokens of context does not fit"
                    + ("; " + "; ".join(reasons) if reasons else ""))
