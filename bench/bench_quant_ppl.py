"""What each quant type costs on the real starter checkpoint: perplexity against F16 (the
baseline, measured in the same run), KL divergence and top-token agreement, on prose the
model's chat data did not contain. Goals: Q8_0 within 0.5% of F16, Q4_K_M within 5%.

    python bench/bench_quant_ppl.py [--text FILE] [--types Q8_0 Q4_K_M ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.quantize import quantize  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from localchat.evaluation import evaluate  # noqa: E402
from localchat.store import STARTER, default_store, install_starter  # noqa: E402
from tests.checkpoints import starter_hf  # noqa: E402

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")  # long English prose, on every Debian machine
GOALS = {"Q8_0": 0.5, "Q4_K_M": 5.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"])
    ap.add_argument("--chars", type=int, default=16_000, help="use the first N characters of the text")
    args = ap.parse_args(argv)
    if not args.text.is_file():
        raise SystemExit(f"{args.text}: no such text file; pass --text FILE")
    text = args.text.read_text(encoding="utf-8", errors="replace")[: args.chars]
    entry = install_starter(default_store(), quiet=True)
    hf = starter_hf(default_store().path_of(entry.files[0].path))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f16 = convert_to_gguf(load_checkpoint(hf), Path(tmp) / "f16.gguf", "f16", quiet=True).path
        f16_size = f16.stat().st_size
        for q in args.types:
            t0 = time.perf_counter()
            out = quantize(f16, Path(tmp) / f"{q}.gguf", q)
            took = time.perf_counter() - t0
            r = evaluate(out, text, base=f16)
            rows.append((q, out.stat().st_size, took, r))
            print(f"{q} done", file=sys.stderr)
    base_ppl = rows[0][3].ppl_base
    print(f"\n{STARTER.name} as an F16 checkpoint; text: {args.text.name} ({rows[0][3].tokens_scored} tokens scored)")
    print(f"{'type':8s} {'size MB':>8s} {'ppl':>8s} {'vs F16':>8s} {'KLD':>8s} {'top-1':>6s}  goal")
    print(f"{'F16':8s} {f16_size / 1e6:8.1f} {base_ppl:8.3f} {1:8.4f}")
    failed = False
    for q, size, _, r in rows:
        delta = (r.ppl / r.ppl_base - 1) * 100
        goal = GOALS.get(q)
        verdict = "" if goal is None else (f"within {goal}%: " + ("PASS" if delta <= goal else "FAIL"))
        failed |= goal is not None and delta > goal
        print(f"{q:8s} {size / 1e6:8.1f} {r.ppl:8.3f} {r.ppl / r.ppl_base:8.4f} {r.kld:8.4f} "
              f"{r.top1 * 100:5.1f}%  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
