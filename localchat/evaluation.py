"""What a quant type costs: perplexity on a text, and KL divergence from a reference model.

Both run through llama.cpp on GGUF files. The text is cut into chunks of `chunk` tokens;
as llama.cpp's own perplexity tool does, only the second half of each chunk is scored, so
every scored token has at least chunk/2 tokens of context. KL divergence compares the
token distributions of the model and its reference (the F16 source) at the same
positions; "top-1 agreement" is how often both would pick the same next token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .gguf_file import read_gguf
from .templates import DEFAULT_FORMAT, get_format, render_chat

DEFAULT_CHUNK = 512
MAX_TOKENS = 16_384
MIN_TOKENS = 32  # below this a perplexity says nothing


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    tokens_scored: int
    ppl_base: float | None = None
    kld: float | None = None
    kld_p99: float | None = None
    top1: float | None = None  # fraction of positions where both models agree on the next token

    def figures(self) -> dict[str, float | int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def summary(self) -> str:
        s = f"perplexity {self.ppl:.4f} over {self.tokens_scored} tokens"
        if self.kld is not None:
            s += (f"; reference perplexity {self.ppl_base:.4f} ({(self.ppl / self.ppl_base - 1) * 100:+.2f}%); "
                  f"KL divergence mean {self.kld:.5f}, p99 {self.kld_p99:.5f}; same top token "
                  f"{self.top1 * 100:.1f}%")
        return s


# Mean KL divergence from the source (nats per token) and what it means for a user, best first.
# Figures from the quant_ppl bench: Q8_0 stays far under 0.01, Q4_K_M of a 1B model is near 0.05,
# a small model at 2-3 bits goes past 0.15, where answers visibly wander from the source's.
# (KLD below this, its name, what it means for a user), best first.
KLD_VERDICTS = ((0.01, "near lossless", "answers as the source would"),
                (0.05, "good", "small differences from the source"),
                (0.15, "noticeable loss", "some answers differ from the source; a larger quant type keeps more"),
                (float("inf"), "poor", "far from the source; pick a larger quant type"))
EVAL_LEGEND = ("*eval*: perplexity (ppl) on localchat's shipped chats, lower is better, and how much it grew "
               "over the source the model was converted from; KLD: how far the next-token probabilities part "
               "from the source's (0: identical). "
               + ", ".join(f"KLD under {limit:g} is {name}" for limit, name, _ in KLD_VERDICTS[:-1])
               + f", above that {KLD_VERDICTS[-1][1]}.")


def verdict(figures: dict[str, Any]) -> str:
    """An eval's figures (EvalResult.figures) in words: good or bad for a user, and why."""
    if "kld" in figures:
        kld = float(figures["kld"])
        words = next(f"{name}: {text}" for limit, name, text in KLD_VERDICTS if kld < limit)
        grew = ""
        if figures.get("ppl_base"):
            grew = f" (ppl {(figures['ppl'] / figures['ppl_base'] - 1) * 100:+.1f}% vs the source)"
        return words + grew
    if "ppl" in figures:
        return "perplexity only (no source to compare with): lower is better"
    return ""


def chat_eval_text(model_path: str | Path) -> str:
    """The shipped evaluation conversations, rendered with this model's own chat template
    (a GGUF file's, or an HF / GPTQ folder's tokenizer's)."""
    if Path(model_path).is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=False)
        template, bos, eos = tok.chat_template, tok.bos_token or "", tok.eos_token or ""
    else:
        h = read_gguf(model_path)
        template, bos, eos = h.chat_template, h.token("bos") or "", h.token("eos") or ""
    source = template or get_format(DEFAULT_FORMAT).template
    lines = resources.files("localchat").joinpath("data/eval_chats.jsonl").read_text(encoding="utf-8")
    parts = []
    for line in lines.splitlines():
        msgs = json.loads(line)["messages"]
        parts.append(render_chat(source, msgs, bos_token=bos, eos_token=eos,
                                 add_generation_prompt=False, origin=f"chat template of {model_path}"))
    return "".join(parts)


def _chunks(tokens: list[int], chunk: int) -> Iterator[list[int]]:
    if len(tokens) < MIN_TOKENS:
        raise ValueError(f"the text has {len(tokens)} tokens; perplexity needs at least {MIN_TOKENS}")
    if len(tokens) <= chunk:
        yield tokens
        return
    for start in range(0, len(tokens) - chunk + 1, chunk):
        yield tokens[start:start + chunk]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def torch_token_logprobs(model: Any, tok: Any, text: str, chunk: int
                         ) -> tuple[list[int], Iterator[tuple[list[int], np.ndarray]]]:
    """As `_token_logprobs`, for a transformers model in memory (HF, GPTQ, or a baseline)."""
    import torch

    tokens = tok(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    device = next(model.parameters()).device

    def run() -> Iterator[tuple[list[int], np.ndarray]]:
        for seq in _chunks(tokens, chunk):
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([seq], device=device)).logits[0].float()
            first = len(seq) // 2
            lp = torch.log_softmax(logits[first:len(seq) - 1], dim=-1).cpu().numpy()
            yield seq[first + 1:], lp

    return tokens, run()


