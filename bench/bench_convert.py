"""Conversion cost against llama.cpp's reference converter, per family, and at 7B and 8B sizes.

1. F16 conversion wall time and peak RSS of `localchat convert`'s writer and of
   `convert_hf_to_gguf.py` (from the llama-cpp-python sdist) on the same checkpoint, each
   in its own process, alternating over rounds after a warm-up; ratios are ours / reference.
   The same for every architecture in the converter's table, on its first tiny example
   (tests/checkpoints.py FAMILY_EXAMPLES: real config shape, few layers, full vocabulary).
2. `--big`: a LLaMA-2-7B-shaped random checkpoint (fp16 safetensors shards, ~13.5 GB, cached
   per machine) converts with peak RSS under 3 GB; its Q4_K_M file is about 4.1 GB; its
   decode speed on this CPU is set against an estimated memory-bandwidth bound: bandwidth
   read by as many concurrent threads as decode uses, measured in the same run alternating
   with decode, divided by the bytes decode reads per token (every tensor but the token
   embeddings, of which it gathers one row). The bound ignores the KV cache and compute,
   so it is an estimate, not a ceiling.
3. `--scale qwen3-8b llama3.1-8b`: checkpoints of those models' real shapes (bf16, random
   weights), each made a shard at a time, converted (peak RSS under 3 GB), quantized to
   Q4_K_M and set against the size llama.cpp's Q4_K_M type mix gives their tensors, then
   deleted (one at a time: each needs ~37 GB of disk at its peak).
4. `--finetune-export` (make bench's `finetune_export`, not part of `--big`): `localchat
   finetune`'s export path on the `--shape` checkpoint with a random rank-16 adapter on
   every linear layer: base + adapter merged tensor by tensor into the GGUF writer, the
   importance pass, then Q4_K_M, with peak RSS under 4 GB; then `--save-merged`'s folder,
   and that Q4_K_M dequantized back to bf16 as a GGUF-only base is for training. Each in
   its own process; everything they write is deleted.

    python bench/bench_convert.py [--big [--shape small]] [--scale SHAPE ...] [--finetune-export] [--checkpoint DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results import alternate, figure, fmt, ratio, report  # noqa: E402

from tests.checkpoints import CACHE, TOKENIZER_FILES, example_tokenizer, random_adapter, starter_hf  # noqa: E402

# Real checkpoints' shapes (their config.json, weights random) with the tokenizer each ships with: a
# tests.checkpoints.example_tokenizer name ("spm" is a toy SentencePiece model; LLaMA-2's is not offline).
LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5, vocab_size=32000, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False, torch_dtype="float16")
# Qwen/Qwen3-8B: GQA 32/8, head_dim 128, q/k norms, 36 layers, 151936 embedding rows (151669 tokens), untied.
QWEN3_8B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, vocab_size=151936,
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False, torch_dtype="bfloat16")
# meta-llama/Llama-3.1-8B-Instruct: GQA 32/8, llama3 rope scaling (a rope_freqs tensor), 128256 tokens, untied.
LLAMA31_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
                  bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=False,
                  torch_dtype="bfloat16")

# TinyLlama-1.1B's shape (LLaMA-2 blocks, GQA 32/4, 22 layers): the ~1B model bench_serve batches.
LLAMA_1B = {**LLAMA2_7B, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
            "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048}


def shrunk(c: dict) -> dict:
    """The same architecture, tokenizer and vocabulary at a few layers: runs a shape's path in a minute
    (a check of the code, not a figure to quote)."""
    return {**c, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
            "num_key_value_heads": c["num_key_value_heads"] // 4, "head_dim": 64}


# name: (config, tokenizer). --big decodes with its shape; --scale shapes are converted, quantized and measured.
SHAPES: dict[str, tuple[dict, str]] = {
    "llama2-7b": (LLAMA2_7B, "spm"), "qwen3-8b": (QWEN3_8B, "qwen"), "llama3.1-8b": (LLAMA31_8B, "llama3"),
    "llama-1b": (LLAMA_1B, "spm"),
    "small": (shrunk(LLAMA2_7B), "spm"), "qwen3-small": (shrunk(QWEN3_8B), "qwen"),
    "llama3.1-small": (shrunk(LLAMA31_8B), "llama3")}
PEAK_RSS_GOAL_GB = 3.0


# Runs a script (or `-c CODE`) as __main__ and, at exit, prints its own peak RSS (VmHWM) last on stderr. On Linux a
# child's ru_maxrss from wait4 starts at its parent's peak, so a bench that made a 16 GB checkpoint in-process
# (or holds a model) would count its own memory as the converter's.
PEAK_RSS_WRAPPER = """
import atexit, os, runpy, sys
def peak():
    with open('/proc/self/status') as f:
        print('peak_rss_kb', next(l.split()[1] for l in f if l.startswith('VmHWM:')), file=sys.stderr)
