"""README.md's benchmark section, generated from bench/results.json so it cannot drift from
what was measured: every figure in it is a figure in the file, printed as the file holds it
(median, and min–max over the n alternating rounds where a bench repeats).

    python bench/readme.py            # rewrite the section between the markers in README.md
    python bench/readme.py --check    # exit 1 if README.md's section differs from the file

tests/test_bench_results.py checks the README against the file the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import fmt  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results.json"
README = BENCH_DIR.parent / "README.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

Bench = dict[str, Any]


def _f(b: Bench, name: str, digits: int = 2, spread: bool = True) -> str:
    return fmt(b["figures"][name], digits, spread)


def _v(b: Bench, name: str, digits: int = 2) -> str:
    """A figure's value alone, for table cells whose spread is printed elsewhere or is none."""
    return f"{b['figures'][name]['value']:.{digits}f}"


def runtime(b: Bench) -> list[str]:
    s = b["settings"]
    rows = [("decode tok/s", "decode_tok_s", 1), ("prompt tok/s", "prompt_tok_s", 1),
            ("time to first token", "ttft_ms", 0), ("peak RSS", "peak_rss_mb", 0)]
    lines = [f"`bench/bench_runtime.py`: localchat's chat path against raw llama-cpp-python "
             f"(`Llama.generate`, nothing else) on {s['model']} {s['quant']}, {s['threads']} threads, "
             f"a {s['prompt_tokens']}-token prompt and {s['completion_tokens']} tokens generated; each side "
             f"in its own processes, {s['rounds']} alternating rounds, each the median of {s['reps']} runs "
             "after a warm-up.", "",
             "| | raw llama-cpp-python | localchat | localchat / raw |", "|---|---|---|---|"]
    lines += [f"| {label} | {_f(b, 'raw_' + k, d)} | {_f(b, 'localchat_' + k, d)} | {_f(b, 'ratio_' + k, 3)} |"
              for label, k, d in rows]
    return lines


def serve(b: Bench) -> list[str]:
    s = b["settings"]
    clients = ", ".join(map(str, s["clients"][:-1])) + (" and " if len(s["clients"]) > 1 else "") + str(s["clients"][-1])
    model = s.get("model", "the starter")
    model = "a random-weight 1.1B LLaMA-shaped Q4_K_M model" if model == "llama-1b" else model
    lines = [f"`bench/bench_serve.py` on {model}: `localchat serve` under {clients} concurrent "
             f"streaming clients (the `openai` package, {s['max_tokens']} tokens an answer) against the same "
             f"requests generated in-process one after another on the one-sequence path, no HTTP; "
             f"{s['rounds']} alternating rounds. The server decodes up to {s.get('parallel', 1)} requests in "
             "one llama.cpp batch (continuous batching)." + (
                 f" The anchor is llama.cpp's own llama-server (`-np {s['parallel']}`) on the same file, prompts "
                 "and client, taking its turn in every round, without its prompt cache (`cache_prompt: false`; "
                 "localchat and the in-process side evaluate every prompt, and every round sends the same "
                 "ones). Both sides run llama.cpp's flash attention." if s.get("llama_server") else ""), "",
             "| clients | requests | server tok/s | in-process tok/s | server / in-process | TTFT p50 "
             "| TTFT p95 |" + (" llama-server tok/s | llama-server / in-process | server / llama-server |"
                                if s.get("llama_server") else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if s.get("llama_server") else "")]
    for c in s["clients"]:
        k = f"c{c}_"
        lines.append(f"| {c} | {c * s['per_client']} | {_f(b, k + 'server_tok_s', 1)} | "
                     f"{_f(b, k + 'inprocess_tok_s', 1)} | {_f(b, k + 'ratio', 3)} | "
                     f"{_f(b, k + 'ttft_p50', 0, False)} | {_f(b, k + 'ttft_p95', 0, False)} |"
                     + (f" {_f(b, k + 'llama_server_tok_s', 1)} | {_f(b, k + 'llama_server_ratio', 3)} | "
                        f"{_f(b, k + 'vs_llama_server', 3)} |" if s.get("llama_server") else ""))
    return lines


