"""The llama.cpp backend (CPU, Metal, CUDA) through llama-cpp-python.

It drives `Llama.generate` token by token: that keeps the KV cache of the previous turn
(a follow-up question only evaluates the new tokens), lets stop strings and cancellation
act between tokens, and costs next to nothing over raw llama-cpp-python.

The sampler chain is localchat's own (`sampler_chain`): penalties, the grammar of a
structured answer, then temperature before top-k/top-p/min-p, as transformers and the
OpenAI API apply them. Presets come from model cards and generation_config.json, whose
numbers mean that order; llama.cpp's default (temperature last) makes top_p=0.9 at
temperature 0.2 keep the tail that the authors' setting cuts off.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import random
import re
import threading
import time
from typing import Any, Iterator, Sequence

import llama_cpp
import numpy as np
from llama_cpp._logger import llama_log_callback as default_log_callback

from ..gguf_file import GGUFHeader, read_gguf
from ..planner import Plan
from llama_cpp import _internals

from .backend import (Backend, CannotEmbed, Chunk, ContextOverflow, GenerationStats, ModelTemplate, PromptLike,
                      SpecialTokens)
from .settings import SamplingSettings
from .stops import StopFilter

DEFAULT_BATCH = 512
EMBED_CONTEXT = 2048  # tokens one embedding decode holds (the longest input, or several short ones)
EMBED_SEQS = 16  # inputs packed into one embedding decode
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5  # ggml.h, enum ggml_log_level
_log_lock = threading.Lock()  # llama.cpp has one log callback per process
_KV_BUFFER = re.compile(r"KV buffer size =\s*([\d.]+) MiB")  # llama_kv_cache's line as a context is made


def kv_cache_args(kv_cache: str, exact: bool = False) -> dict[str, Any]:
    """`Llama` arguments for a KV cache type (planner.KV_CACHE_TYPES), with flash attention: llama.cpp
    quantizes the V cache only with it, and with an f16 cache its fused kernel (fewer graph nodes, so
    fewer thread barriers a layer) decoded faster on the 2-core CPU: the starter +8-10% on one stream,
    the 1.1B LLaMA-shaped Q4_K_M +5% on one stream and +16% with 16 in one batch (llama-server turns
    it on by itself where the device has it). `exact` (perplexity, which compares quant types; logits
    checked against transformers): off with an unquantized (f16, f32) cache, since its CPU kernel rounds
    the queries to f16 (Q8_0's perplexity against F16's moved from under 0.5% to 0.7% with it)."""
    kind = getattr(llama_cpp, f"GGML_TYPE_{kv_cache.upper()}")
    return {"type_k": kind, "type_v": kind, "flash_attn": not (exact and kv_cache in ("f16", "f32"))}


class LlamaErrors:
    """Collects the error lines llama.cpp logs inside a `with` block, and the KV cache it allocates.

    A load that fails reaches Python as a bare "Failed to load model from file", and with
    verbose=False llama-cpp-python sends llama.cpp's own reason (an unknown architecture, a
    missing tensor, a failed GPU allocation) to /dev/null; this keeps it for the error message.
    """

    def __init__(self) -> None:
        self._text: list[str] = []
        self._last_level = 0
        self.kv_bytes = 0  # the KV cache buffers llama.cpp reports allocating, on every device
        self._callback = llama_cpp.llama_log_callback(self._collect)  # kept alive while installed

    def _collect(self, level: int, chunk: bytes, _: ctypes.c_void_p) -> None:
        error = level == GGML_LOG_LEVEL_ERROR
        if error or (level == GGML_LOG_LEVEL_CONT and self._last_level == GGML_LOG_LEVEL_ERROR):
            self._text.append(chunk.decode("utf-8", "replace"))
        elif kv := _KV_BUFFER.search(chunk.decode("utf-8", "replace")):
            self.kv_bytes += int(float(kv.group(1)) * 1024**2)
        if level != GGML_LOG_LEVEL_CONT:
            self._last_level = level

    def __enter__(self) -> LlamaErrors:
        _log_lock.acquire()
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        llama_cpp.llama_log_set(default_log_callback, ctypes.c_void_p(0))
        _log_lock.release()

    def reason(self, keep: int = 4) -> str:
        """The last `keep` distinct error lines, without the C function names, joined by '; '."""
        lines: list[str] = []
        for line in "".join(self._text).splitlines():
            line = re.sub(r"^\w+: ", "", line.strip())
            if line and line != "failed to load model" and line not in lines:  # that one says nothing
                lines.append(line)
        return "; ".join(lines[-keep:])


_LOADING = threading.Lock()


class _UnusedChatFormatter:
    """Stands in for llama-cpp-python's Jinja2ChatFormatter while a model loads."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    def to_chat_handler(self) -> None:
        return None


