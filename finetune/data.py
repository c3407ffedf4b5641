"""Fine-tuning data: read and check every row before anything trains.

Accepted files:
- Alpaca: a JSON array or JSONL of {"instruction", "input"?, "output", "system"?};
- chat JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]};
- ShareGPT JSON/JSONL: {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]};
- plain text (.txt): paragraphs become continued-pretraining rows (no chat template).
A bad row is reported with the file and line it came from, and nothing trains: a
training run that silently skipped a third of the data would teach the wrong thing.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class DatasetError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    messages: tuple[dict[str, str], ...] = ()  # a conversation, or
    text: str = ""  # plain text for continued pretraining
    source: str = ""  # "file:line", for errors later in the pipeline


@dataclass
class Dataset:
    path: Path
    kind: str  # "alpaca", "chat", "sharegpt" or "text"
    train: list[Example]
    held_out: list[Example] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.train) + len(self.held_out)


def _fail(path: Path, line: int | None, message: str) -> DatasetError:
    return DatasetError(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def _rows(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed row) from a JSON array or JSONL file."""
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise _fail(path, None, "the file is empty")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _fail(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
        # Line numbers of each array item, so errors point into the file.
        decoder, rows, pos = json.JSONDecoder(), [], text.index("[") + 1
        for item in data:
            while text[pos] in " \t\r\n,":
                pos += 1
            _, end = decoder.raw_decode(text, pos)
            rows.append((text.count("\n", 0, pos) + 1, item))
            pos = end
        return rows
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise _fail(path, lineno, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    return rows


def _text(path: Path, line: int, row: dict[str, Any], key: str, required: bool = True) -> str:
    value = row.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise _fail(path, line, f"field {key!r} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise _fail(path, line, f"field {key!r} is missing or empty")
    return value


def _conversation(path: Path, line: int, turns: Any, role_key: str, text_key: str) -> tuple[dict[str, str], ...]:
    if not isinstance(turns, list) or not turns:
        raise _fail(path, line, "the conversation is empty")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _fail(path, line, f"turn {i} is not an object")
        role = ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise _fail(path, line, f"turn {i} has role {turn.get(role_key)!r}; valid: "
                                    f"{', '.join(sorted(set(ROLES)))}")
        content = turn.get(text_key)
        if not isinstance(content, str):
            raise _fail(path, line, f"turn {i} has no text in {text_key!r}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise _fail(path, line, "the row has no assistant turn, so there is nothing to learn from it")
    if out[-1]["role"] != "assistant":
        raise _fail(path, line, "the conversation must end with an assistant turn")
    return tuple(out)


def _example(path: Path, line: int, row: Any) -> tuple[str, Example]:
    src = f"{path.name}:{line}"
    if not isinstance(row, dict):
        raise _fail(path, line, f"expected an object, got {type(row).__name__}")
    if "messages" in row:
        return "chat", Example(_conversation(path, line, row["messages"], "role", "content"), source=src)
    if "conversations" in row:
        return "sharegpt", Example(_conversation(path, line, row["conversations"], "from", "value"), source=src)
    if "instruction" in row or "output" in row:
        instruction = _text(path, line, row, "instruction")
        extra = _text(path, line, row, "input", required=False)
        output = _text(path, line, row, "output")
        system = _text(path, line, row, "system", required=False)
        user = instruction + (f"\n\n{extra}" if extra.strip() else "")
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return "alpaca", Example(tuple(msgs), source=src)
    raise _fail(path, line, "unknown row: expected 'messages' (chat), 'conversations' (ShareGPT) or "
                            "'instruction'/'output' (Alpaca)")


def load_dataset(path: str | Path, held_out: float = 0.1, seed: int = 0) -> Dataset:
    """Read and check every row of `path`; split off `held_out` of it for evaluation."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix.lower() in (".txt", ".md"):
        text = path.read_text(encoding="utf-8")
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        if not paragraphs:
            raise _fail(path, None, "the file is empty")
        examples = [Example(text=p, source=f"{path.name}") for p in paragraphs]
        kind = "text"
    else:
        examples, kinds = [], set()
        for line, row in _rows(path):
            k, ex = _example(path, line, row)
            kinds.add(k)
            examples.append(ex)
        if not examples:
            raise _fail(path, None, "the file has no rows")
        kind = "+".join(sorted(kinds))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = int(len(examples) * held_out) if len(examples) >= 10 else 0
    eval_idx = set(order[:n_eval])
    return Dataset(path, kind, [e for i, e in enumerate(examples) if i not in eval_idx],
                   [e for i, e in enumerate(examples) if i in eval_idx])
