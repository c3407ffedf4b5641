"""Conversion cost against llama.cpp's reference converter, and a 7B-sized run.

1. F16 conversion wall time and peak RSS of `localchat convert`'s writer and of
   `convert_hf_to_gguf.py` (from the llama-cpp-python sdist) on the same checkpoint, each
   in its own process, alternating over rounds after a warm-up; ratios are ours / reference.
2. `--big`: a LLaMA-2-7B-shaped random checkpoint (fp16 safetensors shards, ~13.5 GB, cached
   per machine) converts with peak RSS under 3 GB; its Q4_K_M file is about 4.1 GB; its
   decode speed on this CPU is set against an estimated memory-bandwidth bound: bandwidth
   read by as many concurrent threads as decode uses, measured in the same run alternating
   with decode, divided by the bytes decode reads per token (every tensor but the token
   embeddings, of which it gathers one row). The bound ignores the KV cache and compute,
   so it is an estimate, not a ceiling.
3. `--big` (or `--finetune-export` alone): `localchat finetune`'s export path on that
   checkpoint with a random rank-16 adapter on every linear layer: base + adapter merged
   tensor by tensor into the GGUF writer, then Q4_K_M, with peak RSS under 4 GB; then
   `--save-merged`'s folder, and that Q4_K_M dequantized back to bf16 as a GGUF-only base is
   for training. Each in its own process; everything they write is deleted.

    python bench/bench_convert.py [--big [--shape small]] [--finetune-export] [--checkpoint DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import alternate, figure, fmt, ratio, report  # noqa: E402

from tests.checkpoints import CACHE, random_adapter, spm_tokenizer, starter_hf  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000)
# "small" runs the --big path in a minute (a check of the code, not a figure to quote).
SHAPES = {"llama2-7b": LLAMA2_7B,
          "small": {**LLAMA2_7B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 8}}


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {err}")
    return wall, usage.ru_maxrss / 1024**2


def ours(ckpt: Path, out: Path) -> tuple[float, float]:
    code = ("from localchat.convert.checkpoint import load_checkpoint\n"
            "from localchat.convert.to_gguf import convert_to_gguf\n"
            f"convert_to_gguf(load_checkpoint({str(ckpt)!r}), {str(out)!r}, 'f16', quiet=True)\n")
    return run_measured([sys.executable, "-c", code])


def reference(ckpt: Path, out: Path) -> tuple[float, float]:
    script = CACHE / "sdist" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: run the test suite once (it fetches the sdist)")
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    return run_measured([sys.executable, str(script), str(ckpt), "--outtype", "f16", "--outfile", str(out)], env)


def make_checkpoint(folder: Path, c: dict) -> Path:
    """A LLaMA-shaped checkpoint of random fp16 weights (config `c`), sharded like the real one."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                   (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                   (p + "mlp.down_proj.weight", (h, f)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, n = 0, 1
    for name, shape in shapes + [("", ())]:
        if (not name or size > 2e9) and shard:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size, n = {}, 0, n + 1
            print(f"wrote {fname}", file=sys.stderr)
        if not name:
            break
        t = torch.ones(shape, dtype=torch.float16) if len(shape) == 1 else \
            torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=gen)
        shard[name] = t
        size += t.numel() * 2
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps({**c, "architectures": ["LlamaForCausalLM"],
                                                 "model_type": "llama", "torch_dtype": "float16",
                                                 "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0,
                                                 "tie_word_embeddings": False}))
    spm_tokenizer(tmp)
    os.replace(tmp, folder)
    return folder


def finetune_export(ckpt: Path, workdir: Path) -> dict[str, dict]:
    """The fine-tune export path at this size, each step in its own process so its peak RSS is its
    own. The export runs without its after-export check: that is llama.cpp scoring the F16 file
    (mapped, so its pages count as RSS), not the merge or the quantization measured here."""
    adapter = random_adapter(ckpt, workdir / "ft-adapter", r=16)
    store, merged, dequantized = workdir / "ft-store", workdir / "ft-merged", workdir / "ft-dequantized"
    q4 = store / "big-ft" / "big-ft-Q4_K_M.gguf"
    steps = {
        "export": ("from localchat.finetune.command import export_finetuned; from localchat.store import Store; "
                   f"export_finetuned(Path({str(ckpt)!r}), Path({str(adapter)!r}), 'big-ft', 'Q4_K_M', "
                   f"Store({str(store)!r}), quiet=True, check=False)"),
        "merged": ("from localchat.finetune.command import write_merged; "
                   f"write_merged(Path({str(ckpt)!r}), Path({str(adapter)!r}), Path({str(merged)!r}))"),
        "dequant": ("import torch; from localchat.convert.from_gguf import gguf_to_hf; "
                    f"gguf_to_hf(Path({str(q4)!r}), Path({str(dequantized)!r}), torch.bfloat16)"),
    }
    figures: dict[str, dict] = {}
    try:
        for step, code in steps.items():
            wall, rss = run_measured([sys.executable, "-c", "from pathlib import Path; " + code])
            out = {"export": q4, "merged": merged, "dequant": dequantized}[step]
            size = sum(p.stat().st_size for p in ([out] if out.is_file() else out.glob("*.safetensors"))) / 1e9
            figures.update({f"big_ft_{step}_wall": figure(wall, "s"), f"big_ft_{step}_rss": figure(rss, "GB"),
                            f"big_ft_{step}_gb": figure(size, "GB")})
            print(f"fine-tune {step}: {wall:.0f} s, peak RSS {rss:.2f} GB, writes {size:.2f} GB"
                  + (f" (goal: under 4 GB) {'PASS' if rss < 4 else 'FAIL'}" if step == "export" else ""))
            if step == "merged":
                shutil.rmtree(merged)
    finally:
        for folder in (store, merged, dequantized, adapter):
            shutil.rmtree(folder, ignore_errors=True)
    figures["big_ft_export_rss"]["note"] = ("merge + F16 GGUF + Q4_K_M, rank-16 adapter on every linear "
                                            "layer, after-export check off; goal: under 4 GB")
    return figures


