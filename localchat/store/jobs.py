"""Work folders for long jobs: `<store>/.jobs/<pid>-<random>/`.

A conversion writes its intermediate files (the F16 GGUF on the way to a Q4, a GPTQ
staging folder) there, never beside the models, and moves only finished results into a
model's folder. The folder goes when the job ends, whether it succeeded, failed or was
stopped with Ctrl-C. A kill -9 leaves it behind; it names its owner's pid, so the next job
(and `localchat doctor`) can tell it is stale and remove it instead of leaving hidden
gigabytes that make every retry fail its disk check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import psutil

from .manifest import Store

JOBS = ".jobs"
OWNER = "owner.json"


@dataclass(frozen=True)
class JobFolder:
    path: Path
    pid: int | None
    what: str
    alive: bool


@contextlib.contextmanager
def job_folder(store: Store, what: str) -> Iterator[Path]:
    """A fresh work folder for this process, removed when the block ends however it ends.

    Stale folders of killed jobs are removed first: they would otherwise hold the space
    this job is about to need.
    """
    remove_stale_jobs(store)
    root = store.root / JOBS
    while True:  # another job may remove the empty `.jobs` between our mkdir and mkdtemp
        root.mkdir(parents=True, exist_ok=True)
        try:
            folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root))
            break
        except FileNotFoundError:
            continue
    me = psutil.Process()
    (folder / OWNER).write_text(json.dumps({"pid": me.pid, "started": me.create_time(),
                                            "host": socket.gethostname(), "what": what}), encoding="utf-8")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # only when no other job is using it


def job_folders(store: Store) -> list[JobFolder]:
    root = store.root / JOBS
    if not root.is_dir():
        return []
    return [_describe(p) for p in sorted(root.iterdir())]


def remove_stale_jobs(store: Store) -> list[JobFolder]:
    """Delete the work folders of jobs whose process is gone; returns them."""
    stale = [j for j in job_folders(store) if not j.alive]
    for j in stale:
        if j.path.is_dir():
            shutil.rmtree(j.path, ignore_errors=True)
        else:
            j.path.unlink(missing_ok=True)
    return stale


def _describe(path: Path) -> JobFolder:
    head = path.name.split("-", 1)[0]
    pid = int(head) if head.isdigit() else None
    try:
        owner = json.loads((path / OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        owner = {}  # a job between mkdtemp and writing its owner file; the name has its pid
    if not isinstance(owner, dict):
        owner = {}
    what = str(owner.get("what", "unknown job"))
    if owner.get("host", socket.gethostname()) != socket.gethostname():
        return JobFolder(path, pid, what, True)  # a store shared with another machine: not ours to judge
    return JobFolder(path, pid, what, pid is not None and _running(pid, owner.get("started")))


def _running(pid: int, started: object) -> bool:
    """Whether `pid` is the live process that made the folder (not a later one given the same pid)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return not isinstance(started, (int, float)) or abs(proc.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # another user's live process