def quant_ppl(b: Bench) -> list[str]:
    s = b["settings"]
    lines = [f"`bench/bench_quant_ppl.py`: what each llama.cpp quant type costs on {s['model']}, "
             f"perplexity on {s['tokens_scored']} tokens of {s['text']} against F16 in the same run. "
             f"The F16 \"full precision\" is {s['source']}: these figures say what requantizing that "
             "costs, not what quantizing a trained fp16 model would.", "",
             "| type | size MB | perplexity | vs F16 | KL divergence | same top token |",
             "|---|---|---|---|---|---|",
             f"| F16 | {_v(b, 'F16_size_mb', 1)} | {_v(b, 'F16_ppl', 3)} | | | |"]
    lines += [f"| {q} | {_v(b, q + '_size_mb', 1)} | {_v(b, q + '_ppl', 3)} | {_f(b, q + '_ppl_ratio', 4)} | "
              f"{_v(b, q + '_kld', 4)} | {_f(b, q + '_top1', 1)} |" for q in s["types"]]
    if s.get("imatrix_types"):
        lines += ["", f"Plain llama.cpp quantization against localchat's, weighted by an importance matrix from "
                      f"{s['imatrix_rows']} rows of {s['imatrix_row_tokens']} tokens of the chat calibration set "
                      f"({_f(b, 'imatrix_s', 0)} in torch), on held-out text the calibration never saw: "
                      f"{' and '.join(f'`{t}`' for t in s['held_out'])}. Same caveat: the source is {s['source']}.",
                  "", "| type | | size MB | chat KLD | chat ppl / F16 | chat top-1 | prose KLD | prose ppl / F16 "
                  "| prose top-1 |", "|---|---|---|---|---|---|---|---|---|"]
        for q in s["imatrix_types"]:
            for side in ("plain", "imatrix"):
                k = f"{q}_{side}_"
                lines.append(f"| {q} | {side} | {_v(b, k + 'size_mb', 1)} | " + " | ".join(
                    f"{_v(b, k + t + '_kld', 4)} | {_f(b, k + t + '_ppl_ratio', 4)} | {_f(b, k + t + '_top1', 1)}"
                    for t in ("chat", "prose")) + " |")
            lines.append(f"| {q} | KLD cut | | {_f(b, q + '_chat_kld_cut', 1)} | | | {_f(b, q + '_prose_kld_cut', 1)} "
                         "| | |")
        if s.get("auto_mix"):
            k = "AUTO_imatrix_"
            lines += [f"| auto | imatrix | {_v(b, k + 'size_mb', 1)} | " + " | ".join(
                f"{_v(b, k + t + '_kld', 4)} | {_f(b, k + t + '_ppl_ratio', 4)} | {_f(b, k + t + '_top1', 1)}"
                for t in ("chat", "prose")) + " |"] + [
                f"| auto | KLD cut vs {side} Q4_K_M | | {_f(b, f'AUTO_chat_kld_cut_{side}', 1)} | | | "
                f"{_f(b, f'AUTO_prose_kld_cut_{side}', 1)} | | |" for side in ("plain", "imatrix")]
            lines += ["", "`auto` is `--quant auto --size` at the plain Q4_K_M file's size: each layer weight's type "
                          "chosen by its measured sensitivity (convert/automix.py)."]
    return lines


def _shaped(shape: str) -> str:
    """The --big checkpoint as the text names it: 7B-shaped, or a smaller check of the same path."""
    return "a LLaMA-2-7B-shaped" if shape == "llama2-7b" else f"a {shape}-shaped (not 7B: a check)"


