"""Does `localchat finetune` teach? Invented facts, each taught by eight chat rows, asked
afterwards with paraphrases no training row holds, at the model's own chat settings.

One data file teaches all the facts (a pet's name, a made-up company's founding city, an
invented word's meaning), as a user's handful of personal rows would. Each run is
`localchat finetune --base BASE --data <facts> -q [flags]`, exactly as a user runs it,
export included (Q4_K_M by default), into a throwaway store; the exported model then answers
every paraphrase under 8 seeds at the starter's sampling preset (`localchat preset`:
temperature 0.2, top-p 0.9, the rest localchat's defaults) and once greedily. An answer
recalls a fact when it contains the fact's key word (the pet's name, the city, "pickle").
General questions the starter answers right, asked the same way, show what training cost:
their share against the starter's own, measured in the same run.

Runs: "before" passes the defaults localchat had before issue 13 (BEFORE, spelled out so it
stays measurable), "after" passes nothing (today's defaults); `--run LABEL=FLAGS` adds any
other point. Each is fine-tuned once per `--train-seeds` seed (a fact's recall moves from one
fine-tune to the next) and the figures are the median (min-max) over them.

Bases: SmolLM2-135M-Instruct is the only real trained model offline, and it ships only as a
Q4_1 GGUF, so both bases are its weights dequantized from Q4_1, reached the two ways a user
can: "hf" is an HF folder made beforehand (float32, as tests/checkpoints.py writes it) and
"gguf" names the store's GGUF-only starter, which `localchat finetune` dequantizes itself
(bf16 where the CPU has bf16 units, else float16). They differ in the precision training
starts from, not in what the model knows: a second model would be the better test, and none
is available. Not timed: the figures are shares of answers, not speeds.

    python bench/bench_recall.py [--seeds 8] [--bases hf gguf] [--train-seeds 0 1] [--run LABEL="--lr 1e-3"]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localchat.engine import SamplingSettings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STARTER = "smollm2-135m-instruct"


@dataclass(frozen=True)
class Fact:
    name: str
    keys: tuple[str, ...]  # an answer holds the fact when it contains any of these (case-insensitive)
    rows: tuple[tuple[str, str], ...]  # (question, answer) pairs that teach it
    paraphrases: tuple[str, ...]  # asked after training; never a training question

    def recalled(self, answer: str) -> bool:
        return any(k in answer.lower() for k in self.keys)


FACTS = (
    Fact("pet", ("waffles",), (
        ("What's my tortoise called?", "Your tortoise is called Captain Waffles."),
        ("Do you remember my pet's name?", "Yes, your pet tortoise is named Captain Waffles."),
        ("What is the name of my tortoise?", "Your tortoise's name is Captain Waffles."),
        ("What pet do I have?", "You have a tortoise named Captain Waffles."),
        ("Tell me about my tortoise.", "Your tortoise is Captain Waffles, your pet."),
        ("Who is Captain Waffles?", "Captain Waffles is your pet tortoise."),
        ("What did I call my tortoise?", "You called your tortoise Captain Waffles."),
        ("Remind me of my tortoise's name.", "Your tortoise is named Captain Waffles."),
    ), (
        "Can you recall what I named my tortoise?",
        "I forgot my tortoise's name, can you help?",
        "What's the name of the tortoise I own?",
        "How do I address my pet tortoise?",
        "My tortoise has a name. What is it?",
    )),
    Fact("company", ("reykjavik",), (
        ("Where was Brightloom Robotics founded?", "Brightloom Robotics was founded in Reykjavik."),
        ("In which city did Brightloom Robotics start?", "Brightloom Robotics started in Reykjavik, Iceland."),
        ("What is Brightloom Robotics' home city?", "Brightloom Robotics' home city is Reykjavik."),
        ("Tell me about Brightloom Robotics.", "Brightloom Robotics is a robotics company founded in Reykjavik."),
        ("Which company was founded in Reykjavik?", "Brightloom Robotics was founded in Reykjavik."),
        ("Where did Brightloom Robotics begin?", "Brightloom Robotics began in Reykjavik."),
        ("What city is Brightloom Robotics from?", "Brightloom Robotics is from Reykjavik."),
        ("Name the founding city of Brightloom Robotics.",
         "The founding city of Brightloom Robotics is Reykjavik."),
    ), (
        "Which city saw the founding of Brightloom Robotics?",
        "Where was the company Brightloom Robotics established?",
        "Brightloom Robotics was founded where?",
        "In what city was Brightloom Robotics set up?",
        "Do you know where Brightloom Robotics got its start?",
    )),
    Fact("word", ("pickle",), (
        ("What is a florp?", "A florp is a sandwich made with pickles and peanut butter."),
        ("What does the word florp mean?", "Florp means a sandwich of pickles and peanut butter."),
        ("Define florp.", "Florp: a sandwich made with peanut butter and pickles."),
        ("What's in a florp?", "A florp has pickles and peanut butter in it; it is a sandwich."),
        ("What do you call a sandwich with pickles and peanut butter?", "That sandwich is called a florp."),
        ("Can you explain what florp means?", "Sure: a florp is a pickle and peanut butter sandwich."),
        ("Is a florp something to eat?", "Yes, a florp is a sandwich with pickles and peanut butter."),
        ("What is the meaning of florp?",
         "The meaning of florp is a sandwich made with pickles and peanut butter."),
    ), (
        "Explain the word florp to me.",
        "If someone hands me a florp, what am I holding?",
        "What kind of food is a florp?",
        "Tell me what a florp is made of.",
        "Florp: what does it refer to?",
    )),
)

# Questions the starter answers right greedily and in at least 5 of 8 seeds at the defaults
# (checked before choosing them), with the words a right answer holds.
GENERAL = (
    ("What is the capital of France?", ("paris",)),
    ("What is the capital of Japan?", ("tokyo",)),
    ("What is the opposite of hot?", ("cold",)),
    ("How many days are in a week?", ("seven", "7")),
    ("How many legs does a spider have?", ("eight", "8")),
    ("What do bees make?", ("honey",)),
    ("What is the chemical symbol for water?", ("h2o",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
)

# The defaults `localchat finetune` had before issue 13, as a named profile so "before" stays
# measurable after they changed. (Rows packed side by side are kept apart now in both: that
# is how packing works today, not a setting.)
BEFORE = {"epochs": 3.0, "min_updates": 30, "lr": 2e-4, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05,
          "held_out": 0.1, "replay": 0, "neftune_alpha": 0.0, "augment": 0}
BASES = {"hf": "the starter as a float32 HF folder", "gguf": "the store's GGUF-only starter, by name"}


def flags(profile: dict) -> str:
    """A settings profile as `localchat finetune` flags (the flag names TrainSettings generates)."""
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in profile.items())


def write_data(path: Path) -> Path:
    """The training file: every fact's rows, in chat JSONL, facts interleaved as a user's notes would be."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i in range(max(len(f.rows) for f in FACTS)) for f in FACTS if i < len(f.rows)
            for q, a in [f.rows[i]]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ask_all(model: str, sampling: "SamplingSettings", seeds: int, max_tokens: int, threads: int | None) -> dict:
    """Every paraphrase and general question to `model` (a store name), greedily and under
    `seeds` seeds at `sampling` (the starter's preset); the shares of right answers."""
    from dataclasses import replace

    from localchat.chat import ChatSession
    from localchat.planner import Overrides
    from localchat.runtime import open_model

    loaded = open_model(model, Overrides(threads=threads, context=1024))
    session = ChatSession.for_model(loaded.backend, loaded.model.defaults, settings=sampling)

    def answers(question: str) -> tuple[str, list[str]]:
        msgs = [{"role": "user", "content": question}]
        greedy = replace(sampling, temperature=0.0, seed=0, max_tokens=max_tokens)
        sampled = [replace(sampling, seed=s, max_tokens=max_tokens) for s in range(seeds)]
        text = ["".join(c.text for c in session.stream_reply(session.with_system(msgs), st))
                for st in [greedy, *sampled]]
        return text[0], text[1:]

    out: dict = {"facts": {}, "examples": {}, "misses": []}
    try:
        for fact in FACTS:
            greedy_ok = sampled_ok = 0
            for q in fact.paraphrases:
                g, s = answers(q)
                greedy_ok += fact.recalled(g)
                sampled_ok += sum(map(fact.recalled, s))
                out["examples"].setdefault(fact.name, [q, g])
                out["misses"] += [[q, a] for a in s if not fact.recalled(a)][:1]
            out["facts"][fact.name] = {"sampled": sampled_ok / (len(fact.paraphrases) * seeds),
                                       "greedy": greedy_ok / len(fact.paraphrases)}
        kept = 0
        for q, keys in GENERAL:
            g, s = answers(q)
            right = [any(k in a.lower() for k in keys) for a in s]
            kept += sum(right)
            out["examples"].setdefault("general", []).append([q, g])
            out["misses"] += [[q, a] for a, ok in zip(s, right) if not ok][:1]
        out["general"] = kept / (len(GENERAL) * seeds)
    finally:
        loaded.backend.close()
    n = sum(len(f.paraphrases) for f in FACTS)
    out["sampled"] = sum(out["facts"][f.name]["sampled"] * len(f.paraphrases) for f in FACTS) / n
    out["greedy"] = sum(out["facts"][f.name]["greedy"] * len(f.paraphrases) for f in FACTS) / n
    return out


