"""Saved conversations: one plain JSON file per chat in `<store>/chats/`.

Plain files so people can read, back up and grep them; each save goes to a temp name and
`os.replace`, so a kill mid-save leaves the previous version, never half a file. Chat ids
are generated here and checked on the way in, so no name from a browser reaches outside
the folder.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..chat.reasoning import without_thoughts
from ..fsutil import atomic_write_text

CHAT_VERSION = 1
_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def check_id(chat_id: str) -> str:
    if not isinstance(chat_id, str) or not _ID.fullmatch(chat_id):
        raise ChatError(f"{chat_id!r} is not a chat id (like 20261123-101500-a1b2c3)")
    return chat_id


@dataclass
class Conversation:
    id: str = field(default_factory=new_id)
    title: str = "New chat"
    model: str = ""
    system: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)  # user/assistant turns, no system
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    # Earlier versions, by the index of the message where they part: {"4": {"tails": [...], "at": 1}}.
    # Each tail is {"messages": [...], "versions": {...}} (the versions further down that tail); the
    # one shown (tails[at]) is None, since it is `messages[i:]` itself.
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The sampling settings the chat was last answered with (the app's sliders), restored on reopening.
    sampling: dict[str, Any] = field(default_factory=dict)

    def fork(self, index: int) -> None:
        """Keep `messages[index:]` as a version and start a new, empty one there: Regenerate and
        Edit call this, so the answer or the question they replace can be paged back to."""
        v = self.versions.setdefault(str(index), {"tails": [None], "at": 0})
        v["tails"][v["at"]] = self._tail(index)
        del self.messages[index:]
        v["tails"].append(None)
        v["at"] = len(v["tails"]) - 1

    def show_version(self, index: int, k: int) -> None:
        """Show version `k` (from 0) of what follows message `index`, keeping the one shown now."""
        v = self.versions[str(index)]
        if not 0 <= k < len(v["tails"]) or k == v["at"]:
            return
        v["tails"][v["at"]] = self._tail(index)
        tail, v["tails"][k], v["at"] = v["tails"][k], None, k
        del self.messages[index:]
        self.messages += tail["messages"]
        self.versions.update(tail["versions"])

    def branch_point(self) -> int | None:
        """The last message index with more than one version (where ‹k/n› pages), if any."""
        points = [int(i) for i, v in self.versions.items() if len(v["tails"]) > 1 and int(i) <= len(self.messages)]
        return max(points, default=None)

    def _tail(self, index: int) -> dict[str, Any]:
        """`messages[index:]` and the versions inside it, taken out of the conversation's record."""
        inner = {i: self.versions.pop(i) for i in list(self.versions) if int(i) > index}
        return {"messages": [dict(m) for m in self.messages[index:]], "versions": inner}

    def auto_title(self) -> None:
        """Name a new chat after its first question, as chat apps do."""
        if self.title == "New chat":
            first = next((m["content"] for m in self.messages if m["role"] == "user"), "")
            words = " ".join(first.split())
            if words:
                self.title = words[:60] + ("…" if len(words) > 60 else "")

    def full_messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in self.messages]

    def to_markdown(self) -> str:
        lines = [f"# {self.title}", "", f"- model: {self.model or '-'}", f"- saved: {self.updated}", ""]
        if self.system:
            lines += ["**System:** " + self.system, ""]
        names = {"user": "You", "assistant": "Assistant", "system": "System"}
        for m in self.messages:
            lines += [f"**{names[m['role']]}:**", "", m["content"], ""]
        return "\n".join(lines)


@dataclass(frozen=True)
class ChatInfo:
    id: str
    title: str
    model: str
    updated: str
    turns: int


class ChatHistory:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, chat_id: str) -> Path:
        return self.root / f"{check_id(chat_id)}.json"

    def save(self, conv: Conversation) -> None:
        for i, m in enumerate(conv.messages):
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise ChatError(f"chat {conv.id}: message {i} needs a role in {ROLES} and text content")
        conv.updated = _now()
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"version": CHAT_VERSION, **asdict(conv)}
        atomic_write_text(self.path(conv.id), json.dumps(data, ensure_ascii=False, indent=1) + "\n")

    def load(self, chat_id: str) -> Conversation:
        path = self.path(chat_id)
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ChatError(f"no saved chat {chat_id} in {self.root}") from None
        except json.JSONDecodeError as exc:
            raise ChatError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ChatError(f"{path}: expected an object with a 'messages' list")
        data.pop("version", None)
        known = {k: data[k] for k in Conversation.__dataclass_fields__ if k in data}
        conv = Conversation(**known)
        if conv.id != chat_id:
            raise ChatError(f"{path}: holds chat {conv.id!r}, not {chat_id!r}")
        return conv

    def list(self) -> list[ChatInfo]:
        """Newest first; a damaged file is skipped here and reported when opened."""
        out = []
        for p in self.root.glob("*.json"):
            if not _ID.fullmatch(p.stem):
                continue
            try:
                c = self.load(p.stem)
            except ChatError:
                continue
            out.append(ChatInfo(c.id, c.title, c.model, c.updated, len(c.messages)))
        return sorted(out, key=lambda c: (c.updated, c.id), reverse=True)

    def rename(self, chat_id: str, title: str) -> Conversation:
        title = " ".join(title.split())
        if not title:
            raise ChatError("a chat title cannot be empty")
        conv = self.load(chat_id)
        conv.title = title[:200]
        self.save(conv)
        return conv

    def delete(self, chat_id: str) -> None:
        self.path(chat_id).unlink(missing_ok=True)


def write_dataset(history: ChatHistory, chat_ids: list[str], out: str | Path) -> Path:
    """Picked chats as chat JSONL, the format `localchat finetune --data` reads.

    People correct a model in conversation; training on those chats is the shortest way
    from "it should have said this" to a model that says it.
    """
    rows = []
    for chat_id in chat_ids:
        conv = history.load(chat_id)
        msgs = [m for m in without_thoughts(conv.full_messages()) if m["content"].strip()]
        if not any(m["role"] == "assistant" for m in msgs):
            raise ChatError(f"chat {chat_id} ({conv.title!r}) has no assistant answer to learn from")
        rows.append({"messages": msgs})
    if not rows:
        raise ChatError("pick at least one saved chat")
    out = Path(out)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out
