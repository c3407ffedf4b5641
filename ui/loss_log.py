"""The running fine-tune's loss log (`<store>/<name>/finetune/loss.jsonl`), read as it grows.

The app's timer asks for the loss every second for every open page; reading the whole file each
time costs more as the run goes on (a line per update). This keeps what was read and reads only
the bytes added since, starting over when the file is replaced (a new run) or shrinks (a resumed
run rewrites it up to its checkpoint).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd

COLUMNS = ["update", "loss", "series"]


class LossLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # the timer's ticks of several pages may run at once
        self._reset(None)

    def _reset(self, path: Path | None, ino: int = 0) -> None:
        self.path, self.ino, self.offset, self.rest = path, ino, 0, b""
        self.generation = getattr(self, "generation", 0) + 1
        self.frame = _frame([])

    def version(self) -> tuple:
        """Changes whenever the rows do: a page that has drawn this version needs nothing new."""
        return self.generation, len(self.frame)

    def read(self, path: Path | None) -> tuple[tuple, pd.DataFrame]:
        """The rows of `path` (None: no fine-tune), one per logged update, as a frame with numeric
        columns (an empty frame of object columns would make the plot's axis categorical for good)."""
        with self._lock:
            try:
                st = path.stat() if path is not None else None
            except FileNotFoundError:
                st = None
            ino, size = (st.st_ino, st.st_size) if st else (0, 0)
            if path != self.path or ino != self.ino or size < self.offset:
                self._reset(path, ino)
            if size > self.offset:
                with open(path, "rb") as fh:
                    fh.seek(self.offset)
                    data = self.rest + fh.read(size - self.offset)
                self.offset = size
                *lines, self.rest = data.split(b"\n")  # the last piece: a line still being written
                new = [r for r in map(_row, lines) if r is not None]
                if new:  # only the new rows are parsed into a frame
                    self.frame = pd.concat([self.frame, _frame(new)], ignore_index=True) if len(self.frame) \
                        else _frame(new)
            return self.version(), self.frame


def _frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS).astype({"update": "int64", "loss": "float64", "series": "string"})


def _row(line: bytes) -> dict | None:
    try:
        r = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if "loss" in r:
        return {"update": r["step"], "loss": r["loss"], "series": "train"}
    if "held_out_loss" in r:
        return {"update": r["step"], "loss": r["held_out_loss"], "series": "held out"}
    return None
