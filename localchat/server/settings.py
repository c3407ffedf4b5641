"""`localchat serve` settings: one typed model that also generates the CLI flags."""

from __future__ import annotations

from dataclasses import dataclass

from ..hostguard import GuardedOptions
from ..options import option
from ..planner import RunOptions

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServerSettings(GuardedOptions, RunOptions):
    """The server's flags, and how it runs every model it loads (RunOptions: --context, --threads,
    --parallel, --kv-cache, typed once for every command)."""

    option_group = "server"
    host: str = option("127.0.0.1", "address to bind; anything but loopback needs --api-key")
    port: int = option(DEFAULT_PORT, "port to listen on", 0, 65535)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every endpoint but /health")
    max_queue: int = option(32, "requests waiting or running per model before answering 429", 1, 10_000)
    max_body_bytes: int = option(4_000_000, "largest request body accepted (413 above)", 1024, 1 << 30)
    max_models: int = option(2, "models kept loaded at once (least recently used unloads first)", 1, 64)
    keep_alive: float = option(300.0, "seconds an idle model stays loaded (negative: until the server stops; "
                                      "an Ollama request's keep_alive overrides it)", -1.0, 1e9)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.loopback and not self.api_key:
            raise ValueError(f"binding to {self.host} exposes the models to the network: "
                             "pass --api-key KEY (or bind 127.0.0.1)")


