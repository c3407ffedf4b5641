"""`localchat convert PATH --to gguf --quant q4_k_m`: a Hugging Face checkpoint (or an RLHF
output, or a PEFT adapter folder) into a quantized GGUF in the model store.

Quantized types are weighted by an importance matrix computed from chat calibration data
(convert/imatrix.py) unless `--no-imatrix`; the matrix is kept beside the model, so
converting the same checkpoint to another type reuses it.

Every export ends with a check: perplexity and KL divergence against the F16 conversion on
chat text rendered with the model's template, and a one-line smoke chat. The figures go
into the manifest, where `localchat list` shows them.
"""

from __future__ import annotations

import argparse
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from localchat.artifacts import artifact_from_gptq
from localchat.fsutil import HEADROOM, check_disk, human, sha256_file
from localchat.gguf_file import read_gguf
from localchat.quant_types import DEFAULT_QUANT, GPTQ_BITS
from localchat.store import ModelEntry, ModelFile, Store, check_name, default_store
from localchat.store.manifest import gguf_defaults
from localchat.store.jobs import job_folder

from .quantize import (NEEDS_IMATRIX, QUANT_TYPES, USES_IMATRIX, check_imatrix, fallback_note, quant_name, quantize,
                       quantized_bytes)

if TYPE_CHECKING:
    from .to_gguf import GgufPlan

SMOKE_PROMPT = "What is the capital of France?"
GPTQ_BESIDE = "gptq"  # the folder name of a GPTQ checkpoint kept inside a GGUF model's folder
IMATRIX_KEY = "imatrix"  # the store entry's extra key for the importance matrix kept beside the GGUF


@dataclass
class ExportResult:
    entry: ModelEntry
    report: list[str]
    smoke: str


def _name_from(path: Path) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", path.resolve().name).strip("-.").lower()
    return base or "model"


