"""What every tab of the app shares: the store, saved chats, the loaded model, the job runner."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable

from localchat.hardware import HardwareReport, probe
from localchat.planner import Overrides, Plan
from localchat.runtime import plan_model
from localchat.store import Store
from localchat.store.chats import ChatHistory

from .jobs import JobRunner
from .loss_log import LossLog
from .model_slot import ModelSlot

RUNNABLE = ("gguf", "gptq", "lora")


@dataclass
class AppContext:
    store: Store
    overrides: Overrides = field(default_factory=Overrides)

    def __post_init__(self) -> None:
        self.history = ChatHistory(self.store.root / "chats")
        self.slot = ModelSlot(self.store, self.overrides)
        self.jobs = JobRunner({"LOCALCHAT_HOME": str(self.store.root)})
        self.cancels: dict[str, threading.Event] = {}  # per browser session: what Stop sets
        self.loss_log = LossLog()
        self._lock = threading.Lock()
        self._table: tuple[object, list[list[str]]] | None = None  # the Models table, for a store stamp

    def answering(self, session: str) -> bool:
        """Whether an answer is being written for this browser session (Stop has not ended it)."""
        running = self.cancels.get(session)
        return running is not None and not running.is_set()

    @cached_property
    def report(self) -> HardwareReport:
        return probe()  # probed once; the Models tab's refresh probes again

    def reprobe(self) -> None:
        self.__dict__.pop("report", None)
        self._table = None  # planned for the hardware as probed before

    def models_table(self, rows: Callable[[], list[list[str]]]) -> list[list[str]]:
        """`rows()` made once per store change, not per page or timer tick: each row plans its model,
        which reads the model's files; many pages open would each plan every model again."""
        stamp = self.store_stamp()
        with self._lock:
            if self._table is None or self._table[0] != stamp:
                self._table = (stamp, rows())
            return self._table[1]

    def store_stamp(self) -> tuple[int, int, int] | None:
        """The manifest's inode, size and mtime: a stat per timer tick tells whether any process
        (this app, `localchat import`, a job) changed the store since a page last listed it."""
        try:
            st = self.store.manifest_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def chat_models(self) -> list[str]:
        return [n for n, e in self.store.models().items() if e.format in RUNNABLE]

    def _plan(self, name: str) -> tuple[Plan | None, str]:
        """The plan, or why the model cannot run here (shown to the user, not raised)."""
        try:
            # as the app loads it (open_model): in this process
            return plan_model(name, replace(self.overrides, in_process=True), self.store, self.report)[1], ""
        except Exception as exc:
            return None, str(exc)

    def plan_text(self, name: str) -> str:
        p, why = self._plan(name)
        return f"store:   {name}\n{p.describe()}" if p else f"cannot run {name} here: {why}"

    def backend_for(self, name: str) -> str:
        p, why = self._plan(name)
        return p.backend if p else f"cannot run: {why[:80]}"

    def close(self) -> None:
        self.slot.close()
