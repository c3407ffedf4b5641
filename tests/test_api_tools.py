"""Structured output and tool calls in /v1/chat/completions, with the official openai client against
`localchat serve` on the real starter model."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from localchat.store import STARTER, Store

from .test_server import Server

MODEL = STARTER.name
SEEDS = range(20)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, starter_gguf) -> Server:
    from .conftest import starter_home

    srv = Server(starter_home(tmp_path_factory.mktemp("api-home"), starter_gguf))
    yield srv
    srv.stop()


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_json_schema_answers_validate_across_twenty_seeds(server: Server) -> None:
    """response_format json_schema (strict): every answer of 20 seeds parses and validates against the
    schema (jsonschema), streamed and not; a streamed answer equals the non-streamed one of its seed."""
    client = server.client(timeout=300)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in SEEDS:
        r = client.chat.completions.create(model=MODEL, messages=user("Describe a person who lives in Europe."),
                                           response_format=fmt, seed=seed, max_tokens=200)
        text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
        assert r.choices[0].finish_reason == "stop"
        if seed < 3:
            events = client.chat.completions.create(
                model=MODEL, messages=user("Describe a person who lives in Europe."), response_format=fmt,
                seed=seed, max_tokens=200, stream=True)
            assert "".join(c.delta.content or "" for e in events for c in e.choices) == text


def test_json_object_answers_are_json_objects(server: Server) -> None:
    """response_format json_object: the answer is one JSON object, where the plain answer is prose."""
    client = server.client(timeout=300)
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=user("List three fruits as JSON."),
                                           response_format={"type": "json_object"}, seed=seed, max_tokens=120)
        assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize("schema, field", [
    ({"type": "object", "properties": {"a": {"type": "no-such-type"}}}, "response_format.json_schema.schema"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "response_format.json_schema.schema"),
])
def test_bad_schema_gets_400_naming_the_field(server: Server, schema: dict, field: str) -> None:
    """A schema that cannot become a grammar is refused with a 400 naming response_format's schema field."""
    with pytest.raises(openai.BadRequestError) as exc:
        server.client().chat.completions.create(
            model=MODEL, messages=user("hi"),
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert exc.value.status_code == 400 and field in str(exc.value)
    assert exc.value.body["param"] == field
