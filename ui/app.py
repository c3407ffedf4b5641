"""The desktop app: Chat, Models and Fine-tune tabs over one store, served on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from localchat.hostguard import HostGuard, HostGuardMiddleware

from . import chat_tab, finetune_tab, job_panel, models_tab
from .context import AppContext
from .tracker_fix import TrackerTimerFix

TITLE = "localchat"
# The conversation takes the height left over at 1280x800, so the status line above it and the
# message box below it stay on screen; on a phone the saved-chat sidebar goes below the chat.
CSS = """
footer {display: none !important}
#chatbot {height: max(260px, calc(100vh - 430px)) !important}
@media (max-width: 720px) {
  #chat-side {order: 2}
  #chatbot {height: 40vh !important}
}
#chat-status p {margin: 0}
/* The theme's three small choices sit in the top right corner, beside the title; on a phone they
   follow the title, which gets smaller so the message box stays on the first screen. */
#theme {position: absolute; top: 12px; right: 16px; width: auto !important; min-width: 0 !important}
#theme label {padding: 2px 8px}
@media (max-width: 720px) {
  #theme {position: static}
  #app-title h2 {font-size: 1rem; margin: 0}
}
button.label-wrap {padding-right: 8px}  /* the accordion's turned arrow stays inside its button */
"""
# Esc stops the answer being written, as in other chat apps (Stop does the same). The theme picked
# in the header (system, light or dark) is kept in the browser and applied before Gradio's own
# system-setting listener can undo it (ours runs after it when the computer's setting changes).
JS = """
() => {
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') { const b = document.querySelector('#stop'); if (b) b.click(); }
  });
  const dark = window.matchMedia('(prefers-color-scheme: dark)');
  window.localchatTheme = (mode) => {
    if (mode) localStorage.setItem('localchat-theme', mode);
    mode = localStorage.getItem('localchat-theme') || 'system';
    document.body.classList.toggle('dark', mode === 'dark' || (mode === 'system' && dark.matches));
  };
  dark.addEventListener('change', () => window.localchatTheme());
  window.localchatTheme();
}
"""
THEMES = [("System", "system"), ("Light", "light"), ("Dark", "dark")]


def tilde(path: Path) -> str:
    """`path` with the home folder written as ~, as people write it (and no machine path in screenshots)."""
    try:
        return "~/" + str(Path(path).resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE} — offline chat, quantization and fine-tuning · store: `{tilde(ctx.store.root)}`",
                    elem_id="app-title")
        theme = gr.Radio(THEMES, value="system", label="Theme", elem_id="theme", container=False)
        # Job progress and the model lists, refreshed every second (`tick` below); an answer pauses it.
        timer = gr.Timer(1.0)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = chat_tab.build(ctx, timer)
            with gr.Tab("Models", id="models", elem_id="tab-models"):
                m_panel, models_df, m_dropdowns = models_tab.build(ctx)
            with gr.Tab("Fine-tune", id="finetune", elem_id="tab-finetune") as ft_tab:
                f_panel, plot, ft_base, ft_chats = finetune_tab.build(ctx)

        # What this page was sent last (store stamp, loss version, job panel): the timer sends only
        # what changed since, so an idle app sends nothing and plans no model, however many pages are open.
        seen_state = gr.State(None)
        panels = [chat.panel, m_panel, f_panel]

        def tick(seen: tuple | None, current: str | None) -> tuple:
            """Job progress everywhere, and every model list follows the store: a model imported,
            converted or deleted from the command line shows up here within a second."""
            was_store, was_loss, was_job = seen or (None, None, None)
            job = job_panel.render(ctx.jobs)
            updates: list = list(job) * len(panels) if job != was_job else [gr.skip()] * (len(job) * len(panels))
            version, frame = finetune_tab.loss_frame(ctx, ctx.jobs)
            updates.append(frame if version != was_loss else gr.skip())
            stamp = ctx.store_stamp()
            if stamp != was_store:
                models = list(ctx.store.models())
                updates += [models_tab.table(ctx), gr.update(choices=models_tab.hf_models(ctx)),
                            gr.update(choices=models), gr.update(choices=models),
                            *chat_tab.follow_store(ctx, current)]
            else:
                updates += [gr.skip()] * 7
            return (*updates, (stamp, version, job))

        timer.tick(tick, [seen_state, chat.model_dd],
                   [*(c for p in panels for c in p.parts()), plot, models_df, m_dropdowns[0], m_dropdowns[1],
                    ft_base, chat.model_dd, chat.status, chat.first_run, seen_state],
                   show_progress="hidden", queue=False)

        def chats_choices() -> dict:
            return gr.update(choices=[(f"{c.title} ({c.turns} messages)", c.id) for c in ctx.history.list()])

        ft_tab.select(chats_choices, None, [ft_chats])
        # A page opened later (or after a restart) lists the chats saved since the app started.
        app.load(lambda: gr.update(choices=chat_tab.chat_choices(ctx)), None, [chat.chat_list])
        # The theme lives in the browser (each person's own), so these run there, not on the server.
        app.load(None, None, [theme], js="() => localStorage.getItem('localchat-theme') || 'system'")
        theme.input(None, [theme], None, js="(mode) => { window.localchatTheme(mode); return []; }")
    return app


def launch(ctx: AppContext, host: str, port: int, open_browser: bool,
           guard: HostGuard) -> tuple[gr.Blocks, str]:
    """Serve the app; `guard` refuses requests whose Host or Origin is foreign (DNS rebinding, CSRF)
    before Gradio sees them: anyone who can make a browser post here could read chats or delete models."""
    app = build_app(ctx)
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(server_name=host, server_port=port or None, share=False, inbrowser=open_browser,
                           prevent_thread_lock=True, quiet=True, show_error=False, css=CSS, js=JS,
                           max_file_size="20gb", ssr_mode=False, footer_links=[],
                           app_kwargs={"middleware": [Middleware(HostGuardMiddleware, guard=guard),
                                                         Middleware(TrackerTimerFix)]})
    return app, url
