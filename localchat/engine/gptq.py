"""The GPTQ backend: a 4-bit GPTQ checkpoint through transformers + GPTQModel kernels.

On CUDA it runs the fastest kernel GPTQModel has for the card; on a CPU it still runs
(slowly), which keeps the path testable everywhere. This is the only runtime module that
imports torch, and only when the planner picked a GPTQ backend.

The decode loop is our own (prefill, then one token at a time with the KV cache), so
stop strings, cancellation and timing behave exactly as in the llama.cpp backend.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..planner import CPU, Plan, backend_spec
from .backend import Backend, Chunk, ContextOverflow, GenerationStats, ModelTemplate, PromptLike, SpecialTokens
from .settings import SamplingSettings
from .stops import StopFilter


def gptq_environment() -> None:
    """GPTQModel sizes its worker pools from the core count, and its defaults fail on 2-core
    machines; two workers work everywhere we measured. A user's own setting wins."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


def load_model(folder: str | Path, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) from an HF folder, GPTQ or full precision; no remote code."""
    gptq_environment()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), device_map=device, dtype=dtype,
                                                 trust_remote_code=False)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    return model, tok


def _sample(logits: Any, settings: SamplingSettings, history: list[int], counts: dict[int, int],
            gen: Any) -> int:
    """One next token in the llama.cpp backend's order (`sampler_chain`): penalties, then temperature
    before top-k, top-p and min-p, as transformers applies them."""
    import torch

    logits = logits.float().clone()
    if history and settings.repeat_penalty != 1.0:
        idx = torch.tensor(sorted(set(history[-64:])), device=logits.device)
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / settings.repeat_penalty, vals * settings.repeat_penalty)
    if counts and (settings.presence_penalty or settings.frequency_penalty):
        idx = torch.tensor(list(counts), device=logits.device)
        n = torch.tensor(list(counts.values()), device=logits.device, dtype=logits.dtype)
        logits[idx] -= settings.presence_penalty + settings.frequency_penalty * n
    if settings.temperature <= 0:
        return int(logits.argmax())
    logits /= settings.temperature
    if settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cut = torch.cumsum(sorted_p, dim=-1) - sorted_p > settings.top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    if settings.min_p > 0:
        probs[probs < settings.min_p * probs.max()] = 0
    return int(torch.multinomial((probs / probs.sum()).cpu(), 1, generator=gen))


class GptqBackend(Backend):
    def __init__(self, plan: Plan) -> None:
        import torch

        self.name = plan.backend
        self.device = "cpu" if backend_spec(plan.backend).library == CPU else "cuda"  # torch's name, ROCm too
        if self.device == "cpu":
            torch.set_num_threads(plan.threads)
        folder = Path(plan.artifact.path)
        self.model, self.tok = load_model(folder, self.device)
        self.n_ctx = plan.context
        self.template = ModelTemplate(source=self.tok.chat_template, bos_token=self.tok.bos_token or "",
                                      eos_token=self.tok.eos_token or "", origin=f"chat template of {folder}")
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self._eos = set(eos) | ({self.tok.eos_token_id} if self.tok.eos_token_id is not None else set())
        added = [(i, t) for i, t in self.tok.added_tokens_decoder.items() if t.special]
        self.special = SpecialTokens({t.content: i for i, t in added}, [t.content for _, t in added if t.lstrip],
                                     [t.content for _, t in added if t.rstrip])
        self._busy = threading.Lock()

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _encode_pieces(self, pieces: list[str | int]) -> list[int]:
        # split_special_tokens: special added tokens are text here (non-special ones still match).
        ids: list[int] = []
        for piece in pieces:
            ids += [piece] if isinstance(piece, int) else \
                self.tok(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids

    def stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None = None,
               lstrip: bool = True, grammar: str | None = None) -> Iterator[Chunk]:
        if grammar is not None:
            raise ValueError("structured output and tool calls need a grammar, which only the llama.cpp "
                             "backend has; use the model's GGUF")
        with self._busy:
            yield from self._stream(prompt, settings, cancel, lstrip)

    def _stream(self, prompt: PromptLike, settings: SamplingSettings, cancel: threading.Event | None,
                lstrip: bool) -> Iterator[Chunk]:
        import torch

        tokens = self.tokenize(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(f"the prompt takes {len(tokens)} tokens; the context holds {self.n_ctx}")
        gen = torch.Generator().manual_seed(settings.seed if settings.seed is not None else
                                            int.from_bytes(os.urandom(4), "little"))
        budget = min(settings.max_tokens, self.n_ctx - len(tokens))
        stops = StopFilter(settings.stop)
        finish, out, counts, shown, started = "length", [], {}, "", False
        t0 = time.perf_counter()
        t_first = t_last = t0
        with torch.inference_mode():
            ids = torch.tensor([tokens], device=self.device)
            res = self.model(input_ids=ids, use_cache=True)
            past, logits = res.past_key_values, res.logits[0, -1]
            while True:
                token = _sample(logits, settings, tokens + out, counts, gen)
                t_last = time.perf_counter()
                if not out:
                    t_first = t_last
                if token in self._eos:
                    finish = "stop"
                    break
                out.append(token)
                counts[token] = counts.get(token, 0) + 1
                # Decode the whole answer and send what is new: byte-level BPE pieces of one
                # character can span tokens, and a partial one decodes to U+FFFD.
                text = self.tok.decode(out, skip_special_tokens=False)
                new = "" if text.endswith("\ufffd") else text[len(shown):]
                if new:
                    shown = text
                    new = stops.feed(new)
                    if not started and lstrip:
                        new = new.lstrip()
                    started = started or bool(new)
                    if new:
                        yield Chunk(new)
                if stops.stopped:
                    finish = "stop"
                    break
                if len(out) >= budget:
                    break
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
                res = self.model(input_ids=torch.tensor([[token]], device=self.device), past_key_values=past,
                                 use_cache=True)
                past, logits = res.past_key_values, res.logits[0, -1]
        tail = stops.flush()
        stats = GenerationStats(prompt_tokens=len(tokens), cached_tokens=0, completion_tokens=len(out),
                                ttft_s=t_first - t0, decode_s=t_last - t_first, finish_reason=finish)
        yield Chunk(tail.lstrip() if not started and lstrip else tail, stats)

    def close(self) -> None:
        import gc

        del self.model
        gc.collect()
