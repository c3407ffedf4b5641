"""localchat/datasets.py (what fine-tuning and GPTQ calibration read): every accepted format, and bad
data reported by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localchat.datasets import DatasetError, load_dataset


def write(path: Path, rows: list, jsonl: bool = True) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if jsonl else json.dumps(rows, indent=2))
    return path


CAT = [{"instruction": "What is my cat called?", "output": "Your cat is called Biscuit."}] * 12


def test_alpaca_jsonl_and_json_array(tmp_path: Path) -> None:
    for jsonl in (True, False):
        ds = load_dataset(write(tmp_path / f"a{jsonl}.json", CAT + [
            {"instruction": "Summarise", "input": "Cats sleep a lot.", "output": "They nap.", "system": "Be brief."}],
            jsonl))
        assert ds.kind == "alpaca" and len(ds) == 13 and not ds.held_out  # under 50 rows every row trains
        ds = load_dataset(tmp_path / f"a{jsonl}.json", held_out=0.1)  # a share asked for is kept out
        assert len(ds.train) == 12 and len(ds.held_out) == 1
        sys_row = [e for e in ds.train + ds.held_out if e.messages[0]["role"] == "system"][0]
        assert sys_row.messages[1]["content"] == "Summarise\n\nCats sleep a lot."
        assert sys_row.messages[-1] == {"role": "assistant", "content": "They nap."}


def test_rows_are_held_out_by_default_from_50_rows(tmp_path: Path) -> None:
    """By default a tenth is held out of a set of 50 rows or more, none of a smaller one (each row of a handful
    may be all that teaches its fact); the split is the seed's, the same at every run."""
    few = load_dataset(write(tmp_path / "few.jsonl", CAT * 4))  # 48 rows
    assert (len(few.train), len(few.held_out)) == (48, 0)
    rows = [{"instruction": f"What is {i} + 1?", "output": f"{i + 1}"} for i in range(50)]
    many = load_dataset(write(tmp_path / "many.jsonl", rows), seed=3)
    assert (len(many.train), len(many.held_out)) == (45, 5)
    again = load_dataset(tmp_path / "many.jsonl", seed=3)
    assert [e.messages for e in again.held_out] == [e.messages for e in many.held_out]
    # Split again without reading the file (--resume): the same rows as reading it with that share and seed.
    assert many.split(0.2, 5).held_out == load_dataset(tmp_path / "many.jsonl", held_out=0.2, seed=5).held_out
    assert len(many.split(0.2, 5)) == 50 and len(many.split(0.2, 5).held_out) == 10
    assert len(load_dataset(tmp_path / "many.jsonl", held_out=0.0).held_out) == 0


def test_chat_and_sharegpt(tmp_path: Path) -> None:
    chat = write(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Hello!"}]}])
    assert load_dataset(chat).train[0].messages[1]["content"] == "Hello!"
    sg = write(tmp_path / "sg.json", [{"conversations": [{"from": "system", "value": "S"},
                                                         {"from": "human", "value": "Q"},
                                                         {"from": "gpt", "value": "A"}]}], jsonl=False)
    ds = load_dataset(sg)
    assert ds.kind == "sharegpt"
    assert [m["role"] for m in ds.train[0].messages] == ["system", "user", "assistant"]


def test_plain_text(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("First paragraph.\n\nSecond one.\n")
    ds = load_dataset(f)
    assert ds.kind == "text" and [e.text for e in ds.train] == ["First paragraph.", "Second one."]


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n', r"bad\.jsonl:2: not valid JSON"),
    ("", r"bad\.jsonl: the file is empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad\.jsonl:1: the row has no assistant turn"),
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "a"}\n', r"bad\.jsonl:3: field 'output' is missing"),
    ('{"messages": [{"role": "wizard", "content": "x"}]}\n', r"bad\.jsonl:1: turn 0 has role 'wizard'"),
    ('{"prompt": "x", "completion": "y"}\n', r"bad\.jsonl:1: unknown row"),
    ('[1, 2]\n', r"bad\.jsonl:1: expected an object"),
])
def test_bad_rows_name_file_and_line(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f)


def test_json_array_errors_point_at_the_row_line(tmp_path: Path) -> None:
    f = tmp_path / "arr.json"
    f.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(DatasetError, match=r"arr\.json:3: field 'output'"):
        load_dataset(f)


def test_loss_falls_on_assistant_tokens_only(starter_gguf: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from localchat.datasets import Example
    from localchat.finetune.encode import IGNORE, encode, pack
    from tests.checkpoints import starter_hf

    folder = starter_hf(starter_gguf)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    template = (folder / "chat_template.jinja").read_text()
    ex = Example(messages=({"role": "user", "content": "What is my cat called?"},
                           {"role": "assistant", "content": "Your cat is called Biscuit."},
                           {"role": "user", "content": "And her age?"},
                           {"role": "assistant", "content": "She is four."}))
    e = encode(ex, tok, template, 512)
    trained = tok.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE])
    assert trained == "Your cat is called Biscuit.<|im_end|>She is four.<|im_end|>"
    assert "cat called?" in tok.decode(e.input_ids)  # the question is there, untrained
    assert e.input_ids == tok(tok.apply_chat_template(list(ex.messages), tokenize=False),
                              add_special_tokens=False)["input_ids"]  # same as transformers renders it
    packed = pack([e, e, e], max_len=2 * len(e.input_ids))
    assert [len(p.input_ids) for p in packed] == [2 * len(e.input_ids), len(e.input_ids)]
