"""GPTQ against plain round-to-nearest (RTN) at the same bits and group size, both against
full precision, on text the calibration never saw (the shipped evaluation chats, rendered
with the model's template, and GPL-3 prose).

    python bench/bench_gptq.py [--source HF_FOLDER] [--group-size 128]

Quantizes the starter's HF checkpoint with `localchat convert --to gptq`'s own code, so
this is the figure users get; RTN is applied in memory on GPTQ's grid.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localchat.convert.gptq import choose_group_size, layer_input_widths, quantize_gptq  # noqa: E402
from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.rtn import rtn_quantize_  # noqa: E402
from localchat.engine.gptq import load_model  # noqa: E402
from localchat.evaluation import chat_eval_text, evaluate_runs, torch_token_logprobs  # noqa: E402

PROSE = Path("/usr/share/common-licenses/GPL-3")


def default_source() -> Path:
    from tests.checkpoints import starter_hf
    from localchat.store import Store, install_starter, store_root

    store = Store(store_root())
    entry = install_starter(store, quiet=True)
    return starter_hf(store.path_of(entry.files[0].path))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, help="HF checkpoint folder (default: the starter's, built once)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--calibration", type=Path, help="calibration file (default: localchat's own)")
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()
    source = args.source or default_source()
    texts = {"chat": chat_eval_text(source)}
    own = Path(__file__).resolve().parents[1] / "tests" / "data_eval_prose.txt"
    texts["stories"] = own.read_text(encoding="utf-8")
    if PROSE.is_file():
        texts["prose"] = PROSE.read_text(encoding="utf-8")[:12_000]
    group, note = choose_group_size(layer_input_widths(load_checkpoint(source)), args.group_size)
    print(note or f"group size {group}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = quantize_gptq(source, Path(tmp) / "gptq", group_size=args.group_size, quiet=True,
                          calibration=args.calibration, seq_len=args.seq_len)
        print(f"GPTQ quantization: {time.perf_counter() - t:.0f} s, {r.samples} calibration rows")
        fp, tok = load_model(source, "cpu")
        gq, _ = load_model(r.folder, "cpu")
        rtn, _ = load_model(source, "cpu")
        n = rtn_quantize_(rtn, r.bits, r.group_size)
        print(f"RTN: {n} linear layers rounded on the same grid ({r.bits}-bit, group {r.group_size})")
        rows = []
        for label, text in texts.items():
            def run(m):  # noqa: ANN001
                return lambda: torch_token_logprobs(m, tok, text, args.chunk)
            ev_rtn = evaluate_runs(run(rtn), run(fp))
            ev_gq = evaluate_runs(run(gq), run(fp))
            rows.append((label, ev_rtn, ev_gq))
    print(f"\n{source.name}: perplexity on text the calibration did not see "
          f"({r.bits}-bit, group size {r.group_size})\n")
    print("| text | tokens | full precision | RTN | GPTQ | RTN / fp | GPTQ / fp | KLD RTN | KLD GPTQ | top-1 RTN | top-1 GPTQ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, a, b in rows:
        print(f"| {label} | {a.tokens_scored} | {a.ppl_base:.3f} | {a.ppl:.3f} | {b.ppl:.3f} | "
              f"{a.ppl / a.ppl_base:.3f}x | {b.ppl / b.ppl_base:.3f}x | {a.kld:.4f} | {b.kld:.4f} | "
              f"{a.top1 * 100:.1f}% | {b.top1 * 100:.1f}% |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    sys.exit(main())
