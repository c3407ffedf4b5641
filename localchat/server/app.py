"""The OpenAI-compatible HTTP API over the model store, whichever backend the planner picks.

Generation runs in a worker thread per request, one at a time per model behind a FIFO
lock; chunks cross to the event loop through a queue. When a streaming client goes away
the response is cancelled, the cancel flag stops llama.cpp within a token, and the
model's lock is free for the next request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from datetime import datetime
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..chat.session import ChatSession, Turn
from ..chat.structured import ShapeError
from ..chat.tools import ToolCall
from ..engine.backend import Chunk, ContextOverflow, GenerationStats, PromptLike
from ..engine.settings import SamplingSettings
from ..hostguard import header_dict
from ..store import Store, default_store
from ..templates import TemplateError
from .models import RUNNABLE_FORMATS, ModelManager, ServerError, Ticket
from .schemas import ChatRequest, CompletionRequest
from .settings import ServerSettings

_DONE = object()


def error_body(message: str, code: str, param: str | None = None,
               type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
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
        deny = None
        if refused := self.guard.refusal(headers):
            deny = error_response(403, *refused)
        elif self.settings.api_key and scope["path"] != "/health":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
                deny = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                      "invalid_api_key")
        elif int(headers.get("content-length", "0") or 0) > limit:
            deny = error_response(413, f"request body over {limit} bytes", "request_too_large")
        elif "content-length" not in headers:
            # A chunked body's size shows only while it arrives: read it here, where a 413 can still
            # be answered (raised from inside the app's body reader, FastAPI turns it into a 400).
            messages = await read_body(receive, limit)
            if messages is None:
                deny = error_response(413, f"request body over {limit} bytes", "request_too_large")
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

    def __init__(self, content: AsyncIterator[str], ticket: Ticket) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.release()


async def generate(ticket: Ticket, prompt: PromptLike, settings: SamplingSettings,
                   grammar: str | None = None) -> AsyncIterator[Chunk]:
    """Run one generation on the ticket's model in a thread, in queue order.

    The worker thread, not this generator, releases the model's lock when llama.cpp is
    really done: a cancelled request (anyio cancels every await in its scope) must not
    let the next one start on a model that is still decoding.
    """
    model = ticket.model
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancel = threading.Event()

    def done() -> None:
        model.last_used = time.monotonic()
        model.lock.release()

    def post(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: the server is shutting down
            cancel.set()

    def work() -> None:
        try:
            for chunk in model.backend.stream(prompt, settings, cancel, grammar=grammar):
                post(chunk)
        except Exception as exc:  # handed to the request that caused it
            post(exc)
        finally:
            post(_DONE)
            try:
                loop.call_soon_threadsafe(done)
            except RuntimeError:
                pass

    await model.lock.acquire()
    loop.run_in_executor(model.worker, work)  # from here on the thread owns the lock
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        cancel.set()  # a client that left stops llama.cpp within one token


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
        yield
        the_manager.close()

    app = FastAPI(title="localchat", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.manager = the_manager
    app.add_middleware(GuardMiddleware, settings=settings)

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, exc: ServerError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.type)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            where = first["loc"][-1]
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error')} "
                                       f"at character {where}", "invalid_json")
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", "invalid_request", param)

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

    async def prepare(req: ChatRequest | CompletionRequest, build_turn: Any
                      ) -> tuple[Ticket, Turn, SamplingSettings]:
        ticket = await mgr().ticket(req.model)
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

        reader = turn.reader()  # tools offered: the answer is read for calls as it comes

        def choice(text: str | None, reason: str | None, first: bool = False,
                   calls: list[ToolCall] = ()) -> dict[str, Any]:  # type: ignore[assignment]
            if not chat:
                return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [c.as_openai(i) for i, c in enumerate(calls)]
            return {"index": 0, "delta": delta, "finish_reason": reason}

        if not req.stream:
            try:
                parts, stats = [], None
                async for chunk in generate(ticket, turn.prompt, settings_, turn.grammar):
                    parts.append(chunk.text)
                    stats = chunk.stats or stats
            finally:
                ticket.release()
            text, calls = "".join(parts), []
            if reader is not None:
                text = reader.feed(text)
                tail, calls = reader.finish()
                text += tail
            message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
            if calls:
                message["tool_calls"] = [c.as_openai() for c in calls]
            body = ({"index": 0, "message": message, "finish_reason": finish(stats, calls), "logprobs": None}
                    if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish(stats)})
            return {**head, "object": obj, "choices": [body], "usage": usage(stats)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            chunk_obj = obj + ".chunk" if chat else obj
            stats = None
            first = True
            try:
                async for chunk in generate(ticket, turn.prompt, settings_, turn.grammar):
                    stats = chunk.stats or stats
                    text = reader.feed(chunk.text) if reader is not None else chunk.text
                    if text or first:
                        yield sse({**head, "object": chunk_obj, "choices": [choice(text, None, first)]})
                        first = False
            except ContextOverflow as exc:
                yield sse(error_body(str(exc), "context_length_exceeded"))
                return
            calls: list[ToolCall] = []
            if reader is not None:
                tail, calls = reader.finish()
                if tail or calls:
                    yield sse({**head, "object": chunk_obj, "choices": [choice(tail, None, calls=calls)]})
            yield sse({**head, "object": chunk_obj, "choices": [choice(None, finish(stats, calls))]})
            if include_usage:
                yield sse({**head, "object": chunk_obj, "choices": [], "usage": usage(stats)})
            yield "data: [DONE]\n\n"

        return TicketStreamingResponse(events(), ticket)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Any:
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

        ticket, turn, settings_ = await prepare(req, build)
        return await respond(req, ticket, turn, settings_, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        ticket, turn, settings_ = await prepare(req, lambda t: Turn(req.text))
        return await respond(req, ticket, turn, settings_, chat=False)

    return app
