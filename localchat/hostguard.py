"""Which Host and Origin headers a local HTTP service answers: the DNS-rebinding and cross-site guard
that `localchat serve` and `localchat ui` share.

A web page on evil.example can make the browser send requests to a service on 127.0.0.1, by posting
a form there or by re-pointing its own DNS name at 127.0.0.1 (DNS rebinding). Either way the request
carries a foreign Host or Origin header; this guard refuses those with a 403 before anything runs.
Accepted: loopback names, the address the service was bound to, and names given with
--allowed-host; Origins whose host is one of those, or that were given with --allowed-origin.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from .options import Options, option

# ASGI's shapes, spelled out so that this module needs no web framework (the core installs none).
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
ENV_VLLM_GUARD = "LOCALCHAT_VLLM_GUARD"  # the guard's settings for VllmHostGuard, in vLLM's process
ANY_ADDRESS = ("0.0.0.0", "::")


class HostGuard:
    """The Host/Origin policy of a service bound to `bind`."""

    def __init__(self, bind: str, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = ()) -> None:
        # Bound to every address, the service cannot know the names it is reached by: any Host passes
        # (both callers demand an explicit opt-in, --api-key or --allow-remote, to bind that way).
        self.any_host = bind in ANY_ADDRESS
        self.hosts = set(LOOPBACK_HOSTS) | set(allowed_hosts)
        if not self.any_host:
            self.hosts.add(bind)
        self.origins = {o.rstrip("/") for o in allowed_origins}

    def _named(self, name: str) -> bool:
        return name in self.hosts or f"[{name}]" in self.hosts

    def host_ok(self, host: str) -> bool:
        return self.any_host or self._named(urlsplit(f"//{host}").hostname or "")

    def origin_ok(self, origin: str) -> bool:
        return origin.rstrip("/") in self.origins or self._named(urlsplit(origin).hostname or "")

    def refusal(self, headers: Mapping[str, str]) -> tuple[str, str] | None:
        """(message, code) of the 403 a request with these (lower-cased) headers gets, or None."""
        host = headers.get("host", "")
        if not self.host_ok(host):
            return f"Host {host!r} is not allowed (add it with --allowed-host)", "forbidden_host"
        if "origin" in headers and not self.origin_ok(headers["origin"]):
            return (f"Origin {headers['origin']!r} is not allowed (add it with --allowed-origin)",
                    "forbidden_origin")
        return None


def header_dict(scope: Scope) -> dict[str, str]:
    """An ASGI request's headers, names lower-cased (the last of repeated ones wins)."""
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}


class HostGuardMiddleware:
    """ASGI middleware answering refused HTTP requests with 403 {"detail": why} (FastAPI's error shape)
    and closing refused WebSockets before they open."""

    def __init__(self, app: ASGIApp, guard: HostGuard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.guard.refusal(header_dict(scope)) if scope["type"] in ("http", "websocket") else None
        if refused is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": refused[0]})
        body = json.dumps({"detail": refused[0]}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class VllmHostGuard(HostGuardMiddleware):
    """The same guard inside vLLM's server (`serve --engine vllm` passes it as --middleware): vLLM
    builds middleware from the app alone, so the policy comes from $LOCALCHAT_VLLM_GUARD, which
    localchat sets for the child ({"bind": ..., "hosts": [...], "origins": [...]})."""

    def __init__(self, app: ASGIApp) -> None:
        import os

        cfg = json.loads(os.environ.get(ENV_VLLM_GUARD) or '{"bind": "127.0.0.1"}')
        super().__init__(app, HostGuard(cfg["bind"], cfg.get("hosts", ()), cfg.get("origins", ())))


@dataclass(frozen=True)
class GuardedOptions(Options):
    """The flags of a service behind a HostGuard; subclasses add `host`, the address they bind."""

    host: str = option("127.0.0.1", "address to bind")
    allowed_host: tuple[str, ...] = option((), "extra Host header value to accept (DNS-rebinding guard)")
    allowed_origin: tuple[str, ...] = option((), "extra browser Origin to accept, e.g. http://myapp.local")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def guard(self) -> HostGuard:
        return HostGuard(self.host, self.allowed_host, self.allowed_origin)
