"""Ollama's API (`/api/...`) on the same server, for the apps that speak it rather than OpenAI's.

A thin adapter: each route turns an Ollama request into the OpenAI request the pipeline
already takes (`options` onto the sampling fields, `format` onto `response_format`) and the
pipeline's pieces into Ollama's answers, streamed as NDJSON. The guard middleware, the
queue, the model's preset and every check are the OpenAI routes' own.

Ollama's options that set up a model at load (num_ctx, num_gpu, num_thread, ...) are not
taken per request: the server's plan (`--context`, `--threads`) sets them for every client.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from ..artifacts import artifact_from_gguf
from ..chat.session import Turn
from ..chat.tools import template_format
from ..engine.backend import ContextOverflow, GenerationStats
from ..engine.settings import PRESET
from ..gguf_file import GGUFHeader, read_gguf
from ..store.resolve import resolve_model
from .models import ServerError, keep_alive_seconds
from .schemas import ChatRequest, CompletionRequest, EmbeddingInput

if TYPE_CHECKING:  # app.py builds on this module
    from .app import Piece, Pipeline

OLLAMA_PREFIX = "/api/"
NS = 1_000_000_000
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"(-?)((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+)")
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def keep_alive(value: float | str | None, default: float) -> float:
    """Seconds from Ollama's keep_alive: a number of seconds or a Go duration ("5m", "1h30m", "-1m");
    negative keeps the model loaded until the server stops. ServerError names the field."""
    if value is None:
        return default
    if not isinstance(value, str):
        return float(value)
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    found = _DURATION.fullmatch(text)
    if not found:
        raise ServerError(400, f"keep_alive: {value!r} is neither seconds nor a duration like '5m' or '1h30m'",
                          "invalid_value", "keep_alive")
    seconds = sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(found.group(2)))
    return -seconds if found.group(1) else seconds


class Options(BaseModel):
    """The sampling options Ollama takes; the others (load-time ones among them) are ignored."""

    model_config = ConfigDict(extra="ignore")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None  # -1 or -2 (until the context is full): the model's own limit
    stop: list[str] | str | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def fields(self) -> dict[str, Any]:
        """The OpenAI request's sampling fields these options set."""
        out = self.model_dump(exclude_none=True, exclude={"num_predict"})
        if self.num_predict is not None and self.num_predict >= 0:
            out["max_tokens"] = self.num_predict
        return out


def store_name(model: str) -> str:
    """The store's name of an Ollama model name: Ollama's clients may add the default tag."""
    return model.removesuffix(":latest")


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    keep_alive: float | str | None = None

    @property
    def name(self) -> str:
        return store_name(self.model)


class GenerationRequest(Request):
    stream: bool = True  # Ollama streams unless told not to
    options: Options = Field(default_factory=Options)
    format: Literal["", "json"] | dict[str, Any] | None = None

    def openai_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": self.name, "stream": self.stream, **self.options.fields()}
        if self.format == "json":
            fields["response_format"] = {"type": "json_object"}
        elif isinstance(self.format, dict):
            fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format",
                                                                                "schema": self.format}}
        return fields


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None

    def openai(self, where: str) -> dict[str, Any]:
        if self.images:
            raise ServerError(400, f"{where}.images: this server runs text models", "invalid_value", where)
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {
                "name": c.get("function", {}).get("name", ""),
                "arguments": json.dumps(c.get("function", {}).get("arguments", {}))}} for c in self.tool_calls]
        if self.tool_name:
            out["name"] = self.tool_name
        return out


