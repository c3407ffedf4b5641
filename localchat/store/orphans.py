"""What in the store no model owns, for `localchat doctor` to report and `--clean` to remove.

Only things that are certainly leftovers count: work folders of killed jobs, temporary files
of interrupted writes, GGUF files in a model folder that the manifest does not list (an
older localchat left its F16 intermediate that way), and empty folders of no model. Training
runs (`<model>/finetune/`), dequantized bases, partial downloads, chats and datasets are the
user's and are never listed. Anything younger than a few minutes is left alone: a write in
progress looks the same as an abandoned one until its writer is known to be gone.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .jobs import JOBS, job_folders
from .manifest import MANIFEST, Store

GRACE_S = 300
KEPT = {MANIFEST, ".manifest.lock", JOBS, ".partial", "chats", "datasets"}


@dataclass(frozen=True)
class Orphan:
    path: Path
    size: int
    why: str


def find_orphans(store: Store) -> list[Orphan]:
    if not store.root.is_dir():
        return []
    found = [Orphan(j.path, _size(j.path), f"work folder of a job that was killed (pid {j.pid}: {j.what})")
             for j in job_folders(store) if not j.alive]
    entries = store.models()
    owned = _owned_paths(store)
    for top in sorted(store.root.iterdir()):
        if top.name in KEPT or top.is_symlink():
            continue
        if top.name.startswith("."):
            if _old(top):
                found.append(Orphan(top, _size(top), "temporary file of an interrupted write"))
            continue
        if not top.is_dir():
            continue
        children = sorted(top.iterdir())
        if not children and top.name not in entries and _old(top):
            found.append(Orphan(top, 0, "empty folder of no model"))
        for child in children:
            if _owned(child, owned) or child.is_symlink() or not _old(child):
                continue
            if child.name.startswith("."):
                found.append(Orphan(child, _size(child), "temporary file of an interrupted write"))
            elif child.suffix == ".gguf" and child.is_file():
                found.append(Orphan(child, _size(child), "GGUF file no model in the manifest lists"))
    return found


def remove_orphans(orphans: list[Orphan]) -> None:
    for o in orphans:
        if o.path.is_dir() and not o.path.is_symlink():
            shutil.rmtree(o.path, ignore_errors=True)
        else:
            o.path.unlink(missing_ok=True)


def _owned_paths(store: Store) -> set[Path]:
    """Every path a manifest entry lists, including the training outputs finetune records in `extra`."""
    root = store.root.resolve()
    entries = store.models()
    owned = set()
    for e in entries.values():  # `extra` strings are paths, or (a LoRA's base) a model's name
        rels = [f.path for f in e.files] + [v for v in e.extra.values() if isinstance(v, str) and v not in entries]
        owned |= {(root / r).resolve() for r in rels if r}
    return owned


def _owned(path: Path, owned: set[Path]) -> bool:
    """`path` is listed, lies inside a listed folder, or holds a listed file."""
    p = path.resolve()
    return any(p == o or p.is_relative_to(o) or o.is_relative_to(p) for o in owned)


def _old(path: Path) -> bool:
    st = path.lstat()
    return time.time() - max(st.st_mtime, st.st_ctime) > GRACE_S


def _size(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file())
