"""Held-out recall: does the trained model give a held-out row's answer, not only score it well?

A low held-out loss can hide a model that still answers a rephrased question wrongly (issue
13: loss 0.015, yet 1 answer in 4 right). So after training, each held-out chat row's
question is answered greedily by the trained model in torch, and the row counts as
recalled when the answer holds its reference answer's key content, defined simply:

- the key words are the reference's words that are not in the question and not short
  function words ("the", "your", "is"...);
- names and numbers among them (a capitalised word that does not start a sentence, or a
  word with a digit) must all appear; with none, at least half of the key words must.

Words match case-insensitively, a trailing "s" ignored ("pickles" matches "pickle"). It is a
rough check, made to tell "learned the fact" from "learned the phrasing", not a grader.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from localchat.datasets import Example

MAX_ROWS = 32  # held-out rows answered at most: generation costs far more than scoring a loss
MAX_NEW_TOKENS = 96
FUNCTION_WORDS = frozenset("""a an the and or but if of to in on at by for with from as into about than then so
is are was were be been being am do does did has have had will would can could should may might must
i me my mine you your yours he him his she her hers it its we us our they them their this that these those
there here what which who whom whose when where why how not no yes also just very too all any some
""".split())
WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def _norm(word: str) -> str:
    w = word.lower().replace("’", "'")
    w = w[:-2] if w.endswith("'s") else w
    return w[:-1] if len(w) > 3 and w.endswith("s") else w


def key_words(question: str, reference: str) -> tuple[set[str], set[str]]:
    """(names and numbers, other key words) of `reference`, normalised, none of them in `question`."""
    asked = {_norm(w) for w in WORD.findall(question)}
    names, others = set(), set()
    for sentence in re.split(r"(?<=[.!?:;])\s+|\n+", reference):
        for i, m in enumerate(WORD.finditer(sentence)):
            w = _norm(m.group())
            if w in asked or m.group().lower() in FUNCTION_WORDS:
                continue
            is_name = any(c.isdigit() for c in w) or (i > 0 and m.group()[0].isupper())
            (names if is_name else others).add(w)
    return names, others


def recalled(answer: str, question: str, reference: str) -> bool | None:
    """Whether `answer` holds `reference`'s key content; None when the reference has none
    (all its words are in the question or are function words)."""
    names, others = key_words(question, reference)
    said = {_norm(w) for w in WORD.findall(answer)}
    if names:
        return names <= said
    if not others:
        return None
    return len(others & said) >= math.ceil(len(others) / 2)


@dataclass(frozen=True)
class Recall:
    share: float  # of the rows scored
    rows: int  # rows scored
    of: int  # held-out chat rows there were

    def describe(self) -> str:
        sample = f" of {self.of}" if self.of > self.rows else ""
        return f"held-out recall {100 * self.share:.0f}% ({self.rows}{sample} rows answered greedily)"


def held_out_recall(model: Any, tok: Any, template: str, rows: list[Example], device: Any,
                    synced: bool = False) -> Recall | None:
    """Greedy answers of `model` to the held-out chat rows (the first MAX_ROWS that have key
    content), scored by `recalled`; None when no row can be scored (plain text, no held-out rows).
    `synced`: every training process generates together (`Ranks.generating`), none stopping first."""
    import torch

    from .encode import _render

    scored = []
    chats = [ex for ex in rows if ex.messages]
    was_training = model.training
    model.eval()
    try:
        for ex in chats:
            if len(scored) >= MAX_ROWS:
                break
            *before, last = ex.messages
            question = next((m["content"] for m in reversed(before) if m["role"] == "user"), "")
            if recalled("", question, last["content"]) is None:
                continue
            prompt = _render(template, list(before), tok, True)
            ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            # Room for the reference's length and a preamble: the key content comes early or not at all.
            room = min(MAX_NEW_TOKENS, len(tok(last["content"], add_special_tokens=False)["input_ids"]) + 24)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=room, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                     synced_gpus=synced)
            answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            scored.append(bool(recalled(answer, question, last["content"])))
    finally:
        model.train(was_training)
    return Recall(sum(scored) / len(scored), len(scored), len(chats)) if scored else None
