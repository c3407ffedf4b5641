"""`localchat serve`: the models in the store over an OpenAI-compatible API (and Ollama's) on 127.0.0.1.

Editors, agents and scripts that speak the OpenAI API point their base URL at
http://127.0.0.1:PORT/v1; those that speak Ollama's point OLLAMA_HOST at http://127.0.0.1:PORT.
Binding any other address needs --api-key. `--engine vllm --model NAME` serves one model through vLLM
instead (many concurrent users on CUDA GPUs; the planner's `vllm-*` rows), behind the same rules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..server.settings import ServerSettings

if TYPE_CHECKING:
    from ..engine.vllm import VllmLaunch


def serve(settings: ServerSettings) -> int:
    try:
        import uvicorn
    except ImportError:
        print("localchat serve needs the 'serve' extra: pip install 'localchat[serve]'", file=sys.stderr)
        return 1
    from ..server.app import create_app

    app = create_app(settings)
    print(f"localchat API on http://{settings.host}:{settings.port}/v1 "
          f"({'API key required' if settings.api_key else 'loopback only, no key'}); Ctrl-C stops",
          file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def vllm_launch(settings: ServerSettings, model: str, scratch: Path) -> tuple[list[str], VllmLaunch]:
    """The plan's reasons and the vLLM server to start for `model`: the planner chooses (backend family
    "vllm", as many users as --parallel) on a report of what vLLM needs (CUDA GPUs, RAM, its environment),
    and its refusals (no vLLM, a format it does not serve, too big for the GPUs) are this command's."""
    from ..engine.vllm import VllmUnavailable, build_launch, resolve_for_vllm
    from ..hardware import probe
    from ..planner import Overrides, PlanError, plan
    from ..store import default_store
    from ..templates import DEFAULT_FORMAT, get_format

    resolved = resolve_for_vllm(model, default_store())
    report = probe(libraries=("cuda",), llama_cpp=False, vllm=True)
    try:
        p = plan(report, resolved.artifacts, Overrides(backend="vllm", context=settings.context,
                                                       parallel=settings.parallel), resolved.measured)
    except PlanError as exc:
        found = [e.message for e in report.errors if e.probe == "vllm"]  # why the environment was not usable
        raise VllmUnavailable("; ".join([f"cannot serve {resolved.name!r} with vLLM: {exc}", *found])) from None
    launch = build_launch(resolved.name, p, settings, Path(report.runtimes.vllm), get_format(DEFAULT_FORMAT).template,
                          scratch)
    return [*p.reasons, *launch.reasons], launch


def serve_vllm(settings: ServerSettings, model: str) -> int:
    """vLLM's OpenAI server on one store model, as a child process (it brings its own torch)."""
    import os
    import shutil
    import signal
    import subprocess

    from ..engine.vllm import scratch_dir

    scratch = scratch_dir()
    try:
        reasons, launch = vllm_launch(settings, model, scratch)
        for reason in reasons:
            print(f"- {reason}", file=sys.stderr)
        print(f"vLLM serving {model!r} on http://{settings.host}:{settings.port}/v1 "
              f"({'API key required' if settings.api_key else 'loopback only, no key'}); "
              "it starts in about a minute; Ctrl-C stops", file=sys.stderr)
        child = subprocess.Popen(launch.argv, env={**os.environ, **launch.env})
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.terminate()
            return child.wait(timeout=30) or 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat serve", description=__doc__.split("\n\n")[0])
    ServerSettings.add_arguments(parser)
    engine = parser.add_argument_group("engine")
    engine.add_argument("--engine", choices=("localchat", "vllm"), default="localchat",
                        help="localchat's own server (every store model) or vLLM on one model "
                             "(default: localchat)")
    engine.add_argument("--model", "-m", help="with --engine vllm: the store model (HF checkpoint or GPTQ "
                                              "folder) or model folder to serve")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = ServerSettings.from_args(args)
    if args.engine == "vllm":
        if not args.model:
            raise ValueError("--engine vllm serves one model: name it with --model")
        return serve_vllm(settings, args.model)
    if args.model:
        raise ValueError("--model is for --engine vllm; localchat's own server serves every model in the store")
    return serve(settings)
