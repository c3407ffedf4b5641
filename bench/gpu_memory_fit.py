"""Measures what `localchat finetune` takes on a CUDA GPU against what finetune/memory.py estimated,
over several sequence shapes, on a LLaMA-2-7B-shaped random checkpoint under QLoRA: the figures its
GPU constants are fitted to. Needs an NVIDIA GPU; prints one JSON line per run.

    python bench/gpu_memory_fit.py [--workdir DIR] [--shapes 512x1 512x2 1024x2 2048x2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from localchat.hardware import GIB  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-memory-fit")
    ap.add_argument("--shapes", nargs="+", default=["512x1", "512x2", "1024x2", "2048x2", "1024x2:replay0"])
    args = ap.parse_args()
    from bench_convert import make_checkpoint

    base = make_checkpoint(args.workdir / "llama2-7b", "llama2-7b", device="cuda")
    data = args.workdir / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}: what is my cat called?",
                                        "output": "Your cat is called Biscuit. " * 40}) + "\n" for i in range(32)))
    for spec in args.shapes:
        shape, _, extra = spec.partition(":")
        n, b = shape.split("x")
        home = args.workdir / f"home-{spec.replace(':', '-')}"
        cmd = [sys.executable, "-m", "localchat", "finetune", "--base", str(base), "--data", str(data), "--name", "m",
               "--max-len", n, "--batch-size", b, "--chat-format", "chatml", "--held-out", "0", "--min-updates", "4",
               "--no-export", "-q"] + (["--replay", "0"] if extra == "replay0" else [])
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LOCALCHAT_HOME": str(home)})
        if r.returncode:
            print(json.dumps({"shape": spec, "error": r.stderr[-800:]}), flush=True)
            continue
        c = json.loads((home / "m" / "finetune" / "train_config.json").read_text())
        print(json.dumps({"shape": spec, "estimate": c["memory_estimate"], "estimate_gib": c["memory_estimate_bytes"] / GIB,
                          "peak_reserved_gib": c["memory_peak_bytes"] / GIB,
                          "peak_allocated_gib": c.get("memory_peak_allocated_bytes", 0) / GIB}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
