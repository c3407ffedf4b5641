"""The UI's job runner: a real `localchat` child process, its progress and its end."""

from __future__ import annotations

import time
from pathlib import Path

from localchat.store import Store
from localchat.ui.jobs import JobRunner


def _wait(runner: JobRunner, limit: float = 120) -> None:
    deadline = time.time() + limit
    while runner.current.running:
        assert time.time() < deadline, runner.current.log()
        time.sleep(0.1)
    time.sleep(0.2)  # the reader thread drains the last lines


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
