"""Parts of the app without a browser, with real files: what the timer reads and rebuilds per tick, and
the chat's handlers called as Gradio calls them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from localchat.commands.preset import set_preset  # noqa: E402
from localchat.engine.settings import SamplingSettings  # noqa: E402
from localchat.store import STARTER, Store  # noqa: E402
from localchat.store.chats import Conversation  # noqa: E402
from localchat.store.importer import import_gguf  # noqa: E402
from localchat.ui import models_tab  # noqa: E402
from localchat.ui.app import build_app  # noqa: E402
from localchat.ui.chat_tab import BUSY, slider_values  # noqa: E402
from localchat.ui.context import AppContext  # noqa: E402
from localchat.ui.loss_log import LossLog  # noqa: E402


def _lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_loss_log_reads_what_was_added_and_starts_over_for_a_new_run(tmp_path: Path) -> None:
    """The plot's rows grow with the log, a line still being written waits for its end, the version
    stays put while nothing is added (no redraw), and a new run's log (a new file) starts over."""
    log, reader = tmp_path / "loss.jsonl", LossLog()
    empty, frame = reader.read(log)
    assert frame.empty and reader.read(log)[0] == empty
    log.write_text(_lines({"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0}) + '{"step": 3, "lo')
    v2, frame = reader.read(log)
    assert frame["update"].tolist() == [1, 2] and v2 != empty and reader.read(log)[0] == v2
    with open(log, "a") as fh:
        fh.write('ss": 1.5}\n' + _lines({"step": 3, "held_out_loss": 1.8}))
    v3, frame = reader.read(log)
    assert frame.values.tolist() == [[1, 2.5, "train"], [2, 2.0, "train"], [3, 1.5, "train"], [3, 1.8, "held out"]]
    assert str(frame["update"].dtype) == "int64" and str(frame["loss"].dtype) == "float64" and v3 != v2
    fresh = tmp_path / "new.jsonl"
    fresh.write_text(_lines({"step": 1, "loss": 3.0}))
    os.replace(fresh, log)  # a new run (or a resumed one) writes a new file
    assert reader.read(log)[1].values.tolist() == [[1, 3.0, "train"]]


def test_models_table_is_planned_once_per_store_change(home: Store, starter_gguf: Path) -> None:
    """Every page and every tick get the same table until the store changes; a model imported from
    outside the app then shows in the next one."""
    ctx = AppContext(home)
    try:
        first = models_tab.table(ctx)
        assert models_tab.table(ctx) is first  # not planned again for a second page or tick
        import_gguf(Store(home.root), starter_gguf, name="added-later")
        second = models_tab.table(ctx)
        assert second is not first and "added-later" in [row[0] for row in second]
        ctx.reprobe()  # Refresh probes the hardware again: the backends are planned anew
        assert models_tab.table(ctx) is not second
    finally:
        ctx.close()


def listener(app: gr.Blocks, elem_id: str, event: str) -> object:
    """What the app runs when `event` happens to its component `elem_id` (`.fn`, with `.inputs`)."""
    block = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    return next(f for f in app.fns.values() if (block._id, event) in f.targets)


def test_an_answer_that_failed_leaves_the_chat_free_for_the_next_click(home: Store, starter_gguf: Path) -> None:
    """The update saying an answer failed brings the buttons back, and Gradio sends it to the page before
    it resumes the answer's generator to its end: Edit clicked then is answered, not refused as "still
    answering" (a model that failed to load left the answer marked as running until then)."""
    import_gguf(home, starter_gguf, name="broken")
    weights = home.path_of(home.get("broken").files[0].path)
    weights.unlink()  # perhaps a hard link to the starter: a new file, not a write through it
    weights.write_bytes(b"GGUF" + b"\0" * 4096)
    ctx = AppContext(home)
    app = build_app(ctx)
    send, edit = listener(app, "send", "click").fn, listener(app, "edit-last", "click").fn
    page = gr.Request(session_hash="one-page")
    conv = Conversation(model="broken")
    answer = send(page, "Say hi.", conv, "broken", "", -1, *slider_values(SamplingSettings(max_tokens=8)))
    try:
        failed = next(update for update in answer if str(update[2]).startswith("Error:"))
        assert failed[-1] == gr.update(active=True)  # the update that ends the answer: the timer ticks again
        status = edit(conv, page)[2]
        assert status != BUSY and status.startswith("edit the question"), status
    finally:
        answer.close()
        ctx.close()


def test_leaving_the_model_list_keeps_the_prompt_and_settings_typed(home: Store, starter_gguf: Path) -> None:
    """Gradio's model picker sends `input` whenever it loses focus, and twice for a pick: sent for the
    model shown already, it leaves the system prompt, the sliders and the status line as the user set
    them (a look at the list put the model's own back); a new model brings its plan, prompt and preset."""
    import_gguf(home, starter_gguf, name="other")
    set_preset(home, "other", {"top_k": 7})
    ctx = AppContext(home)
    try:
        pick = listener(build_app(ctx), "model-picker", "input")

        def picked(name: str) -> list:  # the picker's value, and each state the page holds at its start
            return list(pick.fn(*(name if b.elem_id == "model-picker" else b.value for b in pick.inputs)))

        assert picked(STARTER.name) == [gr.skip()] * len(pick.outputs)
        other = picked("other")
        assert other[0].startswith("store:   other") and "top_k 7" in other[2] and 7 in other
    finally:
        ctx.close()
