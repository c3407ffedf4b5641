"""`localchat finetune --base MODEL --data FILE`: teach a model your own domain with LoRA
and get a new model in the store that `localchat chat` runs at once.

The output folder (`<store>/<name>/finetune/`) holds the adapter, the merged checkpoint,
the training config, the loss log and its plot; the merged checkpoint goes through
`localchat convert` (with its after-export check) into a GGUF in the store.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from localchat.fsutil import HEADROOM, check_disk, human, sha256_file
from localchat.store import ModelEntry, ModelFile, Store, check_name, default_store

from .data import load_dataset
from .settings import TrainSettings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


class FinetuneError(RuntimeError):
    pass


@dataclass
class FinetuneResult:
    name: str
    out: Path
    report: list[str]


def base_folder(spec: str, store: Store) -> Path:
    """The Hugging Face checkpoint to train: a folder, or a model in the store."""
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
        # Only a GGUF here: dequantize it once into <store>/<name>/hf (float32 safetensors).
        from localchat.convert.from_gguf import gguf_to_hf

        return gguf_to_hf(store.path_of(entry.files[0].path), store.model_dir(spec) / "hf")
    if entry.format != "hf":
        raise FinetuneError(f"{spec} has only {entry.format.upper()} weights; training needs a Hugging Face "
                            "checkpoint or a GGUF (`localchat pull OWNER/REPO` fetches one)")
    return store.path_of(entry.files[0].path).parent


def merge(base: Path, adapter: Path, out: Path) -> Path:
    """Base + adapter as one ordinary checkpoint that `convert/` and transformers read."""
    import torch
    import transformers
    from peft import PeftModel

    from .lora_layers import no_gptq_dispatch

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with no_gptq_dispatch():
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (base / f).is_file():
            shutil.copy(base / f, tmp / f)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


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


def check_export_disk(base_dir: Path, quant: str | None, store: Store) -> None:
    """Refuse before training when the disk cannot hold what follows it: the merged float32
    checkpoint and, with `quant`, the GGUF export's F16 and quantized files."""
    from localchat.convert.checkpoint import load_checkpoint
    from localchat.convert.command import gguf_export_need
    from localchat.convert.to_gguf import plan_gguf

    ckpt = load_checkpoint(base_dir)  # headers only
    merged = sum(4 * math.prod(ckpt.shape(n)) for n in ckpt.names()) + HEADROOM
    need, steps = merged, f"merged checkpoint {human(merged)}"
    if quant:
        more, export_steps = gguf_export_need(plan_gguf(ckpt, "f16"), quant)
        need, steps = need + more, f"{steps}, then GGUF {export_steps}"
    check_disk(store.root, need, f"fine-tuning {base_dir.name} ({steps})")


def finetune(base: str, data: str, name: str | None, settings: TrainSettings, quant: str = "Q4_K_M",
             resume: bool = False, export: bool = True, store: Store | None = None,
             quiet: bool = False, lora_gguf: bool = False) -> FinetuneResult:
    # Every row is checked first: a bad row fails in a second, before a base is dequantized or loaded.
    dataset = load_dataset(data, settings.held_out, settings.seed)
    from localchat.convert.command import export_gguf

    from .train import train

    store = store or default_store()
    base_dir = base_folder(base, store)
    name = check_name(name or f"{base_dir.name.lower()}-{Path(data).stem.lower()}"[:128])
    out = store.model_dir(name) / "finetune"
    check_export_disk(base_dir, quant if export else None, store)
    report = [f"data: {len(dataset.train)} training rows, {len(dataset.held_out)} held out ({dataset.kind})"]
    result = train(base_dir, dataset, out, settings, resume=resume, quiet=quiet)
    if result.resumed_from:
        report.append(f"resumed from update {result.resumed_from}")
    report.append(f"trained {result.steps} updates: loss {result.train_loss:.3f}"
                  + (f", held-out loss {result.held_out_loss:.3f}" if result.held_out_loss is not None else "")
                  + (f", {result.held_out_recall.describe()}" if result.held_out_recall else "")
                  + f", {result.tokens_per_s:.0f} tokens/s; plot: {out / 'loss.png'}")
    if lora_gguf:
        lora_name = register_lora(store, base, base_dir, result.adapter, name)
        report.append(f"GGUF LoRA adapter: {lora_name} (llama.cpp applies it over {base} at load time)")
    merged = merge(base_dir, result.adapter, out / "merged")
    if export:
        # The run's own name: a re-run replaces its earlier export (and deletes that GGUF).
        ex = export_gguf(merged, quant, name=name, store=store, quiet=quiet, replace=True)
        entry = store.get(name)
        entry.source = f"finetune:{base_dir.name}+{Path(data).name}"
        entry.extra = {"adapter": str(result.adapter.relative_to(store.root)),
                       "merged": str(merged.relative_to(store.root)),
                       "loss_plot": str((out / "loss.png").relative_to(store.root))}
        store.add(entry)
        report += ex.report
    return FinetuneResult(name, out, report)


def command(args: argparse.Namespace) -> int:
    from .train import Interrupted

    settings = TrainSettings.from_args(args)
    try:
        r = finetune(args.base, args.data, args.name, settings, args.quant, args.resume,
                     export=not args.no_export, quiet=args.quiet, lora_gguf=args.lora_gguf)
    except Interrupted as exc:
        print(f"localchat finetune: {exc}", file=sys.stderr)
        return 130
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
    parser.add_argument("--no-export", action="store_true", help="stop after the merged checkpoint")
    parser.add_argument("--lora-gguf", action="store_true",
                        help="also store the adapter as a GGUF LoRA (NAME-lora, a few MB) that llama.cpp "
                             "applies over the --base store model at load time")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    TrainSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return command(build_parser().parse_args(argv))
