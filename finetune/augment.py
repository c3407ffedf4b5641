"""Word dropout on the user's questions: more wordings of the same rows, without a model.

A handful of rows teaches a fact through a handful of question wordings, and a small model
then ties the fact to those wordings: asked "If someone hands me a florp, what am I holding?"
after eight rows that each ask "what is a florp?" in some form, it answers "You are holding a
florp." `--augment N` adds N copies of every chat row in which each word of the user's turns
is dropped with probability `--augment-drop` (at least one kept); the assistant's turns stay
as they are. The answer then has to come from the words that carry the question (the names
and rare words), not from one exact phrasing: random deletion from "EDA" (Wei & Zou, 2019),
applied to the prompt only. The copies are drawn once from the run's seed, so a resumed run
trains on the same rows.
"""

from __future__ import annotations

import random

from localchat.datasets import Example


def drop_words(text: str, p: float, rnd: random.Random) -> str:
    """`text` with each whitespace-separated word dropped with probability `p`; never all of them."""
    words = text.split()
    kept = [w for w in words if rnd.random() >= p]
    if not kept and words:
        kept = [rnd.choice(words)]
    return " ".join(kept)


def augment(rows: list[Example], copies: int, p: float, seed: int) -> list[Example]:
    """`rows` and then `copies` copies of each chat row, its user turns thinned by `drop_words`.
    Plain-text rows (continued pretraining) are not copied: they have no question to reword."""
    if copies <= 0 or p <= 0:
        return rows
    rnd = random.Random(f"augment-{seed}")
    out = list(rows)
    for k in range(copies):
        for ex in rows:
            if not ex.messages:
                continue
            turns = tuple({**m, "content": drop_words(m["content"], p, rnd)} if m["role"] == "user" else m
                          for m in ex.messages)
            out.append(Example(messages=turns, source=f"{ex.source} (augmented copy {k + 1})"))
    return out
