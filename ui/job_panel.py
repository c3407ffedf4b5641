"""The progress panel of the running job (pull, import, convert, fine-tune), shown in the
tabs that start jobs and refreshed by one timer."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from .jobs import JobRunner


@dataclass
class JobPanel:
    status: gr.Markdown
    bar: gr.HTML
    log: gr.Code
    stop: gr.Button

    def parts(self) -> list:
        """The components `render` fills, in its order."""
        return [self.status, self.bar, self.log, self.stop]


def build(prefix: str) -> JobPanel:
    with gr.Group():
        status = gr.Markdown("no job running", elem_id=f"{prefix}-job-status")
        bar = gr.HTML("", elem_id=f"{prefix}-job-bar")
        with gr.Accordion("Log", open=False, elem_id=f"{prefix}-job-log-box"):
            log = gr.Code("", language=None, elem_id=f"{prefix}-job-log", interactive=False)
        stop = gr.Button("Stop job", size="sm", variant="stop", visible=False, elem_id=f"{prefix}-job-stop")
    return JobPanel(status, bar, log, stop)


def render(jobs: JobRunner) -> tuple:
    """Status, bar, log and the Stop button (shown only while a job runs) of the current job."""
    job = jobs.current
    if job is None:
        return "no job running", "", "", gr.update(visible=False)
    pct = job.percent if job.percent is not None else (100 if job.ok else 0)
    bar = f"<progress value='{pct}' max='100' style='width:100%'></progress>" if job.running or job.ok else ""
    return job.status(), bar, job.log(), gr.update(visible=job.running)
