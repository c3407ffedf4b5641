"""The Chat tab: streaming answers with Stop, Regenerate, Edit-and-resend and Continue, the
plan in words, live tokens/s, the context budget, and the saved-chat list beside it."""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from localchat.engine.settings import SamplingSettings, model_settings
from localchat.store.chats import ChatError, Conversation

from .context import AppContext

UPDATE_EVERY_S = 0.1
OVERFLOW_POLICY = "when the context is full, the oldest turns are left out and the system prompt is kept"


def _bubbles(conv: Conversation) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in conv.messages]


def chat_choices(ctx: AppContext) -> list[tuple[str, str]]:
    return [(f"{c.title} · {c.updated[:16].replace('T', ' ')}", c.id) for c in ctx.history.list()]


def _budget_html(used: int, n_ctx: int, dropped: int) -> str:
    pct = 100 * used / n_ctx if n_ctx else 0
    note = (f"<br>Note: {dropped} oldest message{'s' if dropped != 1 else ''} no longer fit and "
            "were left out of the last answer (the system prompt was kept)") if dropped else ""
    return (f"<div id='budget'>context: <b>{used}</b> / {n_ctx} tokens ({pct:.0f}%) "
            f"<progress value='{used}' max='{n_ctx}' style='width:40%'></progress><br>"
            f"<small>{OVERFLOW_POLICY}</small>{note}</div>")


def _settings(preset: SamplingSettings, temperature: float, top_p: float, max_tokens: float,
              seed: Any) -> SamplingSettings:
    """The sliders' values over the model's preset (which also set the sliders when it was picked)."""
    seed = int(seed) if seed not in (None, "", -1) and int(seed) >= 0 else None
    return replace(preset, temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens),
                   seed=seed)