def convert(b: Bench) -> list[str]:
    s = b["settings"]
    lines = [f"`bench/bench_convert.py`: F16 conversion of {s['checkpoint']} by localchat and by llama.cpp's "
             f"`convert_hf_to_gguf.py`, each in its own process, {s['rounds']} alternating rounds after a "
             "warm-up.", "",
             "| | wall time | peak RSS |", "|---|---|---|",
             f"| convert_hf_to_gguf.py | {_f(b, 'ref_wall', 1)} | {_f(b, 'ref_rss')} |",
             f"| localchat | {_f(b, 'ours_wall', 1)} | {_f(b, 'ours_rss')} |",
             f"| localchat / reference | {_f(b, 'wall_ratio', 3)} | {_f(b, 'rss_ratio', 3)} |"]
    if s.get("big"):
        shape = _shaped(s["shape"])
        made = (f" ({_f(b, 'big_checkpoint_gb', 1)} of fp16 shards) converts to F16 in "
                f"{_f(b, 'big_f16_wall', 0)} with a peak RSS of {_f(b, 'big_f16_rss')}; Q4_K_M takes "
                f"{_f(b, 'big_q4_quantize_s', 0)} and") if "big_f16_wall" in b["figures"] else ""
        lines += ["", f"With `--big`, {shape} random checkpoint{made} gives a {_f(b, 'big_q4_gb')} file. It "
                  f"decodes at {_f(b, 'big_decode_tok_s')} with {s['threads']} threads. An estimated "
                  f"memory-bandwidth bound, measured alternately with decode: {s['threads']} threads "
                  f"reading at once pull {_f(b, 'big_bandwidth_gbs', 1)}, and decode reads "
                  f"{_f(b, 'big_bytes_per_token_gb')} a token (every tensor but the token embeddings), "
                  f"so at most about {_f(b, 'big_bound_tok_s')}; decode / bound "
                  f"{_f(b, 'big_decode_vs_bound')}. The bound leaves out the KV cache and compute, so it is "
                  "an estimate, not a ceiling."]
        if "big_im_wall" in b["figures"]:
            lines += ["", f"`localchat convert` of that checkpoint to an importance-weighted Q4_K_M (F16, the "
                      f"importance pass: {b['figures']['big_im_imatrix_s']['note'].split(': ', 1)[1]}, then Q4_K_M; "
                      f"the after-export check off) takes {_f(b, 'big_im_wall', 0)}, of which the importance pass "
                      f"{_f(b, 'big_im_imatrix_s', 0)}, at a peak RSS of {_f(b, 'big_im_rss')} (goal: under 4 GB), "
                      f"and gives a {_f(b, 'big_im_q4_gb')} file."]
    return lines + convert_families(b) + convert_scale(b)


def finetune_export(b: Bench) -> list[str]:
    s = b["settings"]
    shape = _shaped(s["shape"])
    return [f"`bench/bench_convert.py --finetune-export`: `localchat finetune`'s export path on {shape} random "
            "checkpoint (fp16) with a random rank-16 adapter on every linear layer, each step in its own process: "
            "base + adapter merged tensor by tensor into the GGUF writer (F16), the importance pass over the "
            "shipped calibration set on that merge, then Q4_K_M weighted by it (the after-export check off), "
            f"takes {_f(b, 'big_ft_export_wall', 0)} at a peak RSS of {_f(b, 'big_ft_export_rss')} (goal: "
            f"under 4 GB) and gives a {_f(b, 'big_ft_export_gb')} file. `--save-merged`'s folder "
            f"({_f(b, 'big_ft_merged_gb', 1)}, the base's dtype) takes {_f(b, 'big_ft_merged_wall', 0)} at "
            f"{_f(b, 'big_ft_merged_rss')}; dequantizing the Q4_K_M file back to bf16, as a GGUF-only base is for "
            f"training ({_f(b, 'big_ft_dequant_gb', 1)}), takes {_f(b, 'big_ft_dequant_wall', 0)} at "
            f"{_f(b, 'big_ft_dequant_rss')}."]


