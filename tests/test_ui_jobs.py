"""The UI's job runner: a real `localchat` child process, its progress and its end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from localchat.store import Store
from localchat.ui.jobs import Job, JobRunner


def _wait(runner: JobRunner, limit: float = 120) -> None:
    deadline = time.time() + limit
    while runner.current.running:  # until its last lines are read, too
        assert time.time() < deadline, runner.current.log()
        time.sleep(0.1)


def test_import_job_lands_in_the_store(home: Store, starter_gguf: Path) -> None:
    runner = JobRunner({"LOCALCHAT_HOME": str(home.root)})
    job = runner.start("import", ["import", str(starter_gguf), "--name", "via-job"])
    try:
        runner.start("again", ["list"])
        raise AssertionError("a second job started while the first ran")
    except RuntimeError as exc:
        assert "still running" in str(exc)
    _wait(runner)
    assert job.ok and "done in" in job.status() and "imported via-job" in job.log()
    assert "via-job" in home.models()


def test_a_job_ends_once_its_last_lines_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job whose command has exited runs on until its output is read: the app never shows it done (or
    failed, with a reason picked from its log) beside a log cut short. Here the lines are read slower
    than the command writes them."""
    read = JobRunner._line

    def slow(job: Job, line: str) -> None:
        time.sleep(0.05)
        read(job, line)

    monkeypatch.setattr(JobRunner, "_line", staticmethod(slow))
    runner = JobRunner()
    job = runner.start("help", ["--help"])
    _wait(runner)
    out = subprocess.run([sys.executable, "-m", "localchat", "--help"], capture_output=True, text=True).stdout
    assert job.ok and job.log().splitlines() == [line.strip() for line in out.splitlines() if line.strip()]


def test_failed_job_says_why(home: Store, tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope" * 100)
    runner = JobRunner({"LOCALCHAT_HOME": str(home.root)})
    runner.start("import x", ["import", str(bad)])
    _wait(runner)
    s = runner.current.status()
    assert s.startswith("Error: import x: failed") and "x.gguf" in s


def test_progress_bars_become_a_percentage() -> None:
    runner = JobRunner()
    job = runner.start("bar", ["--help"])
    _wait(runner)
    runner._line(job, "converting:  42%|████      | 114/272 [00:03<00:04]")
    runner._line(job, "converting:  57%|█████     | 155/272 [00:04<00:03]")
    assert job.percent == 57 and job.stage == "converting"
    assert sum("%|" in line for line in job.lines) == 1  # a bar redraws one line


def test_the_log_leaves_out_import_banners_and_per_tensor_fallback_warnings() -> None:
    """GPTQModel's banner, torch's import notes and llama.cpp's per-tensor fallback warnings stay out
    of the job log; the command's own lines, and its summary of the fallback, stay in."""
    runner = JobRunner()
    job = runner.start("noise", ["--help"])
    _wait(runner)
    job.lines.clear()
    for line in ["WARN  Python GIL is enabled: Multi-gpu quant acceleration for MoE models is sub-optimal",
                 "INFO  ENV: Auto setting CUDA_DEVICE_ORDER=PCI_BUS_ID for correctness.", "INFO",
                 "W1130 05:55:02.559000 10897 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum",
                 "┌─────────────┐ ┌────────────────────────┐", "│ GPT-QModel  │ -> │ ▓▓▓▓ 16bit │",
                 "└─────────────┘ └────────────────────────┘", "GPT-QModel   : 7.6.0", "Torch        : 2.14.1",
                 "warning: blk.0.ffn_up.weight - ncols 64 not divisible by 256 (required for type q4_K) -> "
                 "falling back to q5_0",
                 "llama_model_quantize_impl: WARNING: 15 of 21 tensor(s) required fallback quantization",
                 "- trained 30 updates: loss 10.371, held-out loss 10.174",
                 "- 16 of 21 tensors have rows that are not a multiple of 256, so llama.cpp stored them in a "
                 "fallback type (Q5_0/Q8_0) instead of Q4_K_M's K-quants"]:
        runner._line(job, line)
    assert job.log().splitlines() == ["- trained 30 updates: loss 10.371, held-out loss 10.174",
                                      "- 16 of 21 tensors have rows that are not a multiple of 256, so llama.cpp "
                                      "stored them in a fallback type (Q5_0/Q8_0) instead of Q4_K_M's K-quants"]


def test_a_fine_tune_shows_one_bar_over_its_stages() -> None:
    """The stages of a fine-tune (loading, training, converting) fill one bar that never runs back,
    where a job without stages shows each bar as it comes."""
    from localchat.ui.finetune_tab import PHASES

    runner = JobRunner()
    job = runner.start("ft", ["--help"], target="t1", phases=PHASES)
    _wait(runner)
    seen = []
    for line in ["Loading weights: 100%|██████████| 3/3", "training:  50%|█████     | 15/30",
                 "training: 100%|██████████| 30/30", "Loading weights:  10%|█         | 1/3",
                 "converting to t1-F16.gguf:  50%|█████     | 10/21"]:
        runner._line(job, line)
        seen.append(job.percent)
    assert seen == [5, 45, 85, 85, 90]