def _folder_logprobs(path: str | Path, text: str, chunk: int, threads: int | None
                     ) -> tuple[list[int], Iterator[tuple[list[int], np.ndarray]]]:
    """A GPTQ or HF folder through torch (the only way to score GPTQ; HF is its reference)."""
    import torch

    from .engine.gptq import load_model

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    model, tok = load_model(path, "cuda" if torch.cuda.is_available() else "cpu")
    return torch_token_logprobs(model, tok, text, chunk)


def _token_logprobs(path: str | Path, text: str, chunk: int, threads: int | None, kv_cache: str = "f16"
                    ) -> tuple[list[int], Iterator[tuple[list[int], np.ndarray]]]:
    if Path(path).is_dir():
        return _folder_logprobs(path, text, chunk, threads)
    import llama_cpp

    read_gguf(path)
    from .engine.llamacpp import kv_cache_args, without_chat_formatters

    with without_chat_formatters():  # the file's templates are code: never compiled outside our sandbox
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=chunk, n_batch=chunk, n_ubatch=chunk,
                              logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False,
                              **kv_cache_args(kv_cache, exact=True))
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)[:MAX_TOKENS]

    def run() -> Iterator[tuple[list[int], np.ndarray]]:
        try:
            for seq in _chunks(tokens, chunk):
                llm.reset()
                llm.eval(seq)
                first = len(seq) // 2
                logits = np.asarray(llm.scores[first:len(seq) - 1], dtype=np.float32)
                yield seq[first + 1:], _log_softmax(logits)
        finally:
            llm.close()

    return tokens, run()


def evaluate(model: str | Path, text: str, base: str | Path | None = None, chunk: int = DEFAULT_CHUNK,
             threads: int | None = None, kv_cache: str = "f16") -> EvalResult:
    """Perplexity of `model` on `text`; with `base`, also KL(base || model) and top-1 agreement.

    Each is a GGUF file (scored by llama.cpp) or an HF / GPTQ folder (scored by torch); for
    KL divergence both must share a tokenizer. `kv_cache` is the KV cache type llama.cpp scores
    `model` with (what a quantized cache costs in perplexity).
    """
    return evaluate_runs(lambda: _token_logprobs(model, text, chunk, threads, kv_cache),
                         (lambda: _token_logprobs(base, text, chunk, threads)) if base is not None else None)


def evaluate_runs(model_run: Callable[[], tuple[list[int], Iterator[tuple[list[int], np.ndarray]]]],
                  base_run: Callable[[], tuple[list[int], Iterator[tuple[list[int], np.ndarray]]]] | None = None
                  ) -> EvalResult:
    """`evaluate` over any two scorers (the benchmark passes in-memory baselines)."""
    base = base_run
    nll: list[float] = []
    base_nll: list[float] = []
    kls: list[np.ndarray] = []
    agree = total = 0
    ref_chunks: list[tuple[np.ndarray, np.ndarray]] = []
    if base is not None:
        _, ref = base_run()
        for targets, lp in ref:  # kept compactly: float16 log-probs of the scored positions
            idx = np.arange(len(targets))
            base_nll += list(-lp[idx, targets])
            ref_chunks.append((lp.astype(np.float16), lp.argmax(axis=-1)))
    tokens, run = model_run()
    for i, (targets, lp) in enumerate(run):
        idx = np.arange(len(targets))
        nll += list(-lp[idx, targets])
        if base is not None:
            ref_lp, ref_top = ref_chunks[i]
            p = np.exp(ref_lp.astype(np.float32))
            kls.append((p * (ref_lp.astype(np.float32) - lp)).sum(axis=-1))
            agree += int((lp.argmax(axis=-1) == ref_top).sum())
            total += len(targets)
    ppl = float(np.exp(np.mean(nll)))
    if base is None:
        return EvalResult(ppl=ppl, tokens_scored=len(nll))
    kl = np.concatenate(kls)
    return EvalResult(ppl=ppl, tokens_scored=len(nll), ppl_base=float(np.exp(np.mean(base_nll))),
                      kld=float(kl.mean()), kld_p99=float(np.percentile(kl, 99)), top1=agree / total)
