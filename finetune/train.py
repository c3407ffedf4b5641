"""LoRA and QLoRA training with a loop of our own.

Why not transformers' Trainer: rows are packed into full sequences and batches are cut
to their longest sequence, so no compute goes to padding; checkpoints are ours (adapter,
optimizer, scheduler, step) and written atomically, so Ctrl-C saves one and `--resume`
continues from the last complete one with the same data order. The loss goes to a JSONL
log and a PNG plot as training runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm import tqdm

from localchat.datasets import Dataset, DatasetError, Example
from localchat.fsutil import atomic_write_text
from localchat.hardware.memory import peak_rss, probe_memory

from . import replay
from .augment import augment
from .distributed import ranks
from .encode import IGNORE, Encoded, encode, pack
from .lora_layers import no_gptq_dispatch, speed_up_lora
from .memory import GIB, RUNTIME_BYTES, SHAPES, ModelShape, TrainMemory, check, choose_shape, estimate
from .recall import Recall, held_out_recall
from .settings import CHECKPOINTS, TrainSettings, default_lr

LOSS_LOG = "loss.jsonl"
LOSS_PLOT = "loss.png"


class Interrupted(Exception):
    """Ctrl-C during training; a checkpoint was saved first."""


@dataclass(frozen=True)
class TrainResult:
    adapter: Path
    steps: int
    train_loss: float
    held_out_loss: float | None
    tokens_per_s: float
    resumed_from: int
    tokens_seen: int  # real tokens trained on in this run (no padding)
    held_out_recall: Recall | None = None  # held-out chat rows answered greedily with their key content
    kept_step: int | None = None  # the earlier update whose adapter --early-stop kept
    peak_memory: int = 0  # measured: the GPU allocator's peak on CUDA, else the process's peak RSS
    memory_estimate: int = 0  # what the run estimated before it started (finetune/memory.py)
    device: str = "cpu"


def plan_memory(base: Path, settings: TrainSettings, device: str, qlora: bool, weight_bytes: int,
                checkpointing: bool, free_bytes: int) -> tuple[int, int, TrainMemory]:
    """(max_len, batch_size, estimate): the user's values, or the largest that fit in memory.

    On a CPU one packed 512-token sequence a step trains fastest (measured in
    bench_finetune.py); on CUDA the largest shape whose estimate fits in 90% of the free
    memory. Refuses with "needs X, has Y" when even the smallest does not fit.
    """
    shape = ModelShape.from_folder(base)
    targets = settings.target or shape.default_targets

    def need(max_len: int, batch: int) -> TrainMemory:
        return estimate(shape, tuple(targets), settings.lora_r, max_len, batch, qlora=qlora,
                        weight_bytes=weight_bytes, checkpointing=checkpointing, device=device,
                        replay_kl=settings.replay > 0 and settings.replay_kl)

    budget = int(free_bytes * 0.9)
    if device == "cuda":
        chosen = choose_shape(lambda n, b: need(n, b).total <= budget, settings.max_len, settings.batch_size)
        max_len, batch = chosen or (settings.max_len or SHAPES[-1][0], settings.batch_size or SHAPES[-1][1])
    else:
        max_len, batch = settings.cpu_shape()
    est = need(max_len, batch)
    check(est, budget, "on the GPU" if device == "cuda" else "in RAM", qlora)
    return max_len, batch, est


def _batches(rows: list[Encoded], batch: int, epoch_seed: int) -> list[list[Encoded]]:
    order = list(range(len(rows)))
    random.Random(epoch_seed).shuffle(order)
    return [[rows[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)]


def _collate(batch: list[Encoded], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    width = max(len(r.input_ids) for r in batch)  # cut to the longest row, not a fixed length
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
        # Padding starts a block of its own, which no real token attends to.
        positions[i] = torch.tensor((r.positions or list(range(n))) + list(range(width - n)))
    out = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
    if any(r.positions for r in batch):
        out["position_ids"] = positions.to(device)
    if any(r.soft for r in batch):
        soft = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, r in enumerate(batch):
            if r.soft:
                soft[i, :len(r.soft)] = torch.tensor(r.soft)
        out["soft"] = soft.to(device)
    return out


def _loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained tokens, and how many there were.

    The output layer runs only where a label is trained: on chat data most positions are
    prompt, and the vocabulary-wide matmul and softmax are the costliest step of a small model.
    Tokens marked `soft` (replay rows under --replay-kl) are trained toward the base model's own
    next-token distribution instead (KL divergence, the adapter switched off for the target):
    every probability the base gives, not only its greedy pick, so the fine-tune keeps how the
    base answers other questions while it learns the user's rows.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" in batch:  # packed rows: transformers keeps each row's attention inside the row
        # when it gets positions that restart at each row and no attention mask
        inputs = {"position_ids": batch["position_ids"]}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    soft = batch["soft"][:, 1:][keep] if batch.get("soft") is not None else None
    replayed = soft is not None and bool(soft.any())
    # NEFTune's noise is for the user's rows: the replay ones keep clean inputs on both sides of the KL.
    with _clean_embeddings(base) if replayed else contextlib.nullcontext():
        hidden = base.model(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state
        logits = base.lm_head(hidden[:, :-1][keep]).float()
        n = int(keep.sum())
        if not replayed:
            return torch.nn.functional.cross_entropy(logits, labels[keep], reduction="sum"), n
        loss = torch.nn.functional.cross_entropy(logits[~soft], labels[keep][~soft], reduction="sum")
        with torch.no_grad(), model.disable_adapter():
            target = base.model(input_ids=batch["input_ids"], use_cache=False, **inputs).last_hidden_state
            target = base.lm_head(target[:, :-1][keep][soft]).float().log_softmax(-1)
    loss = loss + torch.nn.functional.kl_div(logits[soft].log_softmax(-1), target, log_target=True,
                                             reduction="sum")
    return loss, n


@contextlib.contextmanager
def _clean_embeddings(base: Any) -> Iterator[None]:
    """The input embeddings in eval mode, where NEFTune's hook adds no noise: a replay row is compared with
    the base's own distribution over the row as it is, and read as it is."""
    emb = base.get_input_embeddings()
    was = emb.training
    emb.eval()
    try:
        yield
    finally:
        emb.train(was)


