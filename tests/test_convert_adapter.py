"""PEFT adapters made by PEFT itself (LoRA, rsLoRA with per-module ranks and alphas, DoRA, fan_in_fan_out,
modules_to_save), read by convert/adapter.py: merged into the base they give PEFT's own merged model
(merge_and_unload), exported as a GGUF LoRA they give it where a GGUF LoRA can say it, and what
cannot be read or expressed is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from localchat.convert.adapter import AdapterError  # noqa: E402
from localchat.convert.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from localchat.convert.lora_gguf import export_lora_gguf  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from tests.checkpoints import starter_hf, tiny_model  # noqa: E402
from tests.test_convert import F32_ATOL, TEXT, hf_logits, llama_logits  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
F16_ATOL = 5e-2  # an F16 GGUF against float32 transformers, as tests/test_convert.py allows


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Path:
    """A tiny random LLaMA (untied lm_head) with the starter's tokenizer."""
    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("base") / "llama", starter_hf(starter_gguf))


@pytest.fixture(scope="module")
def ids(base: Path) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(base)(TEXT)["input_ids"]


def peft_adapter(base: Path, out: Path, ids: list[int] | None = None, safe: bool = True,
                 config: peft.PeftConfig | None = None, **lora: object) -> np.ndarray | None:
    """An adapter made by PEFT on `base`, saved to `out`: B, DoRA magnitudes and modules_to_save copies
    randomised so that each part changes the model. Returns PEFT's merged model's logits on `ids`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = config or peft.LoraConfig(**{"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, **lora})
    model = peft.get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))  # DoRA's m, away from the base's own norms
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out, safe_serialization=safe)
    if ids is None:
        return None
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        return merged(torch.tensor([ids])).logits[0].numpy()


def merged_gguf_logits(adapter: Path, base: Path, ids: list[int], tmp_path: Path) -> np.ndarray:
    """The adapter merged by the checkpoint loader, converted to an F32 GGUF, run by llama.cpp."""
    out = convert_to_gguf(load_checkpoint(adapter, base=base), tmp_path / "merged.gguf", "f32", quiet=True)
    return llama_logits(out.path, ids)


def assert_close(got: np.ndarray, ref: np.ndarray, atol: float) -> None:
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < atol, float(np.abs(got - ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_dora_merges_as_peft_does(safe: bool, base: Path, ids: list[int], tmp_path: Path) -> None:
    """DoRA on every linear layer and on the embedding: W' = m * (W + s*BA) / ||W + s*BA|| per output row,
    from adapter_model.safetensors or (weights_only) adapter_model.bin, gives PEFT's merged model."""
    ref = peft_adapter(base, tmp_path / "dora", ids, safe=safe, use_dora=True,
                       target_modules=LINEAR + ["embed_tokens"])
    assert np.abs(ref - hf_logits(base, ids)).max() > 0.1, "the adapter changes the model"
    assert_close(merged_gguf_logits(tmp_path / "dora", base, ids, tmp_path), ref, F32_ATOL)


def test_rslora_with_rank_and_alpha_patterns_merges_as_peft_does(base: Path, ids: list[int],
                                                                 tmp_path: Path) -> None:
    """rsLoRA scales by alpha/sqrt(r), with r and alpha of single modules from rank_pattern/alpha_pattern."""
    ref = peft_adapter(base, tmp_path / "rs", ids, use_rslora=True, target_modules=LINEAR,
                       rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 16}, alpha_pattern={"o_proj": 64})
    assert np.abs(ref - hf_logits(base, ids)).max() > 0.1, "the adapter changes the model"
    assert_close(merged_gguf_logits(tmp_path / "rs", base, ids, tmp_path), ref, F32_ATOL)
    ckpt = load_checkpoint(tmp_path / "rs", base=base)
    assert any("rsLoRA, rank_pattern, alpha_pattern" in line for line in ckpt.report), ckpt.report


