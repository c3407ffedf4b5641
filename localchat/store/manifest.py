"""The model store: a folder per model and one manifest describing them all.

The manifest is JSON (name, files, format, quant, size, sha256, source, eval figures),
rewritten atomically under a lock, so two `localchat` processes cannot lose each
other's entries and a crash cannot leave it half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from ..fsutil import atomic_write_text
from ..gguf_file import GGUFHeader
from .names import check_name

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; single-process use stays safe
    fcntl = None  # type: ignore[assignment]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
FORMATS = ("gguf", "gptq", "hf", "lora")  # lora: a GGUF adapter over the model named in extra["base"]


class StoreError(RuntimeError):
    pass


@dataclass
class ModelFile:
    path: str  # relative to the store root
    size: int
    sha256: str


@dataclass
class ModelEntry:
    name: str
    format: str
    quant: str
    files: list[ModelFile]
    source: str
    sha256: str = ""  # of the main file
    added: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    eval: dict[str, Any] = field(default_factory=dict)
    # Per-model chat defaults (system prompt, chat format, the sampling preset under "sampling"),
    # like an Ollama Modelfile's.
    defaults: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelEntry":
        d = dict(d)
        d["files"] = [ModelFile(**f) for f in d.get("files", [])]
        d.pop("size", None)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size": self.size}


class Store:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def path_of(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root.resolve()):
            raise StoreError(f"{self.manifest_path}: file {rel!r} points outside the store")
        return p

    def model_dir(self, name: str) -> Path:
        return self.root / check_name(name)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".manifest.lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, ModelEntry]:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.manifest_path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise StoreError(f"{self.manifest_path}: expected an object with a 'models' field")
        entries = {}
        for name, raw in data["models"].items():
            try:
                entries[name] = ModelEntry.from_dict(raw)
            except TypeError as exc:
                raise StoreError(f"{self.manifest_path}: model {name!r}: {exc}") from None
        return entries

    def _write(self, entries: dict[str, ModelEntry]) -> None:
        data = {"version": MANIFEST_VERSION,
                "models": {n: e.to_dict() for n, e in sorted(entries.items())}}
        atomic_write_text(self.manifest_path, json.dumps(data, indent=2) + "\n")

    def models(self) -> dict[str, ModelEntry]:
        return self._read()

    def get(self, name: str) -> ModelEntry:
        entries = self._read()
        if name not in entries:
            have = ", ".join(entries) or "none"
            raise StoreError(f"no model named {name!r} in the store at {self.root} (have: {have})")
        return entries[name]

    def add(self, entry: ModelEntry) -> None:
        _check(entry)
        with self._locked():
            entries = self._read()
            entries[entry.name] = entry
            self._write(entries)

    def replace(self, entry: ModelEntry) -> ModelEntry | None:
        """Register `entry` in place of the model of that name (if any), deleting the files only the
        old entry listed, so a re-export under the same name leaves no unlisted file behind."""
        _check(entry)
        with self._locked():
            entries = self._read()
            old = entries.get(entry.name)
            entries[entry.name] = entry
            self._write(entries)
        if old is not None:
            keep = {self.path_of(f.path) for f in entry.files}
            for f in old.files:
                _discard(self.path_of(f.path), keep)
        return old

    def update(self, name: str, change: Callable[[ModelEntry], None]) -> ModelEntry:
        """Change one entry in place under the lock: a read-modify-write that loses no one else's write."""
        with self._locked():
            entries = self._read()
            if name not in entries:
                raise StoreError(f"no model named {name!r} in the store at {self.root}")
            change(entries[name])
            self._write(entries)
            return entries[name]

    def update_eval(self, name: str, figures: dict[str, Any]) -> None:
        self.update(name, lambda e: e.eval.update(figures))

    def update_extra(self, name: str, key: str, value: Any) -> None:
        """Set one key of a model's `extra` (e.g. the GPTQ figures of a two-format model)."""
        self.update(name, lambda e: e.extra.__setitem__(key, value))

    def remove(self, name: str) -> ModelEntry:
        """Forget a model and delete its folder (files outside its folder are left alone)."""
        with self._locked():
            entries = self._read()
            if name not in entries:
                raise StoreError(f"no model named {name!r} in the store at {self.root} "
                                 f"(have: {', '.join(entries) or 'none'})")
            entry = entries.pop(name)
            self._write(entries)
        folder = self.model_dir(name)
        if folder.is_dir():
            shutil.rmtree(folder)
        return entry


def gguf_defaults(header: GGUFHeader) -> dict[str, Any]:
    """A new store entry's defaults from what its GGUF carries: the authors' sampling settings."""
    return {"sampling": header.sampling} if header.sampling else {}


def _check(entry: ModelEntry) -> None:
    check_name(entry.name)
    if entry.format not in FORMATS:
        raise StoreError(f"format {entry.format!r} is not one of {FORMATS}")


def _discard(path: Path, keep: set[Path]) -> None:
    """Delete `path` except what `keep` lists (a GPTQ model's folder can hold the GGUF replacing it)."""
    if path in keep:
        return
    if path.is_dir() and not path.is_symlink():
        if any(k.is_relative_to(path) for k in keep):
            for child in path.iterdir():
                _discard(child, keep)
        else:
            shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