def convert_families(b: Bench) -> list[str]:
    """A row per family, when the run had them: F16 conversion of its tiny example against the reference."""
    families = b["settings"].get("families")
    if not families:
        return []
    lines = ["", "Per family, the same comparison on each architecture's first tiny example (its real config "
             "shape at a few layers, `tests/checkpoints.py`), with the full vocabulary of the tokenizer its tests "
             "use, so the time goes mostly to the vocabulary and metadata:", "",
             "| architecture (example, vocabulary) | reference wall | localchat wall | wall ratio | reference RSS "
             "| localchat RSS | RSS ratio |", "|---|---|---|---|---|---|---|"]
    for arch, f in families.items():
        k = arch + "_"
        lines.append(f"| {arch} ({f['example']}, {f['vocab']} tokens) | {_f(b, k + 'ref_wall', 1, False)} | "
                     f"{_f(b, k + 'ours_wall', 1, False)} | {_f(b, k + 'wall_ratio', 3)} | "
                     f"{_f(b, k + 'ref_rss', 2, False)} | {_f(b, k + 'ours_rss', 2, False)} | "
                     f"{_f(b, k + 'rss_ratio', 3)} |")
    return lines


def convert_scale(b: Bench) -> list[str]:
    """The --scale shapes, when the run had them: conversion memory and the Q4_K_M file against the expected size."""
    shapes = b["settings"].get("scale")
    if not shapes:
        return []
    lines = ["", "With `--scale`, Qwen3-8B- and Llama-3.1-8B-shaped checkpoints: random weights in each real config "
             "(layers, widths, GQA, vocabulary, untied output), made a shard at a time and deleted after measuring: "
             "F16 conversion in its own process (goal: a peak RSS under 3 GB), "
             "then Q4_K_M, its size set against the size llama.cpp's Q4_K_M type mix gives these tensor shapes.", "",
             "| shape | architecture | parameters | checkpoint | F16 wall | F16 peak RSS | Q4_K_M | expected "
             "| file / expected |", "|---|---|---|---|---|---|---|---|---|"]
    for shape, s in shapes.items():
        k = shape + "_"
        lines.append(f"| {shape} | {s['architecture']} ({s['layers']} layers, {s['hidden']} wide, {s['vocab']} "
                     f"vocabulary) | {s['params_b']:.2f} B | {_f(b, k + 'checkpoint_gb', 1)} | "
                     f"{_f(b, k + 'f16_wall', 0)} | {_f(b, k + 'f16_rss')} | {_f(b, k + 'q4_gb', 3)} | "
                     f"{_f(b, k + 'q4_expected_gb', 3)} | {_f(b, k + 'q4_vs_expected', 4)} |")
    return lines


def gptq(b: Bench) -> list[str]:
    s = b["settings"]
    names = {"chats": "chats (template tokens included)", "stories": "stories", "GPL-3 prose": "GPL-3 prose"}
    lines = [f"`bench/bench_gptq.py`: `--to gptq`'s own code on {s['source']} ({s['bits']}-bit, group size "
             f"{s['group_size']}, {s['samples']} calibration rows of up to {s['seq_len']} tokens) against plain "
             f"round-to-nearest on the same grid; both use the {s['scales']}, so GPTQ's error "
             "compensation is all that differs. Scored on text the calibration never saw (the shipped chats, "
             "`tests/data_eval_prose.txt`, GPL-3 prose). Full precision is the shipped Q4_1 starter "
             f"dequantized. Quantization took {_f(b, 'quantize_s', 0)}.", "",
             "| text | full precision ppl | RTN / fp | GPTQ / fp | KLD RTN | KLD GPTQ | top-1 RTN | top-1 GPTQ |",
             "|---|---|---|---|---|---|---|---|"]
    for label in s["texts"]:
        k = label.split()[0].lower().replace("-", "")
        lines.append(f"| {names.get(label, label)} | {_v(b, k + '_fp_ppl', 3)} | {_f(b, k + '_rtn_ratio', 3)} | "
                     f"{_f(b, k + '_gptq_ratio', 3)} | {_v(b, k + '_rtn_kld', 3)} | {_v(b, k + '_gptq_kld', 3)} | "
                     f"{_f(b, k + '_rtn_top1', 1)} | {_f(b, k + '_gptq_top1', 1)} |")
    return lines


