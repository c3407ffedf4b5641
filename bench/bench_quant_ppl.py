"""What each quant type costs on the real starter checkpoint: perplexity against F16 (the
baseline, measured in the same run), KL divergence and top-token agreement, on prose the
model's chat data did not contain. Not timed: one run is the figure. The F16 "full
precision" is the starter's shipped Q4_1 dequantized (the only real checkpoint offline).
Goals: Q8_0 within 0.5% of F16, Q4_K_M within 5%.

    python bench/bench_quant_ppl.py [--text FILE] [--types Q8_0 Q4_K_M ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import figure, report  # noqa: E402

from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.quantize import quantize  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from localchat.evaluation import evaluate  # noqa: E402
from localchat.store import STARTER, default_store, install_starter  # noqa: E402
from tests.checkpoints import starter_hf  # noqa: E402

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")  # long English prose, on every Debian machine
GOALS = {"Q8_0": 0.5, "Q4_K_M": 5.0}
# The only real checkpoint offline is the starter, shipped as Q4_1: its "full precision" is that,
# dequantized, so these figures say what requantizing costs, not what quantizing a trained fp16 model does.
SOURCE_NOTE = "dequantized from the shipped Q4_1 GGUF"


def main(argv: list[str] | None = None) -> dict:
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
            out = quantize(f16, Path(tmp) / f"{q}.gguf", q)
            rows.append((q, out.stat().st_size, evaluate(out, text, base=f16)))
            print(f"{q} done", file=sys.stderr)
    base_ppl = rows[0][2].ppl_base
    figures = {"F16_size_mb": figure(f16_size / 1e6, "MB"), "F16_ppl": figure(base_ppl, "")}
    print(f"\n{STARTER.name} as an F16 checkpoint ({SOURCE_NOTE}); "
          f"text: {args.text.name} ({rows[0][2].tokens_scored} tokens scored)")
    print(f"{'type':8s} {'size MB':>8s} {'ppl':>8s} {'vs F16':>8s} {'KLD':>8s} {'top-1':>6s}  goal")
    print(f"{'F16':8s} {f16_size / 1e6:8.1f} {base_ppl:8.3f} {1:8.4f}")
    for q, size, r in rows:
        delta = (r.ppl / r.ppl_base - 1) * 100
        goal = GOALS.get(q)
        verdict = "" if goal is None else (f"within {goal}%: " + ("PASS" if delta <= goal else "FAIL"))
        figures.update({f"{q}_size_mb": figure(size / 1e6, "MB"), f"{q}_ppl": figure(r.ppl, ""),
                        f"{q}_ppl_ratio": figure(r.ppl / r.ppl_base, "x", f"perplexity / F16's {verdict}".strip()),
                        f"{q}_kld": figure(r.kld, "", "mean KL divergence from F16"),
                        f"{q}_top1": figure(r.top1 * 100, "%", "same top token as F16")})
        print(f"{q:8s} {size / 1e6:8.1f} {r.ppl:8.3f} {r.ppl / r.ppl_base:8.4f} {r.kld:8.4f} "
              f"{r.top1 * 100:5.1f}%  {verdict}")
    return report({"model": STARTER.name, "source": SOURCE_NOTE, "text": args.text.name, "chars": args.chars,
                   "types": args.types, "tokens_scored": rows[0][2].tokens_scored}, figures)


if __name__ == "__main__":
    main()
