"""Tokenizers into GGUF: byte-level BPE (LLaMA 3, Qwen2, SmolLM) from tokenizer.json, and
SentencePiece (LLaMA 1/2, Mistral, Vicuna) from tokenizer.model.

llama.cpp splits text before BPE with one of its known pre-tokenizers, named in
`tokenizer.ggml.pre`. We read which one from the structure of tokenizer.json's
pre_tokenizer (its split regex and digit handling), not from the model's name, and refuse
a pre-tokenizer we do not know rather than write a file that tokenizes wrongly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

# The split regexes of the pre-tokenizers llama.cpp implements, as tokenizer.json spells them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE = ("gpt-2", "smollm", "llama-bpe", "qwen2")


class TokenizerError(ValueError):
    pass


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None


def _pre_of(pre: dict[str, Any] | None, path: Path) -> str:
    """Name llama.cpp's pre-tokenizer that behaves like this tokenizer.json pre_tokenizer."""
    if not pre:
        raise TokenizerError(f"{path}: no pre_tokenizer; byte-level BPE needs one")
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    split = next((s for s in steps if s.get("type") == "Split"), None)
    byte_level = next((s for s in steps if s.get("type") == "ByteLevel"), None)
    if byte_level is None:
        raise TokenizerError(f"{path}: pre_tokenizer {kinds} is not byte-level; supported: {', '.join(SUPPORTED_PRE)}")
    if split is not None:
        regex = (split.get("pattern") or {}).get("Regex", "")
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT:
            return "qwen2"
        raise TokenizerError(f"{path}: pre_tokenizer split regex {regex!r} is not one llama.cpp knows; "
                             f"supported: {', '.join(SUPPORTED_PRE)}")
    digits = next((s for s in steps if s.get("type") == "Digits"), None)
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if digits is not None and digits.get("individual_digits") and kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    raise TokenizerError(f"{path}: pre_tokenizer {kinds} is not one llama.cpp knows; "
                         f"supported: {', '.join(SUPPORTED_PRE)}")


def pre_tokenizer_config(pre: str) -> dict[str, Any]:
    """The tokenizer.json pre_tokenizer that behaves like llama.cpp's `pre` (the inverse of _pre_of)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "gpt-2":
        return byte_level
    if pre == "smollm":
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    regex = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if regex is None:
        raise TokenizerError(f"pre-tokenizer {pre!r} is not one we can rebuild; supported: {', '.join(SUPPORTED_PRE)}")
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}


def _looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")


def _bpe(folder: Path, vocab_size: int) -> Vocab:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: model type {model.get('type')!r}; expected BPE")
    pre = _pre_of(data.get("pre_tokenizer"), path)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    reverse = {i: t for t, i in vocab.items()}
    size = max(vocab_size, max(reverse) + 1)
    tokens, types = [], []
    for i in range(size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            special = added[tok].get("special") or _looks_special(tok)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab("gpt2", tokens, [int(t) for t in types], pre=pre, merges=merges)


def _spm(folder: Path, vocab_size: int) -> Vocab:
    import sentencepiece as spm

    path = folder / "tokenizer.model"
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as exc:
        raise TokenizerError(f"{path}: not a SentencePiece model ({exc})") from None
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        for tok, i in sorted(json.loads(added_path.read_text()).items(), key=lambda kv: kv[1]):
            if i == len(tokens):
                tokens.append(tok)
                scores.append(-1000.0)
                types.append(gguf.TokenType.USER_DEFINED)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}
    if sp.pad_id() >= 0:
        special["pad"] = sp.pad_id()
    return Vocab("llama", tokens, [int(t) for t in types], scores=scores, special=special)


def _token_id(value: Any, tokens: list[str]) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str) and value in tokens:
        return tokens.index(value)
    return None


def load_vocab(folder: Path, config: dict[str, Any]) -> Vocab:
    """The tokenizer in `folder`, with special tokens, BOS/EOS policy and chat template."""
    vocab_size = int(config.get("vocab_size") or 0)
    if (folder / "tokenizer.json").is_file() and json.loads(
            (folder / "tokenizer.json").read_text(encoding="utf-8")).get("model", {}).get("type") == "BPE":
        vocab = _bpe(folder, vocab_size)
    elif (folder / "tokenizer.model").is_file():
        vocab = _spm(folder, vocab_size)
    else:
        raise TokenizerError(f"{folder}: no tokenizer.json (BPE) or tokenizer.model (SentencePiece)")
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    for kind in ("bos", "eos", "unk", "pad"):
        tid = _token_id(tcfg.get(f"{kind}_token"), vocab.tokens)
        if tid is None and isinstance(config.get(f"{kind}_token_id"), int):
            tid = config[f"{kind}_token_id"]
        if tid is not None and tid >= 0:
            vocab.special[kind] = tid
    if "add_bos_token" in tcfg:
        vocab.add_bos = bool(tcfg["add_bos_token"])
    elif vocab.model == "gpt2":
        vocab.add_bos = False
    if "add_eos_token" in tcfg:
        vocab.add_eos = bool(tcfg["add_eos_token"])
    template = tcfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # several named templates: take the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    vocab.chat_template = template or None
    return vocab


def write_vocab(w: gguf.GGUFWriter, v: Vocab) -> None:
    w.add_tokenizer_model(v.model)
    if v.pre:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    w.add_token_types(v.types)
    if v.merges:
        w.add_token_merges(v.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
               "pad": w.add_pad_token_id}
    for kind, tid in v.special.items():
        setters[kind](tid)
    if v.add_bos is not None:
        w.add_add_bos_token(v.add_bos)
    if v.add_eos is not None:
        w.add_add_eos_token(v.add_eos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