def finetune(b: Bench) -> list[str]:
    s = b["settings"]
    labels = {"trainer": "Trainer + PEFT, padded batches", "localchat": "localchat, same batches",
              "localchat_packed": "localchat, packed, same steps"}
    lines = [f"`bench/bench_finetune.py`: LoRA r={s['lora_r']} on {s['model']}, one epoch over {s['rows']} "
             f"conversations ({s['tokens']} tokens), against a transformers Trainer + PEFT loop at the same "
             f"precision, learning-rate schedule and {s['steps']} optimizer steps: the Trainer and \"same "
             f"batches\" take {s['batch']} rows a step; \"packed\" packs the rows into sequences of up to "
             f"{s['packed_len']} tokens, one a step. Each side in its own process, {s['rounds']} rounds in "
             f"turn. Held-out loss (float32, on the {s['held_out_rows']} calibration conversations, none "
             f"trained on) shows speed was not bought with learning; untrained: "
             f"{_v(b, 'untrained_held_out', 3)}.", "",
             "| precision | run | steps | tokens/s | vs Trainer | peak RSS | RSS vs Trainer | held-out loss |",
             "|---|---|---|---|---|---|---|---|"]
    for p in s["precisions"]:
        for side, label in labels.items():
            k = f"{p}_{side}"
            vs = ("", "") if side == "trainer" else (_f(b, k + "_speed_ratio"), _f(b, k + "_rss_ratio"))
            lines.append(f"| {p} | {label} | {_v(b, k + '_steps', 0)} | {_f(b, k + '_tok_s', 0)} | {vs[0]} | "
                         f"{_f(b, k + '_rss')} | {vs[1]} | {_f(b, k + '_held_out', 3, False)} |")
    if "bf16" not in s["precisions"]:
        lines += ["", "No bf16 rows: " + ("this run left them out." if s["native_bf16"] else
                                          "this CPU has no native bf16 units (localchat trains in float32 there).")]
    return lines


def ui(b: Bench) -> list[str]:
    s = b["settings"]
    return [f"`bench/bench_ui.py`: decode speed inside the app, answered in headless Chromium on the same "
            f"cores, against the same greedy {s['max_tokens']}-token answer in a plain process, "
            f"{s['rounds']} alternating rounds after a warm-up: {_f(b, 'app_tok_s', 1)} against "
            f"{_f(b, 'plain_tok_s', 1)}, {_f(b, 'ratio')}."
            + (f" Meanwhile the browser used {_f(b, 'browser_cores', 3)} (what the page takes from "
               "the decode; other work on the machine moves it far less than the ratio)."
               if "browser_cores" in b["figures"] else "")]


def recall(b: Bench) -> list[str]:
    s = b["settings"]
    facts = s["facts"]
    preset = ", ".join(f"{k} {v:g}" for k, v in s["sampling"].items())
    lines = [f"`bench/bench_recall.py`: does `localchat finetune` teach? {len(facts)} invented facts "
             f"({', '.join(facts)}), {s['rows_per_fact']} chat rows each, then {s['paraphrases']} paraphrased "
             f"questions no row holds, asked {s['seeds']} times at the starter's preset ({preset}) and once "
             f"greedily of the exported {s['export']} model; an answer counts when it holds the fact's key "
             f"word. {s['general']} general questions show what training cost: the starter answers "
             f"{_v(b, 'starter_general', 0)}% of them right. "
             + (f"Each row is the median (min–max) over fine-tunes with seeds {s['train_seeds']}. "
                if len(s["train_seeds"]) > 1 else f"Each row is one fine-tune (seed {s['train_seeds'][0]}). ")
             + "\"before\" passes the defaults of before issue 13 (rows "
             "packed side by side are kept apart in both). Both bases are the starter, whose only weights are "
             "its Q4_1 GGUF: \"hf\" a float32 HF folder of them, \"gguf\" the store model by name, which "
             "`localchat finetune` dequantizes itself (no second real model is available offline).", "",
             "| base | run | updates | paraphrases recalled | greedy | " + " | ".join(facts)
             + " | general kept |", "|---" * (6 + len(facts)) + "|"]
    for base in s["bases"]:
        for run in s["runs"]:
            k = f"{base}_{run.replace('-', '_')}"
            lines.append(f"| {base} | {run} | {_v(b, k + '_updates', 0)} | {_f(b, k + '_recall', 0)} | "
                         f"{_f(b, k + '_greedy', 0)} | " + " | ".join(_f(b, f"{k}_{f}", 0) for f in facts)
                         + f" | {_f(b, k + '_general', 0)} |")
    return lines


