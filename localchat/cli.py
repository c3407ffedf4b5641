"""The `localchat` command: a table of subcommands, each a module with its own `main`."""

from __future__ import annotations

import importlib
import os
import re
import sys

# name: (module, the extra it needs beyond the core install or None, what it does)
COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "chat": ("localchat.commands.chat", None, "chat with a model (interactive, -p, or piped stdin)"),
    "doctor": ("localchat.commands.doctor", None, "show the hardware, the plan for a model, and why"),
    "list": ("localchat.commands.list", None, "list the models in the store"),
    "pull": ("localchat.commands.pull", None, "download a model from the Hugging Face Hub"),
    "rm": ("localchat.commands.rm", None, "delete a model from the store"),
    "preset": ("localchat.commands.preset", None, "show or change a model's sampling defaults"),
    "info": ("localchat.commands.info", None, "show a GGUF file's metadata without loading it"),
    "setup": ("localchat.commands.setup", None, "install the starter model"),
    "import": ("localchat.commands.import_gguf", None, "add a GGUF file you already have to the store"),
    "chats": ("localchat.commands.chats", None, "saved chats: list, export to Markdown, make a dataset"),
    "ui": ("localchat.commands.ui", "ui", "the desktop chat app in your browser (127.0.0.1)"),
    "serve": ("localchat.commands.serve", "serve", "serve the store over an OpenAI-compatible API and Ollama's"),
    "setup-vllm": ("localchat.commands.setup_vllm", None,
                   "make the separate environment `serve --engine vllm` runs vLLM from"),
    "check-vllm": ("localchat.commands.check_vllm", None,
                   "whether vLLM serves a GPTQ folder with its fast Marlin kernels, and why not"),
    "convert": ("localchat.convert.command", "convert",
                "turn a Hugging Face checkpoint into a GGUF in the store"),
    "finetune": ("localchat.finetune.command", "finetune", "teach a model your own domain with LoRA"),
    "eval": ("localchat.commands.eval", None, "perplexity and KL divergence of a model on a text"),
    "bench": ("localchat.commands.bench", None, "decode speed of each backend that can run a model here; "
                                                "the planner then picks the fastest"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: localchat COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, _, desc) in COMMANDS.items()]
    lines += ["", "`localchat COMMAND -h` shows a command's options.",
              "LOCALCHAT_HOME moves the model store (default: the checkout's models/)."]
    return "\n".join(lines)


def extra_modules(extra: str) -> set[str]:
    """Top-level module names of the packages `extra` adds, with the extras it includes, read
    from the installed metadata so pyproject.toml stays the one place that says so."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("localchat") or []
    except PackageNotFoundError:
        return set()
    names: set[str] = set()
    todo, done = [extra], set()
    while todo:
        current = todo.pop()
        done.add(current)
        for req in reqs:
            spec, _, marker = req.partition(";")
            if not re.search(rf"""extra\s*==\s*["']{re.escape(current)}["']""", marker):
                continue
            m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", spec)
            if not m:
                continue
            if m.group(1).lower() == "localchat":
                todo += [e.strip() for e in (m.group(2) or "").split(",") if e.strip() not in done]
            else:
                names.add(m.group(1).lower().replace("-", "_"))
    return names


def missing_from_extra(exc: ModuleNotFoundError, extra: str) -> bool:
    """Whether the module that failed to import is one the extra installs (always, where the
    metadata cannot say: a source tree run without installing)."""
    modules = extra_modules(extra)
    return not modules or (exc.name or "").split(".")[0].lower() in modules


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"localchat: unknown command {name!r}; valid: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, extra, _ = COMMANDS[name]
    try:
        return int(importlib.import_module(module_name).main(rest) or 0)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        # Commands import their extra's packages only when they run, so `-h` works on a core
        # install; running one without its extra says what to install instead of a traceback.
        if extra is None or os.environ.get("LOCALCHAT_DEBUG") or not missing_from_extra(exc, extra):
            raise
        print(f"localchat {name}: needs the {extra!r} extra (no module named {exc.name!r}): "
              f"pip install 'localchat[{extra}]'", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, LookupError, OSError) as exc:
        if os.environ.get("LOCALCHAT_DEBUG"):
            raise
        print(f"localchat {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
