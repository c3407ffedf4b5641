"""GPTQ against plain round-to-nearest (RTN) at the same bits, group size and scale search,
both against full precision, on text the calibration never saw (the shipped evaluation
chats, rendered with the model's template, tests/data_eval_prose.txt and GPL-3 prose).

    python bench/bench_gptq.py [--source HF_FOLDER] [--group-size 128] [--mse 2.4]

Quantizes the starter's HF checkpoint with `localchat convert --to gptq`'s own code, so
this is the figure users get; RTN is applied in memory on GPTQ's grid with the same MSE
scale search GPTQ gets (`--mse 0` compares both with max-abs scales). Not timed: one run
is the figure. The starter's "full precision" is its shipped Q4_1 GGUF dequantized.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import figure, report  # noqa: E402

from localchat.convert.gptq import (DEFAULT_MSE, DEFAULT_SAMPLES, choose_group_size,  # noqa: E402
                                    layer_input_widths, quantize_gptq)
from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.rtn import rtn_quantize_  # noqa: E402
from localchat.engine.gptq import load_model  # noqa: E402
from localchat.evaluation import chat_eval_text, evaluate_runs, torch_token_logprobs  # noqa: E402

PROSE = Path("/usr/share/common-licenses/GPL-3")
SOURCE_NOTE = "full precision = the shipped Q4_1 starter, dequantized"


def default_source() -> Path:
    from tests.checkpoints import starter_hf
    from localchat.store import Store, install_starter, store_root

    store = Store(store_root())
    entry = install_starter(store, quiet=True)
    return starter_hf(store.path_of(entry.files[0].path))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, help="HF checkpoint folder (default: the starter's, built once)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--calibration", type=Path, help="calibration file (default: localchat's own)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="most calibration rows")
    ap.add_argument("--mse", type=float, default=DEFAULT_MSE,
                    help="scale search exponent for both GPTQ and RTN (0: scales from each group's max)")
    ap.add_argument("--chars", type=int, default=12_000, help="characters of each prose text scored")
    args = ap.parse_args(argv)
    source = args.source or default_source()
    texts = {"chats": chat_eval_text(source)}
    own = Path(__file__).resolve().parents[1] / "tests" / "data_eval_prose.txt"
    texts["stories"] = own.read_text(encoding="utf-8")[: args.chars]
    if PROSE.is_file():
        texts["GPL-3 prose"] = PROSE.read_text(encoding="utf-8")[: args.chars]
    group, note = choose_group_size(layer_input_widths(load_checkpoint(source)), args.group_size)
    print(note or f"group size {group}")
    search = f"MSE scale search (exponent {args.mse:g})" if args.mse else "max-abs scales"
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = quantize_gptq(source, Path(tmp) / "gptq", group_size=args.group_size, quiet=True,
                          calibration=args.calibration, seq_len=args.seq_len, samples=args.samples, mse=args.mse)
        took = time.perf_counter() - t
        print(f"GPTQ quantization: {took:.0f} s, {r.samples} calibration rows")
        fp, tok = load_model(source, "cpu")
        gq, _ = load_model(r.folder, "cpu")
        rtn, _ = load_model(source, "cpu")
        n = rtn_quantize_(rtn, r.bits, r.group_size, mse=args.mse)
        print(f"RTN: {n} linear layers rounded on the same grid ({r.bits}-bit, group {r.group_size}, {search})")
        rows = []
        for label, text in texts.items():
            def run(m):  # noqa: ANN001
                return lambda: torch_token_logprobs(m, tok, text, args.chunk)
            rows.append((label, evaluate_runs(run(rtn), run(fp)), evaluate_runs(run(gq), run(fp))))
    figures = {"quantize_s": figure(took, "s", f"GPTQ quantization, {r.samples} calibration rows")}
    print(f"\n{source.name} ({SOURCE_NOTE}): perplexity on text the calibration did not see "
          f"({r.bits}-bit, group size {r.group_size}; GPTQ and RTN both with {search})\n")
    print("| text | tokens | full precision | RTN | GPTQ | RTN / fp | GPTQ / fp | KLD RTN | KLD GPTQ "
          "| top-1 RTN | top-1 GPTQ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, a, b in rows:
        key = label.split()[0].lower().replace("-", "")
        figures.update({
            f"{key}_tokens": figure(a.tokens_scored, "tokens"), f"{key}_fp_ppl": figure(a.ppl_base, ""),
            f"{key}_rtn_ratio": figure(a.ppl / a.ppl_base, "x", f"RTN perplexity / full precision ({search})"),
            f"{key}_gptq_ratio": figure(b.ppl / b.ppl_base, "x", "GPTQ perplexity / full precision"),
            f"{key}_rtn_kld": figure(a.kld, ""), f"{key}_gptq_kld": figure(b.kld, ""),
            f"{key}_rtn_top1": figure(a.top1 * 100, "%"), f"{key}_gptq_top1": figure(b.top1 * 100, "%")})
        print(f"| {label} | {a.tokens_scored} | {a.ppl_base:.3f} | {a.ppl:.3f} | {b.ppl:.3f} | "
              f"{a.ppl / a.ppl_base:.3f}x | {b.ppl / b.ppl_base:.3f}x | {a.kld:.4f} | {b.kld:.4f} | "
              f"{a.top1 * 100:.1f}% | {b.top1 * 100:.1f}% |")
    return report({"source": source.name, "source_note": SOURCE_NOTE, "bits": r.bits, "group_size": r.group_size,
                   "group_note": note, "mse": args.mse, "scales": search, "samples": r.samples,
                   "seq_len": args.seq_len, "texts": list(texts), "chunk": args.chunk}, figures)


if __name__ == "__main__":
    main()
