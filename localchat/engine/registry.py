"""Backend name -> the class that runs it, imported only when chosen (so torch loads only
for the GPTQ backend, and only when the planner picks it)."""

from __future__ import annotations

import importlib

from ..planner import Plan
from .backend import Backend

BACKEND_CLASSES: dict[str, str] = {
    "llamacpp-cpu": "localchat.engine.llamacpp:LlamaCppBackend",
    "llamacpp-metal": "localchat.engine.llamacpp:LlamaCppBackend",
    "llamacpp-cuda": "localchat.engine.llamacpp:LlamaCppBackend",
    "gptq-cuda": "localchat.engine.gptq:GptqBackend",
    "gptq-cpu": "localchat.engine.gptq:GptqBackend",
}


def load_backend(plan: Plan) -> Backend:
    try:
        module_name, cls_name = BACKEND_CLASSES[plan.backend].split(":")
    except KeyError:
        raise ValueError(f"unknown backend {plan.backend!r}; valid: {', '.join(BACKEND_CLASSES)}") from None
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(plan)