@contextlib.contextmanager
def without_chat_formatters() -> Iterator[None]:
    """Keep `Llama()` from compiling the file's chat templates.

    llama-cpp-python compiles every `tokenizer.chat_template*` in the file as it loads, with
    jinja's constant folding, for its own create_chat_completion, which localchat never calls
    (templates render in our limited sandbox). A template holding ``{{ 'x' * 10**10 }}`` would
    build that string at load, before any limit could act. Loads take this lock, so the swap
    is never seen half-done by another load.
    """
    from llama_cpp import llama_chat_format

    with _LOADING:
        real = llama_chat_format.Jinja2ChatFormatter
        llama_chat_format.Jinja2ChatFormatter = _UnusedChatFormatter  # type: ignore[misc, assignment]
        try:
            yield
        finally:
            llama_chat_format.Jinja2ChatFormatter = real  # type: ignore[misc]


class LlamaCppBackend(Backend):
    def __init__(self, plan: Plan, header: GGUFHeader | None = None) -> None:
        path = plan.artifact.path
        self.header = header or read_gguf(path)  # never hand llama.cpp a bad file
        self.name = plan.backend
        n_layers = plan.artifact.dims.n_layers
        gpu_layers = -1 if plan.gpu_layers and plan.gpu_layers >= n_layers else plan.gpu_layers  # -1: all
        with LlamaErrors() as errors, without_chat_formatters():
            try:
                self.llm = llama_cpp.Llama(
                    model_path=path, n_ctx=plan.context, n_batch=min(DEFAULT_BATCH, plan.context),
                    n_threads=plan.threads, n_threads_batch=plan.threads, n_gpu_layers=gpu_layers,
                    lora_path=plan.artifact.lora_path, verbose=False, **kv_cache_args(plan.kv_cache),
                )
            except (ValueError, RuntimeError) as exc:  # "Failed to load model from file: PATH", no reason
                reason = errors.reason()
                raise type(exc)(f"{exc} (llama.cpp: {reason})" if reason else str(exc)) from None
        self.n_ctx = self.llm.n_ctx()
        self.kv_bytes = errors.kv_bytes  # as llama.cpp allocated it (the engine's context replaces it)
        self._vocab = self.llm._model.vocab
        self._add_bos = bool(self.header.metadata.get("tokenizer.ggml.add_bos_token", True))
        self.template = ModelTemplate(
            source=self.header.chat_template,
            bos_token=self.header.token("bos") or "",
            eos_token=self.header.token("eos") or "",
            origin=f"chat template of {path}",
            stop=self.header.stop_strings,
        )
        self.special = _special_tokens(self._vocab)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}  # token -> its text, as llama.cpp gave it once
        self._eog: dict[int, bool] = {}  # token -> whether it ends generation
        self._busy = threading.Lock()  # one llama.cpp context decodes one sequence at a time
        self._grammar: str | None = None
        self._embedder: _internals.LlamaContext | None = None  # made on the first embedding request
        self._seed = 0
        self._engine: Any = None  # the DecodeEngine that took over decoding, if any
        self.llm._init_sampler = self._sampler  # type: ignore[method-assign]  # generate() builds ours

    def _sampler(self, *, top_k: int, top_p: float, min_p: float, temp: float, repeat_penalty: float,
                 frequency_penalty: float, presence_penalty: float, **_: Any) -> _internals.LlamaSampler:
        """The chain `Llama.generate` samples with (it passes its own arguments, ours from `_stream`)."""
        return sampler_chain(self.llm, top_k=top_k, top_p=top_p, min_p=min_p, temp=temp,
                             repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty, grammar=self._grammar, seed=self._seed)

    def _wants_bos(self, text: str) -> bool:
        return self._add_bos and not (self.template.bos_token and text.startswith(self.template.bos_token))

    def _encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self._wants_bos(text), special=True)

    def _encode_pieces(self, pieces: list[str | int]) -> list[int]:
        # As llama.cpp's own tokenize does for each fragment between control tokens: a piece alone
        # gets the SentencePiece space prefix exactly where it would (every text fragment is
        # first or follows a control token), and user-defined tokens are still matched in it.
        # BOS (and EOS, where a vocab asks for one) go around the whole prompt, unless the
        # template's markup starts with the BOS already.
        v = self._vocab
        add = self._add_bos and not (pieces and pieces[0] == llama_cpp.llama_vocab_bos(v))
        ids = [llama_cpp.llama_vocab_bos(v)] if add and llama_cpp.llama_vocab_get_add_bos(v) else []
        for piece in pieces:
            if isinstance(piece, int):
                ids.append(piece)
            else:
                ids += self.llm.tokenize(piece.encode("utf-8"), add_bos=False, special=False)
        if add and llama_cpp.llama_vocab_get_add_eos(v):
            ids.append(llama_cpp.llama_vocab_eos(v))
        return ids

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (asked of llama.cpp once per token: each answer asks per step)."""
        if (eog := self._eog.get(token)) is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return eog

    def _piece(self, token: int) -> bytes:
        """`token`'s bytes, from llama.cpp the first time, then from a dict: the decode engine asks for
        a piece per answer per step, and every call into llama.cpp hands the GIL around."""
        if (piece := self._pieces.get(token)) is not None:
            return piece
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, len(self._piece_buf), 0, False)
        if n < 0:  # a piece longer than the buffer: grow it and ask again
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, -n, 0, False)
        piece = self._pieces[token] = self._piece_buf.raw[:n]
        return piece

    def prompt_tokens(self, prompt: PromptLike, grammar: str | None = None) -> list[int]:
        """`prompt`'s tokens, checked before anything decodes, alike on the one-sequence path and in
        the engine: a grammar llama.cpp cannot parse raises GrammarError (a NULL sampler in a chain
        would crash), a prompt that fills the context raises ContextOverflow."""
        if grammar is not None:
            check_grammar(self._vocab, grammar)
        tokens = self.tokenize(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(f"the prompt takes {len(tokens)} tokens; the context holds {self.n_ctx}")
        return tokens

    def stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None = None,
               lstrip: bool = True, grammar: str | None = None) -> Iterator[Chunk]:
        if self._engine is not None:
            yield from self._engine.stream(prompt, settings, cancel, lstrip, grammar)
            return
        with self._busy:
            self._grammar = grammar
            try:
                yield from self._stream(prompt, settings, cancel, lstrip)
            finally:
                self._grammar = None

    def _stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None,
                lstrip: bool = True) -> Iterator[Chunk]:
        tokens = self.prompt_tokens(prompt, self._grammar)
        if settings.seed is not None:
            self.llm.reset()  # generate() reuses what the cache holds (see reusable_prefix)
        cached = reusable_prefix(self.llm._input_ids[: self.llm.n_tokens], tokens, settings.seed)
        self._seed = settings.seed if settings.seed is not None else random.getrandbits(32)
        answer = AnswerText(self, settings, self.n_ctx - len(tokens), cancel, lstrip)
        gen = self.llm.generate(tokens, top_k=settings.top_k, top_p=settings.top_p, min_p=settings.min_p,
                                temp=settings.temperature, repeat_penalty=settings.repeat_penalty,
                                presence_penalty=settings.presence_penalty,
                                frequency_penalty=settings.frequency_penalty)
        try:
            for token in gen:
                if text := answer.feed(token):
                    yield Chunk(text)
                if answer.finish:
                    break
        finally:
            gen.close()
        yield answer.last(len(tokens), cached)

    def engine(self, slots: int) -> Any:
        """A DecodeEngine that decodes up to `slots` answers at once; from here on `stream` goes
        through it, and the context the model loaded with is freed (the engine holds its own)."""
        from .batching import DecodeEngine

        with self._busy:
            if self._engine is None:
                self._engine = DecodeEngine(self, slots)
                self.llm._ctx.close()  # its KV cache would sit unused beside the engine's
            return self._engine

    def embed(self, texts: list[str], truncate: bool = False) -> tuple[list[list[float]], int]:
        """Mean-pooled, unit-length embeddings, several inputs per decode.

        They come from a second llama.cpp context on the same weights (no second copy): pooling
        is fixed when a context is made, a causal LM's own context pools nothing, and an embedding
        decode there would throw away the KV cache the next chat turn reuses.
        """
        with self._busy:
            ctx = self._embedding_context()
            size = ctx.params.n_ctx
            ids = []
            for i, text in enumerate(texts):
                tokens = self.llm.tokenize(text.encode("utf-8"), add_bos=self._add_bos, special=False)
                if not text or not tokens:
                    raise ValueError(f"input[{i}]: empty text has no embedding")
                if len(tokens) > size and not truncate:
                    raise ValueError(f"input[{i}] takes {len(tokens)} tokens; an embedding takes at most "
                                     f"{size}")
                ids.append(tokens[:size])
            vectors: list[list[float]] = []
            batch = _internals.LlamaBatch(n_tokens=size, embd=0, n_seq_max=EMBED_SEQS, verbose=False)
            try:
                start = 0
                while start < len(ids):
                    end, used = start, 0
                    while end < len(ids) and end - start < EMBED_SEQS and used + len(ids[end]) <= size:
                        used += len(ids[end])
                        end += 1
                    batch.reset()
                    for seq, tokens in enumerate(ids[start:end]):
                        batch.add_sequence(tokens, seq, True)
                    ctx.kv_cache_clear()
                    ctx.decode(batch)
                    n_embd = self.llm.n_embd()
                    for seq in range(end - start):
                        v = np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx.ctx, seq), (n_embd,))
                        vectors.append((v / (np.linalg.norm(v) or 1.0)).tolist())
                    start = end
            finally:
                batch.close()
            return vectors, sum(map(len, ids))

    def _embedding_context(self) -> _internals.LlamaContext:
        if self._embedder is None:
            p = llama_cpp.llama_context_default_params()
            p.n_ctx = p.n_batch = p.n_ubatch = min(EMBED_CONTEXT, self.n_ctx)
            p.n_seq_max, p.kv_unified = EMBED_SEQS, True  # the inputs of a decode share its cells
            p.n_threads = p.n_threads_batch = self.llm.n_threads
            p.embeddings, p.pooling_type = True, llama_cpp.LLAMA_POOLING_TYPE_MEAN
            with LlamaErrors() as errors:
                try:  # freed with the model (the context registers itself on it)
                    self._embedder = _internals.LlamaContext(model=self.llm._model, params=p, verbose=False)
                except ValueError as exc:
                    raise CannotEmbed(f"llama.cpp cannot make an embedding context for this model: "
                                      f"{errors.reason() or exc}") from None
        return self._embedder

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self.llm.close()


class AnswerText:
    """Sampled tokens -> the text a user sees, and when and why the answer ends.

    Shared by the one-sequence path and the decode engine, so both end an answer alike: at an
    end-of-generation token, a stop string (held back until it is sure), the token budget or
    a cancel; UTF-8 split across tokens is joined, and a new answer starts at its first
    visible character (`lstrip`). The clock starts when the answer is asked for.
    """

    def __init__(self, backend: LlamaCppBackend, settings: SamplingSettings, room: int,
                 cancel: threading.Event | None, lstrip: bool = True) -> None:
        self._backend, self._cancel, self._lstrip = backend, cancel, lstrip
        self.budget = min(settings.max_tokens, room)
        self._stops = StopFilter(settings.stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.n, self.started, self.finish = 0, False, ""  # finish: "" while the answer goes on
        self.t0 = time.perf_counter()
        self.t_first = self.t_last = self.t0

    def feed(self, token: int) -> str:
        """The text `token` adds (maybe none yet); sets `finish` when the answer ends here."""
        self.t_last = time.perf_counter()
        if self.n == 0:
            self.t_first = self.t_last
        if self._backend.is_eog(token):
            self.finish = "stop"
            return ""
        self.n += 1
        text = self._stops.feed(self._decoder.decode(self._backend._piece(token)))
        if not self.started and self._lstrip:
            text = text.lstrip()
            self.started = bool(text)
        if self._stops.stopped:
            self.finish = "stop"
        elif self.n >= self.budget:
            self.finish = "length"
        elif self._cancel is not None and self._cancel.is_set():
            self.finish = "cancelled"
        return text

    def last(self, prompt_tokens: int, cached_tokens: int) -> Chunk:
        """The held-back tail of the text and the answer's stats (ended "length" unless told why)."""
        tail = self._stops.feed(self._decoder.decode(b"", final=True)) + self._stops.flush()
        stats = GenerationStats(prompt_tokens=prompt_tokens, cached_tokens=cached_tokens,
                                completion_tokens=self.n, ttft_s=self.t_first - self.t0,
                                decode_s=self.t_last - self.t_first, finish_reason=self.finish or "length")
        return Chunk(tail.lstrip() if not self.started and self._lstrip else tail, stats)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable_prefix(held: Sequence[int], tokens: list[int], seed: int | None) -> int:
    """Prompt tokens a KV cache holding `held` spares evaluating: the prefix they share, less the
    prompt's last token (its logits give the first answer token); none for a seeded request, since a
    prefix evaluated in other batches moves the logits by rounding and a seed promises the same answer."""
    return 0 if seed is not None else min(common_prefix(held, tokens), len(tokens) - 1)


