"""Tool calls: the tools go into the prompt, the model's calls come out of its answer.

Where a model's chat template speaks a tool format (it uses `tools` and the format's marker),
the tools and the conversation's calls and results go through that template, and calls are
parsed in that format:

- Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one block a call;
- Llama 3.1+: a JSON object ``{"name": ..., "parameters": {...}}`` as the whole answer
  (after ``<|python_tag|>`` at times);
- Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``.

A template without tool support (the starter's) gets `GENERIC_PROMPT`, Hermes style: the tools
as JSON in the system message, earlier calls as ``<tool_call>`` blocks in the assistant's text,
results as ``<tool_response>`` blocks in a user turn, all of it message text (tokenized as
text, so a tool result cannot forge a turn). Where a call is required or named, a grammar
built from the function's JSON schema constrains the answer to one call in the format, so its
arguments validate even on a small model.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from .structured import Grammar

Tool = dict[str, Any]  # {"type": "function", "function": {"name", "description", "parameters"}}

GENERIC_PROMPT = (
    "You can call functions to help answer. The functions, as JSON schemas:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, answer with only its name and arguments as a JSON object inside "
    "<tool_call></tool_call> tags:\n<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": "
    "{{<arguments>}}}}\n</tool_call>\nA function's result comes back inside <tool_response></tool_response> "
    "tags. When you have what you need, answer the user in plain text."
)


@dataclass(frozen=True)
class ToolFormat:
    """How a family of chat templates writes tool calls."""

    name: str
    marker: str  # a template holding this (and using `tools`) speaks the format
    open: str  # text before a call ("" when the call is the whole answer)
    close: str  # text after one
    args_key: str  # "arguments" or "parameters"
    bare: str = ""  # how an answer that is only calls may start without `open` (a control token
    #                 the detokenizer leaves out): "{" for a Llama 3 object, "[" for Mistral's list
    listed: bool = False  # the calls come as one JSON list

    def call_schema(self, tool: Tool) -> dict[str, Any]:
        fn = tool["function"]
        return {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                 self.args_key: fn.get("parameters") or {"type": "object"}},
                "required": ["name", self.args_key], "additionalProperties": False}

    def grammar(self, tools: Sequence[Tool], params: Sequence[str]) -> str:
        """One call to one of `tools` (the request fields `params` name them in errors), in this format."""
        g = Grammar(prop_order=("name", self.args_key))
        calls = [g.add(self.call_schema(t), f"call-{i}", p) for i, (t, p) in enumerate(zip(tools, params))]
        call = " | ".join(calls)
        body = f'"[" space ({call}) "]"' if self.listed else f"({call})"
        # A format whose marker is a control token is written bare: the grammar matches text
        prefix = "" if self.bare else _literal(self.open)
        return g.text(" ".join(p for p in (prefix, body, _literal(self.close)) if p))


def _literal(text: str) -> str:
    return json.dumps(text) if text else ""


HERMES = ToolFormat("hermes", "<tool_call>", "<tool_call>\n", "\n</tool_call>", "arguments")
LLAMA3 = ToolFormat("llama3", "<|python_tag|>", "<|python_tag|>", "", "parameters", bare="{")
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "[TOOL_CALLS]", "", "arguments", bare="[", listed=True)
FORMATS = (HERMES, MISTRAL, LLAMA3)


def template_format(source: str) -> ToolFormat | None:
    """The tool format a chat template speaks, or None when it takes no tools."""
    if not re.search(r"\btools\b", source):
        return None
    return next((f for f in FORMATS if f.marker in source), None)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def parse_calls(fmt: ToolFormat, text: str, names: set[str]) -> tuple[list[ToolCall], str] | None:
    """The calls in `text` (what follows the start of the first one) and any text after them, or None
    when it does not start with well-formed calls to offered tools (then it is plain text)."""
    decoder, pos, calls = json.JSONDecoder(), 0, []
    skip = [s.strip() for s in (fmt.open, fmt.close, ";") if s.strip()]
    while True:
        while pos < len(text) and (text[pos].isspace() or any(text.startswith(s, pos) for s in skip)):
            pos += 1 if text[pos].isspace() else len(next(s for s in skip if text.startswith(s, pos)))
        if pos >= len(text):
            return (calls, "") if calls else None
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return (calls, text[pos:]) if calls else None  # a remark after the calls stays text
        pos = end
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            args = item.get(fmt.args_key, item.get("arguments", item.get("parameters", {})))
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            if not isinstance(args, dict):
                return None
            calls.append(ToolCall(item["name"], json.dumps(args, ensure_ascii=False)))


class CallReader:
    """Splits a streamed answer into text to show now and, at the end, the tool calls it made.

    Text that may be the start of a call is held back (as stop strings are), so a streamed
    answer never shows half a call; from the start of a call on, everything is held and parsed
    when the answer ends. What does not parse as calls is shown as text after all.
    """

    def __init__(self, fmt: ToolFormat, names: set[str]) -> None:
        self.fmt, self.names = fmt, names
        self._held, self._call, self._in_call, self._shown = "", "", False, False

    def feed(self, text: str) -> str:
        if self._in_call:
            self._call += text
            return ""
        buf = self._held + text
        starts = [i for i in (buf.find(self.fmt.open.strip()),) if i >= 0]
        if not self._shown and self.fmt.bare and buf.lstrip().startswith(self.fmt.bare):
            starts.append(0)
        if starts:
            cut = min(starts)
            self._in_call, self._call, self._held = True, buf[cut:], ""
            return self._show(buf[:cut])
        keep = 0 if self._shown or buf.strip() else len(buf)  # leading space: the answer may still be a call
        marker = self.fmt.open.strip()
        for n in range(min(len(marker) - 1, len(buf)), keep, -1):
            if marker.startswith(buf[-n:]):
                keep = n
                break
        self._held = buf[len(buf) - keep:] if keep else ""
        return self._show(buf[:len(buf) - keep])

    def _show(self, text: str) -> str:
        self._shown = self._shown or bool(text.strip())
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The text still held, and the calls (none: the held call text is shown as text)."""
        found = parse_calls(self.fmt, self._call, self.names) if self._in_call else None
        if found:
            calls, rest = found
            return self._held + rest, calls
        return self._held + self._call, []


