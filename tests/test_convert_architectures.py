"""Every architecture in the table, proven the same way: a tiny random model of the family's real shape
gives transformers' logits in llama.cpp from our F32 and F16 files, converts to what llama.cpp's own
converter writes, and declares the linear layers LoRA fine-tuning adapts.

The cases come from localchat.convert.gguf.ARCHITECTURES and tests.checkpoints.FAMILY_EXAMPLES, so a
family added to the table fails here until it has examples and passes all of this.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from localchat.convert.checkpoint import load_checkpoint, read_config  # noqa: E402
from localchat.convert.gguf import ARCHITECTURES, converter_for  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from tests.checkpoints import FAMILY_EXAMPLES, example_model, llama_cpp_source, starter_hf  # noqa: E402

CASES = [(arch, variant) for arch in ARCHITECTURES for variant in FAMILY_EXAMPLES.get(arch, {"(none)": None})]
TEXT = ("def add(a, b):\n    return a + b  # 1234567\n  The quick brown fox, 🦙 and 日本語, jumps over 3 lazy dogs.")
# llama.cpp keeps the KV cache in F16, so even an F32 file differs from transformers by rounding.
TOLERANCE = {"f32": 5e-3, "f16": 5e-2}
# Metadata where our file differs from llama.cpp's converter on purpose: (variant, key) -> why.
DIFFERENT_ON_PURPOSE: dict[tuple[str, str], str] = {
    ("llama3.2", "tokenizer.ggml.pre"): (
        "llama.cpp's converter names the pre-tokenizer from a hash of transformers' tokenization of a probe "
        "text; transformers 5 loads this Llama 3 tokenizer.json without its ignore_merges, so the hash "
        "reads 'smaug-bpe' (Llama 3's regex without ignore_merges). We read the file itself: 'llama-bpe', "
        "whose ids equal llama.cpp's Llama 3 test vectors (test_convert_tokenizers)."),
}
# Tensors computed from the config rather than copied: llama.cpp's converter does its arithmetic in
# float32, ours in float64, so they may differ in the last bit.
COMPUTED = {"rope_freqs.weight"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> dict[tuple[str, str], Path]:
    """Each case's tiny model, built once for the module."""
    starter, root, built = starter_hf(starter_gguf), tmp_path_factory.mktemp("families"), {}

    def get(case: tuple[str, str]) -> Path:
        if case not in built:
            # Named as the model, not its class: llama.cpp reads the name (a "phi3" in Phi-4's would
            # make it look for Phi-3's special tokens).
            built[case] = example_model(*case, root / case[1], starter)
        return built[case]

    return get  # type: ignore[return-value]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_has_examples(arch: str) -> None:
    """A family in the converter's table has tiny examples in tests.checkpoints.FAMILY_EXAMPLES."""
    assert FAMILY_EXAMPLES.get(arch), f"{arch} has no FAMILY_EXAMPLES entry: its parity tests cannot run"


