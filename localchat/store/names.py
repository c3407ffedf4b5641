"""Names that come from users or the network never become paths outside the store."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


class UnsafeNameError(ValueError):
    pass


def check_name(name: str, what: str = "model name") -> str:
    """A single path component: letters, digits, '.', '_', '-'; no '..'."""
    if not _NAME.fullmatch(name or "") or ".." in name:
        raise UnsafeNameError(f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                              "(no '/', no '..', at most 128 characters)")
    return name


def safe_file_name(name: str) -> str:
    """A user's file name made into one safe path component (unsafe characters become '-')."""
    clean = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-.")
    return clean[:128] or "file"


def check_repo_id(repo: str) -> str:
    if not _REPO.fullmatch(repo or "") or ".." in repo:
        raise UnsafeNameError(f"repository {repo!r} is not of the form OWNER/NAME")
    return repo


def check_relative(path: str, what: str = "file name") -> str:
    """A relative path with no '..' and no absolute or drive prefix."""
    p = PurePosixPath(path.replace("\\", "/"))
    if not path or p.is_absolute() or ".." in p.parts or ":" in p.parts[0] or any(not x for x in p.parts):
        raise UnsafeNameError(f"{what} {path!r} is not allowed: it must be a relative path inside the repository")
    return str(p)
