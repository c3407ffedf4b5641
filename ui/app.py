"""The desktop app: Chat, Models and Fine-tune tabs over one store, served on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware

from localchat.hostguard import HostGuard, HostGuardMiddleware

from . import chat_tab, finetune_tab, job_panel, models_tab
from .context import AppContext

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
button.label-wrap {padding-right: 8px}  /* the accordion's turned arrow stays inside its button */
"""
# Esc stops the answer being written, as in other chat apps (Stop does the same).
JS = """
() => {
  document.addEventListener('keydown', (e) => {
    if (e.key === 'Escape') { const b = document.querySelector('#stop'); if (b) b.click(); }
  });
}
"""


def tilde(path: Path) -> str:
    """`path` with the home folder written as ~, as people write it (and no machine path in screenshots)."""
    try:
        return "~/" + str(Path(path).resolve().relative_to(Path.home().resolve()))
    except ValueError:
        return str(path)


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE} — offline chat, quantization and fine-tuning · store: `{tilde(ctx.store.root)}`")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = chat_tab.build(ctx)
            with gr.Tab("Models", id="models", elem_id="tab-models"):
                m_panel, models_df, m_dropdowns = models_tab.build(ctx)
            with gr.Tab("Fine-tune", id="finetune", elem_id="tab-finetune") as ft_tab:
                f_panel, plot, ft_base, ft_chats = finetune_tab.build(ctx)

        store_seen = gr.State(None)  # the manifest's stamp when this page last listed the models
        panels = [chat.panel, m_panel, f_panel]

        def tick(seen: object, current: str | None) -> tuple:
            """Job progress everywhere, and every model list follows the store: a model imported,
            converted or deleted from the command line shows up here within a second."""
            updates: list = list(job_panel.render(ctx.jobs)) * len(panels)  # the same job in every tab
            updates.append(finetune_tab.loss_frame(ctx, ctx.jobs))
            stamp = ctx.store_stamp()
            if stamp != seen:
                models = list(ctx.store.models())
                updates += [models_tab.table(ctx), gr.update(choices=models_tab.hf_models(ctx)),
                            gr.update(choices=models), gr.update(choices=models),
                            *chat_tab.follow_store(ctx, current), stamp]
            else:
                updates += [gr.skip()] * 7 + [seen]
            return tuple(updates)

        timer = gr.Timer(1.0)
        timer.tick(tick, [store_seen, chat.model_dd],
                   [*(c for p in panels for c in p.parts()), plot, models_df, m_dropdowns[0], m_dropdowns[1],
                    ft_base, chat.model_dd, chat.status, chat.first_run, store_seen],
                   show_progress="hidden", queue=False)

        def chats_choices() -> dict:
            return gr.update(choices=[(f"{c.title} ({c.turns} messages)", c.id) for c in ctx.history.list()])

        ft_tab.select(chats_choices, None, [ft_chats])
        # A page opened later (or after a restart) lists the chats saved since the app started.
        app.load(lambda: gr.update(choices=chat_tab.chat_choices(ctx)), None, [chat.chat_list])
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
                           app_kwargs={"middleware": [Middleware(HostGuardMiddleware, guard=guard)]})
    return app, url
