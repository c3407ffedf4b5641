"""Layering: chatting on a GGUF needs neither torch nor the converters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
    """The planner module imports no probe and no backend: it only reads the report (`options` types its
    overrides, the flags every command shares)."""
    import localchat.planner as planner

    tree = ast.parse(Path(planner.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    allowed = {"__future__", "collections.abc", "dataclasses", "artifacts", "hardware.report", "options"}
    assert imported <= allowed, imported


def test_ui_builds_without_torch(home: Store) -> None:
    """The app (all three tabs) starts without torch: a Mac user chatting on GGUF needs none."""
    code = (
        "import sys\n"
        "from localchat.store import default_store\n"
        "from localchat.ui.app import build_app\n"
        "from localchat.ui.context import AppContext\n"
        "from localchat.ui.finetune_tab import check_dataset\n"
        "build_app(AppContext(default_store()))\n"
        "check_dataset(sys.argv[1])\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers', "
        "'localchat.convert'))]\n"
        "assert not bad, bad\n"
        "print('clean')\n"
    )
    data = home.root / "d.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')
    r = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("clean")


def _imports(path: Path) -> set[str]:
    """Every module a source file imports, relative ones named as written (".data")."""
    tree = ast.parse(path.read_text())
    found = {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return found | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_convert_and_finetune_meet_only_in_the_runtime_datasets_module() -> None:
    """convert/ imports nothing of finetune/ (GPTQ calibration reads rows through localchat.datasets,
    as fine-tuning does), and that module is plain Python, so the runtime needs no torch for it."""
    import localchat.convert
    import localchat.datasets

    convert_dir = Path(localchat.convert.__file__).parent
    bad = {f"{f.name}: {m}" for f in convert_dir.rglob("*.py") for m in _imports(f) if "finetune" in m}
    assert not bad, bad
    heavy = {m for m in _imports(Path(localchat.datasets.__file__))
             if m.split(".")[0] in ("torch", "transformers", "numpy", "localchat")}
    assert not heavy, heavy
