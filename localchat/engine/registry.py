"""Backend name -> the class that runs it, as the planner's backend table names it; imported
only when chosen (so torch loads only for the GPTQ backend, and only when the planner picks it)."""

from __future__ import annotations

import importlib

from ..planner import Plan, backend_spec
from .backend import Backend


def load_backend(plan: Plan) -> Backend:
    module_name, cls_name = backend_spec(plan.backend).engine.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(plan)
