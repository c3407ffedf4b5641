"""Plain round-to-nearest quantization on GPTQ's own grid: the baseline GPTQ must beat.

Same bits, group size and symmetric scale as our GPTQ output, applied in place to a
transformers model's decoder-layer linear weights (dequantized back to float), so the
only difference left between the two is how GPTQ chooses each rounded value.
"""

from __future__ import annotations

from typing import Any


def rtn_quantize_(model: Any, bits: int = 4, group_size: int = 128) -> int:
    """Round every decoder-layer linear weight to `bits` per group; returns how many were."""
    import torch

    maxq = 2**bits - 1
    zero = (maxq + 1) / 2
    done = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".layers." not in name or not isinstance(module, torch.nn.Linear):
                continue
            w = module.weight.data.float()
            rows, cols = w.shape
            g = w.reshape(rows, cols // group_size, group_size)
            xmax = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
            scale = 2 * xmax / maxq
            q = torch.clamp(torch.round(g / scale) + zero, 0, maxq)
            module.weight.data = ((q - zero) * scale).reshape(rows, cols).to(module.weight.dtype)
            done += 1
    return done
