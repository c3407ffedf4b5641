"""What each quant type costs on the real starter checkpoint: perplexity against F16 (the
baseline, measured in the same run), KL divergence and top-token agreement, on prose the
model's chat data did not contain. Not timed: one run is the figure. The F16 "full
precision" is the starter's shipped Q4_1 dequantized (the only real checkpoint offline).
Goals: Q8_0 within 0.5% of F16, Q4_K_M within 5%.

Then, in the same run, plain llama.cpp quantization against ours (weighted by an importance
matrix from localchat's chat calibration set, convert/imatrix.py) for the `--imatrix-types`,
on two held-out texts the calibration never saw: the evaluation chats rendered with the
model's template, and tests/data_eval_prose.txt. Goal: at least 10% lower KL divergence than
plain Q4_K_M at the same size. And `--quant auto`'s per-tensor mix (convert/automix.py) at plain
Q4_K_M's size, against both Q4_K_M files: on or below the size/KL line through the plain types.

    python bench/bench_quant_ppl.py [--text FILE] [--types Q8_0 Q4_K_M ...] [--imatrix-types Q4_K_M ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results import figure, report  # noqa: E402

from localchat.convert.automix import plan_mix  # noqa: E402
from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.imatrix import compute_imatrix  # noqa: E402
from localchat.convert.quantize import quantize  # noqa: E402
from localchat.convert.to_gguf import plan_gguf, write_gguf  # noqa: E402
from localchat.evaluation import DEFAULT_CHUNK, _token_logprobs, chat_eval_text, evaluate, evaluate_runs  # noqa: E402
from localchat.store import STARTER, default_store, install_starter  # noqa: E402
from tests.checkpoints import starter_hf  # noqa: E402

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")  # long English prose, on every Debian machine
GOALS = {"Q8_0": 0.5, "Q4_K_M": 5.0}
HELD_OUT_PROSE = Path(__file__).resolve().parents[1] / "tests" / "data_eval_prose.txt"
KLD_CUT_GOAL = 10.0  # % lower KL divergence than plain Q4_K_M
# The only real checkpoint offline is the starter, shipped as Q4_1: its "full precision" is that,
# dequantized, so these figures say what requantizing costs, not what quantizing a trained fp16 model does.
SOURCE_NOTE = "dequantized from the shipped Q4_1 GGUF"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--types", nargs="+", default=["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"])
    ap.add_argument("--chars", type=int, default=16_000, help="use the first N characters of the text")
    ap.add_argument("--imatrix-types", nargs="*", default=["Q4_K_M", "IQ4_XS", "Q3_K_M"],
                    help="types to quantize both plain and with the importance matrix")
    ap.add_argument("--no-auto", action="store_true", help="leave out the --quant auto mix at Q4_K_M's size")
    args = ap.parse_args(argv)
    if not args.text.is_file():
        raise SystemExit(f"{args.text}: no such text file; pass --text FILE")
    text = args.text.read_text(encoding="utf-8", errors="replace")[: args.chars]
    entry = install_starter(default_store(), quiet=True)
    hf = starter_hf(default_store().path_of(entry.files[0].path))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = load_checkpoint(hf)
        plan = plan_gguf(ckpt, "f16")
        f16 = write_gguf(plan, Path(tmp) / "f16.gguf", quiet=True).path
        f16_size = f16.stat().st_size
        for q in args.types:
            out = quantize(f16, Path(tmp) / f"{q}.gguf", q)
            rows.append((q, out.stat().st_size, evaluate(out, text, base=f16)))
            print(f"{q} done", file=sys.stderr)
        imatrix_figures, imatrix_settings = _plain_vs_imatrix(ckpt, plan.conv.gguf_name, f16, Path(tmp),
                                                              args.imatrix_types, not args.no_auto)
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
    figures.update(imatrix_figures)
    return report({"model": STARTER.name, "source": SOURCE_NOTE, "text": args.text.name, "chars": args.chars,
                   "types": args.types, "tokens_scored": rows[0][2].tokens_scored, **imatrix_settings}, figures)


def _reference(f16: Path, text: str):  # noqa: ANN202 - evaluate_runs' scorer type
    """The F16's log-probs on `text`, scored once and replayed for every quantized file."""
    tokens, run = _token_logprobs(f16, text, DEFAULT_CHUNK, None)
    chunks = list(run)
    return lambda: (tokens, iter(chunks))


