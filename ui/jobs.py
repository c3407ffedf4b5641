"""Long work (pull, import, convert, fine-tune) as a child process the app watches.

A child process keeps the chat responsive (no GIL or OpenMP contention inside the app),
survives a closed browser tab, and runs exactly the CLI command a user could type, so the
UI and the CLI cannot drift apart. Progress comes from the command's own tqdm bars.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

_PERCENT = re.compile(r"(\d{1,3})%\|")
# Lines the log leaves out: GPTQModel's import banner, torch's import notes, and llama.cpp's
# per-tensor fallback warnings (the command's own summary says what they mean for the model).
_NOISE = re.compile(r"^(INFO|WARN)(\s+(ENV:|Python GIL)|$)|^[┌│└]|^(GPT-QModel|Transformers|Torch|Triton)\s+:"
                    r"|^W\d{4} .*torch/|^Failed to load CPU gemm"
                    r"|^warning: blk\..*falling back to|^llama_model_quantize_impl: WARNING: .*fallback")
_TAIL_LINES = 40


@dataclass
class Job:
    title: str
    argv: list[str]
    proc: subprocess.Popen
    started: float = field(default_factory=time.monotonic)
    lines: deque = field(default_factory=lambda: deque(maxlen=_TAIL_LINES))
    percent: int | None = None
    stage: str = ""
    ended: float | None = None
    target: str = ""  # the model a fine-tune makes: the tab plots its loss, whatever the Name box says
    # Where each stage's own bar sits in the job's one bar: {"training": (5, 85), ...}; a job without
    # it shows each bar as it comes. With it the bar never runs backwards when the next stage starts.
    phases: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        """Until the command has exited and its last lines are read (`ended`): a job shown as done or
        failed comes with its whole log, and a failure with its own error line."""
        return self.ended is None

    @property
    def ok(self) -> bool:
        return not self.running and self.proc.returncode == 0

    def status(self) -> str:
        elapsed = (self.ended or time.monotonic()) - self.started
        rc = None if self.running else self.proc.returncode
        if rc is None:
            where = f" {self.percent}%" if self.percent is not None else ""
            return f"{self.title}: running{where} ({elapsed:.0f} s) {self.stage}".rstrip()
        if rc == 0:
            return f"OK: {self.title}: done in {elapsed:.0f} s"
        if rc in (130, -signal.SIGINT, -signal.SIGTERM):
            return f"{self.title}: stopped after {elapsed:.0f} s"
        err = next((l for l in reversed(self.lines) if "error" in l.lower()), self.lines[-1] if self.lines else "")
        return f"Error: {self.title}: failed ({err or f'exit code {rc}'})"

    @property
    def args(self) -> list[str]:
        """The `localchat` command line the job runs (what a user would type after `localchat`)."""
        return self.argv[3:]

    def log(self) -> str:
        return "\n".join(self.lines)


class JobRunner:
    """One job at a time: on a laptop two conversions would only slow each other down."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.current: Job | None = None
        self._lock = threading.Lock()

    def start(self, title: str, args: list[str], target: str = "",
              phases: dict[str, tuple[int, int]] | None = None) -> Job:
        with self._lock:
            if self.current is not None and self.current.running:
                raise RuntimeError(f"{self.current.title} is still running; wait for it or stop it first")
            argv = [sys.executable, "-m", "localchat", *args]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
                                    stdin=subprocess.DEVNULL)
            job = Job(title, argv, proc, target=target, phases=phases or {})
            threading.Thread(target=self._read, args=(job,), daemon=True).start()
            self.current = job
            return job

    def _read(self, job: Job) -> None:
        assert job.proc.stdout is not None
        buf = b""
        while block := job.proc.stdout.read1(4096):
            buf += block
            *parts, buf = re.split(rb"[\r\n]", buf)
            for raw in parts:
                self._line(job, raw.decode("utf-8", "replace").strip())
        self._line(job, buf.decode("utf-8", "replace").strip())
        job.proc.wait()
        job.ended = time.monotonic()

    @staticmethod
    def _line(job: Job, line: str) -> None:
        if not line or _NOISE.search(line):
            return
        m = _PERCENT.search(line)
        if m:
            pct = min(100, int(m.group(1)))
            job.stage = line.split("|")[0].rstrip(": 0123456789%")[:60]
            span = next((v for k, v in job.phases.items() if job.stage.startswith(k)), None)
            if span:
                job.percent = max(job.percent or 0, span[0] + (span[1] - span[0]) * pct // 100)
            elif not job.phases:
                job.percent = pct
            if job.lines and _PERCENT.search(job.lines[-1]):
                job.lines[-1] = line  # a progress bar redraws one line
                return
        job.lines.append(line)

    def stop(self) -> str:
        job = self.current
        if job is None or not job.running:
            return "nothing is running"
        job.proc.send_signal(signal.SIGINT)  # fine-tune saves a checkpoint on Ctrl-C
        try:
            job.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.proc.terminate()
        return f"stopped {job.title}"
