"""`localchat finetune --base MODEL --data FILE`: teach a model your own domain with LoRA
and get a new model in the store that `localchat chat` runs at once.

The output folder (`<store>/<name>/finetune/`) holds the adapter, the training config, the
loss log and its plot. The GGUF goes through `localchat convert`'s export (with its
after-export check) straight from base + adapter: the checkpoint loader merges each weight
as the GGUF writer reads it, so no merged copy of the model is held in memory or written.
`--save-merged` also keeps the merged checkpoint, in the base's own dtypes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localchat.datasets import HELD_OUT, HOLD_OUT_FROM, HOLD_OUT_MIN, load_dataset
from localchat.fsutil import check_disk, human, sha256_file
from localchat.store import ModelEntry, ModelFile, Store, check_name, default_store

from .distributed import ranks
from .estimate import after_export, reading_base
from .memory import GIB
from .settings import DEQUANTIZED, TrainSettings

if TYPE_CHECKING:
    from localchat.convert.command import ExportResult

MERGED = "merged"  # the folder `--save-merged` writes inside `<store>/<name>/finetune/`


class FinetuneError(RuntimeError):
    pass


@dataclass
class FinetuneResult:
    name: str
    out: Path
    report: list[str]


def base_folder(spec: str, store: Store, dtype: Any, quiet: bool = True) -> Path:
    """The Hugging Face checkpoint to train: a folder, or a model in the store (a GGUF-only one
    dequantized once, to `dtype`)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FinetuneError(f"{path}: not a Hugging Face checkpoint (no config.json)")
        return path
    entries = store.models()
    if spec not in entries:
        raise FinetuneError(f"{spec!r} is neither a folder nor a model in the store "
                            f"(have: {', '.join(entries) or 'none'})")
    entry = entries[spec]
    if entry.format == "gguf":
        # Only a GGUF here: dequantize it once into <store>/<name>/hf, streamed, the disk checked first.
        from localchat.convert.from_gguf import gguf_to_hf

        return gguf_to_hf(store.path_of(entry.files[0].path), store.model_dir(spec) / DEQUANTIZED, dtype, quiet)
    if entry.format != "hf":
        raise FinetuneError(f"{spec} has only {entry.format.upper()} weights; training needs a Hugging Face "
                            "checkpoint or a GGUF (`localchat pull OWNER/REPO` fetches one)")
    return store.path_of(entry.files[0].path).parent


def dequantized_dtype(settings: TrainSettings) -> Any:
    """The dtype a GGUF-only base is dequantized to: bf16 where training holds the base in bf16
    (CUDA cards and CPUs with bf16 units, or `--bf16`), else float16. A CPU without bf16 units
    trains in float32 and widens float16 to it exactly, and float16 keeps more of the dequantized
    values than bf16 would; float32 on disk would only double the size (28 GB for 7B)."""
    import torch

    from .train import fast_bf16

    bf16 = fast_bf16("cuda" if torch.cuda.is_available() else "cpu") if settings.bf16 is None else settings.bf16
    return torch.bfloat16 if bf16 else torch.float16


def write_merged(base: Path, adapter: Path, out: Path, quiet: bool = True) -> Path:
    """Base + adapter as one ordinary checkpoint that `convert/` and transformers read, each tensor
    in the dtype the base stores it in, streamed shard by shard (never the whole model in memory)."""
    from localchat.convert.checkpoint import load_checkpoint
    from localchat.convert.to_hf import save_checkpoint

    return save_checkpoint(load_checkpoint(adapter, base=base), out, "saving the merged checkpoint", quiet)


def export_finetuned(base: Path, adapter: Path, name: str, quant: str, store: Store, quiet: bool = False,
                     check: bool = True) -> ExportResult:
    """The GGUF of base + adapter as the store model `name`, through `localchat convert`'s export of
    the adapter folder over its base: each weight is merged as the GGUF writer reads it, so peak
    memory is about one tensor, not the model. The after-export check compares the quantized file
    with the F16 conversion of that same merge; a re-run replaces its earlier export."""
    from localchat.convert.command import export_gguf

    return export_gguf(adapter, quant, name=name, base=base, store=store, quiet=quiet, replace=True, check=check)