atexit.register(peak)
sys.argv = sys.argv[1:]
if sys.argv[0] == '-c':
    sys.argv = sys.argv[1:]
    exec(compile(sys.argv[0], '<string>', 'exec'), {'__name__': '__main__'})
else:
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
    runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_measured(args: list[str], env: dict[str, str] | None = None,
                 stdout: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of `python ARGS` in a child process, the peak as the child saw it;
    its output goes to `stdout` when given."""
    with tempfile.TemporaryFile("w+") as err, open(stdout or os.devnull, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_WRAPPER, *args], env=env, stdout=out, stderr=err)
        wall = time.perf_counter() - t0
        err.seek(0)
        lines = err.read().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {chr(10).join(lines[-20:])}")
    peak = next(line.split()[1] for line in reversed(lines) if line.startswith("peak_rss_kb"))
    return wall, int(peak) / 1024**2


def ours(ckpt: Path, out: Path) -> tuple[float, float]:
    code = ("from localchat.convert.checkpoint import load_checkpoint\n"
            "from localchat.convert.to_gguf import convert_to_gguf\n"
            f"convert_to_gguf(load_checkpoint({str(ckpt)!r}), {str(out)!r}, 'f16', quiet=True)\n")
    return run_measured(["-c", code])


def reference(ckpt: Path, out: Path) -> tuple[float, float]:
    script = CACHE / "sdist" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script} is missing: run the test suite once (it fetches the sdist)")
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    return run_measured([str(script), str(ckpt), "--outtype", "f16", "--outfile", str(out)], env)


def checkpoint_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint of config `c` holds, in order, from transformers' own
    model class built on the meta device (no memory): the names and shapes the real checkpoint has."""
    import torch
    import transformers

    kw = {k: v for k, v in c.items() if k not in ("architectures", "model_type", "torch_dtype")}
    config = transformers.AutoConfig.for_model(c["model_type"], **kw)
    with torch.device("meta"):
        model = getattr(transformers, c["architectures"][0])(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()
            if not (name == "lm_head.weight" and config.tie_word_embeddings)]


def make_checkpoint(folder: Path, shape: str, shard_gb: float = 2.0, device: str = "cpu") -> Path:
    """A checkpoint of SHAPES[shape] with random weights (norms at 1), sharded like the real one and
    written a shard at a time, so no more than one shard is ever in memory (drawn on `device`: a GPU
    draws 7B weights in seconds)."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    c, tokenizer = SHAPES[shape]
    dtype = getattr(torch, c["torch_dtype"])
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator(device).manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, n = 0, 1
    for name, dims in checkpoint_tensors(c) + [("", ())]:
        if (not name or size > shard_gb * 1e9) and shard:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size, n = {}, 0, n + 1
            print(f"wrote {fname}", file=sys.stderr)
        if not name:
            break
        t = torch.ones(dims, dtype=dtype) if len(dims) == 1 else \
            torch.empty(dims, dtype=dtype, device=device).normal_(0, 0.02, generator=gen).cpu()
        shard[name] = t
        size += t.numel() * t.element_size()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp / "config.json").write_text(json.dumps(c, indent=1))
    src = example_tokenizer(tokenizer, None)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, tmp / f)
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
            wall, rss = run_measured(["-c", "from pathlib import Path; " + code])
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


IMATRIX_RSS_GOAL_GB = 4.0  # as the fine-tune export's: far below the 13.5 GB model, room on a 16 GB machine


def imatrix_convert(ckpt: Path, workdir: Path, calibration: Path | None = None) -> dict[str, dict]:
    """`localchat convert CKPT` (Q4_K_M, the default) in its own process, with what it does by default at
    this size: the F16 GGUF, the importance pass over the shipped calibration set (convert/imatrix.py, one
    decoder layer and a few rows in memory at a time) and Q4_K_M weighted by it. The after-export check is
    off, as for the fine-tune export: it is llama.cpp scoring the mapped F16. The store it writes is deleted.
    `calibration` (--calibration) makes the pass shorter on a busy machine: its memory does not depend on the
    number of rows beyond the first chunk of four, its time grows with them."""
    import re

    store, log = workdir / "imatrix-store", workdir / "imatrix-convert.log"
    cli = "import sys; from localchat.cli import main; sys.exit(main(sys.argv[1:]))"
    try:
        wall, rss = run_measured(["-c", cli, "convert", str(ckpt), "--name", "big-im", "--no-check", "-q"]
                                 + (["--calibration", str(calibration)] if calibration else []),
                                 env={**os.environ, "LOCALCHAT_HOME": str(store)}, stdout=log)
        report = log.read_text(encoding="utf-8")
        q4 = store / "big-im" / "big-im-Q4_K_M.gguf"
        size = q4.stat().st_size / 1e9
    finally:
        shutil.rmtree(store, ignore_errors=True)
        log.unlink(missing_ok=True)
    found = re.search(r"importance matrix: (\d+) weights over (\d+) rows of (\d+) tokens .* in (\d+) s;", report)
    if not found:
        raise RuntimeError(f"no importance matrix line in localchat convert's report:\n{report[-2000:]}")
    weights, rows, tokens, took = (int(g) for g in found.groups())
    verdict = "PASS" if rss < IMATRIX_RSS_GOAL_GB else "FAIL"
    print(f"\nlocalchat convert {ckpt.name} (F16, importance matrix over {rows} rows of {tokens} tokens, Q4_K_M): "
          f"{wall:.0f} s, of which the importance pass {took} s; peak RSS {rss:.2f} GB "
          f"(goal: under {IMATRIX_RSS_GOAL_GB:.0f} GB) {verdict}; {size:.2f} GB file")
    return {"big_im_wall": figure(wall, "s", "localchat convert: F16 + importance matrix + Q4_K_M, check off"),
            "big_im_imatrix_s": figure(took, "s", f"the importance pass: {weights} weights, {rows} rows of "
                                                  f"{tokens} tokens, torch on the CPU"),
            "big_im_rss": figure(rss, "GB", f"peak RSS of the whole convert; goal: under {IMATRIX_RSS_GOAL_GB:.0f} GB"),
            "big_im_q4_gb": figure(size, "GB", "the importance-weighted Q4_K_M file")}


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


def compare_f16(ckpt: Path, workdir: Path, rounds: int, label: str = "") -> dict[str, dict]:
    """Our F16 conversion against the reference converter, alternating, each in its own process.
    With a `label` (one row of the per-family table) it prints one line instead of a table."""
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
    if label:
        print(f"{label:30s} wall {fmt(figures['ours_wall'], 1)} vs {fmt(figures['ref_wall'], 1, False)}: "
              f"{fmt(figures['wall_ratio'], 3)}; peak RSS {fmt(figures['ours_rss'], 2, False)} vs "
              f"{fmt(figures['ref_rss'], 2, False)}: {fmt(figures['rss_ratio'], 3)}")
        return figures
    print(f"{'':12s} {'wall s':>24s} {'peak RSS GB':>26s}")
    print(f"{'reference':12s} {fmt(figures['ref_wall'], 1):>24s} {fmt(figures['ref_rss'], 2):>26s}")
    print(f"{'localchat':12s} {fmt(figures['ours_wall'], 1):>24s} {fmt(figures['ours_rss'], 2):>26s}")
    print(f"{'ratio':12s} {fmt(figures['wall_ratio'], 3):>24s} {fmt(figures['rss_ratio'], 3):>26s}"
          "   (below 1: faster / less memory)")
    return figures


def family_rows(workdir: Path, starter: Path, rounds: int) -> tuple[dict[str, dict], dict[str, dict]]:
    """A row per architecture in the converter's table: F16 conversion against the reference converter
    on the family's first tiny example (tests.checkpoints.FAMILY_EXAMPLES: its real config shape at
    2-6 layers, with the tokenizer and full vocabulary the parity tests use), so time goes mostly to the
    vocabulary and metadata, not the weights. Families added to the table get a row without a change here."""
    import transformers

    from localchat.convert.gguf import ARCHITECTURES
    from tests.checkpoints import FAMILY_EXAMPLES, example_model

    settings: dict[str, dict] = {}
    figures: dict[str, dict] = {}
    root = workdir / "families"
    print(f"\nF16 conversion per family (tiny examples), median (min-max) of {rounds} alternating rounds; "
          "localchat vs convert_hf_to_gguf.py:")
    for arch in ARCHITECTURES:
        variant, (tokenizer, _) = next(iter(FAMILY_EXAMPLES[arch].items()))
        folder = root / variant
        shutil.rmtree(folder, ignore_errors=True)
        try:
            example_model(arch, variant, folder, starter)
            vocab = len(transformers.AutoTokenizer.from_pretrained(folder))
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
            settings[arch] = {"example": variant, "tokenizer": tokenizer, "vocab": vocab,
                              "checkpoint_mb": round(size, 1)}
            figures.update({f"{arch}_{k}": v for k, v in
                            compare_f16(folder, workdir, rounds, f"{arch} ({variant})").items()})
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return settings, figures


# llama.cpp's Q4_K_M type mix (src/llama-quant.cpp, llama_tensor_get_type_impl) for a dense model that is
# not Falcon or a 70B: Q4_K by default; the output layer (or a tied token_embd) Q6_K; attn_v (and a fused
# attn_qkv) and ffn_down Q6_K in the layers use_more_bits picks, Q4_K in the others; 1-D tensors stay as
# they are. A K-quant needs rows of a multiple of 256, else llama.cpp falls back to a 32-block type.
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
GGUF_ALIGNMENT = 32


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, shape: tuple[int, ...], type_name: str, n_layers: int, tied: bool) -> str:
    """The type llama.cpp's Q4_K_M gives one tensor of an F16 file (shape in GGUF order: row length first)."""
    if len(shape) < 2:
        return type_name
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return "Q6_K" if shape[0] % 256 == 0 else "Q8_0"
    sensitive = any(k in name for k in ("attn_v.weight", "attn_qkv.weight", "ffn_down"))
    kind = "Q6_K" if sensitive and _more_bits(int(name.split(".")[1]), n_layers) else "Q4_K"
    return kind if shape[0] % 256 == 0 else K_FALLBACK[kind]


