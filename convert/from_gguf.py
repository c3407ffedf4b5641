"""A GGUF model back into a Hugging Face checkpoint (float32 safetensors), so a model that
exists only as GGUF in the store can be fine-tuned.

transformers dequantizes the weights; its rebuilt tokenizer keeps the vocabulary and merges
but not llama.cpp's pre-tokenizer, which we restore from `tokenizer.ggml.pre` so the
model tokenizes as it did. The folder appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from localchat.gguf_file import read_gguf

from .tokenizer import pre_tokenizer_config


def gguf_to_hf(gguf_path: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    header = read_gguf(gguf_path)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = src.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict())
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
    pre = header.metadata.get("tokenizer.ggml.pre")
    tj = tmp / "tokenizer.json"
    if isinstance(pre, str) and tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        data["pre_tokenizer"] = pre_tokenizer_config(pre)
        tj.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((tmp / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
