"""`localchat serve`: the models in the store over an OpenAI-compatible API (and Ollama's) on 127.0.0.1.

Editors, agents and scripts that speak the OpenAI API point their base URL at
http://127.0.0.1:PORT/v1; those that speak Ollama's point OLLAMA_HOST at http://127.0.0.1:PORT.
Binding any other address needs --api-key.
"""

from __future__ import annotations

import argparse
import sys

from ..server.settings import ServerSettings


def serve(settings: ServerSettings) -> int:
    try:
        import uvicorn
    except ImportError:
        print("localchat serve needs the 'serve' extra: pip install 'localchat[serve]'", file=sys.stderr)
        return 1
    from ..server.app import create_app

    app = create_app(settings)
    print(f"localchat API on http://{settings.host}:{settings.port}/v1 "
          f"({'API key required' if settings.api_key else 'loopback only, no key'}); Ctrl-C stops",
          file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat serve", description=__doc__.split("\n\n")[0])
    ServerSettings.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return serve(ServerSettings.from_args(build_parser().parse_args(argv)))
