"""HF checkpoints (RLHF and PEFT outputs included) into 4-bit GPTQ folders with GPTQModel.

The output is the standard GPTQ layout (`quantize_config.json` plus `quantization_config`
in `config.json`) that transformers, vLLM and auto-gptq read. These are chat models, so
the default calibration is conversations rendered with the model's own chat template,
mixed with plain prose; a calibration set of prose alone tunes the model for text it
will rarely see in a chat.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from localchat.engine.gptq import gptq_environment
from localchat.engine.vllm_check import MARLIN_GROUP_SIZES, check_folder
from localchat.fsutil import check_disk, check_memory, human

from .checkpoint import Checkpoint, load_checkpoint
from .to_hf import TOKENIZER_FILES, save_checkpoint

DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 128
PER_CHANNEL = -1  # one group per output channel: divides every width, and Marlin reads it
DEFAULT_SEQ_LEN = 256
DEFAULT_SAMPLES = 128
# Search each group's scale (clipping) for the lowest squared error instead of taking its
# max: on the starter checkpoint it cut the perplexity cost on prose from 1.33x to 1.23x and
# KL divergence on chats by a quarter, for about 3.5x the quantization time (bench_gptq.py).
DEFAULT_MSE = 2.4


class GptqError(RuntimeError):
    pass


@dataclass
class GptqResult:
    folder: Path
    bits: int
    group_size: int
    samples: int
    report: list[str] = field(default_factory=list)
    plain_source: bool = True  # the source loads as it is (no wrapper, value head or adapter)

    @property
    def quant(self) -> str:
        return f"GPTQ-{self.bits}bit-g{self.group_size}"


def layer_input_widths(ckpt: Checkpoint) -> dict[str, int]:
    """In-features of every 2-D weight GPTQ quantizes (the decoder layers' linear layers)."""
    return {name: ckpt.shape(name)[1] for name in ckpt.names()
            if ".layers." in name and name.endswith(".weight") and len(ckpt.shape(name)) == 2}


def choose_group_size(widths: dict[str, int], wanted: int) -> tuple[int, str]:
    """`wanted` if it divides every layer's input width, else the largest smaller group size vLLM's
    Marlin kernels read (`MARLIN_GROUP_SIZES`) that does, else one group per output channel (-1):
    so the fallback never writes a folder vLLM's fast path refuses."""
    bad = sorted({w for w in widths.values() if w % wanted})
    if not bad:
        return wanted, ""
    for g in sorted((s for s in MARLIN_GROUP_SIZES if 0 < s < wanted), reverse=True):
        if all(w % g == 0 for w in widths.values()):
            return g, (f"group size {wanted} does not divide the layer widths {', '.join(map(str, bad))}; "
                       f"using {g}, the largest that divides them all")
    return PER_CHANNEL, (f"no group size vLLM's Marlin reads divides the layer widths "
                         f"{sorted(set(widths.values()))}; using one group per output channel (-1)")


def _template_of(tok: Any) -> str:
    if not tok.chat_template:
        from localchat.templates import DEFAULT_FORMAT, get_format

        return get_format(DEFAULT_FORMAT).template
    return tok.chat_template


def calibration_texts(tok: Any, dataset: str | Path | None = None) -> list[str]:
    """Calibration samples as text: conversations through the model's template, plus prose."""
    from localchat.templates import render_chat

    template = _template_of(tok)

    def render(msgs: list[dict[str, str]]) -> str:
        return render_chat(template, msgs, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
                           add_generation_prompt=False, origin="the model's chat template")

    if dataset is not None:
        from localchat.datasets import load_dataset

        ds = load_dataset(dataset, held_out=0.0)  # every row checked, errors name file:line
        return [render(list(ex.messages)) if ex.messages else ex.text for ex in ds.train]
    data = resources.files("localchat.convert").joinpath("data")
    chats = [json.loads(line)["messages"] for line in
             data.joinpath("calibration_chats.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
    prose = [p.strip() for p in data.joinpath("calibration_prose.txt").read_text(encoding="utf-8").split("\n\n")
             if p.strip()]
    return [render(m) for m in chats] + prose


def calibration_batches(tok: Any, texts: list[str], seq_len: int, samples: int,
                        stride: int | None = None) -> list[dict[str, list[int]]]:
    """Token rows of at most `seq_len`: long texts are cut, short ones joined, so each row is
    a full window of real text, as GPTQ's Hessian estimate wants. Windows overlap by
    `seq_len - stride` tokens: a small shipped set then still gives many rows, each token
    seen in several contexts."""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False)["input_ids"]
    step = stride or seq_len
    rows = [ids[i:i + seq_len] for i in range(0, max(len(ids) - seq_len, 0) + 1, step)]
    rows = [r for r in rows if len(r) >= min(64, seq_len)][:samples]
    if not rows:
        raise GptqError(f"the calibration text has {len(ids)} tokens; GPTQ needs at least {min(64, seq_len)}")
    return [{"input_ids": r, "attention_mask": [1] * len(r)} for r in rows]


def _scrub(value: Any, secrets: tuple[str, ...]) -> Any:
    """Drop local paths from a saved config: they say where the quantizer ran, nothing more."""
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or any(s and s in value for s in secrets)):
        return None
    return value


CONFIG_FILES = ("config.json", "quantize_config.json", "generation_config.json")


def scrub_configs(folder: Path, secrets: tuple[str, ...]) -> None:
    """Only the configs: tokenizer files hold tokens such as "/" that look like paths."""
    for p in (folder / n for n in CONFIG_FILES):
        if not p.is_file():
            continue
        data = json.loads(p.read_text(encoding="utf-8"))
        p.write_text(json.dumps(_scrub(data, secrets), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _logs_into(folder: Path) -> None:
    """GPTQModel writes a log file per layer pass into ./logs of whatever folder the user ran
    localchat from; point it at our temp folder instead (it goes away with the rest)."""
    try:
        from gptqmodel.looper import loop_processor
    except ImportError:
        return
    if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
        loop_processor._PROJECT_LOG_DIR = folder


def quantize_gptq(source: str | Path, out: str | Path, bits: int = DEFAULT_BITS,
                  group_size: int = DEFAULT_GROUP_SIZE, calibration: str | Path | None = None,
                  base: str | Path | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                  samples: int = DEFAULT_SAMPLES, mse: float = DEFAULT_MSE, quiet: bool = False,
                  work: Path | None = None) -> GptqResult:
    """Quantize `source` into the folder `out`, which appears only when complete.

    Intermediate files (a clean copy of the checkpoint, GPTQModel's offload, the staged
    result) go to a temp folder in `work` (a store job folder), or beside `out`.
    """
    gptq_environment()
    out = Path(out)
    ckpt = load_checkpoint(source, base)
    report = list(ckpt.report)
    widths = layer_input_widths(ckpt)
    if not widths:
        raise GptqError(f"{source}: no decoder-layer weights found to quantize")
    group, note = choose_group_size(widths, group_size)
    if note:
        report.append(note)
    fp32_bytes = sum(4 * math.prod(ckpt.shape(n)) for n in ckpt.names())
    # GPTQModel holds the fp32 model, one layer's Hessians and activations of the calibration rows.
    check_memory(int(fp32_bytes * 1.6) + 512 * 1024**2, "GPTQ quantization")
    plain = all(s.file.suffix == ".safetensors" for s in ckpt.sources.values()) and not ckpt.report
    # Every step's files at once: the clean copy (at most fp32), the offload and the result.
    need = int(fp32_bytes / 8 * bits * 1.2) + fp32_bytes // 4 + (0 if plain else fp32_bytes)
    check_disk(work or out.parent, need, "the GPTQ checkpoint" + ("" if plain else " and a clean copy of its source"))

    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization import FORMAT
    from transformers import AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=work or out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        # inputs GPTQModel cannot read as they are (RLHF wrappers, value heads, PEFT adapters,
        # pickled .bin weights) as a plain folder first
        folder = Path(source) if plain else save_checkpoint(ckpt, tmp / "clean", "a plain copy for GPTQModel")
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        rows = calibration_batches(tok, calibration_texts(tok, calibration), seq_len, samples)
        report.append(f"calibration: {len(rows)} rows of up to {seq_len} tokens from "
                      + (str(calibration) if calibration else
                         "localchat's conversations (rendered with the model's chat template) and prose"))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # What vLLM's Marlin path reads (engine/vllm_check.py): symmetric, no activation order, v1
        # zero-points with checkpoint_format "gptq" written out, whatever GPTQModel's default becomes.
        qcfg = QuantizeConfig(bits=bits, group_size=group, desc_act=False, sym=True, mse=mse,
                              format=FORMAT.GPTQ, offload_to_disk_path=str(tmp / "offload"))
        _logs_into(tmp / "logs")
        model = GPTQModel.load(str(folder), qcfg, device=device, trust_remote_code=False)
        model.quantize(rows, batch_size=1)
        staged = tmp / "out"
        model.save(str(staged))
        del model
        for name in TOKENIZER_FILES:  # the tokenizer travels with the weights
            if not (staged / name).exists() and (folder / name).is_file():
                shutil.copyfile(folder / name, staged / name)
        (staged / "quant_log.csv").unlink(missing_ok=True)
        scrub_configs(staged, (str(tmp), str(Path(source).resolve()), str(Path.home())))
        if out.exists():  # replace an older result only once the new one is complete
            old = tmp / "old"
            os.replace(out, old)
        os.replace(staged, out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    report.append(f"wrote {out.name}: {bits}-bit, group size {group}, {human(size)} on {device}")
    report.append(check_folder(out).summary())
    return GptqResult(out, bits, group, len(rows), report, plain)
