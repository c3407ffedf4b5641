"""Where the store lives: $LOCALCHAT_HOME, else the checkout's models/, else ~/.localchat."""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "LOCALCHAT_HOME"
_CHECKOUT = Path(__file__).resolve().parents[2]


def store_root() -> Path:
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser()
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "models").is_dir():
        return _CHECKOUT / "models"
    return Path.home() / ".localchat"


def chats_dir() -> Path:
    return store_root() / "chats"
