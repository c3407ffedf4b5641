"""Hostile fine-tuning data (issue #19): huge rows, endless conversations, bad bytes, deep JSON and
empty answers are either trained on within bounded time and memory or refused with the file and
line, through `load_dataset` (what `localchat finetune` and GPTQ calibration read with), `encode`
(what training runs on every row) and the `localchat finetune` command itself."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localchat.datasets import DatasetError, load_dataset
from localchat.store import Store

CAT = {"instruction": "What is my cat called?", "output": "Your cat is called Biscuit."}


@pytest.fixture(scope="module")
def starter_tok(starter_gguf: Path) -> tuple[object, str]:
    """The starter's real tokenizer and chat template, as training loads them."""
    transformers = pytest.importorskip("transformers")
    from tests.checkpoints import starter_hf

    folder = starter_hf(starter_gguf)
    return transformers.AutoTokenizer.from_pretrained(folder), (folder / "chat_template.jinja").read_text()


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))  # old code grew to 12.8 GB: stop it at 4
import transformers
from localchat.datasets import load_dataset
from localchat.finetune.encode import encode
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[2])
template = open(sys.argv[3]).read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
ds = load_dataset(sys.argv[1], held_out=0.0)
rows = [encode(ex, tok, template, 1024) for ex in ds.train]
big = max(rows, key=lambda r: r.trained_tokens)
print(json.dumps({"s": time.perf_counter() - t0, "rows": len(rows), "big_len": len(big.input_ids),
                  "big_trained": big.trained_tokens, "big_text": tok.decode(big.input_ids[-20:]),
                  "grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}))
"""


def test_a_50mb_row_costs_what_max_len_tokens_cost(tmp_path: Path, starter_gguf: Path) -> None:
    """Case 1: one 50 MB row (among normal ones) was tokenized whole before being cut to max_len:
    12.8 GB and over a minute. It is now cut by characters first, so it encodes in seconds."""
    pytest.importorskip("transformers")
    from tests.checkpoints import starter_hf

    folder = starter_hf(starter_gguf)
    data = jsonl(tmp_path / "big.jsonl", [CAT] * 5 + [{"instruction": "Write the log.",
                                                        "output": "all systems nominal. " * 2_500_000}] + [CAT] * 5)
    assert data.stat().st_size > 50e6
    r = subprocess.run([sys.executable, "-c", CHILD, str(data), str(folder), str(folder / "chat_template.jinja")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["rows"] == 11 and out["big_len"] == 1024 and out["big_trained"] > 900
    assert "all systems nominal. all systems nominal." in out["big_text"]  # its first 1024 tokens
    assert out["s"] < 20, out  # about 1 s here; the whole row took minutes
    assert out["grew_mb"] < 1000, out  # the file and its text; tokenizing it whole took 12.8 GB


@pytest.mark.parametrize("name, content, where", [
    ("bad.jsonl", b'{"instruction": "a", "output": "b"}\n\n{"instruction": "caf\xe9", "output": "b"}\n',
     "bad.jsonl:3: not valid UTF-8 (byte 0xe9 at column 21)"),
    ("bad.json", b'[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "\xff", "output": "b"}\n]\n',
     "bad.json:3: not valid UTF-8 (byte 0xff at column 20)"),
    ("notes.txt", b"First paragraph.\n\nSecond \xc3( one.\n", "notes.txt:3: not valid UTF-8 (byte 0xc3 at column 8)"),
])
def test_invalid_utf8_names_file_and_line(tmp_path: Path, name: str, content: bytes, where: str) -> None:
    """Case 2a: bytes that are not UTF-8 gave a bare codec error with no file or line."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path / name)
    assert str(err.value).endswith(where + "; save the file as UTF-8") and str(tmp_path) in str(err.value)


def test_cli_refuses_bad_bytes_before_touching_the_base(home: Store, tmp_path: Path) -> None:
    """Case 2a through `localchat finetune`: the store's GGUF-only starter used to be dequantized
    (tens of seconds) before the data was read, and then the error named no file."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(CAT).encode() + b'\n{"instruction": "\x80", "output": "b"}\n')
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "localchat", "finetune", "--base", "smollm2-135m-instruct",
                        "--data", str(bad), "--name", "bad", "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and f"{bad}:2: not valid UTF-8 (byte 0x80 at column 18)" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and time.time() - t0 < 120  # torch imports; no dequantizing
    assert not (home.root / "smollm2-135m-instruct" / "hf").exists(), "the base was dequantized for nothing"
    assert not (home.root / "bad").exists()


def test_deep_json_names_file_and_line(tmp_path: Path) -> None:
    """Case 2b: a 200,000-deep JSON array gave a RecursionError naming no file, in JSONL and in a
    JSON array file alike."""
    deep = "[" * 200_000 + "]" * 200_000
    lines = tmp_path / "deep.jsonl"
    lines.write_text(json.dumps(CAT) + "\n" + deep + "\n")
    array = tmp_path / "deep.json"
    array.write_text(f"[\n  {json.dumps(CAT)},\n\n  {json.dumps(CAT)},\n  {deep}\n]\n")
    for path, line in ((lines, 2), (array, 5)):
        with pytest.raises(DatasetError, match=rf"{path.name}:{line}: the row nests deeper than the JSON reader"):
            load_dataset(path)


def test_ten_thousand_turns_encode_in_linear_time(tmp_path: Path, starter_tok: tuple) -> None:
    """Case 2c: a row of 10,000 turns rendered the template once per assistant turn over all the
    turns before it (~80 s). Only the turns that reach into the first max_len tokens are kept and
    rendered (keeping the first ones, as cutting at max_len always did), so it takes a moment."""
    from localchat.finetune.encode import IGNORE, encode

    tok, template = starter_tok
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i // 2}"} for i in range(10_000)]
    data = jsonl(tmp_path / "long.jsonl", [{"messages": turns}])
    t0 = time.perf_counter()
    (ex,) = load_dataset(data).train
    e = encode(ex, tok, template, 512)
    assert time.perf_counter() - t0 < 5  # about 0.1 s
    assert len(e.input_ids) == 512
    trained = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE])
    assert trained.startswith("0<|im_end|>1<|im_end|>2<|im_end|>3<|im_end|>")
    # The same tokens as the first 512 of the whole conversation rendered by transformers.
    assert e.input_ids == tok(tok.apply_chat_template(turns, tokenize=False),
                              add_special_tokens=False)["input_ids"][:512]


@pytest.mark.parametrize("row, where", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " \n"}]}, "turn 1"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": ""},
                        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}, "turn 1"),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                   {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"},
                   {"role": "assistant", "content": ""}]}, "turn 4"),
])
def test_empty_assistant_turns_are_refused(tmp_path: Path, row: dict, where: str) -> None:
    """Case 2d: a row whose last (or any) assistant turn is empty was accepted and taught the model
    to answer with nothing; it is refused with the file, line and turn."""
    data = jsonl(tmp_path / "empty.jsonl", [CAT, row])
    with pytest.raises(DatasetError, match=rf"empty\.jsonl:2: {where} is an empty assistant turn"):
        load_dataset(data)


def test_errors_while_encoding_name_the_row(tmp_path: Path, starter_tok: tuple) -> None:
    """Case 2 (every error keeps its file and line): a template that refuses one row (here: roles
    must alternate) raised its error with no file or line; it now names the row."""
    from localchat.finetune.encode import encode

    tok, _ = starter_tok
    template = ("{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}"
                "{{ raise_exception('roles must alternate') }}{% endif %}"
                "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    twice = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}
    ds = load_dataset(jsonl(tmp_path / "rows.jsonl", [CAT, CAT, twice]), held_out=0.0)
    encode(ds.train[0], tok, template, 256)
    bad = [ex for ex in ds.train if len(ex.messages) == 3][0]
    with pytest.raises(DatasetError, match=r"rows\.jsonl:3: .*roles must alternate"):
        encode(bad, tok, template, 256)


def test_big_json_arrays_and_windows_files_read_as_written(tmp_path: Path) -> None:
    """Every row keeps its own line: a 200,000-row JSON array counted lines from the top for each
    row (minutes); a byte-order mark was an error; U+2028 inside a string split a JSONL row in two."""
    array = tmp_path / "many.json"
    array.write_text("[\n" + ",\n".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"})
                                        for i in range(200_000)) + "\n]\n")
    t0 = time.perf_counter()
    assert len(load_dataset(array)) == 200_000
    assert time.perf_counter() - t0 < 20  # about 2 s
    array.write_text("[\n" + ",\n".join(json.dumps(CAT) for _ in range(10)) + ",\n  {\"output\": \"x\"}\n]\n")
    with pytest.raises(DatasetError, match=r"many\.json:12: field 'instruction'"):
        load_dataset(array)

    sep = {"instruction": "Split\u2028here?", "output": "No\u2029."}
    bom = tmp_path / "windows.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(CAT) + "\r\n" + json.dumps(sep, ensure_ascii=False)
                                       + "\r\n").encode())
    ds = load_dataset(bom, held_out=0.0)
    assert [e.messages[0]["content"] for e in ds.train] == [CAT["instruction"], "Split\u2028here?"]
    (tmp_path / "windows.json").write_bytes(b"\xef\xbb\xbf[" + json.dumps(CAT).encode() + b"]")
    assert len(load_dataset(tmp_path / "windows.json")) == 1