def bandwidth_gbs(readers: int, gb: float = 1.0, trials: int = 5) -> float:
    """Memory read bandwidth with `readers` threads at once, each summing its own slice of a
    buffer far larger than the caches (numpy releases the GIL while it sums). Decode reads the
    weights with every thread it has, so one reader would understate what it can pull."""
    import numpy as np

    a = np.ones(int(gb * 1e9 / 8))
    parts = np.array_split(a, readers)
    best = 0.0
    with cf.ThreadPoolExecutor(readers) as pool:
        list(pool.map(np.sum, parts))  # warm-up: pages touched, threads started
        for _ in range(trials):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def bytes_per_token(gguf: Path) -> int:
    """Weight bytes one decoded token reads: every tensor but the token-embedding table, of
    which decode gathers a single row."""
    from localchat.gguf_file import read_gguf

    return sum(t.nbytes for t in read_gguf(gguf).tensors if t.name != "token_embd.weight")


class Decoder:
    """A loaded GGUF that times greedy decoding of `tokens` tokens after a short prompt."""

    def __init__(self, gguf: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=0, verbose=False)

    def tok_s(self, tokens: int = 16) -> float:
        self.llm.reset()
        n, t_first = 0, 0.0
        for _tok in self.llm.generate([1, 450, 4996, 17354], temp=0.0):
            n += 1
            if n == 1:
                t_first = time.perf_counter()
            if n > tokens:
                break
        return (n - 1) / (time.perf_counter() - t_first)

    def close(self) -> None:
        self.llm.close()


def compare_f16(ckpt: Path, workdir: Path, rounds: int) -> dict[str, dict]:
    """Our F16 conversion against the reference converter, alternating, each in its own process."""
    runs = alternate(lambda: ours(ckpt, workdir / "ours.gguf"), lambda: reference(ckpt, workdir / "ref.gguf"),
                     rounds, warmup=1)
    for f in ("ours.gguf", "ref.gguf"):
        (workdir / f).unlink(missing_ok=True)
    (o_wall, o_rss), (r_wall, r_rss) = ([list(x) for x in zip(*side)] for side in runs)
    per_round = "localchat / convert_hf_to_gguf.py, per round"
    figures = {"ours_wall": figure(o_wall, "s"), "ref_wall": figure(r_wall, "s"),
               "ours_rss": figure(o_rss, "GB"), "ref_rss": figure(r_rss, "GB"),
               "wall_ratio": ratio(o_wall, r_wall, f"{per_round}; below 1 is faster"),
               "rss_ratio": ratio(o_rss, r_rss, f"{per_round}; below 1 is less")}
    print(f"{'':12s} {'wall s':>24s} {'peak RSS GB':>26s}")
    print(f"{'reference':12s} {fmt(figures['ref_wall'], 1):>24s} {fmt(figures['ref_rss'], 2):>26s}")
    print(f"{'localchat':12s} {fmt(figures['ours_wall'], 1):>24s} {fmt(figures['ours_rss'], 2):>26s}")
    print(f"{'ratio':12s} {fmt(figures['wall_ratio'], 3):>24s} {fmt(figures['rss_ratio'], 3):>26s}"
          "   (below 1: faster / less memory)")
    return figures


def big_finetune(args: argparse.Namespace) -> dict[str, dict]:
    big = make_checkpoint(CACHE / f"{args.shape}-shaped-random", SHAPES[args.shape])
    print(f"\nfine-tune export of the {args.shape}-shaped checkpoint with a random rank-16 adapter:")
    return finetune_export(big, args.workdir)


