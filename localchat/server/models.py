"""The models a server keeps loaded, and the fair queue in front of each.

A model loads on first use and stays; when another one needs the memory (or the
`max_models` cap is reached) the least recently used idle model is unloaded, and any model
idle for its keep-alive (the server's, or what the last request set) is unloaded by `reap`. Each model's
engine decodes its requests (llama.cpp: up to `parallel` at once, in one batch, the rest
waiting in arrival order; others one at a time); `Ticket`s count the requests waiting or
running so a full queue is refused up front instead of piling up.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..engine.backend import Backend
from ..engine.batching import Engine
from ..engine.settings import SamplingSettings, model_settings
from ..hardware import HardwareReport, probe
from ..planner import Overrides, Plan, PlanError, host_budget
from ..runtime import LoadedModel, load_model, plan_model
from ..store import Store
from .settings import ServerSettings


RUNNABLE_FORMATS = ("gguf", "gptq", "lora")  # store formats a backend can serve ("hf" needs converting first)


def keep_alive_seconds(seconds: float) -> float | None:
    """A keep-alive as ServedModel holds it: negative means until the server stops (None)."""
    return None if seconds < 0 else seconds


class ServerError(Exception):
    """An error with an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_


def load_failed(name: str, exc: Exception) -> ServerError:
    """A model in the store that cannot be loaded: the server's fault, not the request's."""
    return ServerError(500, f"the model {name!r} cannot be loaded: {exc}", "model_load_failed", "model",
                       "server_error")


@dataclass(eq=False)
class ServedModel:
    """A model the server keeps loaded (loaded as the CLI and the app load it: runtime.py), with its queue."""

    name: str
    loaded: LoadedModel
    settings: SamplingSettings  # the model's preset: what a request's sampling fields override
    tickets: int = 0
    last_used: float = field(default_factory=time.monotonic)
    keep_alive: float | None = None  # seconds it stays loaded once idle (None: until the server stops)

    @property
    def plan(self) -> Plan:
        return self.loaded.plan

    @property
    def backend(self) -> Backend:
        return self.loaded.backend

    @property
    def engine(self) -> Engine:
        """Decodes every request on one thread of its own (engine/batching.py): llama.cpp's OpenMP keeps
        a spinning thread team per calling thread, and teams from several threads fight over the cores."""
        return self.loaded.engine

    @property
    def defaults(self) -> dict[str, Any]:
        return self.loaded.model.defaults

    @property
    def expires(self) -> float | None:
        """When (time.monotonic) an idle model unloads; None: never."""
        return None if self.keep_alive is None else self.last_used + self.keep_alive

    @property
    def idle(self) -> bool:
        return self.tickets == 0


class Ticket:
    """A request's place in a model's queue; released exactly once."""

    def __init__(self, model: ServedModel) -> None:
        self.model = model
        model.tickets += 1
        model.last_used = time.monotonic()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.model.tickets -= 1


class ModelManager:
    def __init__(self, store: Store, settings: ServerSettings,
                 report: Callable[[], HardwareReport] = probe) -> None:
        self.store, self.settings, self._report = store, settings, report
        self.loaded: dict[str, ServedModel] = {}
        self._load_lock = asyncio.Lock()
        self.budget = host_budget(report())  # RAM for models, measured before any is loaded

    def names(self) -> list[str]:
        return [n for n, e in self.store.models().items() if e.format in RUNNABLE_FORMATS]

    async def ticket(self, name: str) -> Ticket:
        """Load `name` if needed and take a place in its queue, or raise ServerError."""
        model = self.loaded.get(name) or await self._load(name)
        if model.tickets >= self.settings.max_queue:
            raise ServerError(429, f"model {name!r} has {model.tickets} requests queued "
                                   f"(limit {self.settings.max_queue}); retry later",
                              "rate_limit_exceeded", type_="rate_limit_error")
        return Ticket(model)

    def _in_use(self) -> int:
        return sum(m.plan.memory.host_bytes for m in self.loaded.values())

    async def _load(self, name: str) -> ServedModel:
        async with self._load_lock:
            if name in self.loaded:
                return self.loaded[name]
            if name not in self.names():  # only store names: no paths from the network
                raise ServerError(404, f"the model {name!r} does not exist; available: "
                                       f"{', '.join(self.names()) or 'none'}", "model_not_found", "model")
            try:
                overrides = Overrides.of(self.settings, in_process=True)  # the engine runs in this process
                resolved, p = plan_model(name, overrides, self.store, self._report())
                preset = model_settings(resolved.defaults, f"model {name!r}: the sampling preset in "
                                                           f"{self.store.manifest_path}")
            except PlanError as exc:
                raise ServerError(503, f"cannot run {name!r} here: {exc}", "model_does_not_fit",
                                  type_="server_error") from None
            except Exception as exc:  # a damaged file in the store: say which model and why
                raise load_failed(name, exc) from None
            while self.loaded and (len(self.loaded) >= self.settings.max_models
                                   or self._in_use() + p.memory.host_bytes > self.budget):
                idle = [m for m in self.loaded.values() if m.idle]
                if not idle:
                    raise ServerError(503, f"loading {name!r} needs memory that busy models hold; "
                                           "retry when they finish", "server_busy", type_="server_error")
                self.unload(min(idle, key=lambda m: m.last_used).name)
            try:
                loaded = await asyncio.to_thread(load_model, resolved, p, True)
            except Exception as exc:
                raise load_failed(name, exc) from None
            model = ServedModel(name, loaded, preset, keep_alive=keep_alive_seconds(self.settings.keep_alive))
            self.loaded[name] = model
            return model

    def reap(self) -> list[str]:
        """Unload the idle models whose keep-alive has run out; their names."""
        now = time.monotonic()
        gone = [m.name for m in self.loaded.values() if m.idle and m.expires is not None and m.expires <= now]
        for name in gone:
            self.unload(name)
        return gone

    async def reap_forever(self, every: float = 0.25) -> None:
        """`reap` until cancelled (the app's lifespan runs it)."""
        while True:
            await asyncio.sleep(every)
            self.reap()

    def unload(self, name: str) -> None:
        self.loaded.pop(name).loaded.close()  # waits for the step in progress

    def close(self) -> None:
        for name in list(self.loaded):
            self.unload(name)
