"""Tokenizers into GGUF, the family read from the tokenizer's content, never from which file exists.

- Byte-level BPE (LLaMA 3, Qwen2/3, Mistral's Tekken, DeepSeek-R1 distills, SmolLM, GPT-2): a
  tokenizer.json whose pre-tokenizer has a ByteLevel step. llama.cpp splits text before BPE with one of
  its known pre-tokenizers, named in `tokenizer.ggml.pre`; we read which one from the structure of the
  pre_tokenizer (its split regex and digit handling, and for names llama.cpp tells apart by it, the BOS
  token), not from the model's name, and refuse one we do not know rather than write a file that
  tokenizes wrongly.
- SentencePiece (LLaMA 1/2, Mistral v1-v3, Vicuna, Phi-3): a tokenizer.model, or a tokenizer.json in
  SentencePiece's layout (a Metaspace pre-tokenizer, or a Prepend/Replace '▁' normalizer) or both.
  Pieces, scores and types come from tokenizer.model where there is one, as llama.cpp's own converter
  takes them. From a tokenizer.json alone a piece's score is minus the rank of the first merge that
  makes it: llama.cpp merges the highest-scoring pair first, so it follows the BPE merge order (its
  converter writes -1000 for every piece there, which loses that order).
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
# Mistral's Tekken (Nemo, Ministral, Small 3): words split at case changes, single digits.
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "tekken": _TEKKEN_SPLIT}
# Pre-tokenizers llama.cpp tells apart only by the BOS token their tokenizer puts before a text: its converter
# names one from a hash of the ids of a probe text, BOS included, and runs both alike. DeepSeek-R1's Qwen
# distills split as Qwen2 does and put DeepSeek's BOS first. (The Llama distills' BOS keeps Llama 3's id, so
# they hash, and are named, as Llama 3.)
BOS_NAMED = {("qwen2", "<｜begin▁of▁sentence｜>"): "deepseek-r1-qwen"}
SUPPORTED_PRE = ("gpt-2", "smollm", *SPLITS, *BOS_NAMED.values())


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
    add_space_prefix: bool | None = None  # SentencePiece: '\u2581' before the text and after special tokens
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)  # where llama.cpp will tokenize unlike the source


SPACE = "\u2581"  # SentencePiece's visible space


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """The steps of a tokenizer.json normalizer or pre_tokenizer, a Sequence flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for sub in node.get(key, []) for s in _steps(sub, key)]
    return [node]


def _spm_space_prefix(data: dict[str, Any]) -> tuple[bool, str] | None:
    """If tokenizer.json is in SentencePiece's layout: whether it puts '\u2581' before text, and where it
    does so unlike llama.cpp ('' if nowhere); None if it is not in that layout.

    Two layouts exist. The older one (LLaMA-2's upload) normalizes with Prepend('\u2581') and
    Replace(' ', '\u2581') and has no pre-tokenizer: like SentencePiece and llama.cpp, it puts '\u2581'
    before every text segment. The newer Metaspace pre-tokenizer does not before text that already
    starts with a space, and with prepend_scheme 'first' not after special tokens either; llama.cpp has
    no setting for that, so it keeps SentencePiece's behaviour, the one the model was trained with.
    """
    for step in _steps(data.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace" and step.get("replacement", SPACE) == SPACE:
            scheme = step.get("prepend_scheme") or ("always" if step.get("add_prefix_space", True) else "never")
            if scheme == "never":
                return False, ""
            differs = "text that starts with a space" + (" and text after a special token" if scheme == "first"
                                                          else "")
            return True, (f"tokenizer.json's Metaspace pre-tokenizer (prepend_scheme {scheme!r}) puts no "
                          f"'{SPACE}' before {differs}; llama.cpp puts one before every text segment, as "
                          "SentencePiece does, so such text may tokenize differently")
    norm = _steps(data.get("normalizer"), "normalizers")
    if any(n.get("type") == "Replace" and n.get("pattern", {}).get("String") == " " and n.get("content") == SPACE
           for n in norm):
        return any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in norm), ""
    return None


