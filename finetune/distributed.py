"""`localchat finetune` under `accelerate launch`: data parallel over processes, one saver.

Launched by `accelerate launch --num_processes N` (or torchrun) each process sees WORLD_SIZE=N and
runs the same command. Every process builds the same global schedule of micro-batches and takes
every N-th one of each update's share, so an update covers `batch_size * grad_accum * N` rows: the
same global batch as one process with `grad_accum * N` steps of accumulation. The loss module is
wrapped by accelerate: DDP averages gradients across processes during backward; FSDP (version 2) also
shards every weight, so each process holds 1/N of the model and gathers a layer's shards for its
forward; DeepSpeed ZeRO-2 shards the optimizer's state and gradients, ZeRO-3 the weights too. The
logged loss and token counts are summed over processes, so the curve is the global one.
Only the main process writes: the loss log, checkpoints, the adapter, the store and the GGUF export;
the adapter's weights and the optimizer's state are first gathered whole (`Ranks.state`, which every
process joins), and the others then wait at a barrier and return. Without a launcher (WORLD_SIZE unset
or 1) nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any


class Ranks:
    """This process's place among the training processes, and the few collective steps we need."""

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def kind(self) -> str:
        """How the processes share the work, in accelerate's words: NO (one process), MULTI_GPU or
        MULTI_CPU (data parallel), FSDP, DEEPSPEED."""
        return self.accelerator.distributed_type.value if self.accelerator else "NO"

    def device(self, default: str) -> Any:
        """Where this process's model lives: its own GPU under a launcher, else `default`."""
        return self.accelerator.device if self.accelerator else default

    def wrap(self, module: Any, optimizer: Any, batch_size: int, grad_accum: int) -> tuple[Any, Any]:
        """The module whose forward computes the loss, wrapped for gradient sync (DDP) or sharding.
        DeepSpeed wants each process's micro-batch and the micro-batches per update in its config (accelerate
        reads them from a DataLoader, which localchat's loop has none of): they are this run's own."""
        if not self.accelerator:
            return module, optimizer
        deepspeed = self.accelerator.state.deepspeed_plugin
        if deepspeed is not None:
            deepspeed.deepspeed_config.update(train_micro_batch_size_per_gpu=batch_size,
                                              gradient_accumulation_steps=grad_accum)
        return self.accelerator.prepare(module, optimizer)

    def syncing(self, module: Any, last: bool) -> Any:
        """The context for one micro-batch's forward and backward: under DDP, gradients are all-reduced
        only on an update's last micro-batch (`no_sync` on the others, which accumulate locally), so an
        update of `grad_accum` micro-batches communicates once; the sum is the same either way. DeepSpeed
        reduces and steps its optimizer inside the backward of the micro-batch accelerate marks as the
        update's last (`sync_gradients`)."""
        if self.accelerator:
            self.accelerator.sync_gradients = last
            if not last:
                return self.accelerator.no_sync(module)
        from contextlib import nullcontext

        return nullcontext()

    def backward(self, loss: Any) -> None:
        """`loss` is already divided by the micro-batches of an update; DeepSpeed would divide it again."""
        if self.kind == "DEEPSPEED":
            self.accelerator.backward(loss, scale_wrt_gas=False)
        elif self.accelerator:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip(self, module: Any, max_norm: float) -> None:
        """Clip the trained weights' gradients of `module` (the one `wrap` returned): FSDP replaces the
        weights with sharded ones, so a list taken before `wrap` would clip tensors nobody trains. DeepSpeed
        clips inside its own step, at its config's `gradient_clipping` (1.0 in docs/accelerate/deepspeed-*)."""
        params = [p for p in module.parameters() if p.requires_grad]
        if self.accelerator:
            self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            import torch

            torch.nn.utils.clip_grad_norm_(params, max_norm)

    def state(self, model: Any, optimizer: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The trained weights of `model` (keyed as in its state_dict) and the optimizer's state, whole and
        on the CPU in the main process, empty in the others. Every process must call it: under FSDP each
        holds a shard of every weight (a DTensor) and the shards are gathered here; saving a shard gives
        PEFT's "1-D or zero-sized lora_A" adapter. Only the trained weights move: torch's
        `ignore_frozen_params` would still gather a frozen weight tied to another (lm_head). Under DeepSpeed
        the weights and the optimizer's state are its partitioned float32 copies, gathered by DeepSpeed."""
        if self.kind == "DEEPSPEED":
            weights, optim = _deepspeed_state(model, optimizer)
            return (weights, optim) if self.main else ({}, {})
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        weights = {name: p.cpu() for name, p in _trained(model).items()}
        optim = get_optimizer_state_dict(model, optimizer, options=_full(cpu_offload=True)) if optimizer else {}
        return (weights, optim) if self.main else ({}, {})

    def snapshot(self, model: Any) -> dict[str, Any]:
        """A copy of `model`'s trained weights, whole in every process, which `restore` puts back (the best
        pass's adapter under --early-stop). Every process must call it: under FSDP the shards are gathered."""
        return {name: p.clone() for name, p in _trained(model).items()}

    def restore(self, model: Any, weights: dict[str, Any]) -> None:
        """`snapshot`'s weights back into `model` in every process, sharded again where FSDP shards them."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, weights, options=_full(strict=False))  # the frozen base is not in `weights`

    @contextmanager
    def generating(self, module: Any) -> Iterator[bool]:
        """A context in which the model inside `module` (the one `wrap` returned) generates text in every
        process; it yields whether the processes must keep stepping together (transformers' `synced_gpus`):
        under FSDP and DeepSpeed each forward gathers weights from all of them, so one that stops early would
        leave the others waiting. FSDP's (version 2) outermost unit, the embeddings and the output layer, is
        gathered for the whole context: generation does not go through `module`'s own forward."""
        fsdp = self.kind == "FSDP"
        if fsdp:
            module.unshard()
        try:
            yield fsdp or self.kind == "DEEPSPEED"
        finally:
            if fsdp:
                module.reshard()

    def load_state(self, model: Any, optimizer: Any, weights: dict[str, Any], optim: dict[str, Any]) -> None:
        """`state`'s output back into `model` and `optimizer`, sharded again where FSDP shards them.
        Refuses weights that are not exactly `model`'s trained ones (torch would skip them silently)."""
        if self.kind == "DEEPSPEED":
            raise RuntimeError("--resume is not supported under DeepSpeed; train again without --resume")
        from torch.distributed.checkpoint.state_dict import set_state_dict

        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        if set(weights) != trained:
            odd = sorted(set(weights) ^ trained)
            raise ValueError(f"the weights are not this adapter's ({len(odd)} names differ, e.g. {odd[0]})")
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                       options=_full(strict=False))  # strict=False: the frozen base is not in `weights`

    def total(self, *values: float) -> list[float]:
        """Each value summed over the processes (the global loss and token counts of an update)."""
        if not self.accelerator:
            return list(values)
        import torch

        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def main_first(self) -> Any:
        """A context in which the main process runs first and the others after it (shared files
        such as a GGUF base dequantized into the store are then written once)."""
        if self.accelerator:
            return self.accelerator.main_process_first()
        from contextlib import nullcontext

        return nullcontext()

    def wait(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()


def _trained(model: Any) -> dict[str, Any]:
    """`model`'s trained weights by name, detached and whole (gathered from every process's shard under
    FSDP, where every process must call it)."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
            for name, p in model.named_parameters() if p.requires_grad}


def _deepspeed_state(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`Ranks.state` under DeepSpeed ZeRO (every process calls it; each DeepSpeed call is collective): the
    trained weights' float32 copies and their Adam moments, gathered whole from the partitions, keyed by
    weight name as torch's full optimizer state dict is."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    weights = {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in trained}
    if optimizer is None:
        return weights, {}
    inner = optimizer.optimizer.optimizer  # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> torch's
    flat = next(iter(inner.state.values()))  # one entry per flat partition; Adam's step is the same in each
    state = {name: {key: flat[key].clone() if key == "step" else
                    safe_get_full_optimizer_state(p, key).detach().cpu() for key in flat}
             for name, p in trained}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [name for name, _ in trained]}
              for group in inner.param_groups]
    return weights, {"state": state, "param_groups": groups}


def _full(**options: bool) -> Any:
    """torch's state-dict options for whole (unsharded) tensors, which work alike for one process,
    DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


@lru_cache(maxsize=1)
def ranks() -> Ranks:
    """The process group a launcher set up (WORLD_SIZE > 1), or a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    from accelerate import Accelerator

    # Without CUDA, accelerate would see WORLD_SIZE > 1 yet run each process alone unless told "cpu":
    # then it joins them over gloo (MULTI_CPU).
    cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu)
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _shard_on_cpu(accelerator)
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        _deepspeed_on_cpu(accelerator)
    return Ranks(accelerator)


def _shard_on_cpu(accelerator: Any) -> None:
    """Run an FSDP launch on the CPU as FSDP. accelerate (1.15) takes every CPU launch for plain data
    parallel (MULTI_CPU) and drops an FSDP config without a word; torch's FSDP2 shards over gloo on the
    CPU too, so the config the user gave is applied (and the tests run FSDP without a GPU)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise RuntimeError("FSDP on the CPU needs fsdp_version: 2 in the accelerate config "
                           "(docs/accelerate/fsdp.yaml); version 1 shards only on GPUs")
    accelerator.state.fsdp_plugin = plugin
    # Both shared states: each new AcceleratorState() copies the process state's type over its own.
    for state in (PartialState(), accelerator.state):
        state.distributed_type = DistributedType.FSDP


def _deepspeed_on_cpu(accelerator: Any) -> None:
    """Run a DeepSpeed launch on the CPU with DeepSpeed. accelerate (1.15) drops the DeepSpeed config of a
    CPU launch as it drops an FSDP one; DeepSpeed's CPU accelerator trains over the gloo group accelerate
    has joined (oneCCL where its bindings are installed)."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    plugin = DeepSpeedPlugin()  # from the launcher's ACCELERATE_DEEPSPEED_* variables
    plugin.set_mixed_precision(accelerator.state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    accelerator.state.deepspeed_plugins = plugin
    for state in (PartialState(), accelerator.state):
        state.distributed_type = DistributedType.DEEPSPEED