WRITERS: dict[str, Callable[[Bench], list[str]]] = {
    "runtime": runtime, "serve": serve, "serve_1b": serve, "quant_ppl": quant_ppl, "convert": convert,
    "finetune_export": finetune_export, "gptq": gptq,
    "finetune": finetune, "ui": ui, "recall": recall}


def _machine(m: dict[str, Any]) -> str:
    gpus = f", {', '.join(m['gpus'])}" if m.get("gpus") else ", no GPU"
    return f"{m['cpu']} ({m['physical_cores']} cores, {m['memory_gib']} GiB){gpus}"


def render(results: dict[str, Any]) -> str:
    """The section between the markers (markers excluded), from the results file's contents."""
    benches = results.get("benches", {})
    out = ["", "_Generated by `bench/readme.py` from `bench/results.json`; `make bench` reruns every benchmark "
           "(`make bench BENCH_ARGS=\"--only NAME\"` one) and rewrites both. Figures are medians, with the "
           "min–max over n alternating rounds where a bench repeats._", ""]
    if results.get("provisional"):
        out += ["> **Provisional figures**: some of these come from smoke runs with the smallest settings "
                "(`--quick`) or from a busy machine; they show the benchmarks work, not what localchat "
                "achieves. Marked *provisional* below.", ""]
    machines = sorted({_machine(b["machine"]) for b in benches.values() if b.get("machine")})
    commits = sorted({b["versions"]["localchat"] for b in benches.values() if b.get("versions")})
    if machines:
        out += [f"Measured on {'; '.join(machines)}; localchat {', '.join(commits)}.", ""]
    for name, writer in WRITERS.items():
        b = benches.get(name)
        if b is None:
            out += [f"`{name}`: not run yet.", ""]
            continue
        tag = f" *({'provisional, ' if b.get('provisional') else ''}{b['date']}, took {b.get('seconds', '?')} s)*"
        if b.get("status") != "ok":
            out += [f"`{name}` failed on its last run{tag}: `{b.get('error', 'no error recorded')}`", ""]
            continue
        body = writer(b)
        out += [body[0] + tag, *body[1:], ""]
    return "\n".join(out)


def splice(readme: str, section: str) -> str:
    """`readme` with the text between the markers replaced by `section`."""
    try:
        head, rest = readme.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise SystemExit(f"{README}: no {BEGIN} ... {END} markers") from None
    return head + BEGIN + section + END + tail


def section_of(readme: str) -> str:
    return readme.split(BEGIN, 1)[1].split(END, 1)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md is out of date")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    section = render(json.loads(args.results.read_text(encoding="utf-8")))
    readme = README.read_text(encoding="utf-8")
    if args.check:
        same = section_of(readme) == section
        print(f"{README}: benchmark section {'matches' if same else 'differs from'} {args.results}")
        return 0 if same else 1
    new = splice(readme, section)
    if new != readme:
        from localchat.fsutil import atomic_write_text

        atomic_write_text(README, new)
    print(f"{README}: benchmark section written from {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
