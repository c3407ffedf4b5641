"""OpenAI request bodies, validated before anything runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..chat.structured import ANY_OBJECT, json_grammar
from ..engine.settings import SamplingSettings


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


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
