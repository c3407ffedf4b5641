"""The Chat tab: streaming answers with Stop, Regenerate, Edit-and-resend and Continue, the
plan in words, live tokens/s, the context budget, and the saved-chat list beside it."""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from localchat.chat.reasoning import split_thoughts
from localchat.commands.preset import set_preset
from localchat.engine.settings import PRESET, SamplingSettings, model_settings, preset_text
from localchat.store.chats import ChatError, Conversation

from . import job_panel
from .context import AppContext

UPDATE_EVERY_S = 1 / 3  # at most 3 redraws of an answer a second (see `answer`)
BUSY = "still answering: wait, or press Esc (or Stop) to end the answer first"
OVERFLOW_POLICY = "when the context is full, the oldest turns are left out and the system prompt is kept"


@dataclass
class ChatParts:
    """What the app's timer and page load update in this tab."""
    chat_list: gr.Dropdown
    model_dd: gr.Dropdown
    status: gr.Markdown
    first_run: gr.Column
    panel: job_panel.JobPanel


FIRST_RUN = ("### No model yet\nInstall the starter model (SmolLM2-135M-Instruct, about 100 MB, checked "
             "against its SHA-256) to chat right away, or bring your own in the **Models** tab: *Pull* from "
             "Hugging Face, *Import GGUF* (a file on this computer) or *Convert* a checkpoint folder.")


LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "\\[", "right": "\\]", "display": True},
         {"left": "\\(", "right": "\\)", "display": False}, {"left": "$", "right": "$", "display": False}]


def _bubbles(conv: Conversation) -> list[dict[str, Any]]:
    """The chat as the Chatbot shows it: a reasoning model's thoughts in a folded bubble of their own
    before its answer (they are kept in the saved chat, and left out of the model's context)."""
    out: list[dict[str, Any]] = []
    for m in conv.messages:
        thoughts, text = split_thoughts(m["content"]) if m["role"] == "assistant" else ("", m["content"])
        if thoughts:
            folded = {"title": "Thoughts", "status": "done"}
            out.append({"role": "assistant", "content": thoughts, "metadata": folded})
        out.append({"role": m["role"], "content": text})
    return out


def chat_choices(ctx: AppContext) -> list[tuple[str, str]]:
    return [(f"{c.title} · {c.updated[:16].replace('T', ' ')}", c.id) for c in ctx.history.list()]


def _budget_html(used: int, n_ctx: int, dropped: int) -> str:
    pct = 100 * used / n_ctx if n_ctx else 0
    note = (f"<br>Note: {dropped} oldest message{'s' if dropped != 1 else ''} no longer fit and "
            "were left out of the last answer (the system prompt was kept)") if dropped else ""
    return (f"<div id='budget'>context: <b>{used}</b> / {n_ctx} tokens ({pct:.0f}%) "
            f"<progress value='{used}' max='{n_ctx}' style='width:40%'></progress><br>"
            f"<small>{OVERFLOW_POLICY}</small>{note}</div>")


# The sampling settings the tab shows as sliders: field, low, high, step, label. A model's preset sets
# them when the model is picked or a new chat starts; a saved chat restores the ones it was answered with.
SLIDERS = (("temperature", 0, 2, 0.05, "Temperature (0: greedy)"), ("top_p", 0.05, 1, 0.05, "Top-p"),
           ("top_k", 0, 200, 1, "Top-k (0: all)"), ("min_p", 0, 1, 0.01, "Min-p"),
           ("repeat_penalty", 0.5, 2, 0.05, "Repeat penalty (1: none)"),
           ("max_tokens", 16, 4096, 16, "Max answer tokens"))
SHOWN = tuple(f for f, *_ in SLIDERS)
DEFAULTS = SamplingSettings()


def _settings(preset: SamplingSettings, seed: Any, *values: float) -> SamplingSettings:
    """The sliders' values over the model's preset (which also set the sliders when it was picked)."""
    seed = int(seed) if seed not in (None, "", -1) and int(seed) >= 0 else None
    typed = {f: type(getattr(DEFAULTS, f))(v) for f, v in zip(SHOWN, values)}  # a slider sends 40.0 for top_k
    return replace(preset, **typed, seed=seed)


def slider_values(settings: SamplingSettings) -> list[float]:
    return [getattr(settings, f) for f in SHOWN]


