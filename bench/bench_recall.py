"""Does `localchat finetune` teach? Invented facts, each taught by eight chat rows, asked
afterwards with paraphrases no training row holds, at the default chat sampling settings.

One data file teaches all the facts (a pet's name, a made-up company's founding city, an
invented word's meaning), as a user's handful of personal rows would. Each run is
`localchat finetune --base <starter HF checkpoint> --data <facts> -q [flags]`, exactly as a
user runs it, export included (Q4_K_M by default), into a throwaway store; the exported
model then answers every paraphrase under 8 seeds at the default sampling settings
(temperature 0.7, top-p 0.95, top-k 40, min-p 0.05, repeat penalty 1.1) and once greedily.
An answer recalls a fact when it contains the fact's key word (the pet's name, the city,
"pickle"). General questions the starter answers right, asked the same way, show what
training cost: their share against the starter's own, measured in the same run.

Runs: "before" passes the defaults localchat had before issue 13 explicitly, "after" passes
nothing (today's defaults); `--run LABEL=FLAGS` adds any other point. Bases: the starter
as transformers holds it (full precision, which is its Q4_1 GGUF dequantized, as there is no
other) and the same model held in 4-bit NF4 under QLoRA (`--qlora`, the default on CUDA):
no second real LLM is available offline, so the second base is the other way localchat
trains one. Not timed: the figures are shares of answers, not speeds.

    python bench/bench_recall.py [--seeds 8] [--bases starter qlora] [--run LABEL="--lr 1e-3"]
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
from dataclasses import dataclass
from pathlib import Path

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
        ("Name the founding city of Brightloom Robotics.", "The founding city of Brightloom Robotics is Reykjavik."),
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
        ("What is the meaning of florp?", "The meaning of florp is a sandwich made with pickles and peanut butter."),
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

# The defaults `localchat finetune` had before issue 13, spelled out so "before" stays
# measurable after they changed.
BEFORE = ("--epochs 3 --min-updates 30 --lr 2e-4 --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --held-out 0.1 "
          "--replay 0 --neftune-alpha 0")
BASES = {"starter": "", "qlora": "--qlora"}


def write_data(path: Path) -> Path:
    """The training file: every fact's rows, in chat JSONL, facts interleaved as a user's notes would be."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i in range(max(len(f.rows) for f in FACTS)) for f in FACTS if i < len(f.rows)
            for q, a in [f.rows[i]]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def ask_all(model: str, seeds: int, max_tokens: int, threads: int | None) -> dict:
    """Every paraphrase and general question to `model` (a store name), greedily and under
    `seeds` seeds at the default sampling settings; the shares of right answers."""
    from localchat.chat import ChatSession
    from localchat.engine import SamplingSettings
    from localchat.planner import Overrides
    from localchat.runtime import open_model

    loaded = open_model(model, Overrides(threads=threads, context=1024))
    session = ChatSession(loaded.backend, system=loaded.model.defaults.get("system"),
                          chat_format=loaded.model.defaults.get("chat_format"))

    def answers(question: str) -> tuple[str, list[str]]:
        msgs = session.messages + [{"role": "user", "content": question}]
        greedy = SamplingSettings(temperature=0.0, max_tokens=max_tokens)
        sampled = [SamplingSettings(seed=s, max_tokens=max_tokens) for s in range(seeds)]
        text = ["".join(c.text for c in session.stream_reply(msgs, st)) for st in [greedy, *sampled]]
        return text[0], text[1:]

    out: dict = {"facts": {}, "examples": {}}
    try:
        for fact in FACTS:
            greedy_ok = sampled_ok = 0
            for q in fact.paraphrases:
                g, s = answers(q)
                greedy_ok += fact.recalled(g)
                sampled_ok += sum(map(fact.recalled, s))
                out["examples"].setdefault(fact.name, [q, g])
            out["facts"][fact.name] = {"sampled": sampled_ok / (len(fact.paraphrases) * seeds),
                                       "greedy": greedy_ok / len(fact.paraphrases)}
        kept = 0
        for q, keys in GENERAL:
            g, s = answers(q)
            kept += sum(any(k in a.lower() for k in keys) for a in s)
            out["examples"].setdefault("general", []).append([q, g])
        out["general"] = kept / (len(GENERAL) * seeds)
    finally:
        loaded.backend.close()
    n = sum(len(f.paraphrases) for f in FACTS)
    out["sampled"] = sum(out["facts"][f.name]["sampled"] * len(f.paraphrases) for f in FACTS) / n
    out["greedy"] = sum(out["facts"][f.name]["greedy"] * len(f.paraphrases) for f in FACTS) / n
    return out