def register_lora(store: Store, base: str, base_dir: Path, adapter: Path, name: str) -> str:
    """The adapter as a GGUF LoRA entry `<name>-lora` over the store model `base`."""
    from localchat.convert.lora_gguf import export_lora_gguf

    if base not in store.models() or store.get(base).format != "gguf":
        raise FinetuneError(f"--lora-gguf needs a GGUF model from the store as --base (got {base!r}); "
                            "the merged GGUF export works with any base")
    lora_name = check_name(f"{name}-lora"[:128])
    out = export_lora_gguf(adapter, base_dir, store.model_dir(lora_name) / f"{lora_name}.gguf")
    store.add(ModelEntry(name=lora_name, format="lora", quant=f"LoRA over {store.get(base).quant}",
                         files=[ModelFile(str(out.relative_to(store.root)), out.stat().st_size, sha256_file(out))],
                         source=f"finetune:{base}", sha256=sha256_file(out),
                         defaults=dict(store.get(base).defaults), extra={"base": base}))
    return lora_name


def check_export_disk(base_dir: Path, quant: str | None, merged: bool, store: Store) -> None:
    """Refuse before training when the disk cannot hold what follows it: with `merged` the merged
    checkpoint (in the base's own dtypes) and, with `quant`, the GGUF export's F16 and quantized
    files, written from base + adapter directly."""
    from localchat.convert.checkpoint import load_checkpoint
    from localchat.convert.command import gguf_export_need
    from localchat.convert.to_gguf import plan_gguf
    from localchat.convert.to_hf import folder_bytes, stored_specs

    ckpt = load_checkpoint(base_dir)  # headers only
    need, steps = 0, []
    if merged:
        need += folder_bytes(stored_specs(ckpt))
        steps.append(f"merged checkpoint {human(need)}")
    if quant:
        more, export_steps = gguf_export_need(plan_gguf(ckpt, "f16"), quant)
        need += more
        steps.append(f"GGUF {export_steps}")
    if need:
        check_disk(store.root, need, f"fine-tuning {base_dir.name} ({', then '.join(steps)})")


