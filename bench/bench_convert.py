"""Conversion cost against llama.cpp's reference converter, and a 7B-sized run.

1. F16 conversion wall time and peak RSS of `localchat convert`'s writer and of
   `convert_hf_to_gguf.py` (from the llama-cpp-python sdist) on the same checkpoint, each
   in its own process, in one run; ratios are ours / reference.
2. `--big`: a LLaMA-2-7B-shaped random checkpoint (fp16 safetensors shards, ~13.5 GB, cached
   per machine) converts with peak RSS under 3 GB; its Q4_K_M file is about 4.1 GB; its
   decode speed on this CPU is reported against the memory-bandwidth bound (bandwidth
   measured in the same run divided by the file size).

    python bench/bench_convert.py [--big] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.checkpoints import CACHE, spm_tokenizer, starter_hf  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, vocab_size=32000)


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return wall, usage.ru_maxrss / 1024**2


def ours(ckpt: Path, out: Path) -> tuple[float, float]:
    code = ("from localchat.convert.checkpoint import load_checkpoint\n"
            "from localchat.convert.to_gguf import convert_to_gguf\n"
            f"convert_to_gguf(load_checkpoint({str(ckpt)!r}), {str(out)!r}, 'f16', quiet=True)\n")
    return run_measured([sys.executable, "-c", code])


def reference(ckpt: Path, out: Path) -> tuple[float, float]:
    script = CACHE / "sdist" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{script} is missing: run the test suite once (it fetches the sdist)")
    env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    return run_measured([sys.executable, str(script), str(ckpt), "--outtype", "f16", "--outfile", str(out)], env)


def make_7b(folder: Path) -> Path:
    """A LLaMA-2-7B-shaped checkpoint of random fp16 weights, sharded like the real one."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    c = LLAMA2_7B
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
    (tmp / "config.json").write_text(json.dumps({**LLAMA2_7B, "architectures": ["LlamaForCausalLM"],
                                                 "model_type": "llama", "torch_dtype": "float16",
                                                 "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0,
                                                 "tie_word_embeddings": False}))
    spm_tokenizer(tmp)
    os.replace(tmp, folder)
    return folder


def bandwidth_gbs(gb: float = 1.0) -> float:
    """Memory read bandwidth, measured now: sum a buffer far larger than the caches."""
    import numpy as np

    a = np.ones(int(gb * 1e9 / 8))
    a.sum()
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def decode_tok_s(gguf: Path, tokens: int = 16) -> float:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=os.cpu_count(), verbose=False)
    ids = [1, 450, 4996, 17354]
    n, t_first = 0, 0.0
    for _tok in llm.generate(ids, temp=0.0):
        n += 1
        if n == 1:
            t_first = time.perf_counter()
        if n > tokens:
            break
    rate = (n - 1) / (time.perf_counter() - t_first)
    llm.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, help="HF folder to compare on (default: the starter checkpoint)")
    ap.add_argument("--big", action="store_true", help="also run the LLaMA-2-7B-shaped checkpoint (~20 min, 30 GB disk)")
    ap.add_argument("--decode-only", action="store_true", help="with --big: reuse the kept Q4_K_M file")
    ap.add_argument("--workdir", type=Path, default=CACHE / "bench")
    args = ap.parse_args(argv)
    from localchat.store import default_store, install_starter

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        entry = install_starter(default_store(), quiet=True)
        args.checkpoint = starter_hf(default_store().path_of(entry.files[0].path))
    print(f"F16 conversion of {args.checkpoint.name}:")
    o_wall, o_rss = ours(args.checkpoint, args.workdir / "ours.gguf")
    r_wall, r_rss = reference(args.checkpoint, args.workdir / "ref.gguf")
    print(f"{'':12s} {'wall s':>8s} {'peak RSS GB':>12s}")
    print(f"{'reference':12s} {r_wall:8.1f} {r_rss:12.2f}")
    print(f"{'localchat':12s} {o_wall:8.1f} {o_rss:12.2f}")
    print(f"{'ratio':12s} {o_wall / r_wall:8.3f} {o_rss / r_rss:12.3f}   (below 1: faster / less memory)")
    for f in ("ours.gguf", "ref.gguf"):
        (args.workdir / f).unlink(missing_ok=True)
    if not (args.big or args.decode_only):
        return 0

    from localchat.convert.quantize import quantize

    q4 = args.workdir / "llama2-7b-Q4_K_M.gguf"  # kept, so --decode-only can measure again
    if not args.decode_only or not q4.is_file():
        big = make_7b(CACHE / "llama2-7b-shaped-random")
        f16 = args.workdir / "llama2-7b-F16.gguf"
        size = sum(p.stat().st_size for p in big.glob("*.safetensors")) / 1e9
        print(f"\nLLaMA-2-7B-shaped checkpoint ({size:.1f} GB):")
        o_wall, o_rss = ours(big, f16)
        print(f"F16 conversion: {o_wall:.0f} s, peak RSS {o_rss:.2f} GB (goal: under 3 GB) "
              f"{'PASS' if o_rss < 3 else 'FAIL'}")
        t0 = time.perf_counter()
        quantize(f16, q4, "Q4_K_M")
        print(f"Q4_K_M: {q4.stat().st_size / 1e9:.2f} GB (goal: about 4.1 GB), "
              f"quantized in {time.perf_counter() - t0:.0f} s")
        f16.unlink()
    bw = bandwidth_gbs()
    rate = decode_tok_s(q4)
    bound = bw / (q4.stat().st_size / 1e9)
    print(f"decode {rate:.2f} tok/s; memory bandwidth {bw:.1f} GB/s -> bound {bound:.2f} tok/s; "
          f"ratio {rate / bound:.2f} (goal: at least 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
