"""The desktop app: Chat, Models and Fine-tune tabs over one store, served on 127.0.0.1."""

from __future__ import annotations

import gradio as gr
from starlette.middleware import Middleware

from localchat.hostguard import HostGuard, HostGuardMiddleware

from . import chat_tab, finetune_tab, job_panel, models_tab
from .context import AppContext

TITLE = "localchat"
CSS = "#chatbot {min-height: 420px} footer {display: none !important}"


def build_app(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title=TITLE) as app:
        gr.Markdown(f"## {TITLE} — offline chat, quantization and fine-tuning · store: `{ctx.store.root}`")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_list = chat_tab.build(ctx)
            with gr.Tab("Models", id="models", elem_id="tab-models"):
                m_panel, models_df, m_dropdowns = models_tab.build(ctx)
            with gr.Tab("Fine-tune", id="finetune", elem_id="tab-finetune") as ft_tab:
                f_panel, plot, ft_name, ft_base, ft_chats = finetune_tab.build(ctx)

        finished = gr.State(None)  # id of the last job whose end was handled

        def tick(name: str, seen: object) -> tuple:
            status, bar, log = job_panel.render(ctx.jobs)
            job = ctx.jobs.current
            just_ended = job is not None and not job.running and seen != id(job)
            updates = [status, bar, log, status, bar, log, finetune_tab.loss_frame(ctx, name)]
            if just_ended:  # a pull, import, convert or fine-tune landed: show it everywhere
                models = list(ctx.store.models())
                updates += [models_tab.table(ctx), gr.update(choices=models_tab.hf_models(ctx)),
                            gr.update(choices=models), gr.update(choices=models), id(job)]
            else:
                updates += [gr.skip()] * 4 + [seen]
            return tuple(updates)

        timer = gr.Timer(1.0)
        timer.tick(tick, [ft_name, finished],
                   [m_panel.status, m_panel.bar, m_panel.log, f_panel.status, f_panel.bar, f_panel.log, plot,
                    models_df, m_dropdowns[0], m_dropdowns[1], ft_base, finished],
                   show_progress="hidden", queue=False)

        def chats_choices() -> dict:
            return gr.update(choices=[(f"{c.title} ({c.turns} messages)", c.id) for c in ctx.history.list()])

        ft_tab.select(chats_choices, None, [ft_chats])
        # A page opened later (or after a restart) lists the chats saved since the app started.
        app.load(lambda: gr.update(choices=chat_tab.chat_choices(ctx)), None, [chat_list])
    return app


def launch(ctx: AppContext, host: str, port: int, open_browser: bool,
           guard: HostGuard) -> tuple[gr.Blocks, str]:
    """Serve the app; `guard` refuses requests whose Host or Origin is foreign (DNS rebinding, CSRF)
    before Gradio sees them: anyone who can make a browser post here could read chats or delete models."""
    app = build_app(ctx)
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(server_name=host, server_port=port or None, share=False, inbrowser=open_browser,
                           prevent_thread_lock=True, quiet=True, show_error=False, css=CSS,
                           max_file_size="20gb", ssr_mode=False, footer_links=[],
                           app_kwargs={"middleware": [Middleware(HostGuardMiddleware, guard=guard)]})
    return app, url

