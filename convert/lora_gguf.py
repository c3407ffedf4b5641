"""A PEFT LoRA adapter as a GGUF LoRA adapter, which llama.cpp applies on top of its base
model at load time: a few MB per fine-tune instead of another copy of the model.

The layout is llama.cpp's (`general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and `<base tensor>.lora_a` / `.lora_b` per adapted weight). Names and
row orders come from the same per-architecture converter as full conversions, so a LoRA
on LLaMA's Q and K rows is permuted exactly as their base weights are.
"""

from __future__ import annotations

from pathlib import Path

from localchat.fsutil import atomic_path

from .adapter import AdapterError, read_adapter
from .checkpoint import load_checkpoint, read_config
from .gguf import converter_for

__all__ = ["AdapterError", "export_lora_gguf"]


def export_lora_gguf(adapter: str | Path, base: str | Path, out: str | Path) -> Path:
    """Write the adapter in `adapter` (PEFT folder) for the HF base in `base` to `out`.

    llama.cpp scales every module by one `alpha` over that module's rank; each module's own
    scale (rsLoRA's alpha/sqrt(r), rank_pattern, alpha_pattern) is kept exact by folding what
    differs from that into its B.
    """
    import gguf

    adapter, base, out = Path(adapter), Path(base), Path(out)
    ad = read_adapter(adapter)
    updates = ad.only_low_rank("a GGUF LoRA adapter")
    conv = converter_for(read_config(base))
    ad.fit(load_checkpoint(base))  # headers only
    first = updates[0]
    alpha = first.scale * ad.shapes[first.a][0]  # llama.cpp: scale = alpha / rank
    pairs = []
    for u in sorted(updates, key=lambda u: u.target):
        name = conv.gguf_name(u.target)
        if name is None:
            raise AdapterError(f"{ad.weights}: {u.target} has no tensor of its own in the GGUF base")
        a, b = ad.factors(u)
        fold = u.scale * a.shape[0] / alpha
        if fold != 1.0:
            b = b * fold
        pairs.append((name, a, conv.transform(name, b)))  # B's rows in llama.cpp's order, like the base's
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), conv.gguf_arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(f"{base.name} LoRA r{ad.config.get('r', 8)}")
        for name, a, b in pairs:
            w.add_tensor(f"{name}.lora_a", a.contiguous().numpy())
            w.add_tensor(f"{name}.lora_b", b.contiguous().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
