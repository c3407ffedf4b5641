"""Render chat templates, which come from model files we did not write, in a sandbox.

A GGUF's `tokenizer.chat_template` is code. It is rendered in jinja2's
ImmutableSandboxedEnvironment, and any reach for an unsafe attribute (``__globals__``,
``__class__``, ...) stops the render with TemplateSecurityError instead of the sandbox's
default of quietly printing nothing, so a hostile template is refused, not half-run.

The sandbox keeps a template away from the machine but not from the CPU or memory, so every
render also runs under `RenderLimits`: a budget of steps (template lines and Python calls,
counted by a tracer set only on the rendering thread and only while it renders), a
wall-clock deadline, and a cap on the characters of the output and of any string, list,
width or count the template makes on the way. The operations that make a big value in one
step (``*``, ``**``, ``+``, ``~``, ``%``, ``str.format``, str methods and filters given a width
or count, such as ``'x' * 10**10`` or ``'x'.ljust(10**10)``) are checked before they run;
anything else slow or large takes many steps to get there and meets the budget or the
deadline. Over a limit, the render stops with TemplateLimitError.

What is left: one C-level call on values under the cap that multiplies them
(``big.replace('a', big)``) allocates before it can be stopped, and the deadline cannot
interrupt a single C-level call; both are bounded by the cap, not by the template.
"""

from __future__ import annotations

import datetime
import functools
import re
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable, Sequence

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range


class TemplateError(ValueError):
    """A chat template that cannot be rendered; the message says which and why."""


class TemplateSecurityError(TemplateError):
    """A chat template tried to escape the sandbox."""


class TemplateLimitError(TemplateError):
    """A chat template ran too long or built too much."""


@dataclass(frozen=True)
class RenderLimits:
    """What one render may spend. A 20-turn chat through the starter's template takes ~1,000
    steps; a 200-turn one through a long Hugging Face template some tens of thousands."""

    steps: int = 2_000_000  # template lines run plus Python functions called
    seconds: float = 2.0  # wall clock
    chars: int = 8_000_000  # output, and any string, list, width or count made on the way
    int_bits: int = 4096  # the largest integer arithmetic may make


LIMITS = RenderLimits()

_SEQ = (str, list, tuple)
# Filters whose numeric arguments say how much to make (a width, a count to pad to).
_GROWING_FILTERS = ("batch", "center", "format", "indent", "slice", "wordwrap")
_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")  # widths and precisions in 'x%10.3fy'
_BRACE_SPEC = re.compile(r"\{[^{}]*?:([^{}]*)\}")  # the spec in '{0:>10}'


class _Stop(BaseException):
    """Raised inside the render when a limit is hit. A BaseException, so no `except Exception`
    on the way out (jinja's runtime has a few) can swallow it and let the template run on."""


def _show(n: int) -> str:
    return str(n) if n.bit_length() < 64 else f"a {n.bit_length()}-bit number"


def _refuse_size(n: int, kind: str, limits: RenderLimits) -> None:
    if n > limits.chars:
        raise _Stop(f"it asked for a {'string' if kind == 'str' else kind} of {n} "
                    f"{'characters' if kind == 'str' else 'items'} (the limit is {limits.chars})")


def _refuse_numbers(values: Iterable[Any], what: str, limits: RenderLimits) -> None:
    """Integers (or digit strings from a format spec) over the cap, given to something that
    would make that many characters or items."""
    for v in values:
        n = int(v) if isinstance(v, str) and v.isdigit() else v
        if isinstance(n, int) and abs(n) > limits.chars:
            raise _Stop(f"it asked {what} for {_show(n)} (the limit is {limits.chars})")


def _format_numbers(fmt: str, brace: bool) -> list[str]:
    if brace:
        return [d for spec in _BRACE_SPEC.findall(fmt) for d in re.findall(r"\d+", spec)]
    return [d for m in _PERCENT_SPEC.finditer(fmt) for d in m.groups() if d]


