"""From a model spec to a loaded backend: resolve, probe, plan, load. Used by every front end
(the CLI, the app, the server), so a model runs the same way whichever one loads it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

from .engine.backend import Backend
from .engine.registry import load_backend
from .hardware import HardwareReport, probe
from .planner import Overrides, Plan, plan
from .store import ResolvedModel, Store, default_store, resolve_model

if TYPE_CHECKING:
    from .engine.batching import Engine


@dataclass(eq=False)
class LoadedModel:
    model: ResolvedModel
    plan: Plan
    backend: Backend

    @cached_property
    def engine(self) -> Engine:
        """What decodes for many callers (the server, the app): up to the plan's slots at once in one
        batch (llama.cpp), one answer at a time otherwise. Started on first use; from then on
        `backend.stream` decodes through it too."""
        return self.backend.engine(self.plan.slots)

    def close(self) -> None:
        """Stop the engine, if started (waiting for the step in progress), and free the model."""
        if "engine" in self.__dict__:
            self.engine.close()
        self.backend.close()


def plan_model(spec: str, overrides: Overrides | None = None, store: Store | None = None,
               report: HardwareReport | None = None) -> tuple[ResolvedModel, Plan]:
    """Resolve `spec` and plan it for this machine (or `report`); PlanError when it cannot run here."""
    resolved = resolve_model(spec, store or default_store())
    return resolved, plan(report or probe(), resolved.artifacts, overrides, resolved.measured)


def load_model(resolved: ResolvedModel, p: Plan, start_engine: bool = False) -> LoadedModel:
    """Load what `plan_model` chose (a caller may free memory in between, as the server does);
    `start_engine`: its engine's context and thread now (the server, the app), not in the first
    answer's time, the model freed again if that fails."""
    loaded = LoadedModel(resolved, p, load_backend(p))
    if start_engine:
        try:
            loaded.engine
        except BaseException:
            loaded.close()
            raise
    return loaded


def open_model(spec: str, overrides: Overrides | None = None, store: Store | None = None,
               report: HardwareReport | None = None, start_engine: bool = False) -> LoadedModel:
    resolved, p = plan_model(spec, replace(overrides or Overrides(), in_process=True), store, report)
    return load_model(resolved, p, start_engine)
