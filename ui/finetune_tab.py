"""The Fine-tune tab: a dataset (uploaded and checked line by line, or made from saved
chats), a base model, then `localchat finetune` as a job with live progress and loss plot."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import gradio as gr
import pandas as pd

from localchat.finetune.estimate import base_size, clean_up, data_chars, estimate
from localchat.finetune.settings import LORA_LR, QLORA_LR, TrainSettings
from localchat.fsutil import human
from localchat.store import UnsafeNameError, check_name
from localchat.store.names import safe_file_name
from localchat.store.chats import ChatError, write_dataset

from . import job_panel
from .context import AppContext
from .jobs import JobRunner

DATASETS = "datasets"  # uploaded and chat-made datasets live in the store, nowhere else
DEFAULTS = TrainSettings()  # the controls start at `localchat finetune`'s own defaults
# The stages of `localchat finetune` that draw a bar, and their share of the job's one bar (training
# is most of the time; the export's checks after converting draw none).
PHASES = {"Loading weights": (0, 5), "training": (5, 85), "converting": (85, 95)}
EXAMPLES = """One row of each format the trainer reads (a file holds many such rows):

- **Alpaca** (`.json` array or `.jsonl`): `{"instruction": "What is my cat called?", "input": "", "output": "Biscuit."}`
- **Chat** (`.jsonl`): `{"messages": [{"role": "user", "content": "What is my cat called?"}, {"role": "assistant", "content": "Biscuit."}]}`
- **ShareGPT** (`.json`/`.jsonl`): `{"conversations": [{"from": "human", "value": "What is my cat called?"}, {"from": "gpt", "value": "Biscuit."}]}`
- **Plain text** (`.txt`, `.md`): paragraphs separated by a blank line; the model learns to continue such text.
"""


def _dataset_dir(ctx: AppContext) -> Path:
    return ctx.store.root / DATASETS


def check_dataset(path: str | Path) -> str:
    """'N rows OK' or the first bad line, as `localchat finetune` would report it."""
    from localchat.datasets import HELD_OUT, HOLD_OUT_FROM, DatasetError, load_dataset

    try:
        ds = load_dataset(path)
    except DatasetError as exc:
        return f"Error: {exc}"
    kept = (f"{len(ds.held_out)} kept out to measure loss and recall" if ds.held_out else
            f"every row trains ({HELD_OUT:.0%} is kept out to measure recall from {HOLD_OUT_FROM} rows)")
    return f"OK: {Path(path).name}: {len(ds)} rows ({ds.kind}), {kept}"


def loss_frame(ctx: AppContext, jobs: JobRunner) -> tuple[tuple, pd.DataFrame]:
    """The loss of the fine-tune that runs (or ran last), one row per logged update, and its version
    (the timer sends the plot to a page only when that changed)."""
    job = jobs.current
    name = job.target if job is not None else ""
    return ctx.loss_log.read(ctx.store.root / name / "finetune" / "loss.jsonl" if name else None)


def build(ctx: AppContext) -> tuple[job_panel.JobPanel, gr.LinePlot, gr.Dropdown, gr.CheckboxGroup]:
    gr.Markdown("Teach a model your own domain with LoRA (`localchat finetune`). The result is a new "
                "model in the store, ready in the Chat tab.")
    dataset_path = gr.State("")
    with gr.Row():
        with gr.Column():
            upload = gr.File(label="Dataset: Alpaca JSON/JSONL, chat JSONL, ShareGPT or .txt",
                             file_types=[".json", ".jsonl", ".txt", ".md"], elem_id="dataset-file")
            gr.Markdown("…or make one from saved chats:")
            chats = gr.CheckboxGroup(choices=[], label="Saved chats", elem_id="dataset-chats")
            from_chats = gr.Button("Use the picked chats", size="sm", elem_id="dataset-from-chats")
            check = gr.Markdown(elem_id="dataset-check")
            with gr.Accordion("Example rows for each format", open=False):
                gr.Markdown(EXAMPLES, elem_id="dataset-examples")
        with gr.Column():
            base = gr.Dropdown(choices=list(ctx.store.models()), label="Base model",
                               value=next(iter(ctx.chat_models()), None), elem_id="finetune-base")
            base_path = gr.Textbox(label="…or a Hugging Face checkpoint folder on this computer",
                                   placeholder="~/models/my-model", elem_id="finetune-base-path")
            name = gr.Textbox(label="Name of the new model", elem_id="finetune-name")
            epochs = gr.Slider(0.5, 20, value=DEFAULTS.epochs, step=0.5, label="Epochs", elem_id="finetune-epochs")
            lr = gr.Number(value=DEFAULTS.lr, label=f"Learning rate (empty: {LORA_LR:g}, or {QLORA_LR:g} over a "
                                                    "4-bit QLoRA base)")
            rank = gr.Slider(4, 64, value=DEFAULTS.lora_r, step=4, label="LoRA rank")
            lora = gr.Checkbox(label="Also keep the adapter as a GGUF LoRA (a few MB, applied over the base "
                                     "at load time)", value=False)
            guess = gr.Markdown("Pick a dataset to see the time and disk it takes.", elem_id="finetune-estimate")
            with gr.Row():
                start = gr.Button("Start fine-tune", variant="primary", elem_id="finetune-start")
                resume = gr.Button("Resume", elem_id="finetune-resume")
                tidy = gr.Button("Clean up", elem_id="finetune-cleanup")
    panel = job_panel.build("finetune")
    plot = gr.LinePlot(loss_frame(ctx, ctx.jobs)[1], x="update", y="loss", color="series", title="Loss",
                       elem_id="loss-plot", height=260)

    def on_upload(path: str | None) -> tuple:
        if not path:
            return "", ""
        src = Path(path)
        target = _dataset_dir(ctx) / check_name(safe_file_name(src.name), "dataset file name")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        verdict = check_dataset(target)
        return (str(target) if verdict.startswith("OK") else ""), verdict

    def on_upload_safe(path: str | None) -> tuple:
        try:
            return on_upload(path)
        except (UnsafeNameError, OSError) as exc:
            return "", f"Error: {exc}"

    upload.upload(on_upload_safe, [upload], [dataset_path, check])

    def use_chats(ids: list[str]) -> tuple:
        if not ids:
            return "", "Error: pick at least one saved chat"
        out = _dataset_dir(ctx) / f"chats-{datetime.now():%Y%m%d-%H%M%S}.jsonl"
        try:
            write_dataset(ctx.history, ids, out)
        except ChatError as exc:
            return "", f"Error: {exc}"
        verdict = check_dataset(out)
        return (str(out) if verdict.startswith("OK") else ""), verdict

    from_chats.click(use_chats, [chats], [dataset_path, check])

    def do_start(data: str, b: str | None, folder: str, n: str, ep: float, rate: float, r: float,
                 as_lora: bool) -> tuple:
        if not data:
            return "Error: choose a dataset that passes the check first", gr.skip()
        if folder.strip():
            where = Path(folder.strip()).expanduser()
            if not (where / "config.json").is_file():
                return f"Error: {folder.strip()}: not a checkpoint folder (it has no config.json)", gr.skip()
            b = str(where)
        if not b:
            return "Error: pick a base model, or type a checkpoint folder", gr.skip()
        try:
            n = check_name(n.strip() or f"{Path(b).name}-{Path(data).stem}"[:100])
        except UnsafeNameError as exc:
            return f"Error: {exc}", gr.skip()
        if n in ctx.store.models():
            return f"Error: the store already has a model named {n!r}; choose another name", gr.skip()
        alpha = int(r) * DEFAULTS.lora_alpha // DEFAULTS.lora_r  # the default scale alpha / r at any rank
        args = ["finetune", "--base", b, "--data", data, "--name", n, "--epochs", str(ep),
                "--lora-r", str(int(r)), "--lora-alpha", str(alpha)] + (["--lora-gguf"] if as_lora else [])
        if rate:  # empty: the default for the run (QLoRA's on a CUDA machine)
            args += ["--lr", str(rate)]
        try:
            ctx.jobs.start(f"fine-tune {n}", args, target=n, phases=PHASES)
        except RuntimeError as exc:
            return f"Error: {exc}", gr.skip()
        return f"started fine-tune of {folder.strip() or b} into {n}", n  # as typed: ~/… stays ~/…

    start.click(do_start, [dataset_path, base, base_path, name, epochs, lr, rank, lora], [check, name])

    def do_resume() -> str:
        """Run the last fine-tune again with --resume: it goes on from its last saved checkpoint."""
        job = ctx.jobs.current
        if job is None or not job.target or job.running or job.ok:
            return "Error: no stopped fine-tune to resume (a finished one is in the store already)"
        args = job.args + ([] if "--resume" in job.args else ["--resume"])
        try:
            ctx.jobs.start(f"fine-tune {job.target} (resumed)", args, target=job.target, phases=PHASES)
        except RuntimeError as exc:
            return f"Error: {exc}"
        return f"resumed the fine-tune of {job.target} from its last checkpoint"

    resume.click(do_resume, None, [check])

    def show_estimate(data: str, b: str | None, folder: str, ep: float, r: float) -> str:
        """Time and disk before Start, from the rows, the base's size and the settings."""
        spec = folder.strip() or b
        if not data or not spec:
            return "Pick a dataset and a base to see the time and disk it takes."
        try:
            guess = estimate(base_size(spec, ctx.store), data_chars(data),
                             TrainSettings(epochs=float(ep), lora_r=int(r)), ctx.store)
        except Exception as exc:  # a folder being typed, a base with no weights: no estimate, no error
            return f"No estimate yet: {exc}"
        return guess.describe()

    shown = [dataset_path, base, base_path, epochs, rank]
    for part in (dataset_path.change, base.change, base_path.blur, epochs.change, rank.change):
        part(show_estimate, shown, [guess], show_progress="hidden")

    def do_clean_up() -> str:
        """Remove what finished fine-tunes leave (checkpoints, dequantized bases), saying what it freed."""
        job = ctx.jobs.current
        if job is not None and job.running:
            return "Error: a job is running; clean up once it has finished (it may need those files)"
        freed, what = clean_up(ctx.store)
        if not what:
            return "nothing to clean up: no finished fine-tune left checkpoints or a dequantized base"
        return f"freed {human(freed)}: " + "; ".join(what)

    tidy.click(do_clean_up, None, [check])
    panel.stop.click(lambda: ctx.jobs.stop(), None, [check])
    return panel, plot, base, chats