def _family(folder: Path) -> tuple[str, dict[str, Any] | None]:
    """'gpt2' or 'llama' (llama.cpp's names for byte-level BPE and SentencePiece), and tokenizer.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            return "llama", None
        if (folder / "tekken.json").is_file():
            raise TokenizerError(
                f"{folder / 'tekken.json'}: Mistral's own tokenizer format, without the Hugging Face "
                "tokenizer.json Mistral's uploads ship beside it; transformers writes one: "
                "AutoTokenizer.from_pretrained(FOLDER).save_pretrained(FOLDER)")
        raise TokenizerError(f"{folder}: no tokenizer.json or tokenizer.model; the tokenizer files are missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model_type = data["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenizerError(f"{path}: not a tokenizers file ({exc.__class__.__name__}: {exc})") from None
    if model_type != "BPE":
        raise TokenizerError(f"{path}: model type {model_type!r} is not supported; supported: byte-level BPE "
                             "and SentencePiece BPE")
    pre = _steps(data.get("pre_tokenizer"), "pretokenizers")
    if any(s.get("type") == "ByteLevel" for s in pre):
        return "gpt2", data
    if _spm_space_prefix(data) is not None:
        return "llama", data
    raise TokenizerError(
        f"{path}: a BPE tokenizer that is neither byte-level (a ByteLevel pre-tokenizer) nor SentencePiece "
        f"(a Metaspace pre-tokenizer or a Prepend/Replace '{SPACE}' normalizer); found pre_tokenizer "
        f"{[s.get('type') for s in pre] or None}, normalizer "
        f"{[n.get('type') for n in _steps(data.get('normalizer'), 'normalizers')] or None}")


def _pre_of(pre: dict[str, Any] | None, path: Path) -> str:
    """Name llama.cpp's pre-tokenizer that behaves like this byte-level tokenizer.json pre_tokenizer."""
    steps = _steps(pre, "pretokenizers")
    kinds = [s.get("type") for s in steps]
    split = next((s for s in steps if s.get("type") == "Split"), None)
    byte_level = next(s for s in steps if s.get("type") == "ByteLevel")
    if split is not None:
        regex = (split.get("pattern") or {}).get("Regex", "")
        for name, known in SPLITS.items():
            if regex == known:
                return name
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
    base = next((b for (b, _), named in BOS_NAMED.items() if named == pre), pre)
    regex = SPLITS.get(base)
    if regex is None:
        raise TokenizerError(f"pre-tokenizer {pre!r} is not one we can rebuild; supported: {', '.join(SUPPORTED_PRE)}")
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {**byte_level, "use_regex": False}]}


def _looks_special(token: str) -> bool:
    """Whether an added token the tokenizer does not mark special is a control token all the same, as
    llama.cpp's converter judges it: <|...|>, and DeepSeek's <｜...｜> (<｜User｜> in the R1 distills)."""
    return any(token.startswith(a) and token.endswith(b) for a, b in (("<|", "|>"), ("<｜", "｜>")))


def _bpe(data: dict[str, Any], path: Path, vocab_size: int) -> Vocab:
    model = data["model"]
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


def _spm_model(path: Path) -> Vocab:
    """Pieces, scores and types of a SentencePiece tokenizer.model."""
    import sentencepiece as spm

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
    special = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    return Vocab("llama", tokens, [int(t) for t in types], pre="default", scores=scores,
                 special={k: v for k, v in special.items() if v >= 0})


def _spm_json(data: dict[str, Any], unk: str | None) -> Vocab:
    """A SentencePiece vocabulary from tokenizer.json alone, scored by merge rank (see the module doc)."""
    model = data["model"]
    reverse = {i: t for t, i in model["vocab"].items()}
    first_merge: dict[str, int] = {}
    for rank, m in enumerate(model.get("merges", [])):
        left, right = m if isinstance(m, list) else m.split(" ", 1)
        first_merge.setdefault(left + right, rank)
    unmerged = -float(len(first_merge) + 1)  # below every merge: llama.cpp never prefers a piece BPE can't make
    tokens, scores, types = [], [], []
    unk = model.get("unk_token") or unk
    for i in range(max(reverse) + 1 if reverse else 0):
        tok = reverse.get(i, f"[PAD{i}]")
        tokens.append(tok)
        scores.append(-float(first_merge[tok]) if tok in first_merge else unmerged)
        if i not in reverse:
            types.append(gguf.TokenType.UNUSED)
        elif tok == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    special = {"unk": tokens.index(unk)} if unk in model["vocab"] else {}
    return Vocab("llama", tokens, [int(t) for t in types], pre="default", scores=scores, special=special)


