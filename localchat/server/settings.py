"""`localchat serve` settings: one typed model that also generates the CLI flags."""

from __future__ import annotations

from dataclasses import dataclass

from ..hostguard import GuardedOptions
from ..options import option
from ..planner import KV_CACHE_TYPES

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServerSettings(GuardedOptions):
    option_group = "server"
    host: str = option("127.0.0.1", "address to bind; anything but loopback needs --api-key")
    port: int = option(DEFAULT_PORT, "port to listen on", 0, 65535)
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on every endpoint but /health")
    max_queue: int = option(32, "requests waiting or running per model before answering 429", 1, 10_000)
    max_body_bytes: int = option(4_000_000, "largest request body accepted (413 above)", 1024, 1 << 30)
    max_models: int = option(2, "models kept loaded at once (least recently used unloads first)", 1, 64)
    context: int | None = option(None, "context size for loaded models (default: the planner's)", 128, 1 << 20)
    threads: int | None = option(None, "CPU threads per model (default: physical cores)", 1, 1024)
    keep_alive: float = option(300.0, "seconds an idle model stays loaded (negative: until the server stops; "
                                      "an Ollama request's keep_alive overrides it)", -1.0, 1e9)
    parallel: int = option(4, "answers decoded at once per model (llama.cpp; each slot holds a full context "
                              "of KV cache)", 1, 256)
    kv_cache: str = option("f16", "KV cache type (q8_0 and q4_0 take about 1/2 and 1/4 of the memory, "
                                  "with flash attention)", choices=tuple(KV_CACHE_TYPES))

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.loopback and not self.api_key:
            raise ValueError(f"binding to {self.host} exposes the models to the network: "
                             "pass --api-key KEY (or bind 127.0.0.1)")


