"""`localchat ui`: the desktop chat app (chat, models, convert, fine-tune) on 127.0.0.1.

No share link and no login: it binds loopback unless told otherwise, and refuses a
network address without --allow-remote. --window opens a native window (pywebview).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import threading


def ui(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        print("localchat ui needs the 'ui' extra: pip install 'localchat[ui]'", file=sys.stderr)
        return 1
    from localchat.planner import Overrides
    from localchat.store import default_store
    from localchat.ui.app import launch
    from localchat.ui.context import AppContext
    from localchat.ui.settings import UISettings

    settings = UISettings.from_args(args)
    webview = None
    if settings.window:
        try:
            import webview  # type: ignore[import-not-found,no-redef]
        except ImportError:
            print("--window needs pywebview (pip install pywebview); opening the browser instead",
                  file=sys.stderr)
    ctx = AppContext(default_store(), Overrides.of(settings))
    app, url = launch(ctx, settings.host, settings.port, open_browser=settings.browser and webview is None,
                      guard=settings.guard())
    print(f"localchat ui on {url} (no share link; Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        if webview is not None:
            webview.create_window("localchat", url, width=1280, height=860)
            webview.start()
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
        ctx.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from localchat.ui.settings import UISettings

    parser = argparse.ArgumentParser(prog="localchat ui", description=__doc__.split("\n\n")[0])
    UISettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return ui(build_parser().parse_args(argv))
