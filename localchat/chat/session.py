"""A conversation with one model: turns, the chat template, and the context window.

When a conversation outgrows the context, the oldest turns are dropped (the system
prompt is kept) and `last_dropped` says how many, so callers can show it; it never
happens silently. The CLI, the UI and the server all talk through this class.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..engine.backend import Backend, Chunk, ContextOverflow, GenerationStats, PromptLike
from ..engine.settings import SamplingSettings, model_settings
from ..templates import DEFAULT_FORMAT, Prompt, get_format, render_prompt
from .reasoning import split_thoughts, without_thoughts
from .tools import HERMES, CallReader, ToolFormat, ToolUse, generic_messages, template_format

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ResolvedTemplate:
    source: str
    stop: tuple[str, ...]
    origin: str
    notice: str = ""  # shown to the user when a fallback was chosen


def resolve_template(backend: Backend, chat_format: str | None) -> ResolvedTemplate:
    """The user's named format, else the model's own template, else the default (said aloud)."""
    if chat_format:
        fmt = get_format(chat_format)
        return ResolvedTemplate(fmt.template, fmt.stop, f"chat format {fmt.name!r}")
    t = backend.template
    if t.source:
        stop = tuple(dict.fromkeys(t.stop + ((t.eos_token,) if t.eos_token else ())))
        return ResolvedTemplate(t.source, stop, t.origin)
    fmt = get_format(DEFAULT_FORMAT)
    return ResolvedTemplate(fmt.template, fmt.stop, f"chat format {fmt.name!r}",
                            notice=f"the model has no chat template; using {fmt.name!r} "
                                   "(choose another with --chat-format)")


@dataclass(frozen=True)
class Turn:
    """One answer to generate: the prompt, the stop strings that end it, and the grammar it must
    follow (JSON to a schema, a tool call), if any."""

    prompt: PromptLike
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    tools: ToolUse | None = None  # tools offered: the answer is read for calls in `tool_format`
    tool_format: ToolFormat = HERMES

    def reader(self) -> CallReader | None:
        """What splits this turn's answer into text and tool calls (None: all of it is text)."""
        return CallReader(self.tool_format, self.tools.names) if self.tools and self.tools.offered else None