def _plain_vs_imatrix(ckpt, gguf_name, f16: Path, tmp: Path, types: list[str],  # noqa: ANN001
                      auto: bool = True) -> tuple[dict, dict]:
    """Each of `types` quantized plain and with the importance matrix, scored on held-out chats and prose;
    with `auto`, also the `--quant auto` mix at plain Q4_K_M's size."""
    if not types:
        return {}, {}
    start = time.perf_counter()
    im = compute_imatrix(ckpt, gguf_name)
    took = time.perf_counter() - start
    texts = {"chat": chat_eval_text(f16), "prose": HELD_OUT_PROSE.read_text(encoding="utf-8")}
    refs = {name: _reference(f16, t) for name, t in texts.items()}
    figures = {"imatrix_s": figure(took, "s", f"importance matrix over {im.chunk_count} rows of {im.chunk_size} "
                                               "tokens (torch, CPU)")}
    print(f"\nplain llama.cpp vs importance-weighted ({im.chunk_count} x {im.chunk_size} calibration tokens, "
          f"{took:.0f} s); held-out texts: localchat/data/eval_chats.jsonl (chat), {HELD_OUT_PROSE.name} (prose)")
    print(f"{'type':8s} {'side':8s} {'size MB':>8s} " + " ".join(f"{t + ' ' + m:>14s}" for t in texts
                                                              for m in ("KLD", "ppl/F16", "top-1")))

    def score(q: str, side: str, out: Path) -> dict[str, float]:
        """Size and, on each held-out text, KL divergence, perplexity / F16 and top-1 of `out` (then deleted)."""
        size = sizes[f"{q}_{side}"] = out.stat().st_size
        figures[f"{q}_{side}_size_mb"] = figure(size / 1e6, "MB")
        kld, cells = {}, []
        for name, text in texts.items():
            r = evaluate_runs(lambda o=out, t=text: _token_logprobs(o, t, DEFAULT_CHUNK, None), refs[name])
            kld[name] = r.kld
            figures.update({f"{q}_{side}_{name}_kld": figure(r.kld, "", f"mean KL divergence from F16, {name}"),
                            f"{q}_{side}_{name}_ppl_ratio": figure(r.ppl / r.ppl_base, "x"),
                            f"{q}_{side}_{name}_top1": figure(r.top1 * 100, "%")})
            cells += [f"{r.kld:14.5f}", f"{r.ppl / r.ppl_base:14.4f}", f"{r.top1 * 100:13.1f}%"]
        out.unlink()
        print(f"{q:8s} {side:8s} {size / 1e6:8.1f} " + " ".join(cells), flush=True)
        return kld

    klds: dict[str, dict[str, dict[str, float]]] = {}
    sizes: dict[str, int] = {}
    for q in types:
        klds[q] = {side: score(q, side, quantize(f16, tmp / f"{q}-{side}.gguf", q, imatrix=weights))
                   for side, weights in (("plain", None), ("imatrix", im))}
        for name in texts:
            cut = (1 - klds[q]["imatrix"][name] / klds[q]["plain"][name]) * 100
            goal = "" if q != "Q4_K_M" else (f"goal {KLD_CUT_GOAL:.0f}%: "
                                              + ("PASS" if cut >= KLD_CUT_GOAL else "FAIL"))
            figures[f"{q}_{name}_kld_cut"] = figure(cut, "%", f"KL divergence lower than plain llama.cpp's {goal}")
            print(f"{'':8s} {name}: importance matrix cuts KL divergence by {cut:.1f}% {goal}")
    if auto and "Q4_K_M" in types:  # `--quant auto --size` at plain Q4_K_M's size
        mix, _planned = plan_mix(f16, im, sizes["Q4_K_M_plain"])
        kld = score("AUTO", "imatrix", quantize(f16, tmp / "auto.gguf", "AUTO", imatrix=im, types=mix))
        for name in texts:
            for side in ("plain", "imatrix"):
                cut = (1 - kld[name] / klds["Q4_K_M"][side][name]) * 100
                figures[f"AUTO_{name}_kld_cut_{side}"] = figure(
                    cut, "%", f"the auto mix at plain Q4_K_M's size: KL divergence lower than {side} Q4_K_M's")
                print(f"{'':8s} {name}: the auto mix at Q4_K_M's size cuts KL divergence by {cut:.1f}% "
                      f"against {side} Q4_K_M")
    return figures, {"imatrix_types": types, "auto_mix": auto and "Q4_K_M" in types,
                     "imatrix_rows": im.chunk_count, "imatrix_row_tokens": im.chunk_size,
                     "held_out": ["localchat/data/eval_chats.jsonl", f"tests/{HELD_OUT_PROSE.name}"]}


if __name__ == "__main__":
    main()