@dataclass(frozen=True)
class ToolUse:
    """What a request asks about tools: the tools offered and `tool_choice` ("auto", "none",
    "required", or a function's name)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def offered(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def grammar(self, fmt: ToolFormat) -> str | None:
        """The grammar of a required or named call (None: the model may answer in text)."""
        if not self.offered or self.choice == "auto":
            return None
        picked = [(t, f"tools[{i}].function.parameters") for i, t in enumerate(self.tools)
                  if self.choice == "required" or t["function"]["name"] == self.choice]
        return fmt.grammar([t for t, _ in picked], [p for _, p in picked])


def generic_messages(messages: list[dict[str, Any]], use: ToolUse) -> list[dict[str, str]]:
    """The conversation for a template without tool support: tools in the system message, calls and
    results as Hermes-style text in assistant and user turns."""
    out: list[dict[str, str]] = []
    if use.offered:
        tools = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in use.tools)
        prompt = GENERIC_PROMPT.format(tools=tools)
        if messages and messages[0]["role"] == "system":
            prompt = f"{messages[0]['content']}\n\n{prompt}"
            messages = messages[1:]
        out.append({"role": "system", "content": prompt})
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(HERMES.open + json.dumps({"name": c["function"]["name"],
                                                        "arguments": c["function"]["arguments"]},
                                                       ensure_ascii=False) + HERMES.close
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{m['content']}\n{calls}".strip()})
        elif m["role"] == "tool":
            text = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + text}
            else:
                out.append({"role": "user", "content": text})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out
