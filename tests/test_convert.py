"""convert/: HF checkpoints to GGUF, proven equal to the source and to llama.cpp's own converter."""

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

from localchat.convert.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from localchat.gguf_file import read_gguf  # noqa: E402
from tests.checkpoints import starter_hf, tiny_model  # noqa: E402
from tests.test_server import Server  # noqa: E402

# llama.cpp keeps the KV cache in F16, so even an F32 GGUF differs from transformers by rounding.
F32_ATOL = 5e-3
TEXT = "The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384400 km to the Moon!"


@pytest.fixture(scope="session")
def real_hf(starter_gguf: Path) -> Path:
    return starter_hf(starter_gguf)


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_logits(gguf: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_tiny_model_logits_match_transformers(arch: str, tmp_path: Path, real_hf: Path) -> None:
    folder = tiny_model(arch, tmp_path / arch, real_hf)
    if arch == "Qwen2ForCausalLM":  # Qwen2 has biased Q/K/V: make them count
        state = load_checkpoint(folder)
        assert any(n.endswith("q_proj.bias") for n in state.names())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok(TEXT)["input_ids"]
    ref = hf_logits(folder, ids)
    for outtype, atol in (("f32", F32_ATOL), ("f16", 5e-2)):
        out = convert_to_gguf(load_checkpoint(folder), tmp_path / f"{arch}-{outtype}.gguf", outtype, quiet=True)
        got = llama_logits(out.path, ids)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() < atol, (outtype, float(np.abs(got - ref).max()))
        assert (got.argmax(-1) == ref.argmax(-1)).all(), outtype


def test_real_checkpoint_greedy_generation_matches_transformers(real_hf: Path, tmp_path: Path) -> None:
    import llama_cpp

    out = convert_to_gguf(load_checkpoint(real_hf), tmp_path / "smol-f16.gguf", "f16", quiet=True)
    tok = transformers.AutoTokenizer.from_pretrained(real_hf)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a dragon who loves tea."}],
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(real_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0][len(ids):]
    assert len(ref) == 32, "the answer is long enough to compare 32 tokens"
    llm = llama_cpp.Llama(model_path=str(out.path), n_ctx=512, n_threads=2, verbose=False)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, "same tokenizer"
    got = []
    for t in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
        got.append(t)
        if len(got) == 32:
            break
    llm.close()
    assert got == ref.tolist()


@pytest.fixture(scope="session")
def reference_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from the llama-cpp-python sdist (cached per machine)."""
    from tests.checkpoints import llama_cpp_source

    return llama_cpp_source() / "convert_hf_to_gguf.py"


def test_same_as_llama_cpp_reference_converter(real_hf: Path, reference_converter: Path, tmp_path: Path) -> None:
    import gguf

    ref_path = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, str(reference_converter), str(real_hf), "--outtype", "f16",
                    "--outfile", str(ref_path)], check=True, capture_output=True,
                   env={"PYTHONPATH": str(reference_converter.parent / "gguf-py"), "PATH": "/usr/bin:/bin",
                        "HOME": str(Path.home())})
    ours = convert_to_gguf(load_checkpoint(real_hf), tmp_path / "ours.gguf", "f16", quiet=True).path
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(ref_path))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(ta) == set(tb)
    for name in tb:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert list(ta[name].shape) == list(tb[name].shape), name
        assert np.array_equal(ta[name].data, tb[name].data), name
    fa = {k: v.contents() for k, v in a.fields.items()}
    fb = {k: v.contents() for k, v in b.fields.items()}
    for key in [k for k in fb if k.startswith(("tokenizer.", "llama."))]:
        assert fa.get(key) == fb[key], key


def test_rlhf_inputs_convert_and_match(real_hf: Path, tmp_path: Path) -> None:
    """A TRL value-head model, a DeepSpeed-Chat style prefixed .bin actor, and a PEFT adapter."""
    from safetensors.torch import load_file, save_file

    src = tiny_model("LlamaForCausalLM", tmp_path / "policy", real_hf, seed=3)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ids = tok(TEXT)["input_ids"]
    ref = hf_logits(src, ids)
    state = load_file(str(src / "model.safetensors"))

    trl = tmp_path / "trl-ppo"
    shutil.copytree(src, trl)
    save_file({**state, "v_head.summary.weight": torch.randn(1, 64), "v_head.summary.bias": torch.zeros(1)},
              str(trl / "model.safetensors"))
    ds = tmp_path / "ds-actor"
    shutil.copytree(src, ds)
    (ds / "model.safetensors").unlink()
    torch.save({f"module.{k}": v for k, v in state.items()}, ds / "pytorch_model.bin")

    for folder, said in ((trl, "value head"), (ds, "wrapper prefix 'module.'")):
        ckpt = load_checkpoint(folder)
        assert any(said in line for line in ckpt.report), ckpt.report
        out = convert_to_gguf(ckpt, tmp_path / f"{folder.name}.gguf", "f32", quiet=True)
        got = llama_logits(out.path, ids)
        assert np.abs(got - ref).max() < F32_ATOL and (got.argmax(-1) == ref.argmax(-1)).all(), folder.name

    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)  # a trained adapter: B is no longer zero
    adapter = tmp_path / "adapter"
    lora.save_pretrained(adapter)
    with torch.no_grad():
        merged_ref = lora.merge_and_unload()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(merged_ref - ref).max() > 1e-2, "the adapter changes the model"
    ckpt = load_checkpoint(adapter, base=src)
    assert any("merged the LoRA adapter" in line for line in ckpt.report)
    out = convert_to_gguf(ckpt, tmp_path / "merged.gguf", "f32", quiet=True)
    got = llama_logits(out.path, ids)
    assert np.abs(got - merged_ref).max() < F32_ATOL and (got.argmax(-1) == merged_ref.argmax(-1)).all()


def test_bad_inputs_get_clear_errors(real_hf: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(empty)

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    (gpt / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="'GPTNeoXForCausalLM' is not supported; supported: "
                                              "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
                                              "Qwen3ForCausalLM"):
        convert_to_gguf(load_checkpoint(gpt), tmp_path / "x.gguf", quiet=True)

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model("LlamaForCausalLM", tmp_path / "t", real_hf), cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* past the end of the file"):
        load_checkpoint(cut)

    evil = tmp_path / "evil"
    shutil.copytree(tmp_path / "t", evil)
    (evil / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "hook": _Payload()}, evil / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="needs more than tensors to load, so it was refused"):
        load_checkpoint(evil)


class _Payload:
    """An object a malicious pickle would smuggle in: weights_only loading must refuse it."""


def test_cli_convert_quantizes_into_the_store_and_chats(real_hf: Path, home, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "localchat", "convert", str(real_hf), "--name", "smol",
                        "--quant", "q8_0", "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    entry = home.get("smol")
    assert entry.quant == "Q8_0" and entry.files[0].path == "smol/smol-Q8_0.gguf"
    assert not (home.root / "smol" / "smol-F16.gguf").exists()
    assert read_gguf(home.root / entry.files[0].path).quant == "Q8_0"
    assert abs(entry.eval["ppl"] / entry.eval["ppl_base"] - 1) < 0.005  # Q8_0 within 0.5% of F16
    assert "ppl" in subprocess.run([sys.executable, "-m", "localchat", "list"], capture_output=True,
                                   text=True).stdout
    chat = subprocess.run([sys.executable, "-m", "localchat", "chat", "--model", "smol", "-q", "-p",
                           "What is the capital of France?", "--temp", "0", "--system",
                           "You are a helpful assistant."], capture_output=True, text=True, timeout=120)
    assert "Paris" in chat.stdout, chat.stderr


def test_template_is_embedded_with_its_stop_strings(real_hf: Path, tmp_path: Path) -> None:
    src = tmp_path / "vicuna-like"
    shutil.copytree(real_hf, src)
    (src / "chat_template.jinja").unlink()
    out = convert_to_gguf(load_checkpoint(src), tmp_path / "v.gguf", "f16", template="vicuna", quiet=True)
    h = read_gguf(out.path)
    assert "ASSISTANT:" in (h.chat_template or "")
    assert h.stop_strings == ("USER:", "</s>")
    assert any("embedded the 'vicuna' chat template" in line for line in out.report)


def test_killed_conversion_leaves_the_old_file_intact(real_hf: Path, tmp_path: Path) -> None:
    """A conversion SIGKILLed while it writes (its temp file already holds tensors) leaves the
    file that was at the final path byte for byte."""
    import signal
    import time

    final = tmp_path / "killed.gguf"
    shutil.copyfile(convert_to_gguf(load_checkpoint(real_hf), tmp_path / "old.gguf", "f16", quiet=True).path,
                    final)
    old = final.read_bytes()
    code = ("from localchat.convert.checkpoint import load_checkpoint\n"
            "from localchat.convert.to_gguf import convert_to_gguf\n"
            f"convert_to_gguf(load_checkpoint({str(real_hf)!r}), {str(final)!r}, 'f32', quiet=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    partial: list[Path] = []
    while not partial and time.time() < deadline and proc.poll() is None:
        partial = [t for t in tmp_path.glob(".killed.gguf.*.tmp") if t.exists() and t.stat().st_size > 1_000_000]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be killed"
    assert partial and partial[0].exists() and partial[0].stat().st_size > 1_000_000  # killed mid-write
    assert final.read_bytes() == old


def test_sentencepiece_llama2_style_model(tmp_path: Path) -> None:
    import llama_cpp
    import sentencepiece as spm

    from tests.checkpoints import spm_tokenizer

    tok_dir = spm_tokenizer(tmp_path / "spm")
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    folder = tiny_model("LlamaForCausalLM", tmp_path / "llama2ish", tok_dir, vocab_size=sp.vocab_size())
    shutil.copy(tok_dir / "tokenizer.model", folder / "tokenizer.model")
    shutil.copy(tok_dir / "tokenizer_config.json", folder / "tokenizer_config.json")
    out = convert_to_gguf(load_checkpoint(folder), tmp_path / "l2.gguf", "f32", quiet=True).path
    h = read_gguf(out)
    assert h.metadata["tokenizer.ggml.model"] == "llama"
    assert len(h.metadata["tokenizer.ggml.scores"]) == sp.vocab_size()
    assert h.metadata["tokenizer.ggml.add_bos_token"] is True
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, n_threads=2, verbose=False,
                          vocab_only=False)
    for text in ("Hello world", "The sea rolls in with silver light, 1969!", "  two  spaces", "émigré café"):
        assert llm.tokenize(text.encode(), add_bos=True) == [sp.bos_id()] + sp.encode(text), text
    ids = [sp.bos_id()] + sp.encode("Bring a pot of water to a gentle boil, then lower the egg in.")
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    ref = hf_logits(folder, ids)
    assert np.abs(got - ref).max() < F32_ATOL and (got.argmax(-1) == ref.argmax(-1)).all()


def _peak_rss_converting(folder: Path, out: Path) -> int:
    """Peak RSS in bytes of a process that converts `folder` to an F16 GGUF, as the process reads it itself
    (VmHWM): wait4's ru_maxrss of a child starts from its parent's peak on Linux, here pytest's."""
    code = ("from localchat.convert.checkpoint import load_checkpoint\n"
            "from localchat.convert.to_gguf import convert_to_gguf\n"
            f"convert_to_gguf(load_checkpoint({str(folder)!r}), {str(out)!r}, 'f16', quiet=True)\n"
            "from localchat.hardware.memory import peak_rss\n"
            "print(peak_rss())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
def test_a_wide_tensor_is_converted_without_whole_copies(real_hf: Path, tmp_path: Path) -> None:
    """Conversion memory grows by about the largest tensor, not copies of it: a bf16 checkpoint whose embedding is
    49152 x 2048 (an 8B model's 151936 x 4096, scaled down) peaks less than 2.5 times that tensor above the same
    model 64 wide. Converting each tensor whole through float32 made four copies of it (Qwen3-8B peaked at
    5.2 GB of RSS that way, against a 3 GB goal)."""
    from safetensors.torch import load_file, save_file

    peaks, wide_bytes = [], 0
    for hidden in (64, 2048):
        folder = tiny_model("LlamaForCausalLM", tmp_path / f"h{hidden}", real_hf, hidden_size=hidden,
                            tie_word_embeddings=True)
        weights = folder / "model.safetensors"
        state = {k: v.to(torch.bfloat16) for k, v in load_file(str(weights)).items()}
        save_file(state, str(weights), metadata={"format": "pt"})
        wide_bytes = state["model.embed_tokens.weight"].nbytes
        peaks.append(_peak_rss_converting(folder, tmp_path / f"h{hidden}.gguf"))
        embd = next(t for t in read_gguf(tmp_path / f"h{hidden}.gguf").tensors if t.name == "token_embd.weight")
        assert embd.shape[0] == hidden and embd.type_name == "F16"
    growth = peaks[1] - peaks[0]
    assert growth < 2.5 * wide_bytes, (f"{growth / 1e6:.0f} MB more for a {wide_bytes / 1e6:.0f} MB tensor", peaks)


def test_generation_config_sampling_goes_into_the_gguf_and_the_store_and_applies(real_hf: Path, home,
                                                                                tmp_path: Path) -> None:
    """A checkpoint's generation_config.json sampling settings are written into the GGUF under llama.cpp's
    general.sampling.* keys, read back into the store entry's preset, shown by `info` and `list`, and
    used by the server when a request sets none: top_k 1 from the file makes every seed answer alike
    (as temperature 0 with the file's repetition penalty does), while a request's own settings win."""
    import gguf

    src = tmp_path / "tuned"
    shutil.copytree(real_hf, src)
    (src / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.8, "top_k": 1, "repetition_penalty": 1.05}))
    r = subprocess.run([sys.executable, "-m", "localchat", "convert", str(src), "--name", "tuned",
                        "--quant", "f16", "--no-check", "-q"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "sampling defaults from generation_config.json: temp 0.6, top_p 0.8, top_k 1" in r.stdout
    gguf_path = home.path_of(home.get("tuned").files[0].path)
    meta = read_gguf(gguf_path).metadata
    keys = gguf.Keys.General
    assert meta[keys.SAMPLING_TEMP] == pytest.approx(0.6) and meta[keys.SAMPLING_TOP_K] == 1
    assert meta[keys.SAMPLING_TOP_P] == pytest.approx(0.8)
    assert meta[keys.SAMPLING_PENALTY_REPEAT] == pytest.approx(1.05)
    assert home.get("tuned").defaults["sampling"] == {"temperature": 0.6, "top_k": 1, "top_p": 0.8,
                                                      "repeat_penalty": 1.05}
    info = subprocess.run([sys.executable, "-m", "localchat", "info", str(gguf_path)], capture_output=True,
                          text=True)
    assert "sampling defaults: temp 0.6, top_k 1, top_p 0.8, repeat_penalty 1.05" in info.stdout
    listed = subprocess.run([sys.executable, "-m", "localchat", "list"], capture_output=True, text=True).stdout
    assert "temp 0.6, top_k 1, top_p 0.8, repeat_penalty 1.05" in listed

    srv = Server(home)
    try:
        client = srv.client(timeout=300)

        def ask(**kw: object) -> str:
            return client.chat.completions.create(
                model="tuned", max_tokens=24, messages=[{"role": "user", "content": "Tell me a story."}],
                **kw).choices[0].message.content

        greedy = ask(temperature=0, extra_body={"repeat_penalty": 1.05})
        assert [ask(seed=s) for s in (1, 2, 3)] == [greedy] * 3
        assert len({ask(seed=s, temperature=1.5, extra_body={"top_k": 0}) for s in (1, 2, 3)}) > 1
    finally:
        srv.stop()


def test_bad_generation_config_is_refused_naming_file_and_field(real_hf: Path, tmp_path: Path) -> None:
    """A sampling value out of range in generation_config.json stops the conversion with the file and the
    field named, before anything is written."""
    src = tmp_path / "bad"
    shutil.copytree(real_hf, src)
    (src / "generation_config.json").write_text(json.dumps({"do_sample": True, "repetition_penalty": -2}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: repetition_penalty=-2 is out of range"):
        convert_to_gguf(load_checkpoint(src), tmp_path / "bad.gguf", "f16", quiet=True)
    assert not (tmp_path / "bad.gguf").exists()