def validate_messages(messages: list[Message]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must have a role in {ROLES} and text content, got {m!r}")


class ChatSession:
    def __init__(self, backend: Backend, system: str | None = None, chat_format: str | None = None,
                 settings: SamplingSettings | None = None) -> None:
        self.backend = backend
        self.template = resolve_template(backend, chat_format)
        self.settings = settings or SamplingSettings()
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.last_stats: GenerationStats | None = None
        self.last_dropped = 0

    @classmethod
    def for_model(cls, backend: Backend, defaults: Mapping[str, Any], system: str | None = None,
                  chat_format: str | None = None, settings: SamplingSettings | None = None) -> "ChatSession":
        """A session with a model's own defaults (its store entry's): system prompt, chat format and
        sampling preset, each unless the caller gives its own (a system prompt of "": none).
        Every front end starts here."""
        return cls(backend, system=defaults.get("system") if system is None else system,
                   chat_format=chat_format or defaults.get("chat_format"),
                   settings=settings or model_settings(defaults))

    def with_system(self, messages: list[Message]) -> list[Message]:
        """`messages` behind the session's system prompt, unless they bring their own."""
        own = messages[:1] and messages[0]["role"] == "system"
        return messages if own else [m for m in self.messages if m["role"] == "system"] + messages

    def render(self, messages: list[dict[str, Any]], **extra: Any) -> Prompt:
        """The prompt for `messages`, knowing which parts are message text (tokenized as text);
        `extra` goes to the template (`tools`)."""
        t = self.backend.template
        return render_prompt(self.template.source, messages, bos_token=t.bos_token, eos_token=t.eos_token,
                             origin=self.template.origin, locate=self.backend.special.occurs_in, **extra)

    def turn(self, messages: list[dict[str, Any]], grammar: str | None = None,
             tools: ToolUse | None = None) -> Turn:
        """The next answer to `messages` (behind the session's system prompt), as the server asks for it:
        the whole conversation, no turn dropped (a request that does not fit is refused instead).

        Tools, earlier calls and their results go through the model's template where it speaks a
        tool format, else through the generic Hermes-style prompt (see `localchat.chat.tools`);
        a required or named call brings the grammar of that call. Earlier answers' thoughts are left out.
        """
        use = tools or ToolUse(())
        messages = without_thoughts(messages)
        fmt = template_format(self.template.source)
        if fmt is None:
            fmt, prompt = HERMES, self.render(generic_messages(self.with_system(messages), use))
        else:
            self._refuse_control_tokens(messages, use)  # the request's own indices in the error
            extra = {"tools": list(use.tools)} if use.offered else {}
            prompt = self.render(self.with_system(messages), **extra)
        return Turn(prompt, self.template.stop, use.grammar(fmt) or grammar, use if use.offered else None, fmt)

    def _refuse_control_tokens(self, messages: list[dict[str, Any]], use: ToolUse) -> None:
        """Tool definitions and calls that a template writes as JSON are not message text, so a control
        token in them would be markup: refused, naming where it is."""
        parts = [(f"tools[{i}]", t) for i, t in enumerate(use.tools)] if use.offered else []
        parts += [(f"messages[{i}].tool_calls", m["tool_calls"]) for i, m in enumerate(messages)
                  if m.get("tool_calls")]
        for where, value in parts:
            if token := self.backend.special.first_in(json.dumps(value, ensure_ascii=False)):
                raise ValueError(f"{where} holds {token!r}, a control token of this model; refused")

    def reserve_for(self, settings: SamplingSettings) -> int:
        """Tokens kept free for the answer."""
        return min(settings.max_tokens, self.backend.n_ctx // 2)

    def fit(self, messages: list[Message], reserve: int) -> tuple[Prompt, int]:
        """Render `messages`, dropping the oldest turns until the prompt and `reserve` fit."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        dropped = 0
        while True:
            prompt = self.render(system + turns)
            used = self.backend.count_tokens(prompt)
            if used + reserve <= self.backend.n_ctx:
                return prompt, dropped
            if len(turns) <= 1:
                raise ContextOverflow(
                    f"the message takes {used} tokens with the system prompt; the context holds "
                    f"{self.backend.n_ctx}, with {reserve} kept for the answer")
            # Drop the oldest turn: a user message and the assistant reply that followed it.
            cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
            turns, dropped = turns[cut:], dropped + cut

    def stream_reply(self, messages: list[Message], settings: SamplingSettings | None = None,
                     cancel: threading.Event | None = None, continue_last: bool = False) -> Iterator[Chunk]:
        """Answer the conversation `messages` (not stored); sets last_stats and last_dropped.

        With `continue_last`, the last message is an unfinished assistant answer and the
        model carries on from its last word instead of starting a new turn. Earlier answers'
        thoughts are left out.
        """
        validate_messages(messages)
        s = (settings or self.settings).with_stops(self.template.stop)
        partial = Prompt.message_text("")
        if continue_last:
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError("there is no answer to continue: the last message is not the assistant's")
            messages, partial = messages[:-1], Prompt.message_text(messages[-1]["content"])
        prompt, self.last_dropped = self.fit(without_thoughts(messages),
                                             self.reserve_for(s) + self.backend.count_tokens(partial))
        prompt += partial  # the answer so far is message text too
        for chunk in self.backend.stream(prompt, s, cancel, lstrip=not continue_last):
            if chunk.stats:
                self.last_stats = chunk.stats
            yield chunk

    def send(self, text: str, settings: SamplingSettings | None = None,
             cancel: threading.Event | None = None) -> Iterator[Chunk]:
        """Add a user turn, stream the answer, and keep it (even a cancelled part, never its thoughts) in the
        history."""
        pending = self.messages + [{"role": "user", "content": text}]
        parts: list[str] = []
        for chunk in self.stream_reply(pending, settings, cancel):
            parts.append(chunk.text)
            yield chunk
        self.messages = pending + [{"role": "assistant", "content": split_thoughts("".join(parts))[1]}]

    def ask(self, text: str, settings: SamplingSettings | None = None) -> str:
        return "".join(c.text for c in self.send(text, settings))
