"""Engines that decode a loaded model's answers for many callers at once (the server, the app).

`DecodeEngine` is continuous batching over llama.cpp's multi-sequence batches. Decoding is
bound by reading the weights, and llama.cpp decodes a batch holding one token of each of
several sequences for little more than the cost of one. The engine owns one llama.cpp
context with `slots` sequences (each with the plan's full context) and one thread running
the step loop: a waiting request joins a free slot at the next step, its prompt prefilled
in chunks of the batch size so a long prompt stalls the others for one chunk at a time;
every decoding sequence gets its next token from the same `llama_decode`; an answer that
ends or is cancelled leaves its slot at once. No request waits for another to finish,
only for a free slot. Every answer keeps its own sampler chain (the one-sequence path's
`sampler_chain`, grammar included), stop strings, cancel flag and stats.

Each slot remembers the tokens its KV cache holds. A new request takes the free slot whose
tokens share the longest prefix with its prompt and evaluates only the rest, so the next
turn of a conversation re-reads only the new text, however long the history.

`SerialEngine` gives any other backend the same interface, one answer at a time in order.
"""

from __future__ import annotations

import ctypes
import queue
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Union

import llama_cpp
from llama_cpp import _internals

from .backend import Backend, Chunk, PromptLike
from .settings import SamplingSettings

if TYPE_CHECKING:
    from .llamacpp import AnswerText, LlamaCppBackend

Emit = Callable[[Union[Chunk, BaseException, None]], None]  # a chunk, the error that ended it, None: done


class Engine(Protocol):
    """What the server and the app decode through (`Backend.engine`)."""

    def submit(self, prompt: PromptLike, settings: SamplingSettings, emit: Emit,
               cancel: threading.Event | None = None, lstrip: bool = True, grammar: str | None = None) -> None:
        """Queue a request; `emit` gets its chunks from the engine's thread, then None."""

    def stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None = None,
               lstrip: bool = True, grammar: str | None = None) -> Iterator[Chunk]:
        """The answer as `Backend.stream` gives it."""

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine's thread between steps (an embedding), in arrival order."""

    def close(self) -> None:
        """Stop decoding; requests still waiting or running end with an error."""


class EngineClosed(RuntimeError):
    """The model was unloaded while a request waited or ran."""


def emit_all(chunks: Callable[[], Iterable[Chunk]], emit: Emit, cancel: threading.Event) -> None:
    """On a worker thread: each chunk of `chunks()` to `emit`, then the error that ended it (if any),
    then None. A request whose client left while it was queued costs nothing."""
    try:
        if not cancel.is_set():
            for chunk in chunks():
                emit(chunk)
    except BaseException as exc:  # handed to the request that caused it
        emit(exc)
    finally:
        emit(None)


def stream_from(submit: Callable[[Emit], None], cancel: threading.Event) -> Iterator[Chunk]:
    """A blocking iterator over what a submitted request emits; leaving it early cancels it."""
    q: queue.Queue = queue.Queue()
    submit(q.put)
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancel.set()


