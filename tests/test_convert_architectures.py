"""Every architecture in the table, proven the same way: a tiny random model of the family's real shape
gives transformers' logits in llama.cpp from our F32 and F16 files, converts to what llama.cpp's own
converter writes, and declares the linear layers LoRA fine-tuning adapts.

The cases come from localchat.convert.gguf.ARCHITECTURES and tests.checkpoints.FAMILY_EXAMPLES, so a
family added to the table fails here until it has examples and passes all of this.
"""

from __future__ import annotations

import json
import shutil
import sys
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from localchat.convert.checkpoint import load_checkpoint, read_config  # noqa: E402
from localchat.convert.gguf import ARCHITECTURES, converter_for  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from localchat.engine.llamacpp import kv_cache_args  # noqa: E402
from tests.checkpoints import FAMILY_EXAMPLES, example_model, llama_cpp_convert, starter_hf  # noqa: E402

CASES = [(arch, variant) for arch in ARCHITECTURES for variant in FAMILY_EXAMPLES.get(arch, {"(none)": None})]
TEXT = ("def add(a, b):\n    return a + b  # 1234567\n  The quick brown fox, 🦙 and 日本語, jumps over 3 lazy dogs.")
# llama.cpp keeps the KV cache in F16, so even an F32 file differs from transformers by rounding.
TOLERANCE = {"f32": 5e-3, "f16": 5e-2}
# Metadata where our file differs from llama.cpp's converter on purpose: (variant, key) -> why.
DIFFERENT_ON_PURPOSE: dict[tuple[str, str], str] = {
    ("llama3.2", "tokenizer.ggml.add_sep_token"): (
        "we leave it to llama.cpp's default (no SEP); llama.cpp's converter writes false, read from the "
        "post-processor's pair template, the same (test_convert_tokenizers compares what llama.cpp adds)"),
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
        # The F32 file with an F32 KV cache and no flash attention (whose CPU kernel rounds the queries to
        # F16): with llama.cpp's defaults Gemma 3's logits were 5.04e-3 off on an AVX512-BF16 CPU (AMD EPYC),
        # over the bound; with these 2.6e-3 (LLaMA's 2.3e-6).
        exact = kv_cache_args("f32", exact=True) if outtype == "f32" else {}
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, n_threads=2, verbose=False, **exact)
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
    ref_path = llama_cpp_convert(folder, tmp_path / "ref.gguf")
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
    """`localchat finetune` on the family's checkpoint folder, with no --target, adapts every linear layer the
    family declares and exports: the merged model's GGUF in the store gives the merged checkpoint's logits in
    llama.cpp (as PEFT merges it), and the adapter as a GGUF LoRA applied over our base file gives them too (so the family's names
    and row orders hold for merged weights and for adapters)."""
    import llama_cpp

    from localchat.convert.lora_gguf import export_lora_gguf
    from peft import PeftModel

    from localchat.finetune.command import finetune
    from localchat.finetune.lora_layers import no_gptq_dispatch
    from localchat.finetune.settings import TrainSettings
    from localchat.store import Store

    folder = models((arch, variant))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": "An answer."}) + "\n"
                            for i in range(4)))
    store = Store(tmp_path / "home")
    run = finetune(str(folder), str(data), "tuned", TrainSettings(
        epochs=1.0, min_updates=2, held_out=0.0, max_len=64, lr=5e-2, chat_format="chatml"), quant="F16",
        store=store, quiet=True)
    adapter = run.out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == set(converter_for(read_config(folder)).lora_modules())

    ids = _ids(folder)[:24]
    with no_gptq_dispatch():  # the reference: PEFT's own merge (the export wrote no merged folder)
        merged = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32), adapter).merge_and_unload().eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0].numpy()
        moved = np.abs(ref - plain(torch.tensor([ids])).logits[0].numpy()).max()
    base = convert_to_gguf(load_checkpoint(folder), tmp_path / "base.gguf", "f32", quiet=True).path
    lora = export_lora_gguf(adapter, folder, tmp_path / "lora.gguf")
    exported = store.path_of(store.get("tuned").files[0].path)
    assert moved > 0.2, float(moved)  # training moved the logits far beyond the tolerances below
    # The adapter's larger activations widen the F16 KV cache's rounding a little beyond the base's.
    for model, kw, tol in ((base, {"lora_path": str(lora)}, 2e-2), (exported, {}, TOLERANCE["f16"])):
        llm = llama_cpp.Llama(model_path=str(model), n_ctx=128, logits_all=True, n_threads=2, verbose=False, **kw)
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        llm.close()
        assert np.abs(got - ref).max() < tol, (model.name, float(np.abs(got - ref).max()))


# Settings of a family that llama.cpp cannot run as transformers does: (case, config change, field named).
REFUSED = [
    (("Gemma2ForCausalLM", "gemma2"), {"query_pre_attn_scalar": 144}, "query_pre_attn_scalar"),
    (("Gemma2ForCausalLM", "gemma2"), {"tie_word_embeddings": False}, "tie_word_embeddings"),
    (("Phi3ForCausalLM", "phi3.5"), {"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 3,
                                                      "short_factor": [1.0] * 8}}, "rope_scaling.long_factor"),
    (("Qwen3MoeForCausalLM", "qwen3-moe"), {"norm_topk_prob": False}, "norm_topk_prob"),
    (("Qwen3MoeForCausalLM", "qwen3-moe"), {"mlp_only_layers": [1]}, "mlp_only_layers"),
    (("Qwen3MoeForCausalLM", "qwen3-moe"), {"decoder_sparse_step": 2}, "decoder_sparse_step"),
]