class LossOf(torch.nn.Module):
    """`_loss` as a module's forward: accelerate's DDP (or FSDP) wrapper syncs gradients through
    the forward of the module it wraps, and `_loss` bypasses the model's own forward."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        # FSDP shards each of these blocks (a decoder layer) on its own, found by class name as in
        # transformers' models; without them the whole model would be one unit, gathered at once.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None,
                soft: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        for k, v in {"position_ids": position_ids, "soft": soft}.items():
            if v is not None:  # packed rows, replay rows under --replay-kl (see _loss)
                batch[k] = v
        return _loss(self.model, batch)


def evaluate_loss(loss_of: LossOf, rows: list[Encoded], batch_size: int, pad: int, device: str,
                  bf16: bool = False) -> float:
    """Mean loss per trained token over `rows` (no dropout, no gradients). `loss_of` is the module
    training runs (wrapped by `Ranks.wrap` under a launcher): under FSDP every process runs this,
    since each forward gathers the weights' shards from all of them."""
    was_training = loss_of.training
    loss_of.eval()
    tot, n = 0.0, 0
    with torch.no_grad():
        for b in _batches(rows, batch_size, 0):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss, k = loss_of(**_collate(b, pad, device))
            tot, n = tot + float(loss), n + k
    loss_of.train(was_training)
    return tot / max(1, n)