class _StrictSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, limits: RenderLimits, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limits = limits
        for name in _GROWING_FILTERS:
            self.filters[name] = _checked_filter(self.filters[name], name, limits)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """`*`, `**`, `+` and `%` refused when the result would be over the limits, before it is made."""
        lim = self.limits
        if operator == "+":  # the common one (templates build turns with it): checked inline
            if isinstance(left, _SEQ) and isinstance(right, _SEQ) and len(left) + len(right) > lim.chars:
                _refuse_size(len(left) + len(right), type(left).__name__, lim)
        elif operator == "%":
            if isinstance(left, str):
                args = right if isinstance(right, tuple) else (right,)
                _refuse_numbers([*_format_numbers(left, brace=False), *args], "a % format", lim)
        elif isinstance(left, int) and isinstance(right, int):
            bits = (right * abs(left).bit_length() if abs(left) > 1 else 0) if operator == "**" else \
                left.bit_length() + right.bit_length()
            if bits > lim.int_bits:
                raise _Stop(f"it asked for a number over {lim.int_bits} bits ({operator})")
        elif operator == "*":  # a sequence repeated
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, _SEQ) and isinstance(n, int):
                _refuse_size(len(seq) * n, type(seq).__name__, lim)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """str methods (``'x'.ljust(10**10)``) and range refused numbers over the cap."""
        if isinstance(getattr(__obj, "__self__", None), str) or __obj is safe_range:
            name = "range" if __obj is safe_range else getattr(__obj, "__name__", "a call")
            _refuse_numbers((*args, *kwargs.values()), f"{name}()", __self.limits)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        """'{:>10000000000}'.format(...) refused for its width."""
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _refuse_numbers(_format_numbers(value.__self__, brace=True), "a format", self.limits)
        return wrapped


def _checked_filter(fn: Any, name: str, limits: RenderLimits) -> Any:
    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
    def checked(*args: Any, **kwargs: Any) -> Any:
        values = [*args, *kwargs.values()]
        if name == "format" and any(isinstance(v, str) for v in values):
            values += _format_numbers(next(v for v in values if isinstance(v, str)), brace=False)
        _refuse_numbers(values, f"the {name} filter", limits)
        return fn(*args, **kwargs)

    return checked


def _raise_exception(message: str) -> None:
    # HF templates call this to reject conversations they cannot format.
    raise TemplateError(f"the chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str, limits: RenderLimits) -> jinja2.Template:
    env = _StrictSandbox(limits, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    # Macro bodies and `{% set %}` blocks join with env.concat, `a ~ b` with str_join from the
    # template's own module namespace; checked joins keep a doubling loop from building
    # gigabytes between two steps.
    env.concat = _checked_join(limits)  # type: ignore[method-assign]
    template = env.from_string(source)
    namespace = template.root_render_func.__globals__  # type: ignore[attr-defined]
    if "str_join" in namespace:
        namespace["str_join"] = env.concat
    return template


def _checked_join(limits: RenderLimits) -> Any:
    def join(parts: Iterable[Any]) -> str:
        strings = [str(p) for p in parts]
        _refuse_size(sum(map(len, strings)), "str", limits)
        return "".join(strings)

    return join


class _Budget:
    """A tracer for the rendering thread: counts each Python function called and each line
    of template code run (only template frames get the line tracer), and looks at the clock
    every 256 steps. Loops in jinja's own helpers (``lipsum(10**6)``) are counted by their calls."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits, self.steps = limits, 0
        self.deadline = time.perf_counter() + limits.seconds

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.limits.steps:
            raise _Stop(f"it ran more than {self.limits.steps} steps")
        if not self.steps & 255 and time.perf_counter() > self.deadline:
            raise _Stop(f"it ran longer than {self.limits.seconds:g} s")

    def on_call(self, frame: Any, event: str, arg: Any) -> Any:
        self.step()
        return self.on_line if frame.f_code.co_filename == "<template>" else None

    def on_line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.step()
        return self.on_line


def _render(template: jinja2.Template, limits: RenderLimits, context: dict[str, Any]) -> str:
    budget = _Budget(limits)
    parts, size = [], 0
    previous = sys.gettrace()
    sys.settrace(budget.on_call)
    try:
        for part in template.generate(context):
            size += len(part)
            if size > limits.chars:
                raise _Stop(f"its output passed {limits.chars} characters")
            parts.append(part)
    finally:
        sys.settrace(previous)
    return "".join(parts)


def render_chat(source: str, messages: Sequence[dict[str, str]], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True,
                origin: str = "chat template", limits: RenderLimits = LIMITS, **extra: Any) -> str:
    """Render `messages` through the template `source` within `limits`; `origin` names it in errors."""
    try:
        template = _compile(source, limits)
        return _render(template, limits, dict(messages=list(messages), bos_token=bos_token,
                                              eos_token=eos_token, add_generation_prompt=add_generation_prompt,
                                              **extra))
    except _Stop as exc:
        raise TemplateLimitError(f"{origin} was stopped: {exc}") from None
    except RecursionError:
        raise TemplateLimitError(f"{origin} was stopped: it recursed too deep") from None
    except MemoryError:
        raise TemplateLimitError(f"{origin} was stopped: it ran out of memory") from None
    except SecurityError as exc:
        raise TemplateSecurityError(f"{origin} was refused: it tried to leave the sandbox ({exc})") from None
    except TemplateError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{origin} has a syntax error at line {exc.lineno}: {exc.message}") from None
    except Exception as exc:  # jinja2's own errors, and the template's (1/0, range(10**12), ...)
        raise TemplateError(f"{origin} failed to render: {exc}") from None