def big_run(args: argparse.Namespace) -> dict[str, dict]:
    """The 7B-shaped checkpoint: F16 conversion, Q4_K_M, decode against the bandwidth bound."""
    from localchat.convert.quantize import quantize

    shape = SHAPES[args.shape]
    q4 = args.workdir / f"{args.shape}-Q4_K_M.gguf"  # kept, so --decode-only can measure again
    figures: dict[str, dict] = {}
    if not args.decode_only or not q4.is_file():
        big = make_checkpoint(CACHE / f"{args.shape}-shaped-random", shape)
        f16 = args.workdir / f"{args.shape}-F16.gguf"
        size = sum(p.stat().st_size for p in big.glob("*.safetensors")) / 1e9
        print(f"\n{args.shape}-shaped checkpoint ({size:.1f} GB of fp16 shards):")
        o_wall, o_rss = ours(big, f16)
        figures.update({"big_checkpoint_gb": figure(size, "GB"), "big_f16_wall": figure(o_wall, "s"),
                        "big_f16_rss": figure(o_rss, "GB", "peak RSS of the F16 conversion; goal: under 3 GB")})
        print(f"F16 conversion: {o_wall:.0f} s, peak RSS {o_rss:.2f} GB (goal: under 3 GB) "
              f"{'PASS' if o_rss < 3 else 'FAIL'}")
        t0 = time.perf_counter()
        quantize(f16, q4, "Q4_K_M")
        took = time.perf_counter() - t0
        figures["big_q4_quantize_s"] = figure(took, "s")
        print(f"Q4_K_M: {q4.stat().st_size / 1e9:.2f} GB, quantized in {took:.0f} s")
        f16.unlink()
    per_token = bytes_per_token(q4)
    figures.update({"big_q4_gb": figure(q4.stat().st_size / 1e9, "GB", "the Q4_K_M file"),
                    "big_bytes_per_token_gb": figure(per_token / 1e9, "GB",
                                                     "tensor bytes read per decoded token (all but token_embd)")})
    decoder = Decoder(q4, args.threads)
    try:
        rates, bws = alternate(lambda: decoder.tok_s(args.decode_tokens),
                               lambda: bandwidth_gbs(args.threads), args.rounds, warmup=1)
    finally:
        decoder.close()
    bounds = [bw / (per_token / 1e9) for bw in bws]
    figures.update({
        "big_decode_tok_s": figure(rates, "tok/s", f"greedy, {args.threads} threads"),
        "big_bandwidth_gbs": figure(bws, "GB/s", f"{args.threads} concurrent numpy readers, best of 5 each round"),
        "big_bound_tok_s": figure(bounds, "tok/s", "estimate: bandwidth / bytes read per token"),
        "big_decode_vs_bound": ratio(rates, bounds, "decode / estimated bound, per round")})
    print(f"decode {fmt(figures['big_decode_tok_s'])} with {args.threads} threads; "
          f"memory bandwidth with {args.threads} readers {fmt(figures['big_bandwidth_gbs'], 1)}; "
          f"{per_token / 1e9:.2f} GB read per token -> estimated bound {fmt(figures['big_bound_tok_s'])}; "
          f"decode / bound {fmt(figures['big_decode_vs_bound'])}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="HF folder to compare on (default: the starter checkpoint)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each comparison")
    ap.add_argument("--big", action="store_true", help="also run the LLaMA-2-7B-shaped checkpoint "
                    "(first time ~20 min and 30 GB of disk to make it; cached)")
    ap.add_argument("--shape", choices=list(SHAPES), default="llama2-7b",
                    help="with --big: the checkpoint's shape (small: a quick check of this path)")
    ap.add_argument("--decode-only", action="store_true", help="with --big: reuse the kept Q4_K_M file")
    ap.add_argument("--finetune-export", action="store_true", help="the fine-tune export rows only, on the "
                    "--shape checkpoint (--big runs them too)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="decode threads and bandwidth readers "
                    "(default: physical cores, as localchat uses)")
    ap.add_argument("--workdir", type=Path, default=CACHE / "bench")
    args = ap.parse_args(argv)
    if args.threads is None:
        import psutil

        args.threads = psutil.cpu_count(logical=False) or 1
    from localchat.store import default_store, install_starter

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        entry = install_starter(default_store(), quiet=True)
        args.checkpoint = starter_hf(default_store().path_of(entry.files[0].path))
    settings = {"checkpoint": args.checkpoint.name, "rounds": args.rounds, "threads": args.threads,
                "big": args.big or args.decode_only, "shape": args.shape if args.big or args.decode_only else None,
                "decode_tokens": args.decode_tokens}
    if args.finetune_export and not args.big:  # those rows alone
        return report({**settings, "shape": args.shape}, big_finetune(args))
    print(f"F16 conversion of {args.checkpoint.name}, median (min-max) of {args.rounds} alternating rounds:")
    figures = compare_f16(args.checkpoint, args.workdir, args.rounds)
    if args.big or args.decode_only:
        figures.update(big_run(args))
    if args.big:
        figures.update(big_finetune(args))
    return report(settings, figures)


if __name__ == "__main__":
    main()
