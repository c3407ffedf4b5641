"""OpenAI request bodies, validated before anything runs."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..chat.structured import ANY_OBJECT, ShapeError, json_grammar
from ..chat.tools import HERMES, ToolUse
from ..engine.settings import SamplingSettings


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None

    @model_validator(mode="after")
    def _content_given(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may leave it out)")
        return self

    def as_dict(self, where: str) -> dict[str, Any]:
        """The message as chat templates take it (tool call arguments as objects); ValueError names
        the field when a call's arguments are not a JSON object."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = []
            for j, call in enumerate(self.tool_calls):
                try:
                    args = json.loads(call.function.arguments)
                except json.JSONDecodeError as exc:
                    args = exc
                if not isinstance(args, dict):
                    raise ValueError(f"{where}.tool_calls[{j}].function.arguments: not a JSON object")
                out["tool_calls"].append({"id": call.id, "type": "function",
                                          "function": {"name": call.function.name, "arguments": args}})
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id or ""
            if self.name:
                out["name"] = self.name
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The sampling fields both endpoints take; ranges are checked by SamplingSettings."""

    model_config = ConfigDict(extra="ignore")
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # llama.cpp's own samplers, as llama-cpp-python's server takes them
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    def sampling(self, defaults: SamplingSettings | None = None) -> SamplingSettings:
        """SamplingSettings from the request; raises ValueError naming a bad field."""
        base = defaults or SamplingSettings()
        values = {k: getattr(self, k) for k in ("temperature", "top_p", "seed", "presence_penalty",
                                                  "frequency_penalty", "top_k", "min_p", "repeat_penalty")
                  if getattr(self, k) is not None}
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if limit is not None:
            values["max_tokens"] = limit
        if self.stop is not None:
            values["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        merged = {**{k: getattr(base, k) for k in base.__dataclass_fields__}, **values}
        return SamplingSettings(**merged)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self

    def grammar(self) -> str | None:
        """The grammar the answer must follow (None: free text); ShapeError names the bad field."""
        if self.type == "json_object":
            return json_grammar(ANY_OBJECT, "response_format")
        if self.type == "json_schema" and self.json_schema is not None:
            return json_grammar(self.json_schema.schema_, "response_format.json_schema.schema")
        return None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def tool_use(self) -> ToolUse | None:
        """The tools offered and how the model may use them; ShapeError names a field that cannot be
        met (a schema no grammar can follow, a named tool that is not offered)."""
        tools = tuple(t.model_dump(exclude_none=True) for t in self.tools or ())
        choice = self.tool_choice
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice or "auto"
        if not tools:
            if isinstance(choice, NamedToolChoice) or choice == "required":
                raise ShapeError("tool_choice", f"tool_choice {name!r} needs tools, and the request has none")
            return None
        names = [t["function"]["name"] for t in tools]
        if len(set(names)) != len(names):
            raise ShapeError("tools", "two tools have the same name")
        if isinstance(choice, NamedToolChoice) and name not in names:
            raise ShapeError("tool_choice", f"no tool named {name!r} among the tools: {', '.join(names)}")
        HERMES.grammar(tools, [f"tools[{i}].function.parameters" for i in range(len(tools))])  # schemas checked
        return ToolUse(tools, name)


class CompletionRequest(SamplingFields):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _single(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported")
        if not (v if isinstance(v, str) else v[0]):  # nothing for the model to continue
            raise ValueError("the prompt is empty")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingInput(BaseModel):
    """The texts to embed, one or a batch (token-id input is not taken): OpenAI's and Ollama's field."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str] = Field(union_mode="left_to_right")
    dimensions: int | None = Field(default=None, ge=1)

    @field_validator("input")
    @classmethod
    def _some(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= 2048:
            raise ValueError("give between 1 and 2048 texts")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class EmbeddingRequest(EmbeddingInput):
    """/v1/embeddings."""

    model: str
    encoding_format: Literal["float", "base64"] = "float"