def finetune(base: str, data: str, name: str | None, settings: TrainSettings, quant: str = "Q4_K_M",
             resume: bool = False, export: bool = True, store: Store | None = None,
             quiet: bool = False, lora_gguf: bool = False, save_merged: bool = False) -> FinetuneResult:
    # Every row is checked first: a bad row fails in a second, before a base is dequantized or loaded.
    if settings.early_stop and settings.held_out is None:  # it keeps the pass the held-out rows liked best
        settings = replace(settings, held_out=HELD_OUT)
    dataset = load_dataset(data, settings.held_out, settings.seed)
    if settings.early_stop and not dataset.held_out:
        raise FinetuneError(f"--early-stop needs held-out rows to measure, and {data} has none held out "
                            f"({len(dataset)} rows, --held-out {settings.held_out:g}; {HOLD_OUT_MIN} rows or more "
                            "are needed)")
    from .train import train

    store = store or default_store()
    dist = ranks()  # under `accelerate launch`: train in every process, write from the main one
    with reading_base(store, base):  # until the export has read it, no cleanup elsewhere removes the base
        with dist.main_first():
            base_dir = base_folder(base, store, dequantized_dtype(settings), quiet)
        name = check_name(name or f"{base_dir.name.lower()}-{Path(data).stem.lower()}"[:128])
        out = store.model_dir(name) / "finetune"
        check_export_disk(base_dir, quant if export else None, save_merged, store)
        if resume:  # the rows the run held out when it started, whatever today's defaults
            from .train import shape_of_run

            settings = shape_of_run(out, settings)
            dataset = dataset.split(settings.held_out, settings.seed)
        held = f"{len(dataset.held_out)} held out" if dataset.held_out else "none held out"
        if not dataset.held_out and settings.held_out is None and len(dataset) >= HOLD_OUT_MIN:
            held += (f" (fewer than {HOLD_OUT_FROM} rows: every row trains; --held-out {HELD_OUT:g} measures "
                     "recall on that share)")
        report = [f"data: {len(dataset.train)} training rows, {held} ({dataset.kind})"]
        result = train(base_dir, dataset, out, settings, resume=resume, quiet=quiet)
        if not dist.main:
            return FinetuneResult(name, out, [f"process {dist.rank}: trained its share; the main process exports"])
        if result.resumed_from:
            report.append(f"resumed from update {result.resumed_from}")
        report.append(f"trained {result.steps} updates: loss {result.train_loss:.3f}"
                      + (f", held-out loss {result.held_out_loss:.3f}" if result.held_out_loss is not None else "")
                      + (f" (update {result.kept_step} of {result.steps}, kept by --early-stop)"
                         if result.kept_step else "")
                      + (f", {result.held_out_recall.describe()}" if result.held_out_recall else "")
                      + f", {result.tokens_per_s:.0f} tokens/s; plot: {out / 'loss.png'}")
        where = "GPU memory" if result.device == "cuda" else "RSS"
        report.append(f"peak {where} {result.peak_memory / GIB:.2f} GiB "
                      f"(estimated {result.memory_estimate / GIB:.2f} GiB before the run)")
        if lora_gguf:
            lora_name = register_lora(store, base, base_dir, result.adapter, name)
            report.append(f"GGUF LoRA adapter: {lora_name} (llama.cpp applies it over {base} at load time)")
        extra = {"adapter": str(result.adapter.relative_to(store.root)),
                 "loss_plot": str((out / "loss.png").relative_to(store.root))}
        if save_merged:
            merged = write_merged(base_dir, result.adapter, out / MERGED, quiet)
            extra[MERGED] = str(merged.relative_to(store.root))
            report.append(f"merged checkpoint (the base's own dtypes): {merged}")
        else:
            shutil.rmtree(out / MERGED, ignore_errors=True)  # an earlier run's, merged with another adapter
        if export:
            ex = export_finetuned(base_dir, result.adapter, name, quant, store, quiet)

            inherited = dict(store.get(base).defaults) if base in store.models() else {}

            def finish(entry: ModelEntry) -> None:  # under the store lock
                entry.source = f"finetune:{base_dir.name}+{Path(data).name}"
                entry.extra.update(extra)
                # A store base's chat defaults (system prompt, sampling preset) carry over where the
                # export's own file sets none: the fine-tune answers as its base did, facts aside.
                entry.defaults = {**inherited, **entry.defaults}

            store.update(name, finish)
            report.append(f"GGUF written from {base} + the adapter, merged tensor by tensor"
                          + ("" if save_merged else " (no merged copy kept; --save-merged keeps one)"))
            report += ex.report
    if export:  # a stopped or failed run never gets here: its checkpoints stay for Resume
        report += after_export(store, name, base)
    return FinetuneResult(name, out, report)


def command(args: argparse.Namespace) -> int:
    from .train import Interrupted

    settings = TrainSettings.from_args(args)
    try:
        r = finetune(args.base, args.data, args.name, settings, args.quant, args.resume,
                     export=not args.no_export, quiet=args.quiet, lora_gguf=args.lora_gguf,
                     save_merged=args.save_merged)
    except Interrupted as exc:
        print(f"localchat finetune: {exc}", file=sys.stderr)
        return 130
    if not ranks().main:
        return 0
    for line in r.report:
        print(f"- {line}")
    size = sum(f.stat().st_size for f in (r.out.parent).glob("*.gguf"))
    print(f"{r.name}: ready ({human(size)}) -> `localchat chat --model {r.name}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="an HF checkpoint folder or a model in the store "
                                                      "(a GGUF-only one is dequantized once)")
    parser.add_argument("--data", required=True, help="Alpaca JSON/JSONL, chat JSONL, ShareGPT, or .txt")
    parser.add_argument("--name", help="name of the new model in the store")
    parser.add_argument("--quant", default="Q4_K_M", type=str.upper, help="GGUF quant type of the export")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--no-export", action="store_true", help="stop after training: the adapter (and with "
                                                                 "--save-merged the merged checkpoint), no GGUF")
    parser.add_argument("--save-merged", action="store_true",
                        help="also keep base + adapter as one HF checkpoint (finetune/merged, in the base's own "
                             "dtype); the GGUF export does not need it")
    parser.add_argument("--lora-gguf", action="store_true",
                        help="also store the adapter as a GGUF LoRA (NAME-lora, a few MB) that llama.cpp "
                             "applies over the --base store model at load time")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    TrainSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return command(build_parser().parse_args(argv))
