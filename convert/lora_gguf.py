"""A PEFT LoRA adapter as a GGUF LoRA adapter, which llama.cpp applies on top of its base
model at load time: a few MB per fine-tune instead of another copy of the model.

The layout is llama.cpp's (`general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and `<base tensor>.lora_a` / `.lora_b` per adapted weight). Names and
row orders come from the same per-architecture converter as full conversions, so a LoRA
on LLaMA's Q and K rows is permuted exactly as their base weights are.
"""

from __future__ import annotations

import json
from pathlib import Path

from localchat.fsutil import atomic_path

from .checkpoint import CheckpointError, read_config, safetensors_header
from .gguf import converter_for

PEFT_PREFIX = "base_model.model."


class AdapterError(CheckpointError):
    pass


def _adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    f = folder / "adapter_model.safetensors"
    if f.is_file():
        safetensors_header(f)  # a malformed header is an error naming the tensor and field
        return load_file(str(f))
    b = folder / "adapter_model.bin"
    if b.is_file():
        import torch

        return torch.load(str(b), map_location="cpu", weights_only=True)
    raise AdapterError(f"{folder}: no adapter_model.safetensors (or .bin)")


def export_lora_gguf(adapter: str | Path, base: str | Path, out: str | Path) -> Path:
    """Write the adapter in `adapter` (PEFT folder) for the HF base in `base` to `out`."""
    import gguf

    adapter, base, out = Path(adapter), Path(base), Path(out)
    cfg_path = adapter / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{cfg_path}: cannot read the adapter config: {exc}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA" or cfg.get("use_dora"):
        raise AdapterError(f"{cfg_path}: only plain LoRA adapters export to GGUF "
                           f"(got peft_type={cfg.get('peft_type')!r}, use_dora={cfg.get('use_dora')})")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    if cfg.get("use_rslora"):
        alpha = alpha * (r ** 0.5)  # rsLoRA scales by alpha/sqrt(r); llama.cpp by alpha/r
    conv = converter_for(read_config(base))
    tensors = _adapter_tensors(adapter)
    pairs = []
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise AdapterError(f"{adapter}: tensor {key!r} is not a LoRA A/B matrix (modules_to_save "
                                   "and trained embeddings do not fit a GGUF LoRA adapter)")
            continue
        module = key[: -len(".lora_A.weight")]
        b_key = module + ".lora_B.weight"
        if b_key not in tensors:
            raise AdapterError(f"{adapter}: {key} has no matching {b_key}")
        hf_name = module.removeprefix(PEFT_PREFIX) + ".weight"
        name = conv.gguf_name(hf_name)
        if name is None:
            raise AdapterError(f"{adapter}: {hf_name} has no tensor of its own in the GGUF base")
        a = tensors[key].float()
        b = conv.transform(name, tensors[b_key].float())  # rows in llama.cpp's order, like the base
        pairs.append((name, a, b))
    if not pairs:
        raise AdapterError(f"{adapter}: no LoRA tensors found")
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), conv.gguf_arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(f"{base.name} LoRA r{r}")
        for name, a, b in pairs:
            w.add_tensor(f"{name}.lora_a", a.contiguous().numpy())
            w.add_tensor(f"{name}.lora_b", b.contiguous().numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
