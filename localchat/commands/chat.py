"""`localchat chat`: talk to a model in the terminal.

Interactive with a prompt; `-p TEXT` answers once; with a pipe on stdin each line is the
next user turn of one conversation, answered in order, until the input ends.
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import replace
from typing import IO

from ..chat import ChatSession
from ..engine import SamplingSettings
from ..engine.settings import model_settings
from ..runtime import open_model
from .common import add_model_args, overrides_from

HELP = "/reset clears the conversation, /stats shows the last answer's speed, /exit or Ctrl-D quits"


def stream_answer(session: ChatSession, text: str, out: IO[str], cancel: threading.Event | None = None) -> str:
    parts = []
    for chunk in session.send(text, cancel=cancel):
        out.write(chunk.text)
        out.flush()
        parts.append(chunk.text)
    out.write("\n")
    out.flush()
    return "".join(parts)


def _note(session: ChatSession, show_stats: bool) -> None:
    if session.last_dropped:
        print(f"[dropped the {session.last_dropped} oldest messages to fit the "
              f"{session.backend.n_ctx}-token context; the system prompt is kept]", file=sys.stderr)
    if show_stats and session.last_stats:
        print(f"[{session.last_stats.summary()}]", file=sys.stderr)


def interactive(session: ChatSession, show_stats: bool) -> None:
    print(f"chatting with {session.backend.name}; {HELP}", file=sys.stderr)
    while True:
        try:
            text = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        cmd = text.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return
        if cmd == "/reset":
            session.messages = [m for m in session.messages if m["role"] == "system"]
            continue
        if cmd == "/stats":
            print(session.last_stats.summary() if session.last_stats else "no answer yet", file=sys.stderr)
            continue
        cancel = threading.Event()
        try:
            stream_answer(session, text, sys.stdout, cancel)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            cancel.set()
            print("\n[stopped]", file=sys.stderr)
            continue
        _note(session, show_stats)


def chat(args: argparse.Namespace) -> int:
    SamplingSettings.from_args(args)  # bad flags fail before a model loads
    overrides = overrides_from(args)
    if overrides.parallel is None:  # the terminal asks one question at a time: one slot of KV cache
        overrides = replace(overrides, parallel=1)
    loaded = open_model(args.model, overrides)
    p = loaded.plan
    if not args.quiet:
        print(f"[{loaded.model.name}: {p.backend}, {p.artifact.quant}, context {p.context}, "
              f"{p.threads} threads; `localchat doctor` says why]", file=sys.stderr)
    defaults = loaded.model.defaults
    settings = SamplingSettings.from_args(args, base=model_settings(defaults))  # flags over the model's preset
    session = ChatSession.for_model(loaded.backend, defaults, system=args.system, chat_format=args.chat_format,
                                    settings=settings)
    if session.template.notice:
        print(f"[{session.template.notice}]", file=sys.stderr)
    try:
        if args.prompt is not None:
            stream_answer(session, args.prompt, sys.stdout)
            _note(session, args.stats)
        elif not sys.stdin.isatty():
            for line in sys.stdin:
                if line.strip():
                    stream_answer(session, line.rstrip("\n"), sys.stdout)
                    _note(session, args.stats)
        else:
            interactive(session, show_stats=True)
    finally:
        loaded.backend.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("-p", "--prompt", help="answer this one prompt and exit")
    parser.add_argument("--system", help="system prompt (default: the model's, from the store)")
    parser.add_argument("--chat-format", help="use this chat format instead of the model's template")
    parser.add_argument("--stats", action="store_true", help="print tokens/s and time to first token")
    parser.add_argument("-q", "--quiet", action="store_true", help="do not print the plan line")
    add_model_args(parser)
    SamplingSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return chat(build_parser().parse_args(argv))