class GrammarError(ValueError):
    """A GBNF grammar llama.cpp cannot parse."""


def check_grammar(vocab: Any, grammar: str) -> None:
    """Raise GrammarError unless llama.cpp parses `grammar` (a NULL sampler in a chain would crash)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise GrammarError("llama.cpp cannot parse the grammar built for this answer")
    llama_cpp.llama_sampler_free(sampler)


def sampler_chain(llm: llama_cpp.Llama, *, top_k: int, top_p: float, min_p: float, temp: float,
                  repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                  grammar: str | None = None, seed: int = 0) -> _internals.LlamaSampler:
    """Penalties, grammar, then greedy, or temperature, top-k, top-p, min-p and a draw."""
    chain = _internals.LlamaSampler()
    chain.add_penalties(n_vocab=llm.n_vocab(), penalty_last_n=llm.last_n_tokens_size,
                        penalty_repeat=repeat_penalty, penalty_freq=frequency_penalty,
                        penalty_present=presence_penalty)
    if grammar is not None:
        chain.add_grammar(llm._model, llama_cpp.LlamaGrammar.from_string(grammar))
    if temp <= 0:
        chain.add_greedy()
        return chain
    chain.add_temp(temp)
    chain.add_top_k(top_k)
    chain.add_top_p(top_p, 1)
    chain.add_min_p(min_p, 1)
    chain.add_dist(seed)
    return chain


def _special_tokens(vocab: Any) -> SpecialTokens:
    """The vocab's control and unknown tokens: the ones llama.cpp matches in text only when told
    to parse special tokens (user-defined ones it matches always, as Hugging Face does)."""
    ids: dict[str, int] = {}
    lstrip, rstrip = [], []
    for i in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, i)
        if not attr & (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN):
            continue
        try:
            text = llama_cpp.llama_vocab_get_text(vocab, i).decode("utf-8")
        except UnicodeDecodeError:  # cannot occur in a str prompt
            continue
        ids.setdefault(text, i)
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP:
            lstrip.append(text)
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP:
            rstrip.append(text)
    return SpecialTokens(ids, lstrip, rstrip)
