"""Layering: chatting on a GGUF needs neither torch nor the converters."""

from __future__ import annotations

import subprocess
import sys

from localchat.store import Store


def test_chat_imports_neither_torch_nor_converters(home: Store) -> None:
    code = (
        "import sys\n"
        "from localchat.commands import chat\n"
        "rc = chat.main(['-p', 'Say hi.', '--max-tokens', '4', '-q'])\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers', "
        "'localchat.convert', 'localchat.finetune', 'localchat.ui', 'gradio'))]\n"
        "assert rc == 0 and not bad, bad\n"
        "print('clean')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("clean")


def test_planner_is_pure_code() -> None:
    """The planner module imports no probe and no backend: it only reads the report."""
    import ast
    from pathlib import Path

    import localchat.planner as planner

    tree = ast.parse(Path(planner.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "dataclasses", "artifacts", "hardware.report"}, imported
