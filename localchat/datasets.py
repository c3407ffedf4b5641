"""Training and calibration data: read and check every row before anything trains or calibrates.

`localchat finetune` (finetune/) and GPTQ calibration (convert/gptq.py) both read rows here,
so neither package imports the other for it; it is plain Python (no torch), like the runtime.

Accepted files:
- Alpaca: a JSON array or JSONL of {"instruction", "input"?, "output", "system"?};
- chat JSONL: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]};
- ShareGPT JSON/JSONL: {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]};
- plain text (.txt): paragraphs become continued-pretraining rows (no chat template).
A bad row is reported with the file and line it came from, and nothing trains: a
training run that silently skipped a third of the data would teach the wrong thing.
That covers the bytes too (not UTF-8, JSON nested past the decoder's depth) and empty
assistant turns, which would teach the model to answer with nothing. Long rows are not
refused here: encoding keeps the part that fits `--max-len` tokens (finetune/encode.py).
"""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROLES = {"system": "system", "user": "user", "assistant": "assistant",
         "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


# Rows held out by default to measure loss and recall: this share, from this many rows. A smaller set
# trains on every row, as each may be all that teaches its fact: on the recall bench's 24 rows (3 facts)
# holding out 2 cost the GGUF starter recall and general answers on both training seeds measured (README,
# fine-tuning defaults; the HF folder's one seed went the other way, within one seed's spread).
# From 50 rows the 5 held out give a share worth reading; `held_out` set by the caller always applies.
HELD_OUT = 0.1
HOLD_OUT_FROM = 50
HOLD_OUT_MIN = 10  # rows: a smaller set is never split, whatever share is asked for


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
    rows: list[Example] = field(default_factory=list, repr=False)  # every row, in the file's order

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, held_out: float | None = None, seed: int = 0) -> Dataset:
        """These rows with `held_out` of them kept out for evaluation, chosen by `seed` (None: HELD_OUT of a
        set of HOLD_OUT_FROM rows or more, else none); nothing is read again."""
        order = list(range(len(self.rows)))
        random.Random(seed).shuffle(order)
        if held_out is None:
            held_out = HELD_OUT if len(self.rows) >= HOLD_OUT_FROM else 0.0
        n_eval = int(len(self.rows) * held_out) if len(self.rows) >= HOLD_OUT_MIN else 0
        eval_idx = set(order[:n_eval])
        return replace(self, train=[e for i, e in enumerate(self.rows) if i not in eval_idx],
                       held_out=[e for i, e in enumerate(self.rows) if i in eval_idx])


def _fail(path: Path, line: int | None, message: str) -> DatasetError:
    return DatasetError(f"{path}:{line}: {message}" if line else f"{path}: {message}")


def _read(path: Path) -> str:
    """The file as text. Bytes that are not UTF-8 are refused with their line, so the user can find
    them; a byte-order mark (as Windows editors write) is dropped and line ends become "\n"."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = raw.rfind(b"\n", 0, exc.start) + 1
        raise _fail(path, raw.count(b"\n", 0, exc.start) + 1,
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start - line_start + 1}); "
                    "save the file as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode(path: Path, text: str, pos: int, line: int, first: int = 1) -> tuple[Any, int]:
    """The JSON value at `pos` of `text` (which starts on line `first`) and where it ends; `line` is
    where the value starts, for errors that carry no position of their own."""
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise _fail(path, first + exc.lineno - 1, f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise _fail(path, line, "the row nests deeper than the JSON reader allows (about "
                                f"{sys.getrecursionlimit()} levels; a training row needs four)") from None


def _array_rows(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, item) for each item of a top-level JSON array, decoded one at a time so each
    error names the line of its own row; lines are counted in one pass through the file."""
    space, rows = re.compile(r"[ \t\n]*"), []
    pos, line, counted = space.match(text, text.index("[") + 1).end(), 1, 0
    done = text.startswith("]", pos)
    pos += done
    while not done:
        line, counted = line + text.count("\n", counted, pos), pos
        item, pos = _decode(path, text, pos, line)
        rows.append((line, item))
        pos = space.match(text, pos).end()
        if not text.startswith((",", "]"), pos):
            raise _fail(path, text.count("\n", 0, pos) + 1, "not valid JSON (expecting ',' or ']' after a row)")
        done = text[pos] == "]"
        pos = space.match(text, pos + 1).end()
    if text[pos:].strip():
        raise _fail(path, text.count("\n", 0, pos) + 1, "not valid JSON (extra data after the array)")
    return rows


def _rows(path: Path, text: str) -> list[tuple[int, Any]]:
    """(line number, parsed row) from a JSON array or JSONL file."""
    if text.lstrip().startswith("["):
        return _array_rows(path, text)
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a string
        if line.strip():
            row, end = _decode(path, line, len(line) - len(line.lstrip()), lineno, lineno)
            if line[end:].strip():
                raise _fail(path, lineno, f"not valid JSON (extra data at column {end + 1})")
            rows.append((lineno, row))
    return rows


def _paragraphs(text: str) -> list[tuple[int, str]]:
    """(line number, paragraph) for each blank-line-separated paragraph of a text file."""
    out, line = [], 1
    for chunk in text.split("\n\n"):
        if chunk.strip():
            out.append((line + chunk[: len(chunk) - len(chunk.lstrip())].count("\n"), chunk.strip()))
        line += chunk.count("\n") + 2
    return out


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
        if role == "assistant" and not content.strip():
            raise _fail(path, line, f"turn {i} is an empty assistant turn; it would teach the model to answer "
                                    "with nothing")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
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


def load_dataset(path: str | Path, held_out: float | None = None, seed: int = 0) -> Dataset:
    """Read and check every row of `path`; split off `held_out` of it for evaluation (Dataset.split)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    text = _read(path)
    if not text.strip():
        raise _fail(path, None, "the file is empty")
    if path.suffix.lower() in (".txt", ".md"):
        examples = [Example(text=p, source=f"{path.name}:{line}") for line, p in _paragraphs(text)]
        kind = "text"
    else:
        examples, kinds = [], set()
        for line, row in _rows(path, text):
            k, ex = _example(path, line, row)
            kinds.add(k)
            examples.append(ex)
        if not examples:
            raise _fail(path, None, "the file has no rows")
        kind = "+".join(sorted(kinds))
    return Dataset(path, kind, examples, rows=examples).split(held_out, seed)
