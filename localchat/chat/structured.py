"""Answers with a shape: JSON that fits a schema, through a llama.cpp grammar.

A JSON schema becomes a GBNF grammar with llama-cpp-python's converter (a port of llama.cpp's
own json-schema-to-grammar); the sampler then allows only tokens that keep the answer inside
it, so even a small model gives JSON that parses and validates. A schema the converter cannot
handle is refused with the request field that holds it.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # response_format json_object


class ShapeError(ValueError):
    """A schema or tool definition that cannot constrain an answer; `param` names the request field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class Grammar:
    """GBNF rules built from JSON schemas on one converter (so shared rules are written once), and
    a root rule over them."""

    def __init__(self, prop_order: tuple[str, ...] = ()) -> None:
        self._converter = SchemaConverter(prop_order={k: i for i, k in enumerate(prop_order)}, allow_fetch=False,
                                          dotall=False, raw_pattern=False)

    def add(self, schema: Any, name: str, param: str) -> str:
        """Rules for JSON that fits `schema`; returns the name of the top rule. ShapeError names `param`."""
        if not isinstance(schema, dict):
            raise ShapeError(param, f"a JSON schema must be an object, got {json.dumps(schema)[:80]}")
        c = self._converter
        try:
            return c.visit(c.resolve_refs(schema, "schema"), name)
        except (AssertionError, AttributeError, KeyError, TypeError, ValueError, IndexError,
                RecursionError) as exc:
            raise ShapeError(param, "not a JSON schema llama.cpp can follow "
                                    f"({exc or type(exc).__name__})") from None

    def text(self, root: str | None = None) -> str:
        """The grammar; `root` is the root rule's body (none: the rules already have a root)."""
        rules = self._converter.format_grammar()
        return rules if root is None else f"root ::= {root}\n{rules}"


def json_grammar(schema: Any, param: str) -> str:
    """A grammar for one JSON value that fits `schema`."""
    g = Grammar()
    g.add(schema, "", param)  # "" names the top rule root, as the converter does
    return g.text()
