"""Run every benchmark and keep what each measured in one file, bench/results.json.

Each bench runs in its own process (a crash in one cannot take the others down); its
main() returns its settings and figures, which land in the file with the machine, the
versions and the date they were measured with. A bench that fails is recorded as failed
with its error and the others still run. The file is rewritten atomically after every
bench, so an interrupted run keeps what was done. `bench/readme.py` turns the file into
the README's benchmark section.

    python bench/run_all.py                  # everything (`make bench`), well under an hour on 2 cores
    python bench/run_all.py --only gptq      # rerun one bench, merged into the file
    python bench/run_all.py --quick          # smallest settings: checks the plumbing (or BENCH_QUICK=1)

Figures from --quick, or from a run marked --provisional (a busy machine), are marked
provisional in the file and the README says so.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results.json"

# name: (module, arguments of the full run, arguments of --quick). Estimated minutes of the full
# run on an idle 2-core machine are in the comments.
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "runtime": ("bench_runtime", [],  # ~3 min: 5 rounds x 2 processes x 4 generations of 128 tokens
                ["--rounds", "1", "--reps", "1", "--tokens", "16"]),
    "serve": ("bench_serve", [],  # ~6 min: 3 rounds x (2 + 8 + 32 requests) x 2 sides of 64 tokens
              ["--clients", "1", "2", "--per-client", "1", "--tokens", "8", "--rounds", "1"]),
    # ~15 min: the same on the random-weight 1.1B LLaMA-shaped Q4_K_M model (built once, ~5 min, cached), 2 rounds
    "serve_1b": ("bench_serve", ["--model", "llama-1b", "--rounds", "2"],
                 ["--model", "llama-1b", "--clients", "1", "2", "--per-client", "1", "--tokens", "8", "--rounds", "1"]),
    # ~8 min: 5 quantizations and evaluations of the starter; its importance matrix, then Q4_K_M, IQ4_XS and Q3_K_M
    # plain and weighted by it, and the auto mix at Q4_K_M's size, each on held-out chats and prose
    "quant_ppl": ("bench_quant_ppl", [],
                  ["--types", "Q8_0", "Q4_K_M", "--chars", "3000"]),
    # ~70 min once the 7B-shaped checkpoint is cached (making it: ~20 min and 30 GB of disk, once):
    # 4 x 2 starter conversions, 4 x 2 per family (~1 min each), a 13.5 GB conversion, a Q4_K_M quantization,
    # 4 x (decode + bandwidth); `localchat convert`
    # with its importance matrix (~20 min: 20 rows through 32 layers in torch, 18 GB of disk, deleted after); then
    # each 8B shape alone (~10-20 min, ~37 GB of disk at its peak, deleted after)
    "convert": ("bench_convert", ["--big", "--scale", "qwen3-8b", "llama3.1-8b"],
                ["--rounds", "1", "--big", "--shape", "small", "--decode-tokens", "4",
                 "--scale", "qwen3-small", "llama3.1-small"]),
    # ~30 min once the 7B-shaped checkpoint is cached (the same one as convert's): the fine-tune export rows, each
    # in its own process (18 GB of disk at the peak, deleted after): merge + F16 + Q4_K_M, the merged folder
    # (13.5 GB) and that Q4_K_M dequantized back to bf16
    "finetune_export": ("bench_convert", ["--finetune-export"], ["--finetune-export", "--shape", "small"]),
    "gptq": ("bench_gptq", [],  # ~5 min: GPTQ with its scale search, RTN, 3 texts x 2 evaluations
             ["--samples", "4", "--seq-len", "64", "--chars", "2000"]),
    "finetune": ("bench_finetune", [],  # ~15 min: (fp32 + bf16 where native) x 3 sides x 3 rounds
                 ["--rows", "8", "--held-out", "4", "--rounds", "1", "--precision", "fp32"]),
    "ui": ("bench_ui", [],  # ~5 min: 6 rounds (a warm-up and 5) x 2 answers of 256 tokens
           ["--rounds", "1", "--tokens", "16"]),
    # ~50 min (3444 s measured, a 7B export running beside it): 2 bases x (before, after) x training seeds 0
    # and 1 (every figure moves from one fine-tune to the next) of fine-tune + Q4_K_M export, two at a time on
    # one thread each, each asked 15 paraphrases and 8 general questions under 8 seeds and greedily
    "recall": ("bench_recall", ["--threads", "1", "--jobs", "2", "--train-seeds", "0", "1"],
               ["--seeds", "1", "--bases", "hf", "--runs", "after", "--train-seeds", "0"]),
}


def load(path: Path = RESULTS) -> dict[str, Any]:
    """The results file, or an empty one; a damaged file is an error naming it, never overwritten."""
    if not path.exists():
        return {"benches": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: not readable as JSON ({exc}); move it away to start afresh") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benches"), dict):
        raise SystemExit(f"{path}: no \"benches\" object; move it away to start afresh")
    return data


def save(data: dict[str, Any], path: Path = RESULTS) -> None:
    """Write the file atomically, benches in their canonical order, `provisional` on top when
    any of them is."""
    from localchat.fsutil import atomic_write_text

    benches = {name: data["benches"][name] for name in BENCHES if name in data["benches"]}
    out = {"provisional": any(b.get("provisional") for b in benches.values()),
           "note": "written by bench/run_all.py; bench/readme.py turns it into README.md's benchmark section",
           "benches": benches}
    atomic_write_text(path, json.dumps(out, indent=1, ensure_ascii=False) + "\n")


def child(name: str, out: Path, argv: list[str]) -> int:
    """In the bench's own process: run its main() and write what it returned (or its error)."""
    sys.path.insert(0, str(BENCH_DIR))
    sys.path.insert(1, str(ROOT))
    try:
        result = importlib.import_module(BENCHES[name][0]).main(argv)
        out.write_text(json.dumps(result))
        return 0
    except BaseException as exc:  # noqa: BLE001 - recorded, whatever it was
        traceback.print_exc()
        # A worker's error carries its child's traceback: its last line says what went wrong.
        lines = [line for line in str(exc).splitlines() if line.strip()] or [""]
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {lines[-1].strip()}"[:500],
                                   "detail": str(exc)[-4000:]}))
        return 1