def export_gguf(source: str | Path, quant: str = DEFAULT_QUANT, name: str | None = None,
                template: str | None = None, base: str | Path | None = None, store: Store | None = None,
                keep_f16: bool = False, check: bool = True, quiet: bool = False,
                replace: bool = False, imatrix: bool = True,
                calibration: str | Path | None = None, size: str | None = None) -> ExportResult:
    """Convert, quantize, check and register; returns the store entry.

    With `imatrix` (the default) a quantized type is weighted by an importance matrix over
    `calibration` (default: localchat's chat calibration set), kept beside the GGUF.
    `quant="auto"` with `size` ("4.0GB") chooses each layer weight's type by measured
    sensitivity to fit that size (convert/automix.py).

    The disk is checked for every step before the first, the work happens in a job folder
    (`localchat.store.jobs`), and only the finished files move into `<store>/<name>/`: a
    refusal, an error, Ctrl-C or a kill leaves the model folder as it was.
    """
    from localchat.evaluation import chat_eval_text, evaluate

    from .checkpoint import load_checkpoint  # torch and gguf: the convert extra, imported when used
    from .imatrix import SUFFIX, imatrix_for
    from .to_gguf import plan_gguf, write_gguf

    store = store or default_store()
    q = quant_name(quant)
    use_imatrix = imatrix and q in USES_IMATRIX
    check_imatrix(q, use_imatrix)
    budget = _size_budget(q, size)
    name = check_name(name or _name_from(Path(source)))
    refuse_existing(store, name, replace)
    plan = plan_gguf(load_checkpoint(source, base), "f16", template=template, name=name)
    need, steps = gguf_export_need(plan, q)
    check_disk(store.root, need, f"converting {Path(source).name} to {q} ({steps})")
    with job_folder(store, f"convert {Path(source).name} to {q} as {name}") as work:
        f16 = work / f"{name}-F16.gguf"
        report = write_gguf(plan, f16, quiet=quiet).report
        final = f16
        weights, extra = None, {}
        if use_imatrix:
            im, line = imatrix_for(plan.ckpt, plan.conv.gguf_name, work / f"{name}{SUFFIX}", calibration,
                                   _kept_imatrices(store))
            report.append(line)
            weights = im
        types = None
        if budget is not None:
            from .automix import plan_mix

            types, planned = plan_mix(f16, weights, budget)
            mix = Counter(types.values())
            report.append(f"auto mix for {human(budget)}: planned {human(planned)}; "
                          + ", ".join(f"{n} {t}" for t, n in sorted(mix.items())))
        if q != "F16":
            final = quantize(f16, work / f"{name}-{q}.gguf", q, imatrix=weights, types=types)
            note = fallback_note(f16, q)
            if note:
                report.append(note)
        figures: dict = {}
        smoke = ""
        if check:
            text = chat_eval_text(f16)
            ev = evaluate(final, text, base=f16 if final != f16 else None)
            figures = {**ev.figures(), "text": "chat (localchat/data/eval_chats.jsonl)"}
            report.append(f"check: {ev.summary()}")
            smoke = smoke_chat(str(final))
            report.append(f"smoke chat: {SMOKE_PROMPT!r} -> {smoke[:120]!r}")
        files = [_move_into(store, name, f) for f in [final] + ([f16] if keep_f16 and final != f16 else [])]
        if weights is not None:  # in `extra`, not `files`: kept with the model, never run as one
            extra[IMATRIX_KEY] = _move_into(store, name, work / f"{name}{SUFFIX}").path
    entry = ModelEntry(name=name, format="gguf", quant=q, files=files, extra=extra,
                       source=f"convert:{Path(source).resolve().name}", sha256=files[0].sha256, eval=figures,
                       defaults=gguf_defaults(read_gguf(store.path_of(files[0].path))))  # read back from the file
    if template:
        entry.defaults["chat_format"] = template
    kept = _gptq_beside(store, name)
    if kept:  # a new GGUF for a model that also has a GPTQ folder keeps that folder
        entry.files += kept
        entry.quant = _both_quants(q, artifact_from_gptq(store.path_of(kept[0].path)).quant)
    replaced = store.replace(entry)
    stale = replaced.extra.get(IMATRIX_KEY) if replaced else None
    if stale and stale != extra.get(IMATRIX_KEY):  # a replaced model's matrix goes with it
        store.path_of(stale).unlink(missing_ok=True)
    return ExportResult(entry, report, smoke)


def gguf_export_need(plan: GgufPlan, quant: str) -> tuple[int, str]:
    """Disk a GGUF export needs at its peak (the F16 and the quantized file side by side), and
    its steps in words for the refusal."""
    f16 = plan.nbytes + HEADROOM
    q = quant_name(quant)
    if q == "F16":
        return f16, f"F16 {human(f16)}"
    qbytes = quantized_bytes(plan.n_params, q)
    return f16 + qbytes, f"F16 {human(f16)}, then {q} {human(qbytes)}, with headroom"


def refuse_existing(store: Store, name: str, replace: bool) -> None:
    """`--name` of a model in the store replaces it only when asked, as `localchat import` refuses."""
    if not replace and name in store.models():
        raise FileExistsError(f"the store already has a model named {name!r}; pass --replace to replace it "
                              "(its files are deleted), or --name to choose another name")


def _move_into(store: Store, name: str, done: Path) -> ModelFile:
    """A finished file from the job folder into the model's folder (same file system: a rename)."""
    target = store.model_dir(name) / done.name
    target.parent.mkdir(parents=True, exist_ok=True)
    listed = ModelFile(str(target.relative_to(store.root)), done.stat().st_size, sha256_file(done))
    os.replace(done, target)
    return listed


def _size_budget(quant: str, size: str | None) -> int | None:
    """The byte budget of `--quant auto --size`, refused without the other half."""
    from .automix import parse_size

    if (quant == "AUTO") != (size is not None):
        raise ValueError("--quant auto needs --size (say --size 4.0GB), and --size applies only to --quant auto")
    return parse_size(size) if size is not None else None