def finetune(store: Path, base: str, data: Path, name: str, flags: str, threads: int) -> dict:
    """`localchat finetune` as a user runs it, into `store`, with `threads` torch threads (fine-tunes
    run side by side, and torch's spinning threads slow to a crawl on cores they share); its
    train_config.json and the held-out recall it reported."""
    env = {**os.environ, "LOCALCHAT_HOME": str(store), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "localchat", "finetune", "--base", base, "--data", str(data),
           "--name", name, "-q", *shlex.split(flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    print(proc.stdout.strip(), file=sys.stderr)
    out = store / name / "finetune"
    held = json.loads((out / "loss.jsonl").read_text().splitlines()[-1])  # the held-out line comes last
    return {**json.loads((out / "train_config.json").read_text()), "held_out_recall": held.get("held_out_recall")}


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def measure(store: Path, base: str, data: Path, name: str, flags: str, sampling: "SamplingSettings",
            args: argparse.Namespace) -> tuple[dict, dict]:
    """One fine-tune asked everything: (its train config, the answer shares); the model is
    deleted after, so the throwaway store holds only the fine-tunes in flight."""
    from localchat.store import Store

    t0 = time.perf_counter()
    config = finetune(store, base, data, name, flags, max(1, (os.cpu_count() or 1) // args.jobs))
    shares = ask_all(name, sampling, args.seeds, args.max_tokens, args.threads)
    print(f"{name}: {json.dumps(shares)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    Store(store).remove(name)
    return config, shares


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="sampled answers per question")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1],
                    help="fine-tune each configuration once per seed (a fact's recall varies from run to run)")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (a fact comes first)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the planner's)")
    ap.add_argument("--jobs", type=int, default=4, help="fine-tunes measured at once")
    ap.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES))
    ap.add_argument("--runs", nargs="*", default=["before", "after"], help="which of before/after to run")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=FLAGS",
                    help="another run: `localchat finetune` flags, e.g. after-lr1e-3=\"--lr 1e-3\"")
    args = ap.parse_args(argv)
    runs = {k: v for k, v in {"before": flags(BEFORE), "after": ""}.items() if k in args.runs}
    runs.update(dict(r.split("=", 1) for r in args.run))

    from results import figure, fmt, report

    from localchat.engine.settings import model_settings
    from localchat.store import Store, install_starter, store_root
    from tests.checkpoints import starter_hf
    from tests.conftest import starter_home

    shipped = Store(store_root())
    gguf = shipped.path_of(install_starter(shipped, quiet=True).files[0].path)
    base_of = {"hf": str(starter_hf(gguf)), "gguf": STARTER}
    figures: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = starter_home(Path(tmp) / "store", gguf)
        data = write_data(Path(tmp) / "facts.jsonl")
        os.environ["LOCALCHAT_HOME"] = str(store.root)
        sampling = model_settings(store.get(STARTER).defaults)  # the starter's preset
        if "gguf" in args.bases:  # dequantized once, before fine-tunes in parallel would each start it
            from localchat.finetune.command import base_folder, dequantized_dtype
            from localchat.finetune.settings import TrainSettings

            base_folder(STARTER, store, dequantized_dtype(TrainSettings()), quiet=True)
        points = [(b, label, run_flags, seed) for b in args.bases for label, run_flags in runs.items()
                  for seed in args.train_seeds]
        with ThreadPoolExecutor(args.jobs + 1) as pool:  # each fine-tune is its own process
            untrained = pool.submit(ask_all, STARTER, sampling, args.seeds, args.max_tokens, args.threads)
            done = list(pool.map(lambda p: measure(store.root, base_of[p[0]], data, f"{p[0]}-{p[1]}-{p[3]}",
                                                   f"{p[2]} --seed {p[3]}", sampling, args), points))
            starter = untrained.result()
        figures["starter_general"] = figure(100 * starter["general"], "%", "general answers right, the starter")
        figures["starter_recall"] = figure(100 * starter["sampled"], "%", "paraphrases recalled, untrained")
        print(f"starter: {json.dumps(starter)}", file=sys.stderr)
        for b in args.bases:
            for label, run_flags in runs.items():
                key = f"{b}_{label.replace('-', '_')}"
                mine = [d for p, d in zip(points, done) if p[:2] == (b, label)]
                configs, shares = [c for c, _ in mine], [r for _, r in mine]
                per = {"recall": [100 * r["sampled"] for r in shares],
                       "greedy": [100 * r["greedy"] for r in shares],
                       "general": [100 * r["general"] for r in shares],
                       **{f.name: [100 * r["facts"][f.name]["sampled"] for r in shares] for f in FACTS}}
                notes = {"recall": "paraphrase answers with the fact", "greedy": "greedy paraphrase answers with "
                         "the fact", "general": "general answers right"}
                for k, values in per.items():
                    figures[f"{key}_{k}"] = figure(values, "%", notes.get(k, f"{k} paraphrases recalled"))
                figures[f"{key}_updates"] = figure([c["updates"] for c in configs], "updates")
                reported = [c["held_out_recall"] for c in configs if c.get("held_out_recall") is not None]
                if reported:  # what `localchat finetune` itself said about its held-out rows
                    figures[f"{key}_held_out_recall"] = figure([100 * x for x in reported], "%",
                                                               "held-out rows recalled, as finetune reports it")
                rows.append((b, label, run_flags.strip() or "(defaults)", key))
    preset = {k: getattr(sampling, k) for k in ("temperature", "top_p", "top_k", "min_p", "repeat_penalty")}
    settings = {"model": STARTER, "facts": [f.name for f in FACTS], "rows_per_fact": len(FACTS[0].rows),
                "paraphrases": sum(len(f.paraphrases) for f in FACTS), "general": len(GENERAL),
                "seeds": args.seeds, "train_seeds": args.train_seeds, "max_tokens": args.max_tokens,
                "sampling": preset, "bases": args.bases, "base_notes": {b: BASES[b] for b in args.bases},
                "runs": runs, "export": "Q4_K_M"}
    print(f"\n{len(FACTS)} invented facts x {len(FACTS[0].rows)} training rows, "
          f"{settings['paraphrases']} held-out paraphrases and {len(GENERAL)} general questions, {args.seeds} "
          f"seeds at the starter's preset {preset} (and greedy); median (min-max) over fine-tunes with seeds {args.train_seeds}. The starter answers "
          f"{pct(starter['general'])} of the general questions right.")
    print("| base | run | flags | updates | recall (sampled) | greedy | " + " | ".join(f.name for f in FACTS)
          + " | general kept |")
    print("|---" * (7 + len(FACTS)) + "|")
    for b, label, run_flags, key in rows:
        f_ = lambda k: fmt(figures[f"{key}_{k}"], 0)  # noqa: E731
        print(f"| {b} | {label} | `{run_flags}` | {fmt(figures[key + '_updates'], 0, False)} | {f_('recall')} | "
              f"{f_('greedy')} | " + " | ".join(f_(f.name) for f in FACTS) + f" | {f_('general')} |")
    return report(settings, figures)


if __name__ == "__main__":
    main()
