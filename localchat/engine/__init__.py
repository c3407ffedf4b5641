"""Inference engines behind one interface."""

from .backend import Backend, Chunk, ContextOverflow, GenerationStats, ModelTemplate
from .registry import load_backend
from .settings import SamplingSettings

__all__ = ["Backend", "Chunk", "ContextOverflow", "GenerationStats", "ModelTemplate",
           "SamplingSettings", "load_backend"]
