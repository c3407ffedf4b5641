"""The Models tab: the store as a table (with the backend each model would use here), and
pull, import, convert/quantize and delete, each run as a job with a progress bar."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from localchat.commands.list import eval_text, printable
from localchat.quant_types import DEFAULT_QUANT, GPTQ_BITS, NEEDS_IMATRIX, QUANT_TYPES
from localchat.evaluation import EVAL_LEGEND, verdict
from localchat.fsutil import human
from localchat.store import UnsafeNameError, check_name, check_relative
from localchat.store.names import check_repo_id, safe_file_name
from localchat.store.importer import default_import_name

from . import job_panel
from .context import AppContext

HEADERS = ["name", "format", "quant", "size", "backend here", "eval", "source"]


def table(ctx: AppContext) -> list[list[str]]:
    """The store as rows (made once per store change: AppContext.models_table)."""
    return ctx.models_table(lambda: _rows(ctx))


def _rows(ctx: AppContext) -> list[list[str]]:
    rows = []
    for e in ctx.store.models().values():
        backend = ctx.backend_for(e.name) if e.format in ("gguf", "gptq", "lora") else "convert it first"
        hint = verdict(e.eval)
        rows.append([printable(c) for c in (e.name, e.format, e.quant, human(e.size), backend,
                                            eval_text(e) + (f" · {hint}" if hint else ""), e.source)])
    return rows


def local(typed: str) -> Path:
    """A path typed by the user (who may write ~), on the machine the app runs on."""
    return Path(typed).expanduser()


def hf_models(ctx: AppContext) -> list[str]:
    return [n for n, e in ctx.store.models().items() if e.format == "hf"]


def build(ctx: AppContext) -> tuple[job_panel.JobPanel, gr.Dataframe, list[gr.Dropdown]]:
    gr.Markdown("Models in the store (`localchat list`). *backend here* is what the planner would "
                "choose on this machine.")
    models_df = gr.Dataframe(value=table(ctx), headers=HEADERS, interactive=False, elem_id="models-table",
                             wrap=True)
    gr.Markdown(EVAL_LEGEND, elem_id="models-legend")
    refresh = gr.Button("Refresh (probes the hardware again)", size="sm", elem_id="models-refresh")
    panel = job_panel.build("models")
    with gr.Tabs():
        with gr.Tab("Pull"):
            repo = gr.Textbox(label="Hugging Face repo (OWNER/NAME)", elem_id="pull-repo")
            pfile = gr.Textbox(label="File in the repo (optional: its GGUF, preferring Q4_K_M)")
            pname = gr.Textbox(label="Name in the store (optional)")
            pull_btn = gr.Button("Pull", variant="primary", elem_id="pull")
        with gr.Tab("Import GGUF"):
            upload = gr.File(label="A .gguf file", file_types=[".gguf"], elem_id="import-file")
            ipath = gr.Textbox(label="…or its path on this computer (no upload: a big file is copied once)",
                               placeholder="~/Downloads/model-Q4_K_M.gguf", elem_id="import-path")
            iname = gr.Textbox(label="Name in the store (optional)", elem_id="import-name")
            import_btn = gr.Button("Import", variant="primary", elem_id="import")
        with gr.Tab("Convert / quantize"):
            src = gr.Dropdown(choices=hf_models(ctx), label="Hugging Face checkpoint in the store",
                              elem_id="convert-source")
            cpath = gr.Textbox(label="…or a checkpoint folder on this computer (config.json and safetensors)",
                               placeholder="~/models/my-model", elem_id="convert-path")
            to = gr.Radio(["gguf", "gptq"], value="gguf", label="Output format", elem_id="convert-format")
            # The CLI's own list (`localchat convert --quant`); the options of the other format are hidden.
            quant = gr.Dropdown(list(QUANT_TYPES), value=DEFAULT_QUANT, label="GGUF quant type",
                                info=f"{', '.join(NEEDS_IMATRIX)} use an importance matrix computed first; "
                                     "AUTO mixes types per layer to fit a file size", elem_id="convert-quant")
            size = gr.Textbox(label="File size to fit (AUTO)", placeholder="4.0GB", visible=False,
                              elem_id="convert-size")
            bits = gr.Radio(list(GPTQ_BITS), value=GPTQ_BITS[0], label="GPTQ bits per weight", visible=False,
                            elem_id="convert-bits")
            cname = gr.Textbox(label="Name of the result (optional)", elem_id="convert-name")
            convert_btn = gr.Button("Convert", variant="primary", elem_id="convert")
        with gr.Tab("Delete"):
            victim = gr.Dropdown(choices=list(ctx.store.models()), label="Model", elem_id="delete-model")
            sure = gr.Checkbox(label="Yes, delete its files")
            delete_btn = gr.Button("Delete", variant="stop", elem_id="delete-model-btn")
    note = gr.Markdown(elem_id="models-note")

    def start(title: str, args: list[str]) -> str:
        try:
            ctx.jobs.start(title, args)
        except RuntimeError as exc:
            return f"Error: {exc}"
        return f"started: {title}"

    def named(args: list[str], n: str) -> list[str]:
        return args + (["--name", check_name(n.strip())] if n.strip() else [])

    def do_pull(r: str, f: str, n: str) -> str:
        if r.strip() and local(r.strip()).is_absolute() and local(r.strip()).exists():
            return (f"Error: {r.strip()} is a path on this computer: use Import GGUF for a .gguf file, "
                    "or Convert for a checkpoint folder")
        try:
            file = [check_relative(f.strip())] if f.strip() else []
            args = named(["pull", check_repo_id(r.strip()), *file, "-q"], n)
        except UnsafeNameError as exc:
            return f"Error: {exc}"
        return start(f"pull {r.strip()}", args)

    def do_import(path: str | None, typed: str, n: str) -> str:
        if typed.strip():
            path = str(local(typed.strip()))
            if not Path(path).is_file():
                return f"Error: {typed.strip()}: no such file"
        if not path:
            return "Error: choose a .gguf file first, or type its path"
        try:
            name = check_name(n.strip() or default_import_name(Path(path).name))
        except UnsafeNameError as exc:
            return f"Error: {exc}"
        return start(f"import {Path(path).name}", ["import", path, "--name", name])

    def applies(fmt: str, q: str) -> tuple:
        """Only the options of the chosen format (and AUTO's size only with AUTO) are shown."""
        return (gr.update(visible=fmt == "gguf"), gr.update(visible=fmt == "gguf" and q == "AUTO"),
                gr.update(visible=fmt == "gptq"))

    to.change(applies, [to, quant], [quant, size, bits])
    quant.change(applies, [to, quant], [quant, size, bits])

    def do_convert(source: str | None, folder: str, fmt: str, q: str, n: str, fit: str, b: int) -> str:
        if folder.strip():
            where = local(folder.strip())
            if not (where / "config.json").is_file():
                return f"Error: {folder.strip()}: not a checkpoint folder (it has no config.json)"
            source = safe_file_name(where.name).lower()
        elif source:
            where = ctx.store.model_dir(source)
        else:
            return "Error: pick a checkpoint in the store, or type the path of a checkpoint folder"
        if fmt == "gguf" and q == "AUTO" and not fit.strip():
            return "Error: AUTO needs the file size to fit (e.g. 4.0GB)"
        if fmt == "gguf":
            quant = ["--quant", q] + (["--size", fit.strip()] if q == "AUTO" else [])
        else:
            quant = ["--bits", str(b)]
        # The result never takes the source's own name: that would replace the checkpoint it is made from.
        n = n.strip() or f"{source}-{'gptq' if fmt == 'gptq' else q.lower()}"
        if n in ctx.store.models():
            return f"Error: the store already has a model named {n!r}: type another name for the result"
        try:
            args = named(["convert", str(where), "--to", fmt, *quant, "-q"], n)
        except UnsafeNameError as exc:
            return f"Error: {exc}"
        return start(f"convert {where.name} to {fmt if fmt == 'gptq' else q} as {n}", args)

    def do_delete(name: str | None, ok: bool) -> tuple:
        if not name:
            return "Error: pick a model", gr.skip(), gr.skip()
        if not ok:
            return "tick “Yes, delete its files” first", gr.skip(), gr.skip()
        try:
            ctx.store.remove(check_name(name))
            if ctx.slot.name == name:
                ctx.slot.close_model()
        except Exception as exc:
            return f"Error: {exc}", gr.skip(), gr.skip()
        return f"deleted {name}", table(ctx), gr.update(choices=list(ctx.store.models()), value=None)

    pull_btn.click(do_pull, [repo, pfile, pname], [note])
    import_btn.click(do_import, [upload, ipath, iname], [note])
    convert_btn.click(do_convert, [src, cpath, to, quant, cname, size, bits], [note])
    delete_btn.click(do_delete, [victim, sure], [note, models_df, victim])
    panel.stop.click(lambda: ctx.jobs.stop(), None, [note])

    def do_refresh() -> tuple:
        ctx.reprobe()
        return table(ctx), gr.update(choices=hf_models(ctx)), gr.update(choices=list(ctx.store.models()))

    refresh.click(do_refresh, None, [models_df, src, victim])
    return panel, models_df, [src, victim]
