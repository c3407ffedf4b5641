"""`localchat ui` settings: one typed model that also generates the CLI flags."""

from __future__ import annotations

from dataclasses import dataclass

from localchat.hostguard import GuardedOptions
from localchat.options import option
from localchat.planner import RunOptions

DEFAULT_PORT = 7860


@dataclass(frozen=True)
class UISettings(GuardedOptions, RunOptions):
    """The app's flags, and how it runs the chat model (RunOptions, typed once for every command)."""

    option_group = "ui"
    host: str = option("127.0.0.1", "address to bind; the app has no login, so keep it on loopback")
    port: int = option(DEFAULT_PORT, "port to listen on (0: any free port)", 0, 65535)
    window: bool = option(False, "open in a native window (needs pywebview) instead of the browser")
    browser: bool = option(True, "open the app in the default browser once it is up")
    allow_remote: bool = option(False, "really serve a non-loopback --host (anyone who can reach it can "
                                       "use your models and files in the store; with 0.0.0.0, name the "
                                       "address browsers use with --allowed-host)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.loopback and not self.allow_remote:
            raise ValueError(f"--host {self.host} would expose the app, which has no login, to the "
                             "network: keep 127.0.0.1, or add --allow-remote if you mean it")
