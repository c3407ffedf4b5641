"""`localchat doctor`: what hardware this machine has, which backend a model would run on,
and why. `--report FILE` plans for a hardware report saved elsewhere (`--json` writes one).
It also lists what in the store no model owns (work folders of killed jobs, temp files,
unlisted GGUFs), which `--clean` removes."""

from __future__ import annotations

import argparse
import os

from ..fsutil import human
from ..hardware import ENV_REPORT, HardwareReport, load_report, probe
from ..planner import PlanError, gb
from ..runtime import plan_model
from ..store import Store, default_store
from ..store.orphans import find_orphans, remove_orphans
from .common import add_model_args, overrides_from


def describe_report(r: HardwareReport) -> str:
    lines = [f"cpu:     {r.cpu.model} ({r.cpu.arch}), {r.cpu.physical_cores} physical / "
             f"{r.cpu.logical_cores} logical cores; SIMD: {' '.join(r.cpu.simd) or 'none found'}",
             f"memory:  {gb(r.memory.total_bytes)} total, {gb(r.memory.available_bytes)} available"]
    for g in r.accelerators:
        memory = "unified memory" if g.unified else f"VRAM ({gb(g.free_bytes)} free)"
        lines.append(f"gpu:     {g.library} #{g.index} {g.name}, {gb(g.total_bytes)} {memory}"
                     + (f", compute {g.compute}" if g.compute else ""))
    if not r.accelerators:
        lines.append("gpu:     none found")
    rt = r.runtimes
    build = f" (ggml backends: {', '.join(rt.llama_cpp_backends) or 'none'})" if rt.llama_cpp else ""
    lines.append(f"runtimes: llama.cpp {rt.llama_cpp_version or 'not installed'}{build}; "
                 f"GPTQ (torch + GPTQModel) {'installed' if rt.gptq else 'not installed'}; "
                 f"vLLM {rt.vllm or 'not installed (`localchat setup-vllm`)'}")
    for e in r.errors:
        lines.append(f"probe error: {e.probe}: {e.message}")
    return "\n".join(lines)


def describe_store(store: Store, clean: bool) -> str:
    """The store's stray items, one per line, removed first with `clean`."""
    stray = find_orphans(store)
    if not stray:
        return f"store:   {store.root}, nothing stray"
    total = human(sum(o.size for o in stray))
    if clean:
        remove_orphans(stray)
    lines = [f"store:   {store.root}: {'removed ' if clean else ''}{len(stray)} stray item(s), {total}, "
             "that no model owns:"]
    lines += [f"  {o.path.relative_to(store.root)} ({human(o.size)}): {o.why}" for o in stray]
    if not clean:
        lines.append("  `localchat doctor --clean` removes them")
    return "\n".join(lines)


def doctor(args: argparse.Namespace) -> int:
    report = load_report(args.report) if args.report else probe(vllm=True)
    if args.json:
        print(report.to_json())
        return 0
    if args.report or os.environ.get(ENV_REPORT):
        print(f"hardware: as described by {args.report or os.environ[ENV_REPORT]} (not probed)")
    print(describe_report(report))
    print(describe_store(default_store(), args.clean))
    print()
    try:
        model, p = plan_model(args.model, overrides_from(args), report=report)
    except PlanError as exc:
        print(f"plan for {args.model}: refused: {exc}")
        return 1
    print(f"plan for {model.name}:")
    print(p.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the hardware report as JSON")
    parser.add_argument("--report", help="plan with this hardware report (JSON) instead of probing")
    parser.add_argument("--clean", action="store_true",
                        help="remove what in the store no model owns (work folders of killed jobs, temp files, "
                             "unlisted GGUFs)")
    add_model_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return doctor(build_parser().parse_args(argv))