def q4_k_m_expected(f16: Path) -> tuple[dict[str, str], int]:
    """Each tensor's Q4_K_M type and the file size they make: the F16 file's header (the same metadata
    but for the file type) plus every tensor at its type's bytes per block, aligned as GGUF aligns them."""
    import gguf

    from localchat.gguf_file import read_gguf

    h = read_gguf(f16)
    n_layers = int(h.arch_value("block_count"))
    tied = not any(t.name == "output.weight" for t in h.tensors)
    types, size = {}, h.data_offset
    for t in h.tensors:
        types[t.name] = q4_k_m_type(t.name, t.shape, t.type_name, n_layers, tied)
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types[t.name]]]
        nbytes = math.prod(t.shape) // block * block_bytes
        size += -(-nbytes // GGUF_ALIGNMENT) * GGUF_ALIGNMENT
    return types, size


def convert_and_quantize(ckpt: Path, f16: Path, q4: Path, key: str,
                         after_f16: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """Figures `{key}_*` of one big checkpoint: its size, the F16 conversion's wall time and peak RSS
    (its own process), the Q4_K_M quantization's time and the file's size against llama.cpp's mix.
    `after_f16` runs once the F16 file is written (to free the checkpoint's disk); the F16 file is deleted."""
    from localchat.convert.quantize import quantize
    from localchat.gguf_file import read_gguf

    size = sum(p.stat().st_size for p in ckpt.glob("*.safetensors")) / 1e9
    print(f"\n{ckpt.name} ({size:.1f} GB of shards):")
    o_wall, o_rss = ours(ckpt, f16)
    after_f16()
    print(f"F16 conversion: {o_wall:.0f} s, peak RSS {o_rss:.2f} GB (goal: under {PEAK_RSS_GOAL_GB:.0f} GB) "
          f"{'PASS' if o_rss < PEAK_RSS_GOAL_GB else 'FAIL'}")
    try:
        t0 = time.perf_counter()
        quantize(f16, q4, "Q4_K_M")
        took = time.perf_counter() - t0
        types, expected = q4_k_m_expected(f16)
    finally:
        f16.unlink(missing_ok=True)
    got = {t.name: t.type_name for t in read_gguf(q4).tensors}
    differ = sorted(n for n in types if got.get(n) != types[n]) + sorted(set(got) - set(types))
    actual = q4.stat().st_size
    mix = ", ".join(f"{n} {k}" for k, n in sorted(Counter(got.values()).items()))
    print(f"Q4_K_M: {actual / 1e9:.3f} GB, expected {expected / 1e9:.3f} GB from llama.cpp's type mix "
          f"({actual / expected:.4f}x); tensors: {mix}; quantized in {took:.0f} s"
          + (f"; {len(differ)} tensors not of the expected type: {', '.join(differ[:6])}" if differ else ""))
    return {f"{key}_checkpoint_gb": figure(size, "GB"), f"{key}_f16_wall": figure(o_wall, "s"),
            f"{key}_f16_rss": figure(o_rss, "GB", f"peak RSS of the F16 conversion; goal: under "
                                                  f"{PEAK_RSS_GOAL_GB:.0f} GB"),
            f"{key}_q4_quantize_s": figure(took, "s"),
            f"{key}_q4_gb": figure(actual / 1e9, "GB", f"the Q4_K_M file; tensors: {mix}"),
            f"{key}_q4_expected_gb": figure(expected / 1e9, "GB", "header + each tensor at the type llama.cpp's "
                                            "Q4_K_M mix gives it" + (f"; {len(differ)} tensors of another type"
                                                                      if differ else "; every tensor of that type")),
            f"{key}_q4_vs_expected": figure(actual / expected, "x", "file size / expected size")}


def big_finetune(args: argparse.Namespace) -> dict[str, dict]:
    big = make_checkpoint(CACHE / f"{args.shape}-shaped-random", args.shape)
    print(f"\nfine-tune export of the {args.shape}-shaped checkpoint with a random rank-16 adapter:")
    return finetune_export(big, args.workdir)


def big_imatrix(args: argparse.Namespace) -> dict[str, dict]:
    return imatrix_convert(make_checkpoint(CACHE / f"{args.shape}-shaped-random", args.shape), args.workdir,
                           args.imatrix_calibration)


def big_run(args: argparse.Namespace) -> dict[str, dict]:
    """The 7B-shaped checkpoint (cached): F16 conversion, Q4_K_M, decode against the bandwidth bound."""
    q4 = args.workdir / f"{args.shape}-Q4_K_M.gguf"  # kept, so --decode-only can measure again
    figures: dict[str, dict] = {}
    if not args.decode_only or not q4.is_file():
        big = make_checkpoint(CACHE / f"{args.shape}-shaped-random", args.shape)
        figures.update(convert_and_quantize(big, args.workdir / f"{args.shape}-F16.gguf", q4, "big"))
    per_token = bytes_per_token(q4)
    figures.setdefault("big_q4_gb", figure(q4.stat().st_size / 1e9, "GB", "the Q4_K_M file"))
    figures["big_bytes_per_token_gb"] = figure(per_token / 1e9, "GB",
                                               "tensor bytes read per decoded token (all but token_embd)")
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


def scale_run(shape: str, workdir: Path, keep: bool) -> dict[str, dict]:
    """One --scale shape, alone on the disk: the checkpoint is made (streamed, a shard at a time), converted,
    and deleted once the F16 file is written; the F16 file once quantized; the Q4_K_M once measured
    (all kept with `keep`, the checkpoint then reused by the next run)."""
    from localchat.fsutil import check_disk

    folder = CACHE / f"{shape}-shaped-random"
    n_bytes = sum(math.prod(d) for _, d in checkpoint_tensors(SHAPES[shape][0])) * 2
    made = (folder / "model.safetensors.index.json").is_file()
    # The checkpoint (unless kept from before), then the F16 file beside it, then F16 and Q4_K_M together.
    check_disk(workdir, (0 if made else n_bytes) + n_bytes + n_bytes // 3, f"the {shape}-shaped run")
    q4 = workdir / f"{shape}-Q4_K_M.gguf"
    try:
        t0 = time.perf_counter()
        make_checkpoint(folder, shape)
        if not made:
            print(f"made {folder} in {time.perf_counter() - t0:.0f} s")
        return convert_and_quantize(folder, workdir / f"{shape}-F16.gguf", q4, shape,
                                    after_f16=lambda: None if keep else shutil.rmtree(folder))
    finally:
        shutil.rmtree(folder.with_name(folder.name + ".tmp"), ignore_errors=True)  # an interrupted make
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
            q4.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="HF folder to compare on (default: the starter checkpoint)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of each comparison")
    ap.add_argument("--no-families", action="store_true", help="leave out the per-family rows")
    ap.add_argument("--big", action="store_true", help="also run the LLaMA-2-7B-shaped checkpoint "
                    "(first time ~20 min and 30 GB of disk to make it; cached)")
    ap.add_argument("--shape", choices=list(SHAPES), default="llama2-7b",
                    help="with --big: the checkpoint's shape (small: a quick check of this path)")
    ap.add_argument("--decode-only", action="store_true", help="with --big: reuse the kept Q4_K_M file")
    ap.add_argument("--finetune-export", action="store_true", help="the fine-tune export rows only, on the "
                    "--shape checkpoint (make bench's finetune_export)")
    ap.add_argument("--imatrix", action="store_true", help="the importance-weighted convert row only, on the "
                    "--shape checkpoint (--big runs it too)")
    ap.add_argument("--imatrix-calibration", type=Path, help="the calibration file of the --imatrix row "
                    "(default: the shipped set, 20 rows of 512 tokens with the 7B shape's tokenizer)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--scale", nargs="+", choices=list(SHAPES), default=[], metavar="SHAPE",
                    help="also make, convert and quantize these shapes one at a time (qwen3-8b, llama3.1-8b: "
                         "~16 GB checkpoint + 16 GB F16 + 5 GB Q4_K_M at the peak, ~10 min each), deleting "
                         "each's files after measuring; *-small ones check the path in a minute")
    ap.add_argument("--keep", action="store_true", help="with --scale: keep the checkpoints and Q4_K_M files")
    ap.add_argument("--threads", type=int, default=None, help="decode threads and bandwidth readers "
                    "(default: physical cores, as localchat uses)")
    ap.add_argument("--workdir", type=Path, default=CACHE / "bench")
    args = ap.parse_args(argv)
    if args.threads is None:
        import psutil

        args.threads = psutil.cpu_count(logical=False) or 1
    from localchat.store import default_store, install_starter

    args.workdir.mkdir(parents=True, exist_ok=True)
    entry = install_starter(default_store(), quiet=True)
    starter = starter_hf(default_store().path_of(entry.files[0].path))
    args.checkpoint = args.checkpoint or starter
    settings = {"checkpoint": args.checkpoint.name, "rounds": args.rounds, "threads": args.threads,
                "big": args.big or args.decode_only, "shape": args.shape if args.big or args.decode_only else None,
                "decode_tokens": args.decode_tokens,
                "imatrix_calibration": args.imatrix_calibration.name if args.imatrix_calibration else "shipped"}
    if (args.finetune_export or args.imatrix) and not args.big:  # those rows alone
        figures = big_finetune(args) if args.finetune_export else {}
        return report({**settings, "shape": args.shape}, {**figures, **(big_imatrix(args) if args.imatrix else {})})
    print(f"F16 conversion of {args.checkpoint.name}, median (min-max) of {args.rounds} alternating rounds:")
    figures = compare_f16(args.checkpoint, args.workdir, args.rounds)
    if not args.no_families:
        settings["families"], more = family_rows(args.workdir, starter, args.rounds)
        figures.update(more)
    if args.big or args.decode_only:
        figures.update(big_run(args))
    if args.big:
        if args.finetune_export:  # only when asked: make bench runs them as a bench of their own (finetune_export)
            figures.update(big_finetune(args))
        figures.update(big_imatrix(args))
    if args.scale:
        settings["scale"] = {}
        for shape in args.scale:  # one at a time: each alone fills most of a shared disk
            c = SHAPES[shape][0]
            n_params = sum(math.prod(d) for _, d in checkpoint_tensors(c))
            settings["scale"][shape] = {"architecture": c["architectures"][0], "layers": c["num_hidden_layers"],
                                        "hidden": c["hidden_size"], "vocab": c["vocab_size"],
                                        "params_b": round(n_params / 1e9, 2)}
            figures.update(scale_run(shape, args.workdir, args.keep))
    return report(settings, figures)


if __name__ == "__main__":
    main()