def test_modules_to_save_replace_the_base_tensor(base: Path, ids: list[int], tmp_path: Path) -> None:
    """A trained copy of lm_head (modules_to_save, saved under lm_head.weight) replaces the base's."""
    ref = peft_adapter(base, tmp_path / "mts", ids, target_modules=["q_proj", "v_proj"],
                       modules_to_save=["lm_head"])
    assert_close(merged_gguf_logits(tmp_path / "mts", base, ids, tmp_path), ref, F32_ATOL)
    ckpt = load_checkpoint(tmp_path / "mts", base=base)
    assert any("replaced lm_head.weight (modules_to_save)" in line for line in ckpt.report), ckpt.report


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_fan_in_fan_out_on_conv1d_merges_as_peft_does(dora: bool, tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are stored (in, out): under fan_in_fan_out the update and DoRA's row norms are
    transposed to them. No family we convert has Conv1D, so this compares the merged tensors themselves."""
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, bos_token_id=0,
                                     eos_token_id=0)
    config.architectures = ["GPT2LMHeadModel"]
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    peft_adapter(tmp_path / "gpt2", tmp_path / "adapter", fan_in_fan_out=True, use_dora=dora,
                 target_modules=["c_attn", "c_proj", "c_fc"])
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload().state_dict()
    ckpt = load_checkpoint(tmp_path / "adapter", base=tmp_path / "gpt2")
    before = load_checkpoint(tmp_path / "gpt2")
    changed = [n for n in ckpt.names() if not torch.equal(ckpt.get(n), before.get(n))]
    assert len(changed) == 2 * 4, changed  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of two blocks
    for name in ckpt.names():
        torch.testing.assert_close(ckpt.get(name), ref[name], atol=1e-6, rtol=1e-6, msg=name)


def test_cli_converts_a_dora_adapter_with_modules_to_save(base: Path, ids: list[int], home,
                                                          tmp_path: Path) -> None:
    """`localchat convert ADAPTER --base BASE` stores a GGUF whose logits are PEFT's merged model's."""
    ref = peft_adapter(base, tmp_path / "adapter", ids, use_dora=True, target_modules=LINEAR,
                       modules_to_save=["lm_head"])
    r = subprocess.run([sys.executable, "-m", "localchat", "convert", str(tmp_path / "adapter"),
                        "--base", str(base), "--name", "tuned", "--quant", "f16", "--no-check", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert_close(llama_logits(home.path_of(home.get("tuned").files[0].path), ids), ref, F16_ATOL)
    assert "merged the LoRA adapter adapter (DoRA, r=8, alpha=16) into 14 weights" in r.stdout, r.stdout
    assert "replaced lm_head.weight (modules_to_save)" in r.stdout


def test_gguf_lora_keeps_rslora_and_per_module_scales(base: Path, ids: list[int], tmp_path: Path) -> None:
    """A GGUF LoRA has one alpha over each module's rank: rsLoRA's and the patterns' scales are kept exact."""
    import llama_cpp

    ref = peft_adapter(base, tmp_path / "rs", ids, use_rslora=True, target_modules=LINEAR,
                       rank_pattern={"k_proj": 4}, alpha_pattern={"layers.0.mlp.up_proj": 48})
    base_gguf = convert_to_gguf(load_checkpoint(base), tmp_path / "base.gguf", "f32", quiet=True).path
    lora = export_lora_gguf(tmp_path / "rs", base, tmp_path / "lora.gguf")
    llm = llama_cpp.Llama(model_path=str(base_gguf), lora_path=str(lora), n_ctx=256, logits_all=True,
                          n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()
    assert_close(got, ref, F32_ATOL)


@pytest.mark.parametrize("lora, said", [
    (dict(use_dora=True, target_modules=["q_proj"]), "use_dora: DoRA rescales every output row"),
    (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
     "modules_to_save: 'lm_head.weight' is replaced"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "the LoRA on the embedding 'model.embed_tokens.weight'"),
], ids=["dora", "modules_to_save", "embedding"])
def test_gguf_lora_refuses_what_it_cannot_express(lora: dict, said: str, base: Path, tmp_path: Path) -> None:
    """What a GGUF LoRA adapter cannot say is refused by its setting's name, with the merge to use instead,
    and no file is left behind."""
    peft_adapter(base, tmp_path / "adapter", **lora)
    with pytest.raises(AdapterError, match=said) as err:
        export_lora_gguf(tmp_path / "adapter", base, tmp_path / "x.gguf")
    assert "localchat convert" in str(err.value) and str(tmp_path / "adapter") in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


def _edit_config(folder: Path, **changes: object) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("make, said", [
    (dict(peft=peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])),
     "peft_type 'IA3'"),
    (dict(lora_bias=True, target_modules=["q_proj"]), "lora_bias"),
    (dict(trainable_token_indices=[5, 7], target_modules=["q_proj"]), r"trainable_token_indices = \[5, 7\]"),
    (dict(init_lora_weights="pissa", target_modules=["q_proj"]), "init_lora_weights 'pissa' rewrites the base"),
    (dict(edit={"bias": "all"}, target_modules=["q_proj"]), "bias 'all'"),
    (dict(edit={"use_future_trick": True}, target_modules=["q_proj"]), "use_future_trick = true"),
], ids=["ia3", "lora_bias", "trainable_tokens", "pissa", "bias", "unknown_setting"])
def test_unsupported_adapters_are_refused_by_name(make: dict, said: str, base: Path, tmp_path: Path) -> None:
    """Adapters the reader cannot merge faithfully are refused, naming the folder and the setting, where
    they used to be merged without the part that was not understood."""
    make = dict(make)
    edit, config = make.pop("edit", None), make.pop("peft", None)
    peft_adapter(base, tmp_path / "adapter", config=config, **make)
    if edit:
        _edit_config(tmp_path / "adapter", **edit)
    with pytest.raises(CheckpointError, match=said) as err:
        load_checkpoint(tmp_path / "adapter", base=base)
    assert str(tmp_path / "adapter") in str(err.value)