def build(ctx: AppContext) -> gr.Dropdown:
    """Lay out the tab; returns the saved-chat list, which the app refreshes on page load."""
    models = ctx.chat_models()
    first = next((m for m in models if m == "smollm2-135m-instruct"), models[0] if models else None)

    def default_system(name: str | None) -> str:
        if not name or name not in ctx.store.models():
            return ""
        return ctx.store.get(name).defaults.get("system", "")

    def preset(name: str | None) -> SamplingSettings:
        """The model's sampling preset (the global defaults where it has none)."""
        if not name or name not in ctx.store.models():
            return SamplingSettings()
        return model_settings(ctx.store.get(name).defaults)

    conv_state = gr.State(Conversation(model=first or "", system=default_system(first)))
    with gr.Row():
        with gr.Column(scale=1, min_width=240):
            new_btn = gr.Button("New chat", elem_id="new-chat")
            chat_list = gr.Dropdown(choices=chat_choices(ctx), value=None, label="Saved chats",
                                    elem_id="chat-list", interactive=True)
            title_box = gr.Textbox(label="Title", elem_id="chat-title")
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", elem_id="rename-chat")
                delete_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-chat")
            export_btn = gr.Button("Export Markdown", size="sm", elem_id="export-chat")
            export_file = gr.File(label="Markdown export", elem_id="export-file", interactive=False)
        with gr.Column(scale=3):
            with gr.Row():
                model_dd = gr.Dropdown(choices=models, value=first, label="Model", elem_id="model-picker",
                                       scale=3)
                refresh_models = gr.Button("Refresh", scale=0, min_width=40, elem_id="refresh-models")
            with gr.Accordion("Plan: how this model runs here, and why", open=False):
                plan_md = gr.Code(value=ctx.plan_text(first) if first else "no model in the store",
                                  language=None, elem_id="plan", interactive=False)
            chatbot = gr.Chatbot(elem_id="chatbot", height=420, label="Chat")
            with gr.Row():
                msg = gr.Textbox(placeholder="Ask something… (Enter sends)", show_label=False, scale=5,
                                 elem_id="message", autofocus=True)
                send_btn = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            with gr.Row():
                regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                cont_btn = gr.Button("Continue", size="sm", elem_id="continue")
                edit_btn = gr.Button("Edit last question", size="sm", elem_id="edit-last")
            status = gr.Markdown(elem_id="chat-status")
            budget = gr.HTML(_budget_html(0, 0, 0) if not first else "", elem_id="budget-box")
            with gr.Accordion("System prompt and sampling", open=False):
                system_box = gr.Textbox(label="System prompt", value=default_system(first), lines=2,
                                        elem_id="system-prompt")
                d = preset(first)
                temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="Temperature (0: greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(16, 4096, value=d.max_tokens, step=16, label="Max answer tokens",
                                       elem_id="max-tokens")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")

    sampling = [temperature, top_p, max_tokens, seed]
    outputs = [chatbot, msg, status, budget, conv_state, chat_list, title_box]

    def answer(conv: Conversation, mode: str, text: str, model: str, system: str, settings: SamplingSettings,
               request: gr.Request) -> Iterator[tuple]:
        conv.model, conv.system = model, system.strip()
        if mode == "send":
            conv.messages.append({"role": "user", "content": text})
        elif mode == "regenerate":
            while conv.messages and conv.messages[-1]["role"] == "assistant":
                conv.messages.pop()
        if mode != "continue":
            conv.messages.append({"role": "assistant", "content": ""})
        reply = conv.messages[-1]
        base = reply["content"]
        cancel = threading.Event()
        ctx.cancels[request.session_hash if request else ""] = cancel
        loading = ctx.slot.name != model
        yield (_bubbles(conv), "", f"loading {model} …" if loading else "…", gr.skip(), conv, gr.skip(), gr.skip())
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
                # Redraw at most 10 times a second: every token would cost the browser and
                # the server more CPU than the decode itself on a small laptop (bench_ui.py:
                # 0.48x of plain decode speed redrawing every token, 0.75x at 10 a second).
                if now - shown_at < UPDATE_EVERY_S and len(parts) > 1:
                    continue
                shown_at = now
                elapsed = now - first_at
                rate = f"{(len(parts) - 1) / elapsed:.1f} tok/s" if elapsed > 0.2 else "…"
                yield (_bubbles(conv), gr.skip(), f"generating on {ctx.slot.loaded.plan.backend}: {rate}",
                       gr.skip(), conv, gr.skip(), gr.skip())
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
        yield (_bubbles(conv), gr.skip(), line, _budget_html(used, session.backend.n_ctx, session.last_dropped),
               conv, gr.update(choices=chat_choices(ctx), value=conv.id), conv.title)

    def guarded(mode: str):
        def handler(text: str, conv: Conversation, model: str, system: str, temp: float, tp: float,
                    mt: float, sd: Any, request: gr.Request) -> Iterator[tuple]:
            text = (text or "").strip()
            if mode == "send" and not text:
                yield (gr.skip(),) * len(outputs)
                return
            if not model:
                yield (gr.skip(), gr.skip(), "no model: pull or import one in the Models tab",
                       *(gr.skip(),) * 4)
                return
            if mode in ("regenerate", "continue") and not conv.messages:
                yield (gr.skip(), gr.skip(), f"nothing to {mode} yet: ask something first", *(gr.skip(),) * 4)
                return
            if mode == "continue" and conv.messages[-1]["role"] != "assistant":
                yield (gr.skip(), gr.skip(), "nothing to continue: the last message is yours", *(gr.skip(),) * 4)
                return
            try:
                yield from answer(conv, mode, text, model, system, _settings(preset(model), temp, tp, mt, sd),
                                  request)
            except Exception as exc:  # the user sees a message, never a traceback
                if conv.messages and conv.messages[-1]["role"] == "assistant" and not conv.messages[-1]["content"]:
                    conv.messages.pop()
                yield (_bubbles(conv), gr.skip(), f"Error: {exc}", gr.skip(), conv, gr.skip(), gr.skip())
        return handler

    inputs = [msg, conv_state, model_dd, system_box, *sampling]
    for trigger in (send_btn.click, msg.submit):
        trigger(guarded("send"), inputs, outputs)
    regen_btn.click(guarded("regenerate"), inputs, outputs)
    cont_btn.click(guarded("continue"), inputs, outputs)

    def stop(request: gr.Request) -> None:
        event = ctx.cancels.get(request.session_hash if request else "")
        if event is not None:
            event.set()

    stop_btn.click(stop, None, None, queue=False)

    def edit_last(conv: Conversation) -> tuple:
        idx = max((i for i, m in enumerate(conv.messages) if m["role"] == "user"), default=None)
        if idx is None:
            return gr.skip(), gr.skip(), "no question to edit yet", conv
        text = conv.messages[idx]["content"]
        conv.messages = conv.messages[:idx]
        return _bubbles(conv), text, "edit the question and send it again", conv

    edit_btn.click(edit_last, [conv_state], [chatbot, msg, status, conv_state])

    def new_chat(model: str, system: str) -> tuple:
        conv = Conversation(model=model or "", system=system)
        return [], conv, gr.update(value=None), conv.title, "", ""

    new_btn.click(new_chat, [model_dd, system_box], [chatbot, conv_state, chat_list, title_box, status, budget])

    def open_chat(chat_id: str | None, model: str) -> tuple:
        if not chat_id:
            return (gr.skip(),) * 6
        try:
            conv = ctx.history.load(chat_id)
        except ChatError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), f"Error: {exc}"
        pick = conv.model if conv.model in ctx.chat_models() else model
        return _bubbles(conv), conv, conv.title, conv.system, pick, f"opened “{conv.title}”"

    chat_list.input(open_chat, [chat_list, model_dd], [chatbot, conv_state, title_box, system_box, model_dd, status])

    def rename(conv: Conversation, title: str) -> tuple:
        try:
            if not conv.messages:
                raise ChatError("nothing to rename yet: the chat is saved after its first answer")
            conv = ctx.history.rename(conv.id, title)
        except ChatError as exc:
            return gr.skip(), gr.skip(), f"Error: {exc}"
        return conv, gr.update(choices=chat_choices(ctx), value=conv.id), f"renamed to “{conv.title}”"

    rename_btn.click(rename, [conv_state, title_box], [conv_state, chat_list, status])

    def delete(conv: Conversation, model: str, system: str) -> tuple:
        ctx.history.delete(conv.id)
        fresh = Conversation(model=model or "", system=system)
        return [], fresh, gr.update(choices=chat_choices(ctx), value=None), fresh.title, f"deleted “{conv.title}”"

    delete_btn.click(delete, [conv_state, model_dd, system_box], [chatbot, conv_state, chat_list, title_box, status])

    def export(conv: Conversation) -> tuple:
        if not conv.messages:
            return None, "nothing to export yet"
        folder = Path(tempfile.mkdtemp(prefix="localchat-export-"))
        path = folder / f"chat-{conv.id}.md"
        path.write_text(conv.to_markdown(), encoding="utf-8")
        return str(path), f"exported “{conv.title}” as Markdown"

    export_btn.click(export, [conv_state], [export_file, status])

    def pick_model(name: str) -> tuple:
        if not name:
            return "no model", gr.skip(), gr.skip(), gr.skip()
        d = preset(name)
        return ctx.plan_text(name), default_system(name), d.temperature, d.top_p

    model_dd.input(pick_model, [model_dd], [plan_md, system_box, temperature, top_p])

    def reload_models(current: str) -> Any:
        names = ctx.chat_models()
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    refresh_models.click(reload_models, [model_dd], [model_dd])
    return chat_list