def _kept_imatrices(store: Store) -> list[Path]:
    """The importance matrices kept beside the store's models (one may fit the checkpoint at hand)."""
    found = [store.path_of(e.extra[IMATRIX_KEY]) for e in store.models().values() if e.extra.get(IMATRIX_KEY)]
    return [p for p in found if p.is_file()]


def _gptq_beside(store: Store, name: str) -> list[ModelFile]:
    """The GPTQ folder a GGUF model holds beside its GGUF files (see export_gptq)."""
    if name not in store.models():
        return []
    return [f for f in store.get(name).files
            if Path(f.path).name == GPTQ_BESIDE and store.path_of(f.path).is_dir()]


def _both_quants(gguf_quant: str, gptq_quant: str) -> str:
    """The quant label of a model with a GGUF and a GPTQ folder, e.g. "Q4_K_M + GPTQ-4bit-g128"."""
    return f"{gguf_quant.split(' + ')[0]} + {gptq_quant}"


def smoke_chat(spec: str, system: str | None = None, backend: str | None = None) -> str:
    """One greedy answer through the runtime (a GGUF path or a store name), as `localchat chat` gives it."""
    from localchat.chat import ChatSession
    from localchat.engine import SamplingSettings
    from localchat.planner import Overrides
    from localchat.runtime import open_model

    loaded = open_model(spec, Overrides(context=1024, backend=backend, parallel=1))  # one answer: one slot
    try:
        return ChatSession(loaded.backend, system=system).ask(SMOKE_PROMPT,
                                                              SamplingSettings(temperature=0.0, max_tokens=48))
    finally:
        loaded.backend.close()


