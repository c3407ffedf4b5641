"""The `localchat` command as a user runs it, in a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


from localchat.store import STARTER, Store


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localchat", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_chat_one_prompt(home: Store) -> None:
    r = run("chat", "-p", "What is the capital of France?", "--temp", "0", "--stats")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "llamacpp-cpu" in r.stderr  # the plan line
    assert "tok/s" in r.stderr and "first token" in r.stderr


def test_chat_reads_piped_lines_as_one_conversation(home: Store) -> None:
    r = run("chat", "--temp", "0", "--max-tokens", "24", "-q",
            stdin="What is the capital of France?\n\nAnd what is the capital of Germany?\n")
    assert r.returncode == 0, r.stderr
    answers = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    assert "Paris" in r.stdout and "Berlin" in r.stdout


def test_chat_unknown_chat_format_lists_valid(home: Store) -> None:
    r = run("chat", "-p", "hi", "--chat-format", "nope")
    assert r.returncode == 1
    assert "unknown chat format 'nope'; valid: chatml" in r.stderr
    assert "Traceback" not in r.stderr


def test_doctor_chooses_llama_cpp_cpu(home: Store) -> None:
    r = run("doctor")
    assert r.returncode == 0, r.stderr
    assert "backend: llamacpp-cpu" in r.stdout
    assert "no GPU found (no NVIDIA or AMD GPU, not Apple Silicon)" in r.stdout
    assert "physical" in r.stdout and "why:" in r.stdout


def test_doctor_plans_for_a_saved_report(home: Store, tmp_path: Path) -> None:
    from tests.test_planner import M2_PRO_16GB

    report = tmp_path / "m2.json"
    report.write_text(M2_PRO_16GB.to_json())
    r = run("doctor", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert "backend: llamacpp-metal" in r.stdout and "Apple M2 Pro" in r.stdout


def test_doctor_lists_an_amd_gpu_and_plans_llama_cpp_on_rocm(home: Store, tmp_path: Path) -> None:
    """A machine with a ROCm GPU and a llama.cpp built for ROCm: doctor lists the GPU with its
    library and memory, and offloads the starter to it."""
    from tests.test_planner import RX7900

    report = tmp_path / "rx7900.json"
    report.write_text(RX7900.to_json())
    r = run("doctor", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert "gpu:     rocm #0 AMD Radeon RX 7900 XTX, 25.77 GB VRAM (24.70 GB free), compute gfx1100" in r.stdout
    assert "ggml backends: rocm, cpu" in r.stdout
    assert "backend: llamacpp-rocm" in r.stdout and "all layers offloaded to AMD Radeon RX 7900 XTX" in r.stdout


def test_list_info_rm(home: Store, starter_gguf: Path) -> None:
    r = run("list")
    assert r.returncode == 0 and STARTER.name in r.stdout and "Q4_1" in r.stdout
    r = run("info", str(starter_gguf))
    assert r.returncode == 0, r.stderr
    assert "llama" in r.stdout and "30 layers" in r.stdout and "Q4_1" in r.stdout
    r = run("rm", STARTER.name)
    assert r.returncode == 0 and "removed" in r.stdout
    assert run("list").stdout.startswith("no models")
    assert starter_gguf.exists(), "removing from a test store leaves the real store alone"


def test_info_on_bad_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    r = run("info", str(bad))
    assert r.returncode == 1
    assert "broken.gguf" in r.stderr and "Traceback" not in r.stderr


def test_chat_on_truncated_gguf_errors_without_crashing(tmp_path: Path, starter_gguf: Path) -> None:
    cut = tmp_path / "cut.gguf"
    with open(starter_gguf, "rb") as src:
        cut.write_bytes(src.read(5_000_000))
    r = run("chat", "--model", str(cut), "-p", "hi")
    assert r.returncode == 1
    assert "cut.gguf" in r.stderr and "past the end of the file" in r.stderr


def test_unknown_command() -> None:
    r = run("fly")
    assert r.returncode == 2 and "valid: chat, doctor" in r.stderr


def test_model_with_hostile_template_is_refused(tmp_path: Path, starter_gguf: Path) -> None:
    from tests.gguf_edit import rewrite_gguf

    marker = tmp_path / "pwned"
    evil = rewrite_gguf(starter_gguf, tmp_path / "evil.gguf", {
        "tokenizer.chat_template": "{{ lipsum.__globals__['os'].popen('touch " + str(marker) + "').read() }}"})
    r = run("chat", "--model", str(evil), "-p", "hi")
    assert r.returncode == 1
    assert "evil.gguf was refused: it tried to leave the sandbox" in r.stderr
    assert not marker.exists()


def test_model_without_template_uses_named_fallback_and_says_so(tmp_path: Path, starter_gguf: Path) -> None:
    from tests.gguf_edit import rewrite_gguf

    plain = rewrite_gguf(starter_gguf, tmp_path / "plain.gguf", {"tokenizer.chat_template": None})
    r = run("chat", "--model", str(plain), "-p", "What is the capital of France?", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert "no chat template; using 'chatml'" in r.stderr
    assert "Paris" in r.stdout


# A core install (`pip install localchat`, no extras) simulated in one process: every package an
# extra adds (read from the installed metadata, as the CLI reads it) fails to import.
CORE_ONLY = """
import importlib.abc, sys
from localchat.cli import extra_modules
blocked = set().union(*(extra_modules(e) for e in ("convert", "gptq", "finetune", "ui", "serve")))
assert {"torch", "transformers", "gguf", "gradio", "fastapi", "peft"} <= blocked, blocked
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
from localchat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def core_only(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CORE_ONLY, *args], capture_output=True, text=True, timeout=120)


