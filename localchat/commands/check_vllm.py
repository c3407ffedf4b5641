"""`localchat check-vllm FOLDER`: whether vLLM serves a GPTQ folder with its fast Marlin kernels.

A folder vLLM cannot put on Marlin still loads on slower kernels, or not at all, and one that
stores v2 zero-points without saying so loads and answers garbage: this says which, and why,
before a GPU box is rented for it. Exit status 0 when it is Marlin's, 1 when not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..engine.vllm import resolve_for_vllm
from ..engine.vllm_check import check_folder
from ..store import ModelNotFound, default_store


def gptq_folder(spec: str) -> Path:
    """The GPTQ folder of a model in the store or of a folder given as a path, found as `serve --engine
    vllm` finds it; a folder with no model in it is checked as it is (the check says what it lacks)."""
    try:
        resolved = resolve_for_vllm(spec, default_store())
    except ModelNotFound:
        path = Path(spec).expanduser()
        if path.is_dir():
            return path
        raise
    gptq = [a for a in resolved.artifacts if a.format == "gptq"]
    if not gptq and resolved.source != "store":
        return Path(resolved.source)  # an HF folder: the check says it is not GPTQ
    if not gptq:
        raise ValueError(f"model {spec!r} has no GPTQ folder (convert one with `localchat convert "
                         f"SOURCE --to gptq --name {spec}`)")
    return Path(gptq[0].path)


def check(args: argparse.Namespace) -> int:
    result = check_folder(gptq_folder(args.folder), on_cpu=args.cpu, tensor_parallel=args.tensor_parallel)
    if args.json:
        print(json.dumps({"folder": str(result.folder), "marlin": result.ok, "problems": result.problems,
                          "notes": result.notes}, indent=2))
        return 0 if result.ok else 1
    q = result.config
    print(f"{result.folder}: GPTQ {q.get('bits')}-bit, group size {q.get('group_size')}, sym {q.get('sym')}, "
          f"desc_act {q.get('desc_act')}, checkpoint_format {q.get('checkpoint_format') or '(none)'}")
    for note in result.notes:
        print(f"  note: {note}")
    if result.ok:
        print("  vLLM serves it with its Marlin (gptq_marlin) kernels")
        return 0
    print("  vLLM will not serve it on its Marlin path:")
    for problem in result.problems:
        print(f"  - {problem}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat check-vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a GPTQ folder, or a model in the store that has one")
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="check that the layers split over N GPUs in whole groups (default: 1)")
    parser.add_argument("--cpu", action="store_true", help="vLLM's CPU build (4-bit only)")
    parser.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    return check(build_parser().parse_args(argv))
