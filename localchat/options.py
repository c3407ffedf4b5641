"""Typed settings that generate their own CLI flags and check their own bounds.

A settings class is a frozen dataclass whose fields carry `option(...)` metadata; the
same class then builds argparse flags, validates values from any front end (CLI, UI,
HTTP), and cannot drift apart from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Sequence

MISSING = dataclasses.MISSING


def option(default: Any, help: str, lo: float | None = None, hi: float | None = None, flag: str = "",
           choices: Sequence[str] | None = None, aliases: Sequence[str] = ()) -> Any:
    """A settings field: its default, help, bounds, flag (default: --field-name), the values it may take
    and other flags that set it too (a name older commands used)."""
    factory = (lambda d=default: tuple(d)) if isinstance(default, tuple) else None
    meta = {"help": help, "min": lo, "max": hi, "flag": flag, "choices": choices, "aliases": tuple(aliases)}
    if factory:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def internal(default: Any) -> Any:
    """A settings field a program sets, never a flag (which kind of front end asks, say)."""
    return dataclasses.field(default=default, metadata={"internal": True})


def _kind(cls: type, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def validate(obj: Any) -> None:
    """Raise ValueError naming the field whose value is out of range or of the wrong type."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = _kind(type(obj), f)
        if value is None or kind in (tuple, list):
            continue
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            continue
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(f"{f.name} must be a string, got {value!r}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{f.name}={value!r} is not one of {', '.join(choices)}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise ValueError(f"{f.name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if value != value or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ValueError(f"{f.name}={value!r} is out of range [{lo}, {hi}]")


def add_arguments(parser: argparse.ArgumentParser, cls: type, title: str,
                  only: Sequence[str] | None = None) -> None:
    """Flags for the fields of `cls` (those named in `only`, if given)."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.metadata.get("internal"):
            continue
        flags = (f.metadata.get("flag") or "--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ()))
        kind = _kind(cls, f)
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        text = f.metadata.get("help", "")
        if kind in (tuple, list):
            group.add_argument(*flags, dest=f.name, action="append", default=None, help=f"{text} (repeatable)")
            continue
        if kind is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} (default: {'on' if default else 'off'})")
        else:
            group.add_argument(*flags, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"),
                               help=text if default is None else f"{text} (default: {default})")


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` whose flags were given on the command line."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return values


def from_args(cls: type, args: argparse.Namespace, base: Any = None, **overrides: Any) -> Any:
    """`cls` from the flags given, the rest from `base` (an instance: a model's own defaults, say)
    or the class defaults."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)} if base is not None else {}
    values.update(given(cls, args))
    values.update(overrides)
    return cls(**values)


class Options:
    """Base for settings dataclasses: bounds checked on creation, CLI flags generated."""

    option_group = "options"

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
        add_arguments(parser, cls, cls.option_group, only)

    @classmethod
    def from_args(cls, args: argparse.Namespace, base: Any = None, **overrides: Any) -> Any:
        return from_args(cls, args, base, **overrides)
