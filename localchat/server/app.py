"""The OpenAI-compatible HTTP API over the model store, whichever backend the planner picks.

Generation runs on each model's engine (engine/batching.py: llama.cpp decodes up to
`--parallel` requests in one batch, the rest wait their turn in arrival order); chunks cross
to the event loop through a queue. When a streaming client goes away the response is
cancelled, and the cancel flag frees its slot within a step.

Every API shape (OpenAI's here, Ollama's in `ollama.py`) runs the same steps: `prepare`
takes a place in the model's queue and builds the turn, `answer` streams it as `Piece`s
(text, thoughts, tool calls, stats); each shape only translates requests and pieces.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..chat.reasoning import ThoughtSplitter, opens_thoughts
from ..chat.session import ChatSession, Turn
from ..chat.structured import ShapeError
from ..chat.tools import ToolCall
from ..engine.backend import CannotEmbed, Chunk, ContextOverflow, GenerationStats, PromptLike
from ..engine.settings import SamplingSettings
from ..hostguard import header_dict
from ..store import Store, default_store
from ..templates import TemplateError
from .models import RUNNABLE_FORMATS, ModelManager, ServerError, Ticket, keep_alive_seconds
from .ollama import OLLAMA_PREFIX, ollama_routes
from .schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from .settings import ServerSettings

_DONE = object()


def error_body(message: str, code: str, param: str | None = None,
               type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   type_: str = "invalid_request_error", path: str = "") -> JSONResponse:
    """OpenAI's error object, or for Ollama's routes (`path`) the {"error": message} its clients read."""
    if path.startswith(OLLAMA_PREFIX):
        return JSONResponse({"error": message}, status_code=status)
    return JSONResponse(error_body(message, code, param, type_), status_code=status)


class GuardMiddleware:
    """Host/Origin checks (403), the API key (401) and the body size limit (413), before routing."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app, self.settings, self.guard = app, settings, settings.guard()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = header_dict(scope)
        limit = self.settings.max_body_bytes
        path = scope["path"]
        deny = None
        if refused := self.guard.refusal(headers):
            deny = error_response(403, *refused, path=path)
        elif self.settings.api_key and path != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
                deny = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                      "invalid_api_key", path=path)
        elif int(headers.get("content-length", "0") or 0) > limit:
            deny = error_response(413, f"request body over {limit} bytes", "request_too_large", path=path)
        elif "content-length" not in headers:
            # A chunked body's size shows only while it arrives: read it here, where a 413 can still
            # be answered (raised from inside the app's body reader, FastAPI turns it into a 400).
            messages = await read_body(receive, limit)
            if messages is None:
                deny = error_response(413, f"request body over {limit} bytes", "request_too_large", path=path)
            else:
                receive = replay(messages, receive)
        if deny is not None:
            return await deny(scope, receive, send)
        await self.app(scope, receive, send)


async def read_body(receive: Receive, limit: int) -> list[Message] | None:
    """The request's messages up to the end of its body, or None once the body passes `limit` bytes."""
    messages, seen = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client went away
            return messages
        seen += len(message.get("body", b""))
        if seen > limit:
            return None
        if not message.get("more_body", False):
            return messages


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive channel that hands out `messages` first, then whatever comes next (a disconnect)."""
    pending = iter(messages)

    async def next_message() -> Message:
        return next(pending, None) or await receive()

    return next_message


class TicketStreamingResponse(StreamingResponse):
    """Releases the request's queue ticket however the response ends."""

    def __init__(self, content: AsyncIterator[str], ticket: Ticket,
                 media_type: str = "text/event-stream") -> None:
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


class Mailbox:
    """Hands items from the engines' threads to an event loop's queues, waking the loop once per
    burst: a decode step ends with a chunk for every stream in the batch, and a wake-up each would
    cost a write to the loop's pipe and a handover of the GIL per stream, while llama.cpp waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # (the loop keys _mailboxes: no strong reference back)
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """From any thread: `item` into `queue` soon (RuntimeError once the loop is closed)."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:  # a delivery is already on its way
                return
        try:
            loop = self._loop()
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._items.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