def _ids(folder: Path) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(folder)(TEXT, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_logits_match_transformers(arch: str, variant: str, models, tmp_path: Path) -> None:
    """Next-token logits from our F32 and F16 files in llama.cpp equal transformers' on the same ids
    (within F16 rounding); the argmax agrees at every position from the F32 file, and from the F16 one
    wherever transformers' top two are further apart than its tolerance (F16 may flip a near-tie)."""
    import llama_cpp

    folder = models((arch, variant))
    ids = _ids(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    top2 = np.sort(ref, axis=-1)[:, -2:]
    for outtype, atol in TOLERANCE.items():
        out = convert_to_gguf(load_checkpoint(folder), tmp_path / f"{outtype}.gguf", outtype, quiet=True).path
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        llm.close()
        assert np.abs(got - ref).max() < atol, (outtype, float(np.abs(got - ref).max()))
        clear = top2[:, 1] - top2[:, 0] > (2 * atol if outtype == "f16" else 0)
        assert (got.argmax(-1) == ref.argmax(-1))[clear].all(), outtype


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_same_as_llama_cpp_reference_converter(arch: str, variant: str, models, tmp_path: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py on the same folder writes the same tensors (names, shapes, types,
    values), the same tokenizer and the same architecture metadata as ours."""
    import gguf

    folder = models((arch, variant))
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    ref_path = tmp_path / "ref.gguf"
    r = subprocess.run([sys.executable, str(script), str(folder), "--outtype", "f16", "--outfile", str(ref_path)],
                       capture_output=True, text=True, env={"PYTHONPATH": str(script.parent / "gguf-py"),
                                                            "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert r.returncode == 0, r.stderr[-3000:]
    ours = convert_to_gguf(load_checkpoint(folder), tmp_path / "ours.gguf", "f16", quiet=True).path
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(ref_path))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert sorted(ta) == sorted(tb)
    for name, t in tb.items():
        assert ta[name].tensor_type == t.tensor_type, name
        assert list(ta[name].shape) == list(t.shape), name
        if name in COMPUTED:
            assert np.allclose(ta[name].data, t.data, rtol=1e-6, atol=0), name
        else:
            assert np.array_equal(ta[name].data, t.data), name
    arch_name = b.fields["general.architecture"].contents()
    assert a.fields["general.architecture"].contents() == arch_name
    fa = {k: v.contents() for k, v in a.fields.items()}
    for key, field in b.fields.items():
        if key.startswith(("tokenizer.", f"{arch_name}.")) and (variant, key) not in DIFFERENT_ON_PURPOSE:
            want = field.contents()
            got = fa.get(key)
            if isinstance(want, float):
                assert got == pytest.approx(want, rel=1e-6), key
            else:
                assert got == want, key


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_lora_modules_are_the_blocks_linear_layers(arch: str, variant: str, models) -> None:
    """The family's declared LoRA modules are exactly the linear layers of each block, with their
    (in, out) features, and fine-tuning's memory estimate counts those (finetune.memory.ModelShape)."""
    from localchat.finetune.memory import ModelShape

    folder = models((arch, variant))
    declared = converter_for(read_config(folder)).lora_modules()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for block in model.model.layers:
        linear = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
                  for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linear == declared
    shape = ModelShape.from_folder(folder)
    assert shape.module_shapes() == declared and set(shape.default_targets) == set(declared)


@pytest.mark.parametrize(("arch", "variant"), CASES)
def test_lora_fine_tune_adapts_the_family_and_llama_cpp_applies_it(arch: str, variant: str, models,
                                                                   tmp_path: Path) -> None:
    """`localchat finetune`'s trainer, with no --target, adapts every linear layer the family declares;
    the adapter exports to a GGUF LoRA that llama.cpp applies to our base file with the merged model's
    logits (so the family's names and row orders hold for adapters too)."""
    import llama_cpp
    from peft import PeftModel

    from localchat.convert.lora_gguf import export_lora_gguf
    from localchat.datasets import load_dataset
    from localchat.finetune.settings import TrainSettings
    from localchat.finetune.train import train

    folder = models((arch, variant))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "An answer."}) + "\n"
                            for i in range(4)))
    result = train(folder, load_dataset(data, held_out=0.0), tmp_path / "run",
                   TrainSettings(epochs=1.0, min_updates=2, held_out=0.0, max_len=64, lr=5e-2, chat_format="chatml"),
                   quiet=True)
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(converter_for(read_config(folder)).lora_modules())

    ids = _ids(folder)[:24]
    merged = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32), result.adapter).merge_and_unload().eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0].numpy()
        moved = np.abs(ref - plain(torch.tensor([ids])).logits[0].numpy()).max()
    base = convert_to_gguf(load_checkpoint(folder), tmp_path / "base.gguf", "f32", quiet=True).path
    lora = export_lora_gguf(result.adapter, folder, tmp_path / "lora.gguf")
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(lora), n_ctx=128, logits_all=True, n_threads=2,
                          verbose=False)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    # The adapter's larger activations widen the F16 KV cache's rounding a little beyond the base's.
    assert np.abs(got - ref).max() < 2e-2 < moved / 10, (float(np.abs(got - ref).max()), float(moved))


# Settings of a family that llama.cpp cannot run as transformers does: (case, config change, field named).
REFUSED = [
    (("Gemma2ForCausalLM", "gemma2"), {"query_pre_attn_scalar": 144}, "query_pre_attn_scalar"),
    (("Gemma2ForCausalLM", "gemma2"), {"tie_word_embeddings": False}, "tie_word_embeddings"),
    (("Phi3ForCausalLM", "phi3.5"), {"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 3,
                                                      "short_factor": [1.0] * 8}}, "rope_scaling.long_factor"),
]


@pytest.mark.parametrize(("case", "change", "field"), REFUSED, ids=[f for _, _, f in REFUSED])
def test_settings_llama_cpp_cannot_honour_are_refused(case, change, field, models, tmp_path: Path) -> None:
    """A checkpoint whose config asks for what llama.cpp's runtime of the family cannot do (a query scale
    it does not read, an untied output layer Gemma 2 ignores, LongRoPE factors of the wrong length) is
    refused with an error naming config.json and the field, and no GGUF is written."""
    from localchat.convert.checkpoint import CheckpointError

    folder = tmp_path / case[1]
    shutil.copytree(models(case), folder)
    config = json.loads((folder / "config.json").read_text())
    if "rope_scaling" in change:  # transformers 5 writes rope_parameters; an older config has rope_scaling
        del config["rope_parameters"]
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError) as err:
        convert_to_gguf(load_checkpoint(folder), tmp_path / "out.gguf", "f16", quiet=True)
    assert str(folder / "config.json") in str(err.value) and field in str(err.value)
    assert not (tmp_path / "out.gguf").exists()
