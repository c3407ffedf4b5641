"""Options shared by the commands that run a model."""

from __future__ import annotations

import argparse

from ..planner import Overrides
from ..store import DEFAULT_MODEL


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and the planner's overrides (typed once in `Overrides`, as `serve` and `ui` take theirs)."""
    parser.add_argument("--model", "-m", default=DEFAULT_MODEL,
                        help=f"a model in the store, a GGUF file, or a model folder (default: {DEFAULT_MODEL})")
    Overrides.add_arguments(parser)


def overrides_from(args: argparse.Namespace) -> Overrides:
    return Overrides.from_args(args)
