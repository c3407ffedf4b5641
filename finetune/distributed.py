"""`localchat finetune` under `accelerate launch`: data parallel over processes, one saver.

Launched by `accelerate launch --num_processes N` (or torchrun) each process sees WORLD_SIZE=N and
runs the same command. Every process builds the same global schedule of micro-batches and takes
every N-th one of each update's share, so an update covers `batch_size * grad_accum * N` rows: the
same global batch as one process with `grad_accum * N` steps of accumulation. The loss module is
wrapped by accelerate (DDP: gradients averaged across processes during backward); the logged loss
and token counts are summed over processes, so the curve is the global one. Only the main process
writes: the loss log, checkpoints, the adapter, the store and the GGUF export; the others wait at
a barrier and return. Without a launcher (WORLD_SIZE unset or 1) nothing here touches torch.distributed.
"""

from __future__ import annotations

import os
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

    def device(self, default: str) -> Any:
        """Where this process's model lives: its own GPU under a launcher, else `default`."""
        return self.accelerator.device if self.accelerator else default

    def wrap(self, module: Any, optimizer: Any) -> tuple[Any, Any]:
        """The module whose forward computes the loss, wrapped for gradient sync (DDP) or sharding."""
        if not self.accelerator:
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    def syncing(self, module: Any, last: bool) -> Any:
        """The context for one micro-batch's forward and backward: under DDP, gradients are all-reduced
        only on an update's last micro-batch (`no_sync` on the others, which accumulate locally), so an
        update of `grad_accum` micro-batches communicates once; the sum is the same either way."""
        if self.accelerator and not last:
            return self.accelerator.no_sync(module)
        from contextlib import nullcontext

        return nullcontext()

    def backward(self, loss: Any) -> None:
        if self.accelerator:
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip(self, params: list[Any], max_norm: float) -> None:
        if self.accelerator:
            self.accelerator.clip_grad_norm_(params, max_norm)
        else:
            import torch

            torch.nn.utils.clip_grad_norm_(params, max_norm)

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


@lru_cache(maxsize=1)
def ranks() -> Ranks:
    """The process group a launcher set up (WORLD_SIZE > 1), or a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Ranks()
    import torch
    from accelerate import Accelerator

    # Without CUDA, accelerate would see WORLD_SIZE > 1 yet run each process alone unless told "cpu":
    # then it joins them over gloo (MULTI_CPU).
    return Ranks(Accelerator(cpu=not torch.cuda.is_available()))