@pytest.mark.parametrize(("case", "change", "field"), REFUSED, ids=[f for _, _, f in REFUSED])
def test_settings_llama_cpp_cannot_honour_are_refused(case, change, field, models, tmp_path: Path) -> None:
    """A checkpoint whose config asks for what llama.cpp's runtime of the family cannot do (a query scale
    it does not read, an untied output layer Gemma 2 ignores, LongRoPE factors of the wrong length, Qwen3-MoE
    routing without renormalization or with dense blocks) is refused with an error naming config.json and
    the field, and no GGUF is written."""
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


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_unsupported_architecture_is_refused_naming_every_family(arch: str, tmp_path: Path) -> None:
    """A checkpoint of an architecture the converter lacks is refused with an error naming config.json,
    that architecture and the supported list, which holds every family of the table."""
    from localchat.convert.checkpoint import CheckpointError

    folder = tmp_path / "gpt-neox"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError) as err:
        convert_to_gguf(load_checkpoint(folder), tmp_path / "out.gguf", "f16", quiet=True)
    message = str(err.value)
    assert str(folder / "config.json") in message and "'GPTNeoXForCausalLM' is not supported" in message
    assert arch in message.split("supported: ", 1)[1].split(", ")
    assert not (tmp_path / "out.gguf").exists()


def test_a_missing_expert_is_named_and_nothing_is_written(models, tmp_path: Path) -> None:
    """An MoE checkpoint that lacks one expert's matrix is refused before anything is written, naming the
    stacked GGUF tensor and the missing expert's number (llama.cpp would load a shifted stack otherwise)."""
    from safetensors.torch import load_file, save_file

    from localchat.convert.checkpoint import CheckpointError

    folder = tmp_path / "mixtral"
    shutil.copytree(models(("MixtralForCausalLM", "mixtral")), folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_up_exps\.weight stacks 4 tensors .* "
                                              r"number\(s\) 3 are missing"):
        convert_to_gguf(load_checkpoint(folder), tmp_path / "out.gguf", "f16", quiet=True)
    assert not (tmp_path / "out.gguf").exists()


# Measures the resident memory a conversion's writing phase adds, sampled while it runs.
WRITE_RSS = """
import json, sys, threading, time
from localchat.convert.checkpoint import load_checkpoint
from localchat.convert.to_gguf import plan_gguf, write_gguf
plan = plan_gguf(load_checkpoint(sys.argv[1]), "f32")
def rss():  # anonymous memory only: the checkpoint's mmapped pages are the page cache, not our copies
    line = next(x for x in open("/proc/self/status") if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024
before, peak, done = rss(), [0], threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.001)
watcher = threading.Thread(target=watch)
watcher.start()
write_gguf(plan, sys.argv[2], quiet=True)
done.set()
watcher.join()
print(json.dumps({"grew": peak[0] - before}))
"""


def test_experts_are_stacked_without_holding_a_whole_stack(tmp_path: Path) -> None:
    """Converting an MoE checkpoint never holds a whole stacked expert tensor: writing two layers of 32
    small experts (six 32 MB float32 stacks of 1 MB slices, 192 MB) grows memory by less than half a stack,
    since each stack is written one expert's slice at a time. The allocator keeps a few freed slices
    (up to 20 MB with 4 MB slices), so the slices are kept small beside the stack. Filling each stack
    whole first grew memory by 57-65 MB."""
    import gguf
    from safetensors.torch import save_file

    from tests.checkpoints import example_tokenizer

    hidden, width, experts, layers = 256, 1024, 32, 2
    folder = tmp_path / "mixtral-wide"
    folder.mkdir()
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(example_tokenizer("spm", Path()) / f, folder / f)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["MixtralForCausalLM"], "hidden_size": hidden, "intermediate_size": width,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": 1000, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 512}))
    shapes = {"model.embed_tokens.weight": (1000, hidden), "lm_head.weight": (1000, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in (
            ("input_layernorm.weight", (hidden,)), ("post_attention_layernorm.weight", (hidden,)),
            ("self_attn.q_proj.weight", (hidden, hidden)), ("self_attn.k_proj.weight", (hidden // 2, hidden)),
            ("self_attn.v_proj.weight", (hidden // 2, hidden)), ("self_attn.o_proj.weight", (hidden, hidden)),
            ("block_sparse_moe.gate.weight", (experts, hidden)))}
        for e in range(experts):
            expert = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            shapes |= {expert + "w1.weight": (width, hidden), expert + "w3.weight": (width, hidden),
                       expert + "w2.weight": (hidden, width)}
    save_file({k: torch.randn(shape).to(torch.bfloat16) for k, shape in shapes.items()}, folder / "model.safetensors")
    out = tmp_path / "out.gguf"
    r = subprocess.run([sys.executable, "-c", WRITE_RSS, str(folder), str(out)], capture_output=True, text=True,
                       timeout=300)
    written = {t.name: list(t.shape) for t in gguf.GGUFReader(str(out)).tensors} if out.exists() else {}
    out.unlink(missing_ok=True)
    (folder / "model.safetensors").unlink()  # 96 MB and 192 MB: not left for pytest's kept temp folders
    assert r.returncode == 0, r.stderr[-3000:]
    stack = experts * width * hidden * 4
    grew = json.loads(r.stdout.strip().splitlines()[-1])["grew"]
    assert grew < stack / 2, f"writing took {grew / 2**20:.0f} MB more; one stack is {stack / 2**20:.0f} MB"
    assert written["blk.1.ffn_down_exps.weight"] == [width, hidden, experts]
