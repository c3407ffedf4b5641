"""Replay: general conversations trained on beside the user's rows, so the fine-tune keeps
answering other questions as the base does.

A handful of rows about three facts is all a small fine-tune sees; trained on those alone,
the model learns that every question is about them ("The capital of Japan is Reykjavik",
measured in bench/bench_recall.py). Replay rows show it which questions the facts are not for.

localchat ships the conversations (`data/replay_chats.jsonl`, general questions with short
answers written for it). With --replay-kl they are used as they are: their
answers are only the context, and the target at each token is the base's own next-token
distribution there (finetune/train.py), so no answer needs generating. Without it the base
answers the same questions greedily first (minutes on a CPU) and those answers are trained
on as plain rows: long ones anchor more (60-token ones let a fact leak into other answers).
Either way the rows go to `replay.jsonl` in the run's folder, so a resumed run trains on the
same rows and the user can read them.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from localchat.fsutil import atomic_write_text

from localchat.datasets import Example
from .encode import _render

FILE = "replay.jsonl"
CHATS = "data/replay_chats.jsonl"
MAX_NEW_TOKENS = 160  # long answers anchor more: 60-token ones let a fact leak into other answers (bench)
BATCH = 8


def chats() -> list[Example]:
    """The general conversations shipped with localchat (none asks a question the recall benchmark asks)."""
    text = resources.files("localchat.finetune").joinpath(CHATS).read_text(encoding="utf-8")
    return [Example(tuple(json.loads(line)["messages"]), source=f"{CHATS}:{i}")
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]


def prompts() -> list[str]:
    """The shipped conversations' questions."""
    return [ex.messages[0]["content"] for ex in chats()]


def _finish(text: str, ended: bool) -> str:
    """The answer, or when it ran out of tokens its complete sentences ("" when there are none)."""
    text = text.strip()
    if ended:
        return text
    cut = max(text.rfind(e) for e in (". ", ".\n", "! ", "? ", "\n"))
    return text[:cut + 1].strip() if cut > 0 else ""


def generate(model: Any, tok: Any, template: str, count: int, device: str) -> list[Example]:
    """The base's greedy answers to the first `count` prompts, as chat rows (those that end
    within MAX_NEW_TOKENS or have a sentence by then)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ends = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
               else [model.generation_config.eos_token_id or tok.eos_token_id])
    asked = prompts()[:count]
    rows = []
    was_training = model.training
    model.eval()
    try:
        for k in range(0, len(asked), BATCH):
            batch = asked[k:k + BATCH]
            ids = [tok(_render(template, [{"role": "user", "content": p}], tok, True),
                       add_special_tokens=False)["input_ids"] for p in batch]
            width = max(map(len, ids))  # left-padded, so every answer starts at the same column
            inputs = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=inputs, attention_mask=mask, do_sample=False,
                                     max_new_tokens=MAX_NEW_TOKENS, pad_token_id=pad)
            for p, new in zip(batch, out[:, width:].tolist()):
                stop = next((i for i, t in enumerate(new) if t in ends), None)
                answer = _finish(tok.decode(new[:stop], skip_special_tokens=True), stop is not None)
                if answer:
                    rows.append(Example(({"role": "user", "content": p}, {"role": "assistant", "content": answer}),
                                        source=f"{FILE}:{len(rows) + 1}"))
    finally:
        model.train(was_training)
    return rows


def save(rows: list[Example], out: Path) -> None:
    atomic_write_text(out / FILE, "".join(json.dumps({"messages": list(r.messages)}) + "\n" for r in rows))


def load(out: Path) -> list[Example] | None:
    """The replay rows a run in `out` trained on, or None when it has none."""
    try:
        lines = (out / FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return [Example(tuple(json.loads(line)["messages"]), source=f"{FILE}:{i}") for i, line in enumerate(lines, 1)]
