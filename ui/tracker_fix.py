"""Gradio 6's status tracker leaves an animation-frame timer running; this serves its code so the
timer ends.

The tracker (the `statustracker-*.js` chunk) runs a requestAnimationFrame timer while its component is
pending, for the elapsed time it shows, and does not stop it when the component is removed while
still pending, as the page's own "Loading..." is at every load: from then on the browser makes 60
frames a second for nothing, for as long as the page is open, on the cores the model decodes on (on
2 cores an idle page's browser took 0.07-0.09 of a core, 0.03 without). The chunk takes
requestAnimationFrame once, as it loads. Served with `BEFORE` and `AFTER` around it, it takes one that
asks for a frame only while a tracker on the page shows a pending status (the only time a timer shows);
the page's other code, and other JavaScript worlds (extensions, test drivers), keep the browser's own.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CHUNK = re.compile(r"/assets/statustracker-[\w-]+\.js$")
BEFORE = (b"const localchatFrame = window.requestAnimationFrame;\n"
          b"window.requestAnimationFrame = (cb) => document.querySelector("
          b"'[data-testid=status-tracker] .progress-text') ? localchatFrame.call(window, cb) : 0;\n")
AFTER = b"\nwindow.requestAnimationFrame = localchatFrame;\n"


class TrackerTimerFix:
    """ASGI middleware: Gradio's status-tracker chunk, served with `BEFORE` and `AFTER` around it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not CHUNK.search(scope["path"]):
            return await self.app(scope, receive, send)
        start: Message = {}
        parts: list[bytes] = []

        async def wrapped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(parts)
            if start["status"] == 200:
                body = BEFORE + body + AFTER
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, wrapped)