class SerialEngine:
    """One answer at a time, in arrival order, on one thread (llama.cpp's OpenMP keeps a thread
    team per calling thread, and teams from several threads fight over the cores)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._worker = ThreadPoolExecutor(1, "localchat-decode")

    def submit(self, prompt: PromptLike, settings: SamplingSettings, emit: Emit,
               cancel: threading.Event | None = None, lstrip: bool = True, grammar: str | None = None) -> None:
        """Queue a request; `emit` gets its chunks from the worker thread, then None."""
        cancel = cancel or threading.Event()
        self._worker.submit(emit_all, lambda: self.backend.stream(prompt, settings, cancel, lstrip, grammar),
                            emit, cancel)

    def stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None = None,
               lstrip: bool = True, grammar: str | None = None) -> Iterator[Chunk]:
        cancel = cancel or threading.Event()
        return stream_from(lambda emit: self.submit(prompt, settings, emit, cancel, lstrip, grammar), cancel)

    def call(self, fn: Callable[[], Any]) -> Future:
        return self._worker.submit(fn)

    def close(self) -> None:
        self._worker.shutdown(wait=True)


@dataclass(eq=False)
class _Request:
    tokens: list[int]
    settings: SamplingSettings
    grammar: str | None
    cancel: threading.Event
    emit: Emit
    answer: AnswerText


@dataclass(eq=False)
class _Slot:
    seq: int  # its llama.cpp sequence id
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds, position by position
    request: _Request | None = None
    sampler: _internals.LlamaSampler | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    next: int = -1  # the sampled token the next step decodes
    cached: int = 0  # prompt tokens the request found in the cache
    last_used: float = 0.0


class DecodeEngine:
    """Continuous batching on one llama.cpp context (see the module's docstring)."""

    def __init__(self, backend: LlamaCppBackend, slots: int) -> None:
        from .llamacpp import DEFAULT_BATCH, LlamaErrors

        self.backend, self.slots = backend, slots
        self.n_ctx = backend.n_ctx  # per sequence
        llm = backend.llm
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_ctx = self.n_ctx * slots
        params.n_seq_max = slots
        params.kv_unified = False  # a cache stream per sequence: each attends over its own tokens only
        self.n_batch = params.n_batch = params.n_ubatch = min(DEFAULT_BATCH, self.n_ctx * slots)
        with LlamaErrors() as log:
            self._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.kv_bytes = log.kv_bytes  # the KV cache of all slots, as llama.cpp allocated it
        if llm._lora_adapter is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
            scales = (ctypes.c_float * 1)(llm.lora_scale)
            if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
                raise RuntimeError(f"llama.cpp cannot apply the LoRA adapter {llm.lora_path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(slots)]
        self._inbox: deque[_Request] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # work for this thread between steps
        self._wake = threading.Condition()
        self._closing = False
        self.steps = 0  # llama_decode calls so far (what a test of fairness counts)
        self._thread = threading.Thread(target=self._run, name="localchat-decode", daemon=True)
        self._thread.start()

    # --- the callers' side -------------------------------------------------------------------

    def submit(self, prompt: PromptLike, settings: SamplingSettings, emit: Emit,
               cancel: threading.Event | None = None, lstrip: bool = True, grammar: str | None = None) -> None:
        """Queue a request; `emit` gets its chunks from the engine's thread, then None.

        A prompt that cannot run (too long, a grammar llama.cpp rejects) raises here, at once.
        """
        from .llamacpp import AnswerText

        tokens = self.backend.prompt_tokens(prompt, grammar)
        cancel = cancel or threading.Event()
        answer = AnswerText(self.backend, settings, self.n_ctx - len(tokens), cancel, lstrip)
        with self._wake:
            if self._closing:
                raise EngineClosed("the model is being unloaded")
            self._inbox.append(_Request(tokens, settings, grammar, cancel, emit, answer))
            self._wake.notify()

    def stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None = None,
               lstrip: bool = True, grammar: str | None = None) -> Iterator[Chunk]:
        """The answer as `Backend.stream` gives it, decoded in the shared batch."""
        cancel = cancel or threading.Event()
        return stream_from(lambda emit: self.submit(prompt, settings, emit, cancel, lstrip, grammar), cancel)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the engine's thread between two steps (an embedding in the backend's own context:
        one thread drives llama.cpp, so OpenMP thread teams do not fight over the cores)."""
        done: Future = Future()
        with self._wake:
            if self._closing:
                raise EngineClosed("the model is being unloaded")
            self._calls.append((fn, done))
            self._wake.notify()
        return done

    def close(self) -> None:
        """Stop the step loop (requests still waiting or running get EngineClosed) and free the context."""
        with self._wake:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()

    # --- the engine's thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._closing and not self._inbox and not self._calls and not self._active():
                        self._wake.wait()
                    if self._closing:
                        break
                    self._admit()
                    calls, self._calls = list(self._calls), deque()
                for fn, done in calls:
                    if done.set_running_or_notify_cancel():
                        try:
                            done.set_result(fn())
                        except BaseException as exc:  # handed to the caller
                            done.set_exception(exc)
                if self._active():
                    try:
                        self._step()
                    except Exception as exc:  # those in the batch get the error; the loop goes on
                        for slot in self._active():
                            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
                            slot.tokens = []
                            self._leave(slot, exc)
        finally:
            gone = EngineClosed("the model was unloaded")
            for slot in self._active():
                self._leave(slot, gone)
            for _, done in self._calls:
                if done.set_running_or_notify_cancel():
                    done.set_exception(gone)
            while self._inbox:
                req = self._inbox.popleft()
                req.emit(gone)
                req.emit(None)

    def _active(self) -> list[_Slot]:
        return [s for s in self._slots if s.request is not None]

    def _admit(self) -> None:
        """Waiting requests into free slots: each to the one sharing the longest prefix of its prompt
        (then the one unused longest, so recent conversations keep their cache)."""
        from .llamacpp import reusable_prefix, sampler_chain

        while self._inbox:
            free = [s for s in self._slots if s.request is None]
            if not free:
                return
            req = self._inbox.popleft()
            slot = max(free, key=lambda s: (self._reuse(s, req.tokens), -s.last_used))
            keep = reusable_prefix(slot.tokens, req.tokens, req.settings.seed)
            if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, keep, -1):
                keep = 0  # a cache that cannot drop a tail (recurrent models): start over
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            s = req.settings
            seed = s.seed if s.seed is not None else random.getrandbits(32)
            slot.sampler = sampler_chain(self.backend.llm, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                                         temp=s.temperature, repeat_penalty=s.repeat_penalty,
                                         frequency_penalty=s.frequency_penalty,
                                         presence_penalty=s.presence_penalty, grammar=req.grammar, seed=seed)
            slot.request, slot.tokens, slot.pending = req, req.tokens[:keep], req.tokens[keep:]
            slot.cached, slot.next = keep, -1

    @staticmethod
    def _reuse(slot: _Slot, tokens: list[int]) -> int:
        """Cached tokens `tokens` would reuse in `slot`, counted only where they are at least half
        of what the slot holds: a new chat that shares just the system prompt with a conversation
        takes the slot unused longest rather than wiping that conversation's history."""
        from .llamacpp import common_prefix

        shared = common_prefix(slot.tokens, tokens)
        return shared if 2 * shared >= len(slot.tokens) else 0

    def _step(self) -> None:
        """One llama_decode: each decoding slot's next token and, while the batch has room, each
        prefilling slot's next prompt chunk; then every sampled token goes to its answer.

        Tokens go into the batch in slot order. With a KV stream per sequence, llama.cpp splits a
        batch into ubatches of consecutive sequence ids holding equally many tokens each, and each
        ubatch reads all the weights once: decode tokens first and prompt chunks after would cut
        the run of decoding slots at every prefilling one (three passes where two do). The step's
        tokens are all sampled before any chunk is handed out, so the consumers (the server's event
        loop) do not take the GIL between llama.cpp calls here, and read while the next step decodes.
        """
        for slot in self._active():
            if slot.request is not None and slot.request.cancel.is_set():
                slot.request.answer.finish = "cancelled"
                self._leave(slot)
        batch, n, sample_at = self._batch, 0, []

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n] = token, len(slot.tokens)
            batch.n_seq_id[n], batch.seq_id[n][0], batch.logits[n] = 1, slot.seq, logits
            slot.tokens.append(token)
            if logits:
                sample_at.append((slot, n))
            n += 1

        active = self._active()
        room = self.n_batch - sum(1 for slot in active if not slot.pending)  # decoding slots come first
        for slot in active:
            if not slot.pending:
                add(slot, slot.next, True)
            elif room > 0:
                chunk, slot.pending = slot.pending[:room], slot.pending[room:]
                room -= len(chunk)
                for i, token in enumerate(chunk):
                    add(slot, token, not slot.pending and i == len(chunk) - 1)
        if n == 0:
            return
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx.ctx, batch)
        self.steps += 1
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc}) with {len(active)} sequences in the batch")
        sampled = [(slot, slot.sampler.sample(self._ctx, i)) for slot, i in sample_at]  # type: ignore[union-attr]
        for slot, token in sampled:
            req = slot.request
            assert req is not None
            if text := req.answer.feed(token):
                req.emit(Chunk(text))
            if req.answer.finish:
                self._leave(slot)
            else:
                slot.next = token

    def _leave(self, slot: _Slot, error: BaseException | None = None) -> None:
        """End the slot's request (its last chunk with stats, or `error`); the slot keeps its cache."""
        req = slot.request
        assert req is not None
        if error is None:
            req.emit(req.answer.last(len(req.tokens), slot.cached))
        else:
            req.emit(error)
        req.emit(None)
        if slot.sampler is not None:
            slot.sampler.close()
        slot.request, slot.sampler, slot.pending = None, None, []
        slot.last_used = time.monotonic()