async def generate(ticket: Ticket, prompt: PromptLike, settings: SamplingSettings,
                   grammar: str | None = None) -> AsyncIterator[Chunk]:
    """Run one generation on the ticket's model's engine; chunks cross from its thread to the
    event loop through a queue. The engine decides when the request runs (a free slot of the
    batch, in arrival order); a request cancelled while it waits or runs leaves at the next step.
    """
    model = ticket.model
    loop = asyncio.get_running_loop()
    mailbox = _mailboxes.get(loop) or _mailboxes.setdefault(loop, Mailbox(loop))
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def post(item: Any) -> None:
        if item is None:
            model.last_used = time.monotonic()
        try:
            mailbox.post(queue, _DONE if item is None else item)
        except RuntimeError:  # the loop is gone: the server is shutting down
            cancel.set()

    try:
        # Off the event loop: it tokenizes the prompt.
        await asyncio.to_thread(model.engine.submit, prompt, settings, post, cancel, grammar=grammar)
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            for item in coalesced(items):
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        cancel.set()  # a client that left stops its decode within one step


def coalesced(items: list[Any]) -> list[Any]:
    """`items` with each run of plain text chunks joined into one: when the event loop falls behind
    the decode steps (many streams on a busy machine), a client gets one event for what piled up,
    and the loop spends less of the CPU that llama.cpp's threads decode on."""
    out: list[Any] = []
    for item in items:
        if (isinstance(item, Chunk) and item.stats is None and out and isinstance(out[-1], Chunk)
                and out[-1].stats is None):
            out[-1] = Chunk(out[-1].text + item.text)
        else:
            out.append(item)
    return out


@dataclass
class Piece:
    """A part of an answer as every API shape reads it: text, thoughts, and (on the last piece,
    the one with stats) the tool calls the answer made."""

    text: str = ""
    reasoning: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    stats: GenerationStats | None = None


async def answer(ticket: Ticket, turn: Turn, settings: SamplingSettings, thoughts: bool = True
                 ) -> AsyncIterator[Piece]:
    """The turn's answer as pieces: `<think>` thoughts split off (with `thoughts`: a chat answer),
    tool calls read out of the text where tools were offered. The last piece carries the stats."""
    reader = turn.reader()
    prompt_text = turn.prompt if isinstance(turn.prompt, str) else turn.prompt.text
    splitter = ThoughtSplitter(opens_thoughts(prompt_text)) if thoughts else None

    def piece(reasoning: str, text: str) -> Piece:
        return Piece(reader.feed(text) if reader is not None and text else text, reasoning)

    stats = None
    async for chunk in generate(ticket, turn.prompt, settings, turn.grammar):
        stats = chunk.stats or stats
        yield piece(*(splitter.feed(chunk.text) if splitter else ("", chunk.text)))
    last = piece(*(splitter.finish() if splitter else ("", "")))
    if reader is not None:
        tail, last.calls = reader.finish()
        last.text += tail
    last.stats = stats
    yield last


async def collect(pieces: AsyncIterator[Piece]) -> Piece:
    """A whole answer as one piece."""
    whole = Piece()
    async for p in pieces:
        whole.text += p.text
        whole.reasoning += p.reasoning
        whole.calls += p.calls
        whole.stats = p.stats or whole.stats
    return whole


async def on_model(ticket: Ticket, work: Callable[[], Any]) -> Any:
    """Run `work` on the ticket's model thread, between decode steps (an embedding)."""
    try:
        return await asyncio.wrap_future(ticket.model.engine.call(work))
    finally:
        ticket.model.last_used = time.monotonic()


@dataclass(frozen=True)
class Pipeline:
    """The steps every API shape shares, handed to the Ollama routes."""

    manager: Callable[[], ModelManager]
    store: Store
    prepare: Callable[..., Awaitable[tuple[Ticket, Turn, SamplingSettings]]]
    chat_turn: Callable[[ChatRequest], Callable[[Ticket], Turn]]
    answer: Callable[..., AsyncIterator[Piece]]
    collect: Callable[[AsyncIterator[Piece]], Awaitable[Piece]]
    embed: Callable[..., Awaitable[tuple[list[list[float]], int]]]
    stream: type[TicketStreamingResponse]