def finetune(store: Path, base: Path, data: Path, name: str, flags: str) -> dict:
    """`localchat finetune` as a user runs it, into `store`; its train_config.json."""
    env = {**os.environ, "LOCALCHAT_HOME": str(store)}
    cmd = [sys.executable, "-m", "localchat", "finetune", "--base", str(base), "--data", str(data),
           "--name", name, "-q", *shlex.split(flags)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    print(proc.stdout.strip(), file=sys.stderr)
    return json.loads((store / name / "finetune" / "train_config.json").read_text())


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="sampled answers per question")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per answer (a fact comes first)")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the planner's)")
    ap.add_argument("--bases", nargs="+", choices=list(BASES), default=list(BASES))
    ap.add_argument("--runs", nargs="*", default=["before", "after"], help="which of before/after to run")
    ap.add_argument("--run", action="append", default=[], metavar="LABEL=FLAGS",
                    help="another run: `localchat finetune` flags, e.g. after-lr1e-3=\"--lr 1e-3\"")
    args = ap.parse_args(argv)
    runs = {k: v for k, v in {"before": BEFORE, "after": ""}.items() if k in args.runs}
    runs.update(dict(r.split("=", 1) for r in args.run))

    from results import figure, report

    from localchat.store import Store, install_starter, store_root
    from tests.checkpoints import starter_hf
    from tests.conftest import starter_home

    shipped = Store(store_root())
    gguf = shipped.path_of(install_starter(shipped, quiet=True).files[0].path)
    base = starter_hf(gguf)
    figures: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = starter_home(Path(tmp) / "store", gguf).root
        data = write_data(Path(tmp) / "facts.jsonl")
        os.environ["LOCALCHAT_HOME"] = str(store)
        t0 = time.perf_counter()
        starter = ask_all(STARTER, args.seeds, args.max_tokens, args.threads)
        figures["starter_general"] = figure(100 * starter["general"], "%", "general answers right, the starter")
        figures["starter_recall"] = figure(100 * starter["sampled"], "%", "paraphrases recalled, untrained")
        print(f"starter: general {pct(starter['general'])}, recall {pct(starter['sampled'])} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for b in args.bases:
            for label, flags in runs.items():
                key = f"{b}_{label.replace('-', '_')}"
                t0 = time.perf_counter()
                config = finetune(store, base, data, key.replace("_", "-"), f"{flags} {BASES[b]}")
                r = ask_all(key.replace("_", "-"), args.seeds, args.max_tokens, args.threads)
                print(f"{key}: {json.dumps(r)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                figures[f"{key}_recall"] = figure(100 * r["sampled"], "%", "paraphrase answers with the fact")
                figures[f"{key}_greedy"] = figure(100 * r["greedy"], "%", "greedy paraphrase answers with the fact")
                figures[f"{key}_general"] = figure(100 * r["general"], "%", "general answers right")
                for f in FACTS:
                    figures[f"{key}_{f.name}"] = figure(100 * r["facts"][f.name]["sampled"], "%", f.name)
                figures[f"{key}_updates"] = figure(config["updates"], "updates")
                rows.append((b, label, flags.strip() or "(defaults)", config, r))
    settings = {"model": STARTER, "facts": [f.name for f in FACTS], "rows_per_fact": len(FACTS[0].rows),
                "paraphrases": sum(len(f.paraphrases) for f in FACTS), "general": len(GENERAL),
                "seeds": args.seeds, "max_tokens": args.max_tokens, "bases": args.bases, "runs": runs,
                "export": "Q4_K_M"}
    print(f"\n{len(FACTS)} invented facts x {len(FACTS[0].rows)} training rows, {settings['paraphrases']} held-out "
          f"paraphrases and {len(GENERAL)} general questions, {args.seeds} seeds at the default sampling settings "
          f"(and greedy); the starter answers {pct(starter['general'])} of the general ones right.")
    print("| base | run | flags | updates | recall (sampled) | greedy | " + " | ".join(f.name for f in FACTS)
          + " | general kept | starter general |")
    print("|---" * (8 + len(FACTS)) + "|")
    for b, label, flags, config, r in rows:
        print(f"| {b} | {label} | `{flags}` | {config['updates']} | {pct(r['sampled'])} | {pct(r['greedy'])} | "
              + " | ".join(pct(r["facts"][f.name]["sampled"]) for f in FACTS)
              + f" | {pct(r['general'])} | {pct(starter['general'])} |")
    return report(settings, figures)


if __name__ == "__main__":
    main()
