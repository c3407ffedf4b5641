"""What a fine-tune will cost before it starts (time and disk), and what it leaves behind that
nothing reads once its model is exported (its resume checkpoints, a GGUF base dequantized for
training): removed when the export has succeeded; a stopped or failed run keeps them for Resume.

The time is rough by nature: the tokens to train (from the rows, the epochs and the trainer's
`min_updates`, and the replay sequence beside each of the user's) times the work per token (4 x the
base's weights: the forward pass and the backward pass through the frozen weights), at the speed
the last fine-tune in this store measured (its
loss log's tokens/s, scaled by model size), or at an assumed speed before any ran. The disk is
what the run writes at its peak: the dequantized base (a GGUF base), the checkpoints it keeps
every `save_every` updates (LoRA weights and Adam's two moments, float32), and the export's F16
and quantized files side by side (finetune/command.py checks that part before training too).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from localchat.fsutil import human
from localchat.quant_types import DEFAULT_QUANT, QUANT_TYPES
from localchat.safetensors_file import read_safetensors_header
from localchat.store import Store, StoreError

from .replay import MAX_NEW_TOKENS
from .settings import CHECKPOINTS, DEQUANTIZED, TrainSettings

try:
    import fcntl
except ImportError:  # Windows: no lock, a dequantized base is removed as on a machine running one fine-tune
    fcntl = None  # type: ignore[assignment]

CHARS_PER_TOKEN = 4  # English text in a BPE vocabulary; the estimate needs no tokenizer
# A two-core laptop CPU running torch, before this store has measured one (the docs session: the starter
# on a dozen rows, ~4,300 tokens, took 496 s on two busy cores with loading and export, ~5 GFLOP/s).
ASSUMED_FLOPS = 10e9
CHECKPOINT_BYTES = 4 + 8  # per LoRA weight: the weight and Adam's two moments, float32


@dataclass(frozen=True)
class BaseSize:
    params: int
    lora_per_rank: int  # LoRA weights at rank 1 (sum of in + out over every block's linear layers)
    dequantize: bool  # a GGUF base that training needs as a checkpoint first (not made yet)


def base_size(spec: str, store: Store) -> BaseSize:
    """The base's weight count and LoRA size from its headers alone (a GGUF or a checkpoint folder)."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        entry = store.get(spec)
        if entry.format == "gguf":
            from localchat.gguf_file import read_gguf

            header = read_gguf(store.path_of(entry.files[0].path))
            shapes = {t.name: t.shape for t in header.tensors}
            block = [s for n, s in shapes.items() if n.startswith("blk.0.") and len(s) == 2]
            per_block = sum(a + b for a, b in block)
            layers = int(header.arch_value("block_count", 1))
            return BaseSize(header.n_params, per_block * layers,
                            not (store.model_dir(spec) / DEQUANTIZED / "config.json").is_file())
        folder = store.path_of(entry.files[0].path).parent
    shapes: dict[str, list[int]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        shapes.update({k: t.shape for k, t in read_safetensors_header(f).items()})
    linear = [s for n, s in shapes.items() if ".layers." in n and n.endswith(".weight") and len(s) == 2]
    per_layer = sum(a + b for a, b in linear)
    return BaseSize(sum(math.prod(s) for s in shapes.values()), per_layer, False)


def measured_speed(store: Store) -> tuple[float, int] | None:
    """(tokens/s, base weights) of the newest fine-tune in this store that logged its speed."""
    logs = sorted(store.root.glob("*/finetune/loss.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    for log in logs:
        try:
            config = json.loads((log.parent / "train_config.json").read_text())
            rates = [json.loads(line).get("tok_s") for line in log.read_text().splitlines()]
            params = base_size(config["base"], store).params
        except (OSError, ValueError, KeyError, StoreError):  # a log half written, a base cleaned up since
            continue
        rates = [r for r in rates if r]
        if rates:
            return float(rates[-1]), params
    return None


@dataclass(frozen=True)
class Estimate:
    updates: int
    tokens: int
    seconds: float
    measured: bool
    disk: dict[str, int]  # what the run writes, by part; the GGUF's F16 file is removed after the export

    def describe(self) -> str:
        speed = "at the speed the last fine-tune here measured" if self.measured else \
            "at an assumed CPU speed (the log shows the real one after the first updates)"
        mins = self.seconds / 60
        when = f"{mins / 60:.1f} h" if mins >= 90 else f"{mins:.0f} min" if mins >= 1.5 else f"{self.seconds:.0f} s"
        parts = ", ".join(f"{k} {human(v)}" for k, v in self.disk.items() if v)
        return (f"Estimate: about {when} for {self.updates} updates over ~{self.tokens:,} tokens ({speed}); "
                f"disk at the peak about {human(sum(self.disk.values()))} ({parts}). "
                "The checkpoints and a dequantized base are removed once the model is exported "
                "(a stopped run keeps them for Resume).")


def estimate(base: BaseSize, chars: int, settings: TrainSettings, store: Store) -> Estimate:
    """Time and disk of `localchat finetune` on `chars` characters of training rows."""
    tokens = max(1, chars // CHARS_PER_TOKEN)
    seq_tokens, seq_batch = settings.cpu_shape()
    per_epoch = max(1, math.ceil(tokens / seq_tokens / seq_batch / settings.grad_accum))
    updates = max(math.ceil(per_epoch * settings.epochs), settings.min_updates)
    trained = int(tokens * updates / per_epoch)
    if settings.replay:  # a replay sequence beside each of the user's (finetune/train.py)
        # with --replay-kl the base's own forward pass over it too (a third of training's work), else the
        # base's greedy answers to the replay questions first (decoding: about training's work a token)
        replayed = updates * settings.grad_accum * seq_batch * seq_tokens
        trained += int(replayed * 4 / 3) if settings.replay_kl else replayed + settings.replay * MAX_NEW_TOKENS
    seen = measured_speed(store)
    rate = seen[0] * seen[1] / base.params if seen else ASSUMED_FLOPS / (4 * base.params)
    lora = base.lora_per_rank * settings.lora_r
    disk = {"dequantized base": 2 * base.params if base.dequantize else 0,
            "checkpoints": math.ceil(updates / settings.save_every) * lora * CHECKPOINT_BYTES,
            "F16 export": 2 * base.params, "GGUF": int(QUANT_TYPES[DEFAULT_QUANT][1] / 8 * base.params)}
    return Estimate(updates, trained, trained / rate, seen is not None, disk)


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _base_lock(store: Store, base: str) -> Path | None:
    """What a fine-tune of `base` locks while it reads the base's dequantized copy: the store GGUF it is
    made from (owned by the manifest, so it outlives the copy and no cleanup removes it). None for a
    base that is no GGUF of the store: a checkpoint folder is read where it is, and never removed."""
    entry = store.models().get(base)
    if entry is None or entry.format != "gguf":
        return None
    return store.path_of(entry.files[0].path)


@contextlib.contextmanager
def reading_base(store: Store, base: str) -> Iterator[None]:
    """A shared lock for as long as a fine-tune makes and reads the dequantized copy of `base` (training,
    then the export): another run finishing, or Clean up in the app, keeps a copy that is in use. Taken
    before the copy is looked for, so a run never finds a copy that is being removed."""
    lock = _base_lock(store, base)
    if lock is None or fcntl is None:
        yield
        return
    with open(lock, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        yield


def _remove_unread(store: Store, base: str) -> int | None:
    """Remove the dequantized copy of `base` unless a fine-tune reads it; its bytes, or None if kept."""
    lock = _base_lock(store, base)  # None for a checkpoint folder given by path: nothing of ours to remove
    if lock is None or not (folder := store.model_dir(base) / DEQUANTIZED).is_dir():
        return 0
    with open(lock, "rb") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
        size = _bytes(folder)
        shutil.rmtree(folder)
        return size


def leftovers(store: Store) -> dict[Path, int]:
    """Files finished fine-tunes leave that nothing reads: the checkpoints of each fine-tuned model in
    the store (a run that was stopped has no model yet, and keeps them for Resume), and the bases
    dequantized from GGUF for training (made again when a fine-tune needs one). Path -> bytes.
    A run removes its own once its model is exported: these are what `--no-export` and older runs left."""
    found: dict[Path, int] = {}
    for name, entry in store.models().items():
        folder = store.model_dir(name)
        candidates = [folder / "finetune" / CHECKPOINTS] if (folder / "finetune" / "adapter").is_dir() else []
        if entry.format == "gguf":
            candidates.append(folder / DEQUANTIZED)
        for path in candidates:
            if path.is_dir():
                found[path] = _bytes(path)
    return found


def clean_up(store: Store) -> tuple[int, list[str]]:
    """Remove `leftovers` (a dequantized base that a fine-tune reads stays); returns the bytes freed and
    what each was, in words."""
    freed, what = 0, []
    for path, size in leftovers(store).items():
        owner = path.relative_to(store.root).parts[0]
        if path.name == CHECKPOINTS:
            shutil.rmtree(path)
        elif _remove_unread(store, owner) is None:
            what.append(f"{owner}: dequantized base kept, a fine-tune is reading it")
            continue
        freed += size
        what.append(f"{owner}: {'checkpoints' if path.name == CHECKPOINTS else 'dequantized base'} {human(size)}")
    return freed, what


def after_export(store: Store, name: str, base: str) -> list[str]:
    """Once the fine-tune `name` is exported: remove what only its training and Resume read (its
    checkpoints, the copy of a GGUF `base` dequantized for training: made again when a fine-tune needs
    it), and say what went, what stays and why, as lines of the run's report."""
    out = store.model_dir(name) / "finetune"
    gone = []
    if (checkpoints := out / CHECKPOINTS).is_dir():
        size = _bytes(checkpoints)
        shutil.rmtree(checkpoints)
        gone.append(f"its resume checkpoints ({human(size)}: the model is finished)")
    kept = [f"the adapter in {out / 'adapter'} ({human(_bytes(out / 'adapter'))}: the trained weights, for "
            "a new export or a GGUF LoRA), the loss log and its plot"]
    freed = _remove_unread(store, base)
    if freed is None:
        kept.append(f"{store.model_dir(base) / DEQUANTIZED}: another fine-tune is reading it "
                    "(Clean up in the app removes it later)")
    elif freed:
        gone.append(f"{base} dequantized for training ({human(freed)}; made again when a fine-tune needs it)")
    return ([f"removed {'; '.join(gone)}"] if gone else []) + [f"kept {'; '.join(kept)}"]


def data_chars(path: str | Path) -> int:
    """Characters in the training rows of a dataset file (checked as `localchat finetune` reads it)."""
    from localchat.datasets import load_dataset

    ds = load_dataset(path)
    return sum(len(ex.text) + sum(len(m["content"]) for m in ex.messages) for ex in ds.train)