def preset_note(ctx: AppContext, name: str | None) -> str:
    """Which preset the sliders start from: the model's own, or the global defaults."""
    if not name or name not in ctx.store.models():
        return ""
    own = ctx.store.get(name).defaults.get(PRESET) or {}
    return (f"**{name}**'s preset: {preset_text(own)}" if own else
            f"**{name}** has no preset: the global defaults apply") + " (*Save as the model's preset* changes it)"


def pager(conv: Conversation) -> tuple:
    """The ‹ k/n › row under the chat, for the last place with versions (a regenerated answer, an
    edited question); hidden while there is none."""
    i = conv.branch_point()
    if i is None:
        return gr.update(visible=False), ""
    v = conv.versions[str(i)]
    what = "answer" if i < len(conv.messages) and conv.messages[i]["role"] == "assistant" else "question"
    return gr.update(visible=True), f"{what} version {v['at'] + 1}/{len(v['tails'])}"


def first_model(ctx: AppContext) -> str | None:
    """The model a new chat starts on: the starter where the store has it, else the first one."""
    models = ctx.chat_models()
    return next((m for m in models if m == "smollm2-135m-instruct"), models[0] if models else None)


def build(ctx: AppContext, timer: gr.Timer) -> ChatParts:
    """Lay out the tab; returns the parts the app refreshes on page load and on `timer`, which an answer
    pauses while it is written."""
    first = first_model(ctx)

    def default_system(name: str | None) -> str:
        if not name or name not in ctx.store.models():
            return ""
        return ctx.store.get(name).defaults.get("system", "")

    def preset(name: str | None) -> SamplingSettings:
        """The model's sampling preset (the global defaults where it has none)."""
        if not name or name not in ctx.store.models():
            return SamplingSettings()
        return model_settings(ctx.store.get(name).defaults)

    def fresh_conversation() -> Conversation:
        """A new chat with its own id. Gradio calls this for every page it serves (each tab, each
        reload): one id made when the app started would make every tab overwrite the same file."""
        model = first_model(ctx) or ""
        return Conversation(model=model, system=default_system(model))

    conv_state = gr.State(fresh_conversation)
    shown_model = gr.State(first)  # the model whose plan, system prompt and preset the tab shows
    deleted = gr.State(None)  # the chat Delete removed last, until Undo or the next delete
    with gr.Row(elem_id="chat-row"):
        with gr.Column(scale=1, min_width=240, elem_id="chat-side"):
            new_btn = gr.Button("New chat", elem_id="new-chat")
            chat_list = gr.Dropdown(choices=chat_choices(ctx), value=None, label="Saved chats",
                                    elem_id="chat-list", interactive=True)
            title_box = gr.Textbox(label="Title", elem_id="chat-title")
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", elem_id="rename-chat")
                delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-chat")
            undo_btn = gr.Button("Undo delete", size="sm", visible=False, elem_id="undo-delete")
            export_btn = gr.Button("Export Markdown", size="sm", elem_id="export-chat")
            export_file = gr.File(label="Markdown export", elem_id="export-file", interactive=False)
        with gr.Column(scale=3, elem_id="chat-main"):
            model_dd = gr.Dropdown(choices=ctx.chat_models(), value=first, label="Model", elem_id="model-picker")
            # Status first: loading, speed and errors stay in view above the conversation.
            status = gr.Markdown(elem_id="chat-status")
            with gr.Column(visible=first is None, elem_id="first-run") as first_run:
                gr.Markdown(FIRST_RUN)
                starter_btn = gr.Button("Install the starter model", variant="primary", elem_id="install-starter")
                panel = job_panel.build("chat")
            # No share icon (there is nowhere to share to offline); inline math renders as well as $$…$$.
            chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", buttons=["copy", "copy_all"],
                                 latex_delimiters=LATEX)
            with gr.Row(visible=False, elem_id="versions") as version_row:
                prev_btn = gr.Button("‹", size="sm", scale=0, min_width=60, elem_id="version-prev")
                version_label = gr.Markdown(elem_id="version-label")
                next_btn = gr.Button("›", size="sm", scale=0, min_width=60, elem_id="version-next")
            with gr.Row(equal_height=True):
                msg = gr.Textbox(placeholder="Ask something… (Enter sends, Esc stops)", show_label=False,
                                 scale=5, elem_id="message", autofocus=True)
                send_btn = gr.Button("Send", variant="primary", scale=1, min_width=110, elem_id="send")
                stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
            with gr.Row():
                regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                cont_btn = gr.Button("Continue", size="sm", elem_id="continue")
                edit_btn = gr.Button("Edit last question", size="sm", elem_id="edit-last")
            budget = gr.HTML(_budget_html(0, 0, 0) if not first else "", elem_id="budget-box")
            with gr.Accordion("Plan: how this model runs here, and why", open=False):
                plan_md = gr.Code(value=ctx.plan_text(first) if first else "no model in the store",
                                  language=None, elem_id="plan", interactive=False)
            with gr.Accordion("System prompt and sampling", open=False):
                system_box = gr.Textbox(label="System prompt", value=default_system(first), lines=2,
                                        elem_id="system-prompt")
                preset_md = gr.Markdown(preset_note(ctx, first), elem_id="preset-note")
                d = preset(first)
                sliders = [gr.Slider(lo, hi, value=getattr(d, f), step=step, label=label,
                                     elem_id=f.replace("_", "-")) for f, lo, hi, step, label in SLIDERS]
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                save_preset = gr.Button("Save as the model's preset", size="sm", elem_id="save-preset")

    sampling = [seed, *sliders]
    # What would change the chat under an answer being written (its reply is a message of the chat
    # it streams into): greyed out until the answer ends, and each handler refuses while one runs.
    locked = [send_btn, regen_btn, cont_btn, edit_btn, delete_btn, new_btn, prev_btn, next_btn]
    # The page's timer (job progress, the model lists) pauses while the answer is written: each tick costs
    # the browser more than a redraw of the answer, on the cores the model decodes on (bench_ui.py), and
    # the first tick after the answer brings whatever changed meanwhile.
    outputs = [chatbot, msg, status, budget, conv_state, chat_list, title_box, *locked, timer]
    lock = (gr.update(interactive=False),) * len(locked) + (gr.update(active=False),)
    unlock = (gr.update(interactive=True),) * len(locked) + (gr.update(active=True),)
    keep = (gr.skip(),) * (len(locked) + 1)

    def answered(key: str) -> None:
        """No answer runs in this session any more: the busy checks let the next click through. Set before
        the update that brings the buttons back: Gradio sends it to the page before it resumes the
        generator to its end, and a click made at once after a failed load was refused as busy there."""
        if (running := ctx.cancels.get(key)) is not None:
            running.set()

    def answer(conv: Conversation, mode: str, text: str, model: str, system: str, settings: SamplingSettings,
               key: str) -> Iterator[tuple]:
        conv.model, conv.system = model, system.strip()
        conv.sampling = {f: getattr(settings, f) for f in (*SHOWN, "seed") if getattr(settings, f) is not None}
        if mode == "send":
            conv.messages.append({"role": "user", "content": text})
        elif mode == "regenerate" and conv.messages[-1]["role"] == "assistant":
            conv.fork(len(conv.messages) - 1)  # the answer it replaces stays a version to page back to
        if mode != "continue":
            conv.messages.append({"role": "assistant", "content": ""})
        reply = conv.messages[-1]
        base = reply["content"]
        cancel = threading.Event()
        ctx.cancels[key] = cancel
        loading = ctx.slot.name != model
        note = f"loading {model} …" if loading else "…"
        yield _bubbles(conv), "", note, gr.skip(), conv, gr.skip(), gr.skip(), *lock
        session = ctx.slot.session(model, conv.system or None)
        history = conv.full_messages()
        if mode != "continue":
            history = history[:-1]
        parts: list[str] = []
        t0, first_at, shown_at = time.perf_counter(), None, 0.0
        for chunk in ctx.slot.stream(session, history, settings, cancel, continue_last=mode == "continue"):
            if chunk.text:
                parts.append(chunk.text)
                now = time.perf_counter()
                first_at = first_at or now
                reply["content"] = base + "".join(parts)
                # Redraw at most 3 times a second: every redraw costs the browser and the server
                # CPU that the decode needs on a small laptop (bench_ui.py, 2 cores: 0.48x of plain
                # decode speed redrawing every token, 0.75x at 10 a second; 4 a second gave 0.876x
                # (0.862-0.900) against 3 a second's 0.913x (0.861-0.963), 5 fresh apps each, one run).
                if now - shown_at < UPDATE_EVERY_S and len(parts) > 1:
                    continue
                shown_at = now
                elapsed = now - first_at
                rate = f"{(len(parts) - 1) / elapsed:.1f} tok/s" if elapsed > 0.2 else "…"
                yield (_bubbles(conv), gr.skip(), f"generating on {ctx.slot.loaded.plan.backend}: {rate}",
                       gr.skip(), conv, gr.skip(), gr.skip(), *keep)
        stats = session.last_stats
        conv.auto_title()
        ctx.history.save(conv)
        line = f"{model} on {ctx.slot.loaded.plan.backend}: " + (stats.summary() if stats else
                                                                 f"{time.perf_counter() - t0:.1f} s")
        if stats and stats.finish_reason == "cancelled":
            line = "Stopped: " + line
        elif mode == "continue" and not parts:
            line = "The answer was already complete; nothing to add. " + line
        used = (stats.prompt_tokens + stats.completion_tokens) if stats else 0
        answered(key)  # (the engine also marks the event as its stream ends)
        yield (_bubbles(conv), gr.skip(), line, _budget_html(used, session.backend.n_ctx, session.last_dropped),
               conv, gr.update(choices=chat_choices(ctx), value=conv.id), conv.title, *unlock)

    def refuse(why: str) -> tuple:
        return (gr.skip(), gr.skip(), why, *(gr.skip(),) * (len(outputs) - 3))

    def guarded(mode: str):
        def handler(request: gr.Request, text: str, conv: Conversation, model: str, system: str, sd: Any,
                    *values: float) -> Iterator[tuple]:
            text = (text or "").strip()
            key = request.session_hash if request else ""
            if ctx.answering(key):  # Enter again while an answer is written
                yield refuse(BUSY)
                return
            if mode == "send" and not text:
                yield (gr.skip(),) * len(outputs)
                return
            if not model:
                yield refuse("no model: install the starter above, or pull or import one in the Models tab")
                return
            if model not in ctx.chat_models():
                yield refuse(f"Error: “{model}” was removed from the store: pick another model")
                return
            if mode in ("regenerate", "continue") and not conv.messages:
                yield refuse(f"nothing to {mode} yet: ask something first")
                return
            if mode == "continue" and conv.messages[-1]["role"] != "assistant":
                yield refuse("nothing to continue: the last message is yours")
                return
            try:
                yield from answer(conv, mode, text, model, system, _settings(preset(model), sd, *values), key)
            except Exception as exc:  # the user sees a message, never a traceback
                if conv.messages and conv.messages[-1]["role"] == "assistant" and not conv.messages[-1]["content"]:
                    conv.messages.pop()
                answered(key)
                yield (_bubbles(conv), gr.skip(), f"Error: {exc}", gr.skip(), conv, gr.skip(), gr.skip(), *unlock)
            finally:
                answered(key)  # however it ended (a page closed mid-answer closes the generator)
        return handler

    inputs = [msg, conv_state, model_dd, system_box, *sampling]
    # Progress hidden: the status line and the Send button show the busy state, not pulsing borders.
    pager_out = [version_row, version_label]
    then_pager = {"fn": pager, "inputs": [conv_state], "outputs": pager_out}
    for trigger in (send_btn.click, msg.submit):
        trigger(guarded("send"), inputs, outputs, show_progress="hidden").then(**then_pager)
    regen_btn.click(guarded("regenerate"), inputs, outputs, show_progress="hidden").then(**then_pager)
    cont_btn.click(guarded("continue"), inputs, outputs, show_progress="hidden")

    def stop(request: gr.Request) -> None:
        event = ctx.cancels.get(request.session_hash if request else "")
        if event is not None:
            event.set()

    stop_btn.click(stop, None, None, queue=False)

    def edit_last(conv: Conversation, request: gr.Request) -> tuple:
        if ctx.answering(request.session_hash):
            return gr.skip(), gr.skip(), BUSY, gr.skip()
        idx = max((i for i, m in enumerate(conv.messages) if m["role"] == "user"), default=None)
        if idx is None:
            return gr.skip(), gr.skip(), "no question to edit yet", conv
        text = conv.messages[idx]["content"]
        conv.fork(idx)  # the question and its answers stay a version: sending the edit starts a branch
        return _bubbles(conv), text, "edit the question and send it again (‹ pages back to the original)", conv

    edit_btn.click(edit_last, [conv_state], [chatbot, msg, status, conv_state]).then(**then_pager)

    def page(conv: Conversation, step: int, request: gr.Request) -> tuple:
        if ctx.answering(request.session_hash):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), BUSY
        i = conv.branch_point()
        if i is None:
            return gr.skip(), conv, *pager(conv), gr.skip()
        conv.show_version(i, conv.versions[str(i)]["at"] + step)
        if conv.messages:
            ctx.history.save(conv)  # reopened later, the chat shows the version picked last
        return _bubbles(conv), conv, *pager(conv), gr.skip()

    def page_back(conv: Conversation, request: gr.Request) -> tuple:
        return page(conv, -1, request)

    def page_on(conv: Conversation, request: gr.Request) -> tuple:
        return page(conv, 1, request)

    prev_btn.click(page_back, [conv_state], [chatbot, conv_state, *pager_out, status])
    next_btn.click(page_on, [conv_state], [chatbot, conv_state, *pager_out, status])

    def new_chat(model: str, system: str, request: gr.Request) -> tuple:
        if ctx.answering(request.session_hash):  # the trash icon cannot be greyed out
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), BUSY, *(gr.skip(),) * (1 + len(sliders))
        conv = Conversation(model=model or "", system=system)
        return [], conv, gr.update(value=None), conv.title, "", "", *slider_values(preset(model))

    new_outputs = [chatbot, conv_state, chat_list, title_box, status, budget, *sliders]
    new_btn.click(new_chat, [model_dd, system_box], new_outputs).then(**then_pager)
    # The chat's trash icon starts a new chat: the cleared one stays saved and is not sent again.
    chatbot.clear(new_chat, [model_dd, system_box], new_outputs).then(**then_pager)

    def open_chat(chat_id: str | None, model: str) -> tuple:
        """The saved chat, on its model (if still in the store) and with the sampling settings it was
        answered with."""
        skip = (gr.skip(),) * (3 + len(sampling))
        if not chat_id:
            return (gr.skip(),) * 6 + skip
        try:
            conv = ctx.history.load(chat_id)
        except ChatError as exc:
            return (gr.skip(),) * 5 + (f"Error: {exc}",) + skip
        pick = conv.model if conv.model in ctx.chat_models() else model
        try:
            used = replace(preset(pick), **{k: v for k, v in conv.sampling.items() if k in (*SHOWN, "seed")})
        except (TypeError, ValueError):  # a hand-edited chat: its model's preset instead
            used = preset(pick)
        seed_value = used.seed if used.seed is not None else -1
        return (_bubbles(conv), conv, conv.title, conv.system, pick, f"opened “{conv.title}”",
                ctx.plan_text(pick) if pick else gr.skip(), preset_note(ctx, pick), seed_value,
                *slider_values(used), pick)

    chat_list.input(open_chat, [chat_list, model_dd],
                    [chatbot, conv_state, title_box, system_box, model_dd, status, plan_md, preset_md,
                     *sampling, shown_model]).then(**then_pager)

    def rename(conv: Conversation, title: str) -> tuple:
        try:
            if not conv.messages:
                raise ChatError("nothing to rename yet: the chat is saved after its first answer")
            conv = ctx.history.rename(conv.id, title)
        except ChatError as exc:
            return gr.skip(), gr.skip(), f"Error: {exc}"
        return conv, gr.update(choices=chat_choices(ctx), value=conv.id), f"renamed to “{conv.title}”"

    rename_btn.click(rename, [conv_state, title_box], [conv_state, chat_list, status])

    def delete(conv: Conversation, model: str, system: str, request: gr.Request) -> tuple:
        if ctx.answering(request.session_hash):
            return (gr.skip(),) * 4 + (BUSY, gr.skip(), gr.skip())
        if not conv.messages:
            return (gr.skip(),) * 4 + ("nothing to delete: this chat is not saved yet", gr.skip(), gr.skip())
        ctx.history.delete(conv.id)
        fresh = Conversation(model=model or "", system=system)
        return ([], fresh, gr.update(choices=chat_choices(ctx), value=None), fresh.title,
                f"deleted “{conv.title}”: Undo brings it back", conv, gr.update(visible=True))

    delete_outputs = [chatbot, conv_state, chat_list, title_box, status, deleted, undo_btn]
    delete_btn.click(delete, [conv_state, model_dd, system_box], delete_outputs).then(**then_pager)

    def undo(gone: Conversation | None) -> tuple:
        if gone is None:
            return (gr.skip(),) * 4 + ("nothing to undo", None, gr.update(visible=False))
        ctx.history.save(gone)
        return (_bubbles(gone), gone, gr.update(choices=chat_choices(ctx), value=gone.id), gone.title,
                f"restored “{gone.title}”", None, gr.update(visible=False))

    undo_btn.click(undo, [deleted], delete_outputs).then(**then_pager)

    def export(conv: Conversation) -> tuple:
        if not conv.messages:
            return None, "nothing to export yet"
        folder = Path(tempfile.mkdtemp(prefix="localchat-export-"))
        path = folder / f"chat-{conv.id}.md"
        path.write_text(conv.to_markdown(), encoding="utf-8")
        return str(path), f"exported “{conv.title}” as Markdown"

    export_btn.click(export, [conv_state], [export_file, status])

    def pick_model(name: str, shown: str | None) -> tuple:
        """The picked model's plan, system prompt and preset. Gradio's picker sends `input` at every blur
        (and twice for a pick): the model shown already keeps the prompt and settings the user typed."""
        if name == shown:
            return (gr.skip(),) * (5 + len(sliders))
        if not name:
            return ("no model",) + (gr.skip(),) * (2 + len(sliders)) + ("", name)
        if name not in ctx.chat_models():
            gone = f"Error: “{name}” was removed from the store"
            return (gr.skip(),) * (3 + len(sliders)) + (gone, gr.skip())
        return (ctx.plan_text(name), default_system(name), preset_note(ctx, name), *slider_values(preset(name)),
                "", name)

    # Progress hidden: Gradio's pending timer ("0.0s") would show in the status line. One at a time: a
    # pick's second `input` then finds the model shown that its first one set.
    model_dd.input(pick_model, [model_dd, shown_model],
                   [plan_md, system_box, preset_md, *sliders, status, shown_model],
                   show_progress="hidden", concurrency_limit=1)

    def save_as_preset(model: str, *values: float) -> tuple:
        """The sliders as the model's preset (what `localchat preset` sets): only the settings that
        differ from the global defaults are kept, so saving the defaults clears them; the preset's
        settings without a slider (set with `localchat preset`) stay."""
        if not model or model not in ctx.store.models():
            return gr.skip(), "Error: pick a model first"
        chosen = _settings(DEFAULTS, None, *values)
        changes = {f: getattr(chosen, f) for f in SHOWN if getattr(chosen, f) != getattr(DEFAULTS, f)}
        try:
            entry = set_preset(ctx.store, model, changes, unset=SHOWN)
        except Exception as exc:
            return gr.skip(), f"Error: {exc}"
        saved = entry.defaults.get(PRESET) or {}
        return preset_note(ctx, model), f"saved {model}'s preset: {preset_text(saved)}"

    save_preset.click(save_as_preset, [model_dd, *sliders], [preset_md, status])

    def install_starter() -> str:
        try:
            ctx.jobs.start("install the starter model", ["setup"])
        except RuntimeError as exc:
            return f"Error: {exc}"
        return "installing the starter model: its progress shows below"

    starter_btn.click(install_starter, None, [status])
    panel.stop.click(lambda: ctx.jobs.stop(), None, [status])
    return ChatParts(chat_list, model_dd, status, first_run, panel)


def follow_store(ctx: AppContext, current: str | None) -> tuple:
    """Updates for the model picker, its status line and the first-run box after the store changed
    (a model imported, converted, fine-tuned or deleted, by this app or by the command line)."""
    names = ctx.chat_models()
    if current in names:
        return gr.update(choices=names), gr.skip(), gr.update(visible=not names)
    pick = first_model(ctx)
    note = f"“{current}” was removed from the store; " + (f"now using {pick}" if pick else "no model left")
    return gr.update(choices=names, value=pick), note if current else gr.skip(), gr.update(visible=not names)