def usage(stats: GenerationStats | None) -> dict[str, int]:
    p = stats.prompt_tokens if stats else 0
    c = stats.completion_tokens if stats else 0
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def finish(stats: GenerationStats | None, calls: list[ToolCall] = ()) -> str:  # type: ignore[assignment]
    if calls:
        return "tool_calls"
    return "length" if stats and stats.finish_reason == "length" else "stop"


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(settings: ServerSettings | None = None, store: Store | None = None,
               manager: ModelManager | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    store = store or default_store()
    the_manager = manager or ModelManager(store, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = asyncio.create_task(the_manager.reap_forever())  # unloads models idle past their keep-alive
        yield
        reaper.cancel()
        the_manager.close()

    app = FastAPI(title="localchat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.manager = the_manager
    app.add_middleware(GuardMiddleware, settings=settings)

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.type, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            where = first["loc"][-1]
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error')} "
                                       f"at character {where}", "invalid_json", path=request.url.path)
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", "invalid_request", param,
                              path=request.url.path)

    def mgr() -> ModelManager:
        return app.state.manager

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "loaded": sorted(mgr().loaded)}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": n, "object": "model", "owned_by": "localchat",
             "created": int(datetime.fromisoformat(e.added).timestamp())}
            for n, e in store.models().items() if e.format in RUNNABLE_FORMATS]}

    async def prepare(req: ChatRequest | CompletionRequest, build_turn: Any,
                      keep_alive: float = settings.keep_alive) -> tuple[Ticket, Turn, SamplingSettings]:
        ticket = await mgr().ticket(req.model)
        ticket.model.keep_alive = keep_alive_seconds(keep_alive)
        try:
            try:
                settings_ = req.sampling(ticket.model.settings)
            except ValueError as exc:
                param = str(exc).split("=")[0].split(" ")[0]
                raise ServerError(400, str(exc), "invalid_value", param) from None
            n_ctx = ticket.model.backend.n_ctx
            if settings_.max_tokens > n_ctx:
                raise ServerError(400, f"max_tokens={settings_.max_tokens} exceeds the model's context "
                                       f"of {n_ctx} tokens", "invalid_value", "max_tokens")
            # Off the event loop: a slow chat template must not stall other requests.
            turn = await asyncio.to_thread(build_turn, ticket)
            settings_ = settings_.with_stops(turn.stop)
            try:
                n_prompt = await asyncio.to_thread(ticket.model.backend.count_tokens, turn.prompt)
            except Exception as exc:
                raise ServerError(400, f"cannot tokenize the prompt: {exc}", "invalid_prompt") from None
            if n_prompt >= n_ctx:
                raise ServerError(400, f"the prompt takes {n_prompt} tokens; the model's context holds "
                                       f"{n_ctx}", "context_length_exceeded", "messages")
            return ticket, turn, settings_
        except BaseException:
            ticket.release()
            raise

    async def respond(req: ChatRequest | CompletionRequest, ticket: Ticket, turn: Turn,
                      settings_: SamplingSettings, chat: bool) -> Any:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": created, "model": req.model}

        def choice(piece: Piece, reason: str | None = None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": piece.text, "logprobs": None, "finish_reason": reason}
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if piece.reasoning:
                delta["reasoning_content"] = piece.reasoning
            if piece.text:
                delta["content"] = piece.text
            if piece.calls:
                delta["tool_calls"] = [c.as_openai(i) for i, c in enumerate(piece.calls)]
            return {"index": 0, "delta": delta, "finish_reason": reason}

        if not req.stream:
            try:
                whole = await collect(answer(ticket, turn, settings_, thoughts=chat))
            finally:
                ticket.release()
            text, calls, stats = whole.text, whole.calls, whole.stats
            message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if whole.reasoning:
                message["reasoning_content"] = whole.reasoning
            if calls:
                message["tool_calls"] = [c.as_openai() for c in calls]
            body = ({"index": 0, "message": message, "finish_reason": finish(stats, calls), "logprobs": None}
                    if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish(stats)})
            return {**head, "object": obj, "choices": [body], "usage": usage(stats)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            chunk_obj = obj + ".chunk" if chat else obj
            first, last = True, Piece()
            try:
                async for piece in answer(ticket, turn, settings_, thoughts=chat):
                    if piece.stats is not None:  # the last piece: its calls come before the finish
                        last = piece
                    elif piece.text or piece.reasoning or first:
                        yield sse({**head, "object": chunk_obj, "choices": [choice(piece, None, first)]})
                        first = False
            except ContextOverflow as exc:
                yield sse(error_body(str(exc), "context_length_exceeded"))
                return
            if last.text or last.reasoning or last.calls:
                yield sse({**head, "object": chunk_obj, "choices": [choice(last)]})
            done = choice(Piece(), finish(last.stats, last.calls))
            yield sse({**head, "object": chunk_obj, "choices": [done]})
            if include_usage:
                yield sse({**head, "object": chunk_obj, "choices": [], "usage": usage(last.stats)})
            yield "data: [DONE]\n\n"

        return TicketStreamingResponse(events(), ticket)

    def chat_turn(req: ChatRequest) -> Callable[[Ticket], Turn]:
        """What builds the turn of a chat request on its model; ServerError (400) names a bad field."""
        try:
            messages = [m.as_dict(f"messages[{i}]") for i, m in enumerate(req.messages)]
        except ValueError as exc:
            raise ServerError(400, str(exc), "invalid_messages", str(exc).split(":")[0]) from None
        try:
            grammar = req.response_format.grammar() if req.response_format else None
            tools = req.tool_use()
        except ShapeError as exc:
            raise ServerError(400, str(exc), "invalid_schema" if "schema" in exc.param or "parameters" in exc.param
                              else "invalid_value", exc.param) from None

        def build(ticket: Ticket) -> Turn:
            model = ticket.model
            session = ChatSession.for_model(model.backend, model.defaults)
            try:
                return session.turn(messages, grammar, tools)
            except TemplateError as exc:
                raise ServerError(400, f"model {ticket.model.name!r}: {exc}", "chat_template_error",
                                  "messages") from None
            except ValueError as exc:
                raise ServerError(400, str(exc), "invalid_messages", "messages") from None

        return build

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
        ticket, turn, settings_ = await prepare(req, chat_turn(req))
        return await respond(req, ticket, turn, settings_, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        ticket, turn, settings_ = await prepare(req, lambda t: Turn(req.text))
        return await respond(req, ticket, turn, settings_, chat=False)

    async def embed(name: str, texts: list[str], truncate: bool = False, dimensions: int | None = None,
                    keep_alive: float = settings.keep_alive) -> tuple[list[list[float]], int]:
        """Embeddings of `texts` by model `name` and the tokens they took; ServerError (400) for a
        model that cannot embed, or an input that is empty or too long."""
        ticket = await mgr().ticket(name)
        ticket.model.keep_alive = keep_alive_seconds(keep_alive)
        try:
            vectors, n_tokens = await on_model(ticket, lambda: ticket.model.backend.embed(texts, truncate))
        except CannotEmbed as exc:
            raise ServerError(400, f"model {name!r} cannot embed: {exc}", "model_cannot_embed",
                              "model") from None
        except ValueError as exc:
            raise ServerError(400, str(exc), "invalid_value", "input") from None
        finally:
            ticket.release()
        if dimensions is not None and vectors and dimensions != len(vectors[0]):
            raise ServerError(400, f"dimensions={dimensions}: model {name!r} gives {len(vectors[0])}-"
                                   "dimensional embeddings, and cannot shorten them", "invalid_value",
                              "dimensions")
        return vectors, n_tokens

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        vectors, n_tokens = await embed(req.model, req.texts, dimensions=req.dimensions)

        def encoded(v: list[float]) -> str | list[float]:  # base64: what the openai client asks for by default
            little_endian_f32 = np.asarray(v, "<f4").tobytes()
            return v if req.encoding_format == "float" else base64.b64encode(little_endian_f32).decode()

        return {"object": "list", "model": req.model,
                "data": [{"object": "embedding", "index": i, "embedding": encoded(v)}
                         for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    app.include_router(ollama_routes(Pipeline(mgr, store, prepare, chat_turn, answer, collect, embed,
                                              TicketStreamingResponse)))
    return app
