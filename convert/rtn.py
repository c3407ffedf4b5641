"""Plain round-to-nearest quantization on GPTQ's own grid: the baseline GPTQ must beat.

Same bits, group size, symmetric scale and scale search as our GPTQ output, applied in
place to a transformers model's decoder-layer linear weights (dequantized back to float),
so the only difference left between the two is how GPTQ chooses each rounded value. The
scales come from GPTQModel's own `Quantizer`, the code GPTQ runs for each group: with
`mse` > 0 it searches each group's clipping for the lowest error, as `quantize_gptq` asks
it to, and a baseline without that search would flatter GPTQ.
"""

from __future__ import annotations

from typing import Any


def rtn_quantize_(model: Any, bits: int = 4, group_size: int = 128, mse: float = 0.0) -> int:
    """Round every decoder-layer linear weight to `bits` per group; returns how many were.

    `mse`: the exponent of GPTQModel's scale search (0: each group's scale from its largest
    weight; `convert.gptq.DEFAULT_MSE` is what `--to gptq` uses).
    """
    import torch
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import Quantizer

    quantizer = Quantizer(QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, mse=mse))
    quantizer.configure(perchannel=True)
    done = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".layers." not in name or not isinstance(module, torch.nn.Linear):
                continue
            w = module.weight.data.float()
            groups = w.reshape(-1, group_size)  # one row per (output channel, group), as GPTQ slices them
            quantizer.find_params(groups, weight=True)
            module.weight.data = quantizer.quantize(groups).reshape(w.shape).to(module.weight.dtype)
            done += 1
    return done
