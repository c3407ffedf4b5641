"""From a model spec to a loaded backend: resolve, probe, plan, load. Used by every front end."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .engine.backend import Backend
from .engine.registry import load_backend
from .hardware import HardwareReport, probe
from .planner import Overrides, Plan, plan
from .store import ResolvedModel, Store, default_store, resolve_model


@dataclass
class LoadedModel:
    model: ResolvedModel
    plan: Plan
    backend: Backend


def plan_model(spec: str, overrides: Overrides | None = None, store: Store | None = None,
               report: HardwareReport | None = None) -> tuple[ResolvedModel, Plan]:
    resolved = resolve_model(spec, store or default_store())
    return resolved, plan(report or probe(), resolved.artifacts, overrides, resolved.measured)


def open_model(spec: str, overrides: Overrides | None = None, store: Store | None = None,
               report: HardwareReport | None = None) -> LoadedModel:
    resolved, p = plan_model(spec, replace(overrides or Overrides(), in_process=True), store, report)
    return LoadedModel(resolved, p, load_backend(p))
