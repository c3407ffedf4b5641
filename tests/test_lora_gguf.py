"""PEFT LoRA adapters as GGUF LoRA adapters that llama.cpp applies at load time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from localchat.convert.checkpoint import load_checkpoint
from localchat.convert.lora_gguf import AdapterError, export_lora_gguf
from localchat.convert.to_gguf import convert_to_gguf

from .checkpoints import starter_hf, tiny_model
from .test_convert import hf_logits

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


def _random_adapter(base: Path, out: Path, r: int = 8, alpha: int = 16) -> Path:
    """A real PEFT adapter on every attention and MLP projection, with non-zero B matrices."""
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft.save_pretrained(out)
    merged = peft.merge_and_unload()
    merged.save_pretrained(out / "merged")
    return out


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_adapter_on_gguf_base_matches_merged_transformers(arch: str, tmp_path: Path, starter_gguf: Path) -> None:
    import llama_cpp

    base = tiny_model(arch, tmp_path / "base", starter_hf(starter_gguf))
    adapter = _random_adapter(base, tmp_path / "adapter")
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ids = tok(TEXT)["input_ids"]
    ref = hf_logits(adapter / "merged", ids)
    plain = hf_logits(base, ids)
    assert np.abs(ref - plain).max() > 0.1, "the adapter must change the logits for this test to mean anything"

    base_gguf = convert_to_gguf(load_checkpoint(base), tmp_path / "base.gguf", "f32", quiet=True).path
    lora = export_lora_gguf(adapter, base, tmp_path / "lora.gguf")
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora), n_ctx=256, logits_all=True,
                          n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert np.abs(got - ref).max() < 5e-3, float(np.abs(got - ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_non_lora_adapters_are_refused(tmp_path: Path, starter_gguf: Path) -> None:
    base = tiny_model("LlamaForCausalLM", tmp_path / "base", starter_hf(starter_gguf))
    adapter = _random_adapter(base, tmp_path / "adapter")
    cfg = adapter / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"use_dora": false', '"use_dora": true'))
    with pytest.raises(AdapterError, match="use_dora"):
        export_lora_gguf(adapter, base, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
