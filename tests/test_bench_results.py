"""The README's benchmark figures come from bench/results.json, and evaluation text is not
calibration text. Fast: no benchmark runs here, only files are read."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results.json"
EVAL = ROOT / "localchat" / "data" / "eval_chats.jsonl"
CALIBRATION = ROOT / "convert" / "data" / "calibration_chats.jsonl"
CALIBRATION_PROSE = ROOT / "convert" / "data" / "calibration_prose.txt"
# A number as a reader sees one: not part of a name like Q4_K_M, SmolLM2-135M, LLaMA-2-7B or fp32.
NUMBER = re.compile(r"(?<![\w\-.])\d+(?:\.\d+)?")


def _readme_module():
    spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "bench" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section() -> str:
    return _readme_module().section_of((ROOT / "README.md").read_text(encoding="utf-8"))


def _numbers_in(value: object) -> list[float]:
    """Every number in the results file: its values, and the numbers inside its strings."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        return [float(m) for m in NUMBER.findall(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers_in(v)]
    return []


def test_readme_benchmark_section_is_generated_from_results():
    """Drift: README.md's section between the bench markers is exactly what bench/readme.py makes
    of bench/results.json (rerun `python bench/readme.py` after changing either)."""
    readme = _readme_module()
    expected = readme.render(json.loads(RESULTS.read_text(encoding="utf-8")))
    assert _section() == expected, "README.md's benchmark section is stale: run python bench/readme.py"


def test_every_bench_make_bench_runs_has_its_readme_paragraph():
    """A bench added to bench/run_all.py without a writer in bench/readme.py would be measured into
    results.json and never shown; one in the README's order is the same list in both."""
    spec = importlib.util.spec_from_file_location("bench_run_all", ROOT / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    assert list(_readme_module().WRITERS) == list(run_all.BENCHES)


def test_every_number_in_the_benchmark_section_is_in_results():
    """Hand-written figures: each number printed in the section is a number of results.json,
    rounded as printed (so no figure is typed in or derived by hand)."""
    known = _numbers_in(json.loads(RESULTS.read_text(encoding="utf-8")))
    section = _section()
    assert NUMBER.search(section), "the benchmark section shows no figures"
    missing = []
    for token in NUMBER.findall(section):
        digits = len(token.split(".")[1]) if "." in token else 0
        printed = token.lstrip("0") if not token.startswith("0.") else token  # "00" of a time is 0
        printed = "0" + printed if printed.startswith(".") or not printed else printed
        if not any(f"{x:.{digits}f}" == printed for x in known):
            missing.append(token)
    assert not missing, f"numbers in README.md's benchmark section that are not in {RESULTS.name}: {missing}"


def _messages(path: Path) -> list[tuple[int, str]]:
    return [(n, m["content"]) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            for m in json.loads(line)["messages"] if m["role"] != "system"]


def _runs(text: str, n: int = 8) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_no_evaluation_question_or_answer_is_in_the_calibration_set():
    """Leak: an evaluation chat whose question or answer is also a calibration message scores GPTQ
    on text it was calibrated on."""
    calibration = {text.strip().lower() for _, text in _messages(CALIBRATION)}
    shared = [f"{EVAL.name} line {n}: {text[:60]!r}" for n, text in _messages(EVAL)
              if text.strip().lower() in calibration]
    assert not shared, f"evaluation messages also in {CALIBRATION.name}: {shared}"


def test_evaluation_text_shares_no_passage_with_calibration_text():
    """Near-copies: no evaluation message shares a run of 8 words with the calibration chats or prose
    (a reworded question over a copied answer is still a leak)."""
    calibration = set().union(*(_runs(text) for _, text in _messages(CALIBRATION)),
                              _runs(CALIBRATION_PROSE.read_text(encoding="utf-8")))
    shared = [f"{EVAL.name} line {n}: {' '.join(sorted(_runs(text) & calibration)[0])!r}"
              for n, text in _messages(EVAL) if _runs(text) & calibration]
    assert not shared, f"evaluation text that is also calibration text: {shared}"


def _bench_recall():
    spec = importlib.util.spec_from_file_location("bench_recall", ROOT / "bench" / "bench_recall.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_recall_bench_asks_only_questions_no_training_row_holds():
    """Leak: a paraphrase the recall benchmark asks, or one of its general questions, that is a training
    question (or one of the replay prompts finetune trains on by default) scores recall of a row, not of
    a fact, or general knowledge the run rehearsed."""
    bench = _bench_recall()
    from localchat.finetune.replay import prompts

    trained = {q.strip().lower() for f in bench.FACTS for q, _ in f.rows} | {p.strip().lower() for p in prompts()}
    asked = [q for f in bench.FACTS for q in f.paraphrases] + [q for q, _ in bench.GENERAL]
    assert not [q for q in asked if q.strip().lower() in trained]
    assert all(len(f.paraphrases) >= 3 and 6 <= len(f.rows) <= 10 for f in bench.FACTS) and len(bench.FACTS) >= 3
