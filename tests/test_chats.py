"""Saved chats: plain JSON in the store, atomic saves, Markdown export, and a dataset."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localchat.cli import main as cli
from localchat.datasets import load_dataset
from localchat.store.chats import ChatError, ChatHistory, Conversation, check_id, write_dataset


def _conv(question: str = "What is my cat called?", answer: str = "Biscuit.") -> Conversation:
    return Conversation(model="m", system="Be brief.",
                        messages=[{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def test_save_load_list_rename_delete(tmp_path: Path) -> None:
    h = ChatHistory(tmp_path)
    a, b = _conv(), _conv("Capital of France?", "Paris.")
    a.auto_title()
    h.save(a)
    time.sleep(1.1)  # updated has one-second resolution
    h.save(b)
    assert [c.id for c in h.list()] == [b.id, a.id]
    assert h.load(a.id).messages == a.messages and h.load(a.id).title == "What is my cat called?"
    assert json.loads((tmp_path / f"{a.id}.json").read_text())["version"] == 1
    h.rename(a.id, "  The   cat ")
    assert h.load(a.id).title == "The cat"
    with pytest.raises(ChatError, match="cannot be empty"):
        h.rename(a.id, "  ")
    h.delete(a.id)
    assert [c.id for c in h.list()] == [b.id]


@pytest.mark.parametrize("bad", ["../../etc/passwd", "20261123-101500-a1b2c3/../x", "", "x.json"])
def test_ids_cannot_leave_the_folder(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ChatError, match="not a chat id"):
        ChatHistory(tmp_path).load(bad)
    with pytest.raises(ChatError):
        check_id(bad)


def test_damaged_file_is_named_and_skipped_in_the_list(tmp_path: Path) -> None:
    h = ChatHistory(tmp_path)
    good = _conv()
    h.save(good)
    bad_id = "20261123-101500-a1b2c3"
    (tmp_path / f"{bad_id}.json").write_text('{"messages": [\n  oops\n]}')
    assert [c.id for c in h.list()] == [good.id]
    with pytest.raises(ChatError, match=rf"{bad_id}\.json: line 2"):
        h.load(bad_id)


def test_markdown_export_holds_the_conversation() -> None:
    md = _conv().to_markdown()
    assert "**You:**" in md and "What is my cat called?" in md and "Biscuit." in md and "Be brief." in md


def test_kill_mid_save_loses_nothing(tmp_path: Path) -> None:
    """A writer SIGKILLed in the middle of a save (its temp file already holds bytes) leaves the
    previous complete file every time."""
    h = ChatHistory(tmp_path)
    conv = _conv(answer="x" * 4_000_000)  # big enough that a save takes a while
    h.save(conv)
    before = h.path(conv.id).read_bytes()
    script = (f"from localchat.store.chats import ChatHistory\n"
              f"h = ChatHistory({str(tmp_path)!r}); c = h.load({conv.id!r})\n"
              f"while True:\n    c.messages[-1]['content'] += 'y'; h.save(c)\n")
    mid_write = 0
    for _ in range(20):
        for stray in tmp_path.glob(f".{conv.id}.json.*.tmp"):
            stray.unlink()
        proc = subprocess.Popen([sys.executable, "-c", script])
        deadline = time.time() + 30
        while time.time() < deadline:  # wait until a save has begun writing its temp file
            if any(t.stat().st_size > 0 for t in tmp_path.glob(f".{conv.id}.json.*.tmp") if t.exists()):
                break
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # a temp file left behind holding part of a save: the kill came while it was writing
        mid_write += any(t.stat().st_size > 0 for t in tmp_path.glob(f".{conv.id}.json.*.tmp"))
        loaded = h.load(conv.id)  # parses: never half a file
        assert loaded.messages[-1]["content"].startswith("x" * 4_000_000)
        if mid_write >= 3:
            break
    assert mid_write >= 3, "the writer was never killed in the middle of a save"
    assert len(h.path(conv.id).read_bytes()) >= len(before)
    assert [c.id for c in h.list()] == [conv.id]


def test_picked_chats_become_a_dataset_the_trainer_reads(tmp_path: Path) -> None:
    h = ChatHistory(tmp_path / "chats")
    a, b = _conv(), _conv("Who made you?", "The localchat team.")
    h.save(a)
    h.save(b)
    out = write_dataset(h, [a.id, b.id], tmp_path / "ds.jsonl")
    ds = load_dataset(out, held_out=0.0)
    assert ds.kind == "chat" and len(ds) == 2
    assert ds.train[0].messages[0] == {"role": "system", "content": "Be brief."}
    empty = Conversation(messages=[{"role": "user", "content": "hi"}])
    h.save(empty)
    with pytest.raises(ChatError, match="no assistant answer"):
        write_dataset(h, [empty.id], tmp_path / "ds2.jsonl")


def test_chats_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LOCALCHAT_HOME", str(tmp_path))
    h = ChatHistory(tmp_path / "chats")
    c = _conv()
    c.auto_title()
    h.save(c)
    assert cli(["chats", "list"]) == 0
    assert c.id in capsys.readouterr().out
    assert cli(["chats", "export", c.id, "-o", str(tmp_path / "c.md")]) == 0
    assert "Biscuit." in (tmp_path / "c.md").read_text()
    assert cli(["chats", "dataset", c.id, "-o", str(tmp_path / "d.jsonl")]) == 0
    assert json.loads((tmp_path / "d.jsonl").read_text())["messages"][-1]["content"] == "Biscuit."
    assert cli(["chats", "export", "../../etc/passwd"]) == 1
    assert "not a chat id" in capsys.readouterr().err


def test_dataset_leaves_out_thoughts(tmp_path: Path) -> None:
    """A reasoning model's <think>…</think> in a saved answer does not go into the training set."""
    h = ChatHistory(tmp_path)
    c = _conv("What is my cat called?", "<think>\nThe user told me earlier.\n</think>\n\nBiscuit.")
    h.save(c)
    rows = load_dataset(write_dataset(h, [c.id], tmp_path / "ds.jsonl"), held_out=0.0)
    assert rows.train[0].messages[-1] == {"role": "assistant", "content": "Biscuit."}


def test_regenerated_and_edited_versions_page_back_and_survive_a_save(tmp_path: Path) -> None:
    """Regenerate (a fork at the answer) and Edit (a fork at the question) keep what they replace:
    paging shows each version again, and a reload from disk keeps them all."""
    h = ChatHistory(tmp_path)
    conv = _conv()
    conv.fork(1)  # regenerate the answer
    conv.messages.append({"role": "assistant", "content": "Whiskers."})
    conv.messages += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
    conv.fork(2)  # edit the second question
    conv.messages += [{"role": "user", "content": "Really sure?"}, {"role": "assistant", "content": "Quite."}]
    h.save(conv)
    conv = h.load(conv.id)
    assert conv.branch_point() == 2 and conv.versions["2"]["at"] == 1
    conv.show_version(2, 0)
    assert [m["content"] for m in conv.messages] == ["What is my cat called?", "Whiskers.", "Sure?", "Yes."]
    conv.show_version(1, 0)  # the first answer, with the turns that followed it then (none)
    assert [m["content"] for m in conv.messages] == ["What is my cat called?", "Biscuit."]
    assert conv.branch_point() == 1
    conv.show_version(1, 1)
    conv.show_version(2, 1)
    assert [m["content"] for m in conv.messages][-2:] == ["Really sure?", "Quite."]
