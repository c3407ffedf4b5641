"""Files that are never half-written, and space checked before long work."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import psutil


# Disk kept free beyond a file's estimated size: metadata (a vocabulary runs to megabytes) and the
# estimate's own error. Every long job adds it once per file it writes.
HEADROOM = 64 << 20


class ResourceError(RuntimeError):
    """Not enough disk or memory; the message says "needs X, has Y"."""


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError


def check_disk(path: str | os.PathLike[str], needed: int, what: str = "this") -> None:
    """Refuse before starting when the filesystem of `path` lacks `needed` bytes."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ResourceError(f"{what} needs {human(needed)} of disk at {probe}, has {human(free)} free")


def check_memory(needed: int, what: str = "this") -> None:
    available = psutil.virtual_memory().available
    if available < needed:
        raise ResourceError(f"{what} needs {human(needed)} of memory, has {human(available)} available")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; it replaces `final` only if the block succeeds.

    A crash or a kill leaves `final` as it was (at worst a stray `.tmp` file, never a
    half-written `final`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 is not what a user expects
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; it replaces `final` only if the block succeeds,
    so a checkpoint folder is either complete or absent (a crash leaves at worst `NAME.tmp`)."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(final, ignore_errors=True)  # a folder cannot be renamed over a full one
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(final: str | os.PathLike[str], text: str) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