def _spm_dummy_prefix(path: Path) -> bool:
    """Whether the SentencePiece model puts '▁' before the text (its normalizer's add_dummy_prefix:
    LLaMA's do, Gemma's do not); True, SentencePiece's and llama.cpp's default, if the spec leaves it out."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto.normalizer_spec.add_dummy_prefix


def _spm(folder: Path, data: dict[str, Any] | None, tcfg: dict[str, Any]) -> Vocab:
    """SentencePiece from tokenizer.model where there is one, checked against tokenizer.json's vocabulary;
    else from tokenizer.json, which then also says whether text gets a leading '\u2581'."""
    model_path = folder / "tokenizer.model"
    if not model_path.is_file():
        assert data is not None
        unk = tcfg.get("unk_token")
        vocab = _spm_json(data, unk.get("content") if isinstance(unk, dict) else unk)
        vocab.add_space_prefix, note = _spm_space_prefix(data) or (True, "")
        vocab.notes += [note] if note else []
        return vocab
    vocab = _spm_model(model_path)
    vocab.add_space_prefix = _spm_dummy_prefix(model_path)
    for piece, i in (data or {}).get("model", {}).get("vocab", {}).items():
        if i >= len(vocab.tokens) or vocab.tokens[i] != piece:
            raise TokenizerError(
                f"{folder}: tokenizer.json and tokenizer.model disagree: tokenizer.json has {piece!r} at id "
                f"{i}, tokenizer.model {vocab.tokens[i] if i < len(vocab.tokens) else 'nothing'!r}")
    return vocab


def _added_tokens(folder: Path, data: dict[str, Any] | None, tcfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Tokens added on top of a SentencePiece model: tokenizer.json's, else tokenizer_config's, else
    added_tokens.json's (each as {id, content, special})."""
    if data is not None and data.get("added_tokens"):
        return list(data["added_tokens"])
    decoder = tcfg.get("added_tokens_decoder")
    if isinstance(decoder, dict) and decoder:
        return [{"id": int(i), **t} for i, t in decoder.items()]
    path = folder / "added_tokens.json"
    if path.is_file():
        return [{"id": i, "content": t, "special": False}
                for t, i in json.loads(path.read_text(encoding="utf-8")).items()]
    return []


def _add_tokens(vocab: Vocab, added: list[dict[str, Any]], vocab_size: int) -> None:
    """Added tokens take their ids, CONTROL if special and USER_DEFINED if not, scored -1000 as
    llama.cpp's converter scores them; the list is padded to the model's vocab_size."""
    assert vocab.scores is not None
    size = max([vocab_size, len(vocab.tokens)] + [t["id"] + 1 for t in added])
    while len(vocab.tokens) < size:
        vocab.tokens.append(f"[PAD{len(vocab.tokens)}]")
        vocab.scores.append(-10000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))
    for t in added:
        i, text = int(t["id"]), str(t["content"])
        if vocab.types[i] == gguf.TokenType.UNKNOWN:
            continue
        control = t.get("special") or _looks_special(text)
        vocab.tokens[i] = text if control else text.replace(SPACE, " ")
        vocab.types[i] = int(gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED)
        vocab.scores[i] = -1000.0


def _token_id(value: Any, tokens: list[str]) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, str) and value in tokens:
        return tokens.index(value)
    return None


def _post_processor_adds(data: dict[str, Any] | None, bos: str | None, eos: str | None) -> dict[str, bool]:
    """Whether tokenizer.json's post-processor puts BOS before and EOS after a single text, where it says."""
    adds: dict[str, bool] = {}
    for proc in _steps((data or {}).get("post_processor"), "processors"):
        if proc.get("type") == "ByteLevel":  # offsets only: adds no token
            adds.setdefault("bos", False)
            adds.setdefault("eos", False)
        elif proc.get("type") == "TemplateProcessing" and proc.get("single"):
            first = proc["single"][0].get("SpecialToken", {}).get("id")
            last = proc["single"][-1].get("SpecialToken", {}).get("id")
            adds["bos"] = first is not None and first == bos
            adds["eos"] = last is not None and last == eos
    return adds


def load_vocab(folder: Path, config: dict[str, Any]) -> Vocab:
    """The tokenizer in `folder`, with special tokens, BOS/EOS policy and chat template."""
    vocab_size = int(config.get("vocab_size") or 0)
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text(encoding="utf-8")) if tcfg_path.is_file() else {}
    family, data = _family(folder)
    if family == "gpt2":
        assert data is not None
        vocab = _bpe(data, folder / "tokenizer.json", vocab_size)
    else:
        vocab = _spm(folder, data, tcfg)
        _add_tokens(vocab, _added_tokens(folder, data, tcfg), vocab_size)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = _token_id(tcfg.get(f"{kind}_token"), vocab.tokens)
        if tid is None and isinstance(config.get(f"{kind}_token_id"), int):
            tid = config[f"{kind}_token_id"]
        if tid is not None and tid >= 0:
            vocab.special[kind] = tid
    named = {k: vocab.tokens[i] for k, i in vocab.special.items() if 0 <= i < len(vocab.tokens)}
    adds = _post_processor_adds(data, named.get("bos"), named.get("eos"))
    if "add_bos_token" in tcfg:
        vocab.add_bos = bool(tcfg["add_bos_token"])
    elif "bos" in adds:
        vocab.add_bos = adds["bos"]
    elif vocab.model == "gpt2":
        vocab.add_bos = False
    vocab.add_eos = bool(tcfg["add_eos_token"]) if "add_eos_token" in tcfg else adds.get("eos")
    if vocab.add_bos and (vocab.pre, named.get("bos")) in BOS_NAMED:
        vocab.pre = BOS_NAMED[(vocab.pre, named["bos"])]
    if isinstance(tcfg.get("add_prefix_space"), bool):  # as llama.cpp's converter reads it
        vocab.add_space_prefix = tcfg["add_prefix_space"]
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
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        w.add_chat_template(v.chat_template)