class ChatBody(GenerationRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None  # thoughts are split off whenever the model writes them


class GenerateBody(GenerationRequest):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    images: list[str] | None = None
    context: list[int] | None = None
    think: bool | str | None = None


class EmbedBody(Request, EmbeddingInput):
    truncate: bool = True


class EmbeddingsBody(Request):
    prompt: str


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    name: str = ""  # the older clients' field

    @property
    def store_name(self) -> str:
        return store_name(self.model or self.name)


def translate(cls: type[ChatRequest] | type[CompletionRequest], fields: dict[str, Any]) -> Any:
    """The OpenAI request for an Ollama one; ServerError (400) names the field that does not fit."""
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        param = {"max_tokens": "options.num_predict", "response_format": "format"}.get(param or "", param)
        raise ServerError(400, f"{param or 'body'}: {first.get('msg')}", "invalid_request", param) from None


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def timings(stats: GenerationStats | None, started: float, loaded: float) -> dict[str, Any]:
    """Ollama's done fields, in nanoseconds."""
    out: dict[str, Any] = {"done_reason": "length" if stats and stats.finish_reason == "length" else "stop",
                           "total_duration": int((time.perf_counter() - started) * NS),
                           "load_duration": int((loaded - started) * NS)}
    if stats:
        out |= {"prompt_eval_count": stats.prompt_tokens, "prompt_eval_duration": int(stats.ttft_s * NS),
                "eval_count": stats.completion_tokens, "eval_duration": int(stats.decode_s * NS)}
    return out


def ollama_routes(pipe: Pipeline) -> APIRouter:
    router = APIRouter()

    def default_alive() -> float:
        return pipe.manager().settings.keep_alive

    def details(name: str, entry: Any) -> tuple[dict[str, Any], dict[str, Any], GGUFHeader | None]:
        """Ollama's `details` and `model_info` of a store model (its manifest `entry`), and its GGUF
        header (None for other formats): each file read once."""
        gguf = next((pipe.store.path_of(f.path) for f in entry.files if f.path.endswith(".gguf")), None)
        try:
            if gguf is not None:  # the header once: the artifact's figures and the parameter count
                header = read_gguf(gguf)
                artifact = artifact_from_gguf(gguf, header)
            else:
                header, artifact = None, resolve_model(name, pipe.store).artifacts[0]
        except Exception as exc:  # a damaged store entry: say which model and why
            raise ServerError(500, f"the model {name!r} cannot be read: {exc}", "model_load_failed", "model",
                              "server_error") from None
        arch, dims = artifact.architecture or entry.format, artifact.dims
        info: dict[str, Any] = {"general.architecture": arch, f"{arch}.context_length": dims.n_ctx_train,
                                f"{arch}.embedding_length": dims.n_embd, f"{arch}.block_count": dims.n_layers,
                                f"{arch}.attention.head_count": dims.n_head,
                                f"{arch}.attention.head_count_kv": dims.n_head_kv}
        size = ""
        if header is not None:
            n = info["general.parameter_count"] = header.n_params
            size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
        return ({"parent_model": "", "format": entry.format, "family": arch, "families": [arch],
                 "parameter_size": size, "quantization_level": artifact.quant}, info, header)

    def known(name: str) -> None:
        if name not in pipe.manager().names():  # only store names: no paths from the network
            raise ServerError(404, f"model {name!r} not found; available: "
                                   f"{', '.join(pipe.manager().names()) or 'none'}", "model_not_found", "model")

    async def load_or_unload(req: Request, seconds: float, empty: dict[str, Any]) -> dict[str, Any]:
        """A request with nothing to answer: load the model, or with keep_alive 0 unload it now
        (once idle, if requests are still running on it)."""
        known(req.name)
        manager = pipe.manager()
        if seconds == 0:
            model = manager.loaded.get(req.name)
            if model is not None:
                model.keep_alive = 0
                if model.idle:
                    manager.unload(req.name)
            reason = "unload"
        else:
            ticket = await manager.ticket(req.name)
            ticket.model.keep_alive = keep_alive_seconds(seconds)
            ticket.release()
            reason = "load"
        return {"model": req.model, "created_at": now(), **empty, "done": True, "done_reason": reason}

    async def run(req: GenerationRequest, openai_req: Any, build: Any, seconds: float, field: str,
                  thoughts: bool) -> Any:
        """Generate through the pipeline; the answer under `field` ("message" or "response")."""
        started = time.perf_counter()
        ticket, turn, settings = await pipe.prepare(openai_req, build, seconds)
        loaded = time.perf_counter()
        head = {"model": req.model}

        def body(p: Piece) -> dict[str, Any]:
            if field == "response":
                return {"response": p.text, **({"thinking": p.reasoning} if p.reasoning else {})}
            message: dict[str, Any] = {"role": "assistant", "content": p.text}
            if p.reasoning:
                message["thinking"] = p.reasoning
            if p.calls:
                message["tool_calls"] = [{"function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                                         for c in p.calls]
            return {"message": message}

        if not req.stream:
            try:
                whole = await pipe.collect(pipe.answer(ticket, turn, settings, thoughts=thoughts))
            finally:
                ticket.release()
            return {**head, "created_at": now(), **body(whole), "done": True,
                    **timings(whole.stats, started, loaded)}

        async def lines() -> AsyncIterator[str]:
            try:
                async for p in pipe.answer(ticket, turn, settings, thoughts=thoughts):
                    if p.text or p.reasoning or p.calls:
                        yield json.dumps({**head, "created_at": now(), **body(p), "done": False}) + "\n"
                    if p.stats is not None:
                        yield json.dumps({**head, "created_at": now(), **body(type(p)()), "done": True,
                                          **timings(p.stats, started, loaded)}) + "\n"
            except ContextOverflow as exc:
                yield json.dumps({"error": str(exc)}) + "\n"

        return pipe.stream(lines(), ticket, media_type="application/x-ndjson")

    @router.post("/api/chat")
    async def chat(req: ChatBody) -> Any:
        seconds = keep_alive(req.keep_alive, default_alive())
        if not req.messages:
            return await load_or_unload(req, seconds, {"message": {"role": "assistant", "content": ""}})
        messages = [m.openai(f"messages[{i}]") for i, m in enumerate(req.messages)]
        openai_req = translate(ChatRequest, {**req.openai_fields(), "messages": messages,
                                             **({"tools": req.tools} if req.tools else {})})
        return await run(req, openai_req, pipe.chat_turn(openai_req), seconds, "message", thoughts=True)

    @router.post("/api/generate")
    async def generate(req: GenerateBody) -> Any:
        seconds = keep_alive(req.keep_alive, default_alive())
        for name, why in (("suffix", "fill-in-the-middle is not supported"),
                          ("template", "a request cannot bring its own template"),
                          ("images", "this server runs text models"),
                          ("context", "token contexts are not kept; send the conversation to /api/chat")):
            if getattr(req, name):
                raise ServerError(400, f"{name}: {why}", "invalid_value", name)
        if not req.prompt:
            return await load_or_unload(req, seconds, {"response": ""})
        if req.raw:  # the caller's own markup, as /v1/completions takes it
            if req.format:
                raise ServerError(400, "format: a raw prompt cannot take a format", "invalid_value", "format")
            openai_req = translate(CompletionRequest, {**req.openai_fields(), "prompt": req.prompt})
            return await run(req, openai_req, lambda t: Turn(req.prompt), seconds, "response", thoughts=False)
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + [
            {"role": "user", "content": req.prompt}]
        openai_req = translate(ChatRequest, {**req.openai_fields(), "messages": messages})
        return await run(req, openai_req, pipe.chat_turn(openai_req), seconds, "response", thoughts=True)

    async def embed(req: Request, texts: list[str], truncate: bool, dimensions: int | None) -> Any:
        started = time.perf_counter()
        vectors, n_tokens = await pipe.embed(req.name, texts, truncate, dimensions,
                                             keep_alive(req.keep_alive, default_alive()))
        return vectors, {"total_duration": int((time.perf_counter() - started) * NS), "load_duration": 0,
                         "prompt_eval_count": n_tokens}

    @router.post("/api/embed")
    async def embed_route(req: EmbedBody) -> dict[str, Any]:
        vectors, stats = await embed(req, req.texts, req.truncate, req.dimensions)
        return {"model": req.model, "embeddings": vectors, **stats}

    @router.post("/api/embeddings")
    async def embeddings(req: EmbeddingsBody) -> dict[str, Any]:
        vectors, _ = await embed(req, [req.prompt], True, None)
        return {"embedding": vectors[0]}

    @router.get("/api/tags")
    async def tags() -> dict[str, Any]:
        entries = pipe.store.models()
        return {"models": [{"name": n, "model": n, "modified_at": entries[n].added, "size": entries[n].size,
                            "digest": entries[n].sha256, "details": details(n, entries[n])[0]}
                           for n in pipe.manager().names()]}

    @router.post("/api/show")
    async def show(req: ShowBody) -> dict[str, Any]:
        name = req.store_name
        known(name)
        entry = pipe.store.models()[name]
        about, info, header = details(name, entry)
        template = (header.chat_template or "") if header else ""
        capabilities = ["completion"] + (["embedding"] if header else []) + (
            ["tools"] if template_format(template) is not None else [])
        preset = entry.defaults.get(PRESET) or {}  # as Ollama's Modelfile PARAMETER lines
        return {"modelfile": "", "parameters": "\n".join(f"{k} {v}" for k, v in preset.items()),
                "template": template, "system": entry.defaults.get("system") or "", "details": about,
                "model_info": info, "capabilities": capabilities, "modified_at": entry.added}

    @router.get("/api/ps")
    async def ps() -> dict[str, Any]:
        clock, wall = time.monotonic(), datetime.now(timezone.utc)
        entries, out = pipe.store.models(), []
        for m in pipe.manager().loaded.values():
            expires = m.expires
            left = timedelta(days=365 * 100) if expires is None else timedelta(seconds=expires - clock)
            until = wall + left
            entry = entries.get(m.name)
            out.append({"name": m.name, "model": m.name, "digest": entry.sha256 if entry else "",
                        "size": m.plan.memory.host_bytes + m.plan.memory.device_bytes,
                        "size_vram": m.plan.memory.device_bytes,
                        "details": details(m.name, entry)[0] if entry else {},
                        "expires_at": until.isoformat().replace("+00:00", "Z"),
                        "context_length": m.backend.n_ctx})
        return {"models": out}

    @router.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    return router
