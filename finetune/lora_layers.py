"""Cheaper PEFT LoRA layers on the CPU: a faster dropout, and no float32 round trip.

Dropout: PEFT drops out the input of every adapted layer: seven full activation-sized masks per
transformer block, each drawn with `bernoulli_`, which takes one Mersenne-Twister draw per
element on one core. On a 2-core CPU that alone took ~30% of a training step of the
starter model. Here one 64-bit draw gives four 16-bit lanes, each compared with a
threshold: still an independent keep/drop per element, with the rate rounded to 1/65536.
On CUDA torch's own dropout (Philox, on the GPU) is already cheap and stays.

Round trip: PEFT casts a layer's input to the adapter's dtype (float32) before the LoRA
path; under bf16 autocast the matmul then casts it straight back. With the base in bf16
that is two activation-sized copies per adapted layer for nothing, so under autocast the
input stays as it is and autocast alone picks the matmul dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator
from unittest import mock

import torch

LANES = 4  # 16-bit lanes per 64-bit draw
SPAN = 1 << 16


class FastDropout(torch.nn.Module):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p = p
        self.threshold = -(SPAN // 2) + round(p * SPAN)  # lanes are signed int16

    def keep_mask(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        n = shape.numel()
        draws = torch.empty((n + LANES - 1) // LANES, dtype=torch.int64, device=device)
        draws.random_(-(2**63), None)  # the full 64-bit range: every lane uniform over int16
        return draws.view(torch.int16)[:n].view(shape) >= self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # A scaled 0/1 mask in x's dtype: one multiply forward and back (cheaper than where()).
        return x * self.keep_mask(x.shape, x.device).to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def speed_up_lora(model: Any, autocast: bool) -> int:
    """Apply the two changes above to every LoRA layer of a PEFT model; returns how many layers.

    `autocast` must hold only when every forward pass runs under torch.autocast: the input
    cast is what makes a plain float32 pass over a bf16 base work.
    """
    layers = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        layers += 1
        if autocast:
            module.cast_input_dtype_enabled = False  # read by PEFT's BaseTunerLayer._cast_input_dtype
        for name, drop in list(drops.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                drops[name] = FastDropout(drop.p)
    return layers


@contextlib.contextmanager
def no_gptq_dispatch() -> Iterator[None]:
    """PEFT's layer dispatchers ask whether each layer is a GPTQModel one, importing GPTQModel
    to find out when it is installed (seconds, and its banner in the middle of our output).
    The bases we train are HF or bitsandbytes models, never GPTQ ones: answer "not installed"
    in every PEFT module that asks."""
    import sys

    import peft  # noqa: F401  (its tuner modules are loaded by now)

    with contextlib.ExitStack() as stack:
        for name, module in list(sys.modules.items()):
            if name.startswith("peft.") and hasattr(module, "is_gptqmodel_available"):
                stack.enter_context(mock.patch.object(module, "is_gptqmodel_available", lambda: False))
        yield