def run_one(name: str, quick: bool, provisional: bool, timeout: float) -> dict[str, Any]:
    from results import machine, today, versions

    module, full, small = BENCHES[name]
    argv = small if quick else full
    entry: dict[str, Any] = {"date": today(), "args": argv, "quick": quick, "provisional": provisional or quick,
                             "machine": machine(), "versions": versions()}
    print(f"\n=== {name}: bench/{module}.py {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", name, str(out), "--", *argv],
                                  timeout=timeout, cwd=ROOT)
            result = json.loads(out.read_text()) if out.is_file() else \
                {"error": f"exited with status {proc.returncode} and no result"}
        except subprocess.TimeoutExpired:
            result = {"error": f"timed out after {timeout:.0f} s"}
    entry["seconds"] = round(time.perf_counter() - t0)
    if "error" in result:
        entry.update(status="failed", error=result["error"], detail=result.get("detail", ""))
        print(f"=== {name} failed after {entry['seconds']} s: {result['error']}", flush=True)
    else:
        entry.update(status="ok", settings=result.get("settings", {}), figures=result.get("figures", {}))
        print(f"=== {name} done in {entry['seconds']} s", flush=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), metavar="NAME",
                    help=f"run these and merge them into the file ({', '.join(BENCHES)})")
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                    help="the smallest settings, to check the plumbing (figures marked provisional)")
    ap.add_argument("--provisional", action="store_true", help="mark the figures provisional (a busy machine)")
    ap.add_argument("--timeout", type=float, default=5400, help="seconds a bench may take before it is failed")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--child", nargs=2, metavar=("NAME", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child[0], Path(args.child[1]), args.rest[1:] if args.rest[:1] == ["--"] else args.rest)

    sys.path.insert(0, str(BENCH_DIR))
    sys.path.insert(1, str(ROOT))
    data = load(args.results)
    failed = []
    for name in args.only or BENCHES:
        data["benches"][name] = run_one(name, args.quick, args.provisional, args.timeout)
        if data["benches"][name]["status"] != "ok":
            failed.append(name)
        save(data, args.results)
    print(f"\nwrote {args.results}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