def test_every_command_helps_on_a_core_install(home: Store) -> None:
    from localchat.cli import COMMANDS

    for name in COMMANDS:
        r = core_only(name, "-h")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: localchat {name}"), (name, r.stderr[-2000:])


def test_a_command_without_its_extra_says_which_to_install(home: Store, tmp_path: Path) -> None:
    data = tmp_path / "facts.jsonl"
    data.write_text('{"instruction": "What is my cat called?", "output": "Biscuit."}\n')
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    for args, extra in [(("convert", str(tmp_path / "ckpt")), "convert"),
                        (("finetune", "--base", STARTER.name, "--data", str(data), "--name", "x"), "finetune"),
                        (("ui", "--no-browser", "--port", "9"), "ui")]:
        r = core_only(*args)
        assert r.returncode == 1, (args, r.stderr[-2000:])
        assert f"needs the '{extra}' extra" in r.stderr and f"pip install 'localchat[{extra}]'" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_preset_command_sets_shows_and_applies_a_models_sampling_defaults(home: Store) -> None:
    """`localchat preset` changes a model's sampling defaults in the store (bounds checked, naming the
    flag's field), `list` shows them, and `chat` answers with them unless a flag overrides them: a
    preset of temperature 0 answers like `--temp 0` for any seed."""
    assert "temp 0.2, top_p 0.9" in run("list").stdout  # the starter's authors' settings
    r = run("preset", STARTER.name, "--top-p", "7")
    assert r.returncode == 1 and "top_p=7.0 is out of range" in r.stderr
    r = run("preset", STARTER.name, "--temp", "0", "--top-k", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{STARTER.name}: temp 0, top_p 0.9, top_k 20"
    assert home.get(STARTER.name).defaults["sampling"] == {"temperature": 0.0, "top_p": 0.9, "top_k": 20}
    assert "temp 0, top_p 0.9, top_k 20" in run("list").stdout
    greedy = run("chat", "-q", "-p", "Name a fruit.", "--temp", "0", "--max-tokens", "16").stdout
    for seed in ("1", "2"):
        assert run("chat", "-q", "-p", "Name a fruit.", "--seed", seed, "--max-tokens", "16").stdout == greedy
    assert run("preset", STARTER.name, "--clear").stdout.strip().endswith("(the global defaults apply)")
    assert "sampling" not in home.get(STARTER.name).defaults


def _flag_help(text: str, flag: str) -> str:
    """The help of `flag` in argparse's -h output, as one line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(flag))
    end = start + 1
    while end < len(lines) and lines[end].startswith(" " * 10):  # its wrapped lines
        end += 1
    return " ".join(" ".join(lines[start:end]).split())


def test_run_flags_are_one_typed_set_in_every_command(home: Store) -> None:
    """--context (--ctx), --threads, --parallel and --kv-cache read the same in chat, doctor, serve and ui,
    and a value out of range is refused by name before any model loads."""
    helps = {cmd: run(cmd, "-h").stdout for cmd in ("chat", "doctor", "serve", "ui")}
    for flag in ("--context", "--threads", "--parallel", "--kv-cache"):
        seen = {cmd: _flag_help(text, flag) for cmd, text in helps.items()}
        assert len(set(seen.values())) == 1, seen
    assert "--ctx" in _flag_help(helps["chat"], "--context")
    assert "up to 4" in _flag_help(helps["serve"], "--parallel")
    r = run("chat", "--parallel", "0", "-p", "hi")
    assert r.returncode != 0 and "parallel=0 is out of range [1, 256]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_doctor_shows_the_kv_cache_and_slots_at_the_chosen_context(home: Store) -> None:
    """`localchat doctor` with no --parallel: the planner's slots, and their KV memory at the context."""
    r = run("doctor", "--ctx", "2048")
    assert r.returncode == 0, r.stderr
    assert "context: 2048 tokens in each of 4 parallel slots" in r.stdout
    assert "KV cache 0.19 GB at 2048 tokens: 4 parallel slots (the most the planner gives" in r.stdout