def last_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint that was written completely (its state.json is last to land)."""
    done = [p for p in (out / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_checkpoint(out: Path, model: Any, optimizer: Any, scheduler: Any, step: int) -> None:
    """The adapter's weights and the optimizer's state, keyed by weight name. Every process calls it
    (under FSDP the shards are gathered); the main one writes."""
    from safetensors.torch import save_file

    dist = ranks()
    weights, optim = dist.state(model, optimizer)
    if not dist.main:
        return
    final = out / CHECKPOINTS / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "adapter.safetensors"))
    torch.save({"optimizer": optim, "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _load_checkpoint(ckpt: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    from safetensors.torch import load_file

    state = torch.load(ckpt / "optim.pt", map_location="cpu", weights_only=True)
    try:
        ranks().load_state(model, optimizer, load_file(str(ckpt / "adapter.safetensors")), state["optimizer"])
    except ValueError as exc:  # another adapter's, or one keyed as PEFT saves (older localchat)
        raise RuntimeError(f"{ckpt / 'adapter.safetensors'}: {exc}; train again without --resume") from exc
    scheduler.load_state_dict(state["scheduler"])
    return int(json.loads((ckpt / "state.json").read_text())["step"])


def plot_loss(log: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["step"] for r in rows if "loss" in r], [r["loss"] for r in rows if "loss" in r], label="train")
    held = [r for r in rows if "held_out_loss" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["held_out_loss"] for r in held], "o-", label="held-out")
    ax.set_xlabel("update")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("localchat finetune")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)


def fast_bf16(device: str) -> bool:
    """Whether bf16 matmuls are native here; on CPUs without bf16 units autocast only adds casts."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def qlora_kwargs(device: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained arguments for a 4-bit NF4 base (double-quantized scales), as in QLoRA.

    bitsandbytes runs 4-bit layers on CUDA and, slower, on the CPU, which is how the tests
    cover this path on machines without a GPU.
    """
    import importlib.util

    import transformers

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("QLoRA needs bitsandbytes (pip install 'localchat[finetune]' on Linux or "
                           "Windows, or pip install bitsandbytes); or train without --qlora")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=compute_dtype,
                                             bnb_4bit_use_double_quant=True)
    return {"quantization_config": config, "device_map": {"": 0 if device == "cuda" else "cpu"}}


def train(base: Path, data: Dataset, out: Path, settings: TrainSettings, resume: bool = False,
          quiet: bool = False, stop_after: int | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a LoRA adapter on `data` over the HF model in `base`; results land in `out`."""
    import transformers
    from peft import LoraConfig, get_peft_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dist = ranks()  # one process, or one of `accelerate launch`'s (finetune/distributed.py)
    place = dist.device(device)
    if settings.early_stop and dist.kind == "DEEPSPEED":  # its trained weights are its optimizer's copies
        raise RuntimeError("--early-stop is not supported under DeepSpeed; train without --early-stop")
    qlora = cuda if settings.qlora is None else settings.qlora
    if settings.lr is None:
        settings = replace(settings, lr=default_lr(qlora))
    bf16 = fast_bf16(device) if settings.bf16 is None else settings.bf16
    # The frozen base is stored in bf16 wherever autocast runs the matmuls in bf16 anyway:
    # half the memory, and no per-step cast of every weight. LoRA weights stay float32.
    # CUDA cards without bf16 (before Ampere) hold it in float16 and run without autocast.
    dtype = torch.bfloat16 if bf16 else torch.float16 if cuda else torch.float32
    checkpointing = cuda if settings.gradient_checkpointing is None else settings.gradient_checkpointing
    free = _gpu_budget(place, settings.gpu_memory) if cuda else probe_memory().available_bytes
    if resume:  # the shape the run started with, whatever memory is free now: the same data order
        settings = shape_of_run(out, settings)
    if settings.target is None:  # every linear layer of a block, as the architecture names them
        settings = replace(settings, target=ModelShape.from_folder(base).default_targets)
    max_len, batch_size, need = plan_memory(base, settings, device, qlora, 2 if dtype != torch.float32 else 4,
                                            checkpointing, free)
    torch.manual_seed(settings.seed)

    tok = transformers.AutoTokenizer.from_pretrained(base)
    template = None
    if settings.chat_format:
        from localchat.templates import get_format

        template = get_format(settings.chat_format).template
    else:
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
    # Bad rows fail here, before the model loads; the augmented copies of the user's rows come after them.
    trained = augment(data.train, settings.augment, settings.augment_drop, settings.seed)
    rows = [encode(ex, tok, template, max_len) for ex in trained]
    held = [encode(ex, tok, template, max_len) for ex in data.held_out]

    kwargs: dict[str, Any] = {"dtype": dtype}
    if qlora:
        kwargs.update(qlora_kwargs(device, dtype))
        if dist.world > 1 and cuda:
            kwargs["device_map"] = {"": place}
    model = transformers.AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if not qlora:
        model.to(place)
    base_bytes = model.get_memory_footprint()  # the frozen base as held in memory (4-bit with QLoRA)
    out.mkdir(parents=True, exist_ok=True)
    with dist.main_first():  # the main process picks the replay rows and saves them; the others read them
        replayed = _replay_rows(model, tok, template, settings, out, resume or not dist.main, device, bf16)
    replay_rows = [_as_replay(r, settings.replay_kl) for r in _encode_fitting(replayed, tok, template, max_len)]
    own_rows = len(data.train)
    if settings.pack:  # apart: the user's rows and the replay rows go to separate micro-batches
        own_rows = len(pack(rows[:len(data.train)], max_len))  # a pass over the rows as written, packed
        rows, replay_rows = pack(rows, max_len), pack(replay_rows, max_len)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    with no_gptq_dispatch():
        model = get_peft_model(model, LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                                 lora_dropout=settings.lora_dropout,
                                                 target_modules=list(settings.target), task_type="CAUSAL_LM"))
    if not cuda:  # on CUDA PEFT's layers stay as they are (torch's dropout is cheap there)
        speed_up_lora(model, autocast=bf16)
    if settings.neftune_alpha:
        from transformers.integrations.neftune import activate_neftune

        activate_neftune(model, settings.neftune_alpha)  # a hook that adds noise only in training mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr,
                                  weight_decay=0.0)
    # Each process's micro-batches per update: the user's, and as many replay ones beside them.
    micro_per_update = settings.grad_accum * (2 if replay_rows else 1)
    compute_loss, optimizer = dist.wrap(LossOf(model), optimizer, batch_size, micro_per_update)
    # The user's micro-batches per update over all processes: each takes every `world`-th (the same
    # global batch). Epochs and updates count passes over the user's rows alone; replay rides beside them.
    # --epochs counts passes over the user's rows as written (`own`, micro-batches a pass): their augmented
    # copies add wordings, not updates. The batches are drawn from all of `rows`, copies included.
    per_update = settings.grad_accum * dist.world
    per_epoch = math.ceil(len(rows) / batch_size)
    own = math.ceil(own_rows / batch_size)
    # A dozen rows make one or two updates an epoch: too few to learn a fact. Repeat the data.
    total = max(1, settings.min_updates, math.ceil(own * settings.epochs / per_update))
    warmup = max(1, total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))

    log = out / LOSS_LOG
    step = 0
    if resume:
        ck = last_checkpoint(out)
        if ck is None:
            raise RuntimeError(f"{out}: no complete checkpoint to resume from")
        step = _load_checkpoint(ck, model, optimizer, scheduler)
        kept = [line for line in (log.read_text().splitlines() if log.is_file() else [])
                if json.loads(line).get("step", 0) <= step]
        dist.wait()  # every process has read the checkpoint before the main one writes anything
        if dist.main:
            atomic_write_text(log, "".join(line + "\n" for line in kept))
    elif log.exists() and dist.main:
        log.unlink()
    resumed_from = step
    # The settings as given, then what was chosen for them (a None max_len becomes the one used).
    # The measured peak joins it at the end.
    run_config = {**asdict(settings), "base": str(base), "data": str(data.path), "format": data.kind,
                  "rows": len(data.train), "augmented_rows": len(trained) - len(data.train),
                  "held_out_rows": len(data.held_out), "replay_rows": len(replayed),
                  "max_len": max_len, "batch_size": batch_size, "device": device, "qlora": qlora,
                  "gradient_checkpointing": checkpointing, "bf16": bf16, "base_bytes": base_bytes,
                  "memory_estimate": need.describe(), "memory_estimate_bytes": need.total, "updates": total,
                  "epochs_run": round(total * per_update / own, 2), "processes": dist.world, "distributed": dist.kind}
    if dist.main:
        atomic_write_text(out / "train_config.json", json.dumps(run_config, indent=2))

    schedule: list[list[Encoded]] = []
    while len(schedule) < total * per_update:  # whole shuffled passes over `rows`, the last one cut
        schedule += _batches(rows, batch_size, settings.seed + len(schedule) // per_epoch)
    schedule = schedule[: total * per_update]
    beside = _replay_schedule(replay_rows, batch_size, settings.seed, len(schedule))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True  # finish this step, save, then stop

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    model.train()
    bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=quiet or not dist.main)
    per_pass = max(1, own // per_update)  # updates in one pass over the user's rows
    best: _Best | None = None
    tokens_done, t_start, last_loss = 0, time.perf_counter(), float("nan")
    try:
        while step < total and not interrupted:
            optimizer.zero_grad(set_to_none=True)
            loss_sum, n_sum = 0.0, 0
            tokens = 0
            part = slice(step * per_update, (step + 1) * per_update)
            mine = _weighted(schedule[part][dist.rank::dist.world], beside[part][dist.rank::dist.world],
                             settings.replay_share)
            for i, (micro, weight) in enumerate(mine):
                batch = _collate(micro, pad, place)
                with dist.syncing(compute_loss, last=i == len(mine) - 1):  # one all-reduce per update
                    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                        loss, n = compute_loss(**batch)
                    dist.backward(loss / max(1, n) * weight)  # DDP averages it over processes
                loss_sum += float(loss.detach())
                n_sum += n
                tokens += int(batch["attention_mask"].sum())
            dist.clip(compute_loss, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            loss_sum, n_sum, tokens = dist.total(loss_sum, n_sum, tokens)
            tokens_done += int(tokens)
            last_loss = loss_sum / max(1, n_sum)
            rate = tokens_done / (time.perf_counter() - t_start)
            record = {"step": step, "loss": round(last_loss, 5), "lr": scheduler.get_last_lr()[0],
                      "tok_s": round(rate, 1)}
            if dist.main:
                with open(log, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if on_step:
                on_step(record)
            if step % settings.save_every == 0 or step == total:
                _save_checkpoint(out, model, optimizer, scheduler, step)
            if held and (step % per_pass == 0 or step == total):
                best = _held_out_pass(compute_loss, model, held, batch_size, pad, device, bf16, step,
                                      log if dist.main else None, best, settings.early_stop)
            if stop_after is not None and step >= stop_after:
                interrupted = True
        if interrupted and step < total:
            _save_checkpoint(out, model, optimizer, scheduler, step)
            if dist.main:
                plot_loss(log, out / LOSS_PLOT)
            raise Interrupted(f"stopped at update {step} of {total}; checkpoint saved, continue with --resume")
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    train_time = time.perf_counter() - t_start
    held_loss, recall, kept_step = None, None, None
    if held and settings.early_stop and best is not None and best.step != step:
        dist.restore(model, best.state)  # in every process, sharded again where FSDP shards the weights
        kept_step = best.step
    if held:  # every process: under FSDP each forward gathers the weights' shards from all of them
        held_loss = evaluate_loss(compute_loss, held, batch_size, pad, device, bf16)  # of the adapter saved
        if template:
            with dist.generating(compute_loss) as synced, \
                    torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                recall = held_out_recall(model, tok, template, data.held_out, place, synced)
    weights, _ = dist.state(model)  # whole in the main process, however the processes held it
    peak = _peak_memory(cuda, place)
    adapter = out / "adapter"
    if dist.main:  # the others wait
        if held_loss is not None:
            record = {"step": kept_step or step, "held_out_loss": round(held_loss, 5), "saved": True}
            if recall:
                record.update(held_out_recall=round(recall.share, 4), held_out_recall_rows=recall.rows)
            with open(log, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        plot_loss(log, out / LOSS_PLOT)
        atomic_write_text(out / "train_config.json", json.dumps(
            {**run_config, "memory_peak_bytes": peak,
             **({"memory_peak_allocated_bytes": torch.cuda.max_memory_allocated(place)} if cuda else {})},
            indent=2))
        tmp = out / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights)
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(tmp, adapter)
    dist.wait()
    return TrainResult(adapter, step, last_loss, held_loss, tokens_done / train_time if train_time else 0.0,
                       resumed_from, tokens_done, recall, kept_step, peak, need.total, device)


@dataclass
class _Best:
    step: int
    loss: float
    state: dict[str, torch.Tensor] | None  # the adapter's weights then (with early stopping)


def _held_out_pass(loss_of: LossOf, model: Any, held: list[Encoded], batch_size: int, pad: int, device: str,
                   bf16: bool, step: int, log: Path | None, best: _Best | None, keep: bool) -> _Best:
    """The held-out loss after a pass, logged (the plot shows it beside the training loss); the
    best so far, with a copy of its adapter when early stopping will want it back. The last
    pass wins when early stopping is off. Every process measures it through `loss_of` (the same
    weights, the same choice; under FSDP each forward needs them all); only the main one logs
    (`log` None in the others)."""
    loss = evaluate_loss(loss_of, held, batch_size, pad, device, bf16)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(json.dumps({"step": step, "held_out_loss": round(loss, 5)}) + "\n")
    if keep and best is not None and best.loss <= loss:
        return best
    return _Best(step, loss, ranks().snapshot(model) if keep else None)


def _replay_schedule(rows: list[Encoded], batch: int, seed: int, count: int) -> list[list[Encoded]]:
    """`count` micro-batches of replay rows, one beside each of the user's and as long: passes over the
    replay rows, each in its own order, as many as it takes ([] without replay). Beside rather than mixed
    in, the replay rows take a fixed share of every update (--replay-share) however many there are, and do
    not dilute the passes over the user's rows (mixed in, 64 replay answers outweighed two dozen short
    rows about ten to one in tokens, and three epochs were three passes over the user's rows). As long
    as the user's: replay sequences a quarter as long kept 84% of the recall bench's general answers,
    full ones 97% (the starter's 94%), at the same recall."""
    out: list[list[Encoded]] = []
    k = 0
    while rows and len(out) < count:
        out += _batches(rows, batch, seed + 1_000_003 + k)
        k += 1
    return out[:count]


def _weighted(users: list[list[Encoded]], replays: list[list[Encoded]], share: float
              ) -> list[tuple[list[Encoded], float]]:
    """This process's micro-batches of an update, each with its weight in the update's loss (a mean per
    token within each): the replay ones `share` of it together, the user's the rest."""
    share = share if replays else 0.0
    return [(m, (1 - share) / len(users)) for m in users] + [(m, share / len(replays)) for m in replays]


def _encode_fitting(rows: list[Example], tok: Any, template: str | None, max_len: int) -> list[Encoded]:
    """The replay rows encoded to `max_len` tokens, those with no answer token within it left out (a
    user's short --max-len must not fail on rows the user never wrote)."""
    out = []
    for ex in rows:
        try:
            out.append(encode(ex, tok, template, max_len))
        except DatasetError:
            continue
    return out


def _as_replay(row: Encoded, kl: bool) -> Encoded:
    """A replay row, its answer's tokens trained toward the base's distribution with --replay-kl."""
    return replace(row, soft=[True] * len(row.input_ids)) if kl else row


def _replay_rows(model: Any, tok: Any, template: str | None, settings: TrainSettings, out: Path, resume: bool,
                 device: str, bf16: bool) -> list[Example]:
    """`settings.replay` general conversations (finetune/replay.py): the shipped ones under --replay-kl,
    else the base's own answers to their questions; a resumed run reads the ones it started with, so its
    data order is the same."""
    if not settings.replay or not template:
        return []
    if resume:
        kept = replay.load(out)
        if kept is not None:
            return kept
    if settings.replay_kl:
        rows = replay.chats()[:settings.replay]
    else:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            rows = replay.generate(model, tok, template, settings.replay, device)
    replay.save(rows, out)
    return rows


def shape_of_run(out: Path, settings: TrainSettings) -> TrainSettings:
    """`settings` with what the interrupted run in `out` used for its rows and their order: its max_len and
    batch_size, its held-out share and augmentation (none in a run from before --augment) and its updates,
    so a resumed run continues the same schedule whatever the defaults are now."""
    try:
        saved = json.loads((out / "train_config.json").read_text())
    except (OSError, ValueError):
        return settings
    same = {k: saved.get(k, 0 if k == "augment" else getattr(settings, k))
            for k in ("augment", "augment_drop", "epochs", "min_updates", "seed", "grad_accum", "pack",
                      "held_out")}
    return replace(settings, max_len=settings.max_len or saved.get("max_len"),
                   batch_size=settings.batch_size or saved.get("batch_size"), **same)


def _gpu_budget(place: Any, gib: float | None) -> int:
    """The GPU memory free for training: all that is free, or `--gpu-memory` GiB of it, which torch's
    allocator is then held to (what a card of that size would allow, or room left for another program)."""
    index = torch.device(place).index  # None ("cuda"): torch's current card
    free, total = torch.cuda.mem_get_info(index)
    if gib is None:
        return free
    cap = int(gib * GIB)  # the CUDA context's share (RUNTIME_BYTES) included, as on a card of that size
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, (cap - RUNTIME_BYTES["cuda"]) / total)), index)
    return min(free, cap)


def _peak_memory(cuda: bool, place: Any) -> int:
    """The run's measured peak: what torch's allocator held on the GPU, else the process's own peak RSS."""
    return torch.cuda.max_memory_reserved(place) if cuda else peak_rss()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
