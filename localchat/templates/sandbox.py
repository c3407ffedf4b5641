"""Render chat templates, which come from model files we did not write, in a sandbox.

A GGUF's `tokenizer.chat_template` is code. It is rendered in jinja2's
ImmutableSandboxedEnvironment, and any reach for an unsafe attribute (``__globals__``,
``__class__``, ...) stops the render with TemplateSecurityError instead of the sandbox's
default of quietly printing nothing, so a hostile template is refused, not half-run.
"""

from __future__ import annotations

import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template that cannot be rendered; the message says which and why."""


class TemplateSecurityError(TemplateError):
    """A chat template tried to escape the sandbox."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")


def _raise_exception(message: str) -> None:
    # HF templates call this to reject conversations they cannot format.
    raise TemplateError(f"the chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(source: str, messages: Sequence[dict[str, str]], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True,
                origin: str = "chat template", **extra: Any) -> str:
    """Render `messages` through the template `source`; `origin` names it in errors."""
    try:
        template = _compile(source)
        return template.render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, **extra)
    except SecurityError as exc:
        raise TemplateSecurityError(f"{origin} was refused: it tried to leave the sandbox ({exc})") from None
    except TemplateError:
        raise
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{origin} has a syntax error at line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"{origin} failed to render: {exc}") from None
