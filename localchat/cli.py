"""The `localchat` command: a table of subcommands, each a module with its own `main`."""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("localchat.commands.chat", "chat with a model (interactive, -p, or piped stdin)"),
    "doctor": ("localchat.commands.doctor", "show the hardware, the plan for a model, and why"),
    "list": ("localchat.commands.list", "list the models in the store"),
    "pull": ("localchat.commands.pull", "download a model from the Hugging Face Hub"),
    "rm": ("localchat.commands.rm", "delete a model from the store"),
    "info": ("localchat.commands.info", "show a GGUF file's metadata without loading it"),
    "setup": ("localchat.commands.setup", "install the starter model"),
    "import": ("localchat.commands.import_gguf", "add a GGUF file you already have to the store"),
    "chats": ("localchat.commands.chats", "saved chats: list, export to Markdown, make a dataset"),
    "ui": ("localchat.commands.ui", "the desktop chat app in your browser (127.0.0.1)"),
    "serve": ("localchat.commands.serve", "serve the store over an OpenAI-compatible API"),
    "convert": ("localchat.convert.command", "turn a Hugging Face checkpoint into a GGUF in the store"),
    "finetune": ("localchat.finetune.command", "teach a model your own domain with LoRA"),
    "eval": ("localchat.commands.eval", "perplexity and KL divergence of a model on a text"),
    "bench": ("localchat.commands.bench", "decode speed of each backend that can run a model here; "
                                          "the planner then picks the fastest"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: localchat COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`localchat COMMAND -h` shows a command's options.",
              "LOCALCHAT_HOME moves the model store (default: the checkout's models/)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"localchat: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, LookupError, OSError) as exc:
        if os.environ.get("LOCALCHAT_DEBUG"):
            raise
        print(f"localchat {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