def export_gptq(source: str | Path, name: str | None = None, bits: int = 4, group_size: int = 128,
                calibration: str | Path | None = None, base: str | Path | None = None,
                store: Store | None = None, check: bool = True, quiet: bool = False,
                mse: float | None = None, replace: bool = False) -> ExportResult:
    """Quantize to GPTQ into `<store>/<name>/`, check it against the source, register it."""
    from localchat.evaluation import chat_eval_text, evaluate

    from .gptq import quantize_gptq

    store = store or default_store()
    name = check_name(name or f"{_name_from(Path(source))}-gptq")
    existing = store.models().get(name)
    # `--name` of a GGUF model puts the GPTQ folder beside its GGUF: one model with two
    # artifacts, and the planner (with `localchat bench` figures) picks between them.
    beside = existing is not None and existing.format == "gguf"
    if not (beside and not _gptq_beside(store, name)):  # anything else replaces what is there
        refuse_existing(store, name, replace)
    folder = store.model_dir(name) / GPTQ_BESIDE if beside else store.model_dir(name)
    kw = {} if mse is None else {"mse": mse}
    with job_folder(store, f"GPTQ of {Path(source).name} as {name}") as work:
        r = quantize_gptq(source, folder, bits, group_size, calibration, base, quiet=quiet, work=work, **kw)
    report, figures, smoke = r.report, {}, ""
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    gptq_file = ModelFile(str(folder.relative_to(store.root)), size, "")
    if beside:
        def add_beside(entry: ModelEntry) -> None:  # under the store lock: the GGUF entry as it is now
            entry.files = [f for f in entry.files if f.path != gptq_file.path] + [gptq_file]
            entry.quant = _both_quants(entry.quant, r.quant)

        store.update(name, add_beside)
        report.append(f"added beside {name}'s GGUF: on CUDA the plan prefers GPTQ unless `localchat bench "
                      f"{name}` measures llama.cpp faster there")
    else:
        store.replace(ModelEntry(name=name, format="gptq", quant=r.quant, files=[gptq_file],
                             source=f"convert:{Path(source).resolve().name}",
                             sha256=sha256_file(folder / "model.safetensors")
                             if (folder / "model.safetensors").is_file() else ""))
    if check:
        text = chat_eval_text(folder)
        # KL divergence needs the source as transformers reads it: a plain HF folder.
        ev = evaluate(folder, text, base=Path(source) if r.plain_source else None)
        figures = {**ev.figures(), "text": "chat (localchat/data/eval_chats.jsonl)"}
        report.append(f"check: {ev.summary()}")
        smoke = smoke_chat(str(folder), backend="gptq-cuda" if _cuda() else "gptq-cpu")
        report.append(f"smoke chat: {SMOKE_PROMPT!r} -> {smoke[:120]!r}")
        if beside:  # the model's figures stay the GGUF's; the GPTQ's are kept beside them
            store.update_extra(name, "gptq_eval", figures)
        else:
            store.update_eval(name, figures)
    return ExportResult(store.get(name), report, smoke)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def convert(args: argparse.Namespace) -> int:
    if args.to == "gptq":
        r = export_gptq(args.path, args.name, args.bits, args.group_size, args.calibration, args.base,
                        check=not args.no_check, quiet=args.quiet, mse=0.0 if args.fast else None,
                        replace=args.replace)
        for line in r.report:
            print(f"- {line}")
        e = r.entry
        print(f"{e.name}: {e.quant}, {human(e.size)} -> `localchat chat --model {e.name}` "
              "(fast on a CUDA GPU; slow on the CPU, where a GGUF of the same model is the better choice)")
        return 0
    r = export_gguf(args.path, args.quant, args.name, args.template, args.base, keep_f16=args.keep_f16,
                    check=not args.no_check, quiet=args.quiet, replace=args.replace,
                    imatrix=not args.no_imatrix, calibration=args.calibration, size=args.size)
    for line in r.report:
        print(f"- {line}")
    e = r.entry
    print(f"{e.name}: {e.quant}, {human(e.size)} -> `localchat chat --model {e.name}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a Hugging Face checkpoint folder, RLHF output or PEFT adapter folder")
    parser.add_argument("--to", choices=("gguf", "gptq"), default="gguf")
    parser.add_argument("--quant", default=DEFAULT_QUANT, type=str.upper, choices=list(QUANT_TYPES),
                        help=f"quant type (default: {DEFAULT_QUANT}; {', '.join(NEEDS_IMATRIX)} need the "
                             "importance matrix)")
    parser.add_argument("--name", help="name in the store (default: the folder's name)")
    parser.add_argument("--replace", action="store_true", help="replace the model of that name in the store "
                                                              "(its files are deleted once the new ones are in)")
    parser.add_argument("--template", help="embed this chat format (for models without a template)")
    parser.add_argument("--base", help="base model folder for a PEFT adapter")
    parser.add_argument("--keep-f16", action="store_true", help="keep the F16 GGUF in the store too")
    parser.add_argument("--size", help="with --quant auto: the file size to fit, e.g. 4.0GB (each layer weight's "
                                       "type chosen by its measured sensitivity)")
    parser.add_argument("--no-imatrix", action="store_true",
                        help="quantize the GGUF without an importance matrix (llama.cpp's plain quantization)")
    parser.add_argument("--calibration", help="calibration data for the importance matrix (GGUF) or GPTQ: chat "
                                              "JSONL, Alpaca, ShareGPT or .txt (default: conversations and prose "
                                              "shipped with localchat)")
    gptq = parser.add_argument_group("gptq (--to gptq)")
    gptq.add_argument("--bits", type=int, choices=GPTQ_BITS, default=GPTQ_BITS[0], help="bits per weight (default: 4)")
    gptq.add_argument("--group-size", type=int, default=128, choices=(128, 64, 32, 16),
                      help="weights sharing one scale (default: 128; smaller if it does not divide the layers, "
                           "within what vLLM's Marlin kernels read; 16 they do not)")
    gptq.add_argument("--fast", action="store_true", help="take each group's max as its scale instead of "
                                                         "searching the best clipping (~3.5x faster, a little worse)")
    parser.add_argument("--no-check", action="store_true", help="skip the perplexity/KL check and smoke chat")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    return convert(build_parser().parse_args(argv))
