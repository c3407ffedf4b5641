"""Hostile cases for conversion, the disk and the model store (issue #19): a nearly full disk,
killed and interrupted conversions, malformed safetensors headers, names with a trailing
newline, `convert --name` onto an existing model, and control characters in `localchat list`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localchat.cli import main as cli
from localchat.store import Store

pytest.importorskip("torch")
pytest.importorskip("transformers")

from localchat.convert.checkpoint import load_checkpoint  # noqa: E402
from localchat.convert.to_gguf import convert_to_gguf  # noqa: E402
from localchat.fsutil import HEADROOM  # noqa: E402
from tests.checkpoints import starter_hf, tiny_model  # noqa: E402

MB = 1 << 20


@pytest.fixture(scope="session")
def tiny(starter_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LLaMA with the starter's tokenizer: converts in a second or two."""
    return tiny_model("LlamaForCausalLM", tmp_path_factory.mktemp("ckpt") / "tiny", starter_hf(starter_gguf))


def everything_in(root: Path) -> set[str]:
    """Every path under `root`, hidden ones included."""
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def localchat(*args: str, home: Path, **kw: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOCALCHAT_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "localchat", *args], capture_output=True, text=True,
                          env=env, timeout=600, **kw)


def test_nearly_full_disk_refuses_convert_up_front_and_leaves_nothing(tiny: Path, small_disk: Path,
                                                                      tmp_path: Path) -> None:
    """Case 1: a disk where the F16 fits but F16 + Q4 does not. The convert used to write the
    F16, refuse at the quantize step and leave the F16 behind, failing every retry; now it
    refuses before writing anything, and a retry succeeds once space is freed."""
    f16 = convert_to_gguf(load_checkpoint(tiny), tmp_path / "measure-F16.gguf", "f16", quiet=True).path
    home = small_disk / "store"
    home.mkdir()
    filler = small_disk / "other-files"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as fh:  # leave room for the F16 (and its headroom) and 1 MB more
        os.posix_fallocate(fh.fileno(), 0, free - (f16.stat().st_size + HEADROOM + MB))
    has = shutil.disk_usage(small_disk).free
    assert f16.stat().st_size + HEADROOM < has < f16.stat().st_size + HEADROOM + 2 * MB

    r = localchat("convert", str(tiny), "--name", "tiny", "--no-check", "-q", home=home)
    assert r.returncode == 1
    assert "needs" in r.stderr and "has" in r.stderr and "Q4_K_M" in r.stderr, r.stderr
    assert str(home) in r.stderr, "the refusal names the folder whose disk is full"
    assert everything_in(home) == set(), "nothing written, hidden or not"

    filler.unlink()
    r = localchat("convert", str(tiny), "--name", "tiny", "--no-check", "-q", home=home)
    assert r.returncode == 0, r.stderr
    assert everything_in(home) == {"manifest.json", ".manifest.lock", "tiny", "tiny/tiny-Q4_K_M.gguf",
                                   "tiny/tiny.imatrix.gguf"}


def _start_convert(tiny: Path, home: Path) -> subprocess.Popen:
    """`localchat convert` in a child that takes Ctrl-C as a terminal would deliver it."""
    env = {**os.environ, "LOCALCHAT_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "localchat", "convert", str(tiny), "--name", "tiny", "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_job_output(home: Path, proc: subprocess.Popen) -> Path:
    """The job folder, once the conversion has started writing into it."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        written = [p for p in home.glob(".jobs/*/*") if p.name != "owner.json"]
        if written:
            return written[0].parent
        time.sleep(0.01)
    raise AssertionError(f"no job folder appeared (exit {proc.poll()}): {proc.stderr.read()}")


def test_killed_convert_leaves_a_stale_job_folder_that_doctor_and_the_next_start_remove(tiny: Path,
                                                                                       home: Store) -> None:
    """Case 1: kill -9 mid-conversion. Its partial files are in a job folder (not in the
    model's folder); `localchat doctor` reports it, `--clean` removes it, and the next
    conversion removes another one before it starts."""
    proc = _start_convert(tiny, home.root)
    job = _wait_for_job_output(home.root, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert job.is_dir() and not (home.root / "tiny").exists()
    assert "tiny" not in home.models()

    r = localchat("doctor", home=home.root)
    assert f".jobs/{job.name}" in r.stdout and "job that was killed" in r.stdout, r.stdout
    assert "localchat doctor --clean" in r.stdout
    r = localchat("doctor", "--clean", home=home.root)
    assert "removed 1 stray item" in r.stdout, r.stdout
    assert not job.exists()

    proc = _start_convert(tiny, home.root)
    job = _wait_for_job_output(home.root, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = localchat("convert", str(tiny), "--name", "tiny", "--no-check", "-q", home=home.root)
    assert r.returncode == 0, r.stderr
    assert not job.exists(), "the next job removed the killed one's folder"
    assert not (home.root / ".jobs").exists()
    assert "nothing stray" in localchat("doctor", home=home.root).stdout


def test_ctrl_c_during_convert_removes_its_job_folder(tiny: Path, home: Store) -> None:
    """Case 1: Ctrl-C (SIGINT) mid-conversion exits 130 and leaves no work files behind."""
    before = everything_in(home.root)
    proc = _start_convert(tiny, home.root)
    _wait_for_job_output(home.root, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read()
    assert everything_in(home.root) == before


def _rewrite_header(src: Path, dst: Path, change: object) -> Path:
    """A copy of the checkpoint whose safetensors header `change` rewrote (the data stays as it was)."""
    shutil.copytree(src, dst)
    st = dst / "model.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = change(json.loads(raw[8:8 + n]))
    hb = json.dumps(header).encode()
    st.write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n:])
    return st


def _second(h: dict) -> str:
    """The tensor whose data comes right after the first one's."""
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])[1]


def _overlap(h: dict) -> dict:
    name = _second(h)
    h[name]["data_offsets"] = [o - 4 for o in h[name]["data_offsets"]]
    return h


def _set(key: str, value: object) -> object:
    def change(h: dict) -> dict:
        h["model.norm.weight"][key] = value
        return h
    return change


MALFORMED = {
    "overlapping offsets": (_overlap, ["field 'data_offsets'", "overlaps"], _second),
    "reversed offsets": (lambda h: _set("data_offsets", h["model.norm.weight"]["data_offsets"][::-1])(h),
                         ["field 'data_offsets'", "ends before it starts"], "model.norm.weight"),
    "list header": (lambda h: list(h.items()), ["header is a JSON list"], None),
    "string offsets": (lambda h: _set("data_offsets", [str(o) for o in h["model.norm.weight"]["data_offsets"]])(h),
                       ["field 'data_offsets'", "not two non-negative integers"], "model.norm.weight"),
    "negative shape": (_set("shape", [-1, 64]), ["field 'shape'", "non-negative"], "model.norm.weight"),
    "missing offsets": (lambda h: {**h, "model.norm.weight": {k: v for k, v in h["model.norm.weight"].items()
                                                             if k != "data_offsets"}},
                        ["field 'data_offsets' is missing"], "model.norm.weight"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_header_is_one_clear_error_and_leaves_no_trace(
        case: str, tiny: Path, home: Store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Case 2: a broken safetensors header (overlapping or reversed offsets, a list, string
    offsets, a negative shape, missing offsets) used to raise SafetensorError, AttributeError,
    TypeError or a bare KeyError and leave an empty model folder; now it is one error naming
    the file, the tensor and the field, and the store is as it was."""
    change, phrases, tensor = MALFORMED[case]
    original = json.loads((tiny / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tiny / "model.safetensors").read_bytes()[:8], "little")])
    tensor = tensor(original) if callable(tensor) else tensor
    st = _rewrite_header(tiny, tmp_path / "broken", change)
    before = everything_in(home.root)
    assert cli(["convert", str(st.parent), "--name", "broken", "--no-check", "-q"]) == 1
    err = capsys.readouterr().err
    assert f"{st}:" in err, err
    for phrase in phrases + ([repr(tensor)] if tensor else []):
        assert phrase in err, (phrase, err)
    assert everything_in(home.root) == before
    assert "broken" not in home.models()


def test_name_with_a_trailing_newline_is_refused(home: Store, starter_gguf: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """Case 3: `$` matched before a final newline, so "evil\\n" passed as a model name (and
    became a folder and a split `list` row)."""
    before = everything_in(home.root)
    assert cli(["import", str(starter_gguf), "--name", "evil\n"]) == 1
    assert "model name 'evil\\n' is not allowed" in capsys.readouterr().err
    assert everything_in(home.root) == before


def test_convert_onto_an_existing_name_needs_replace_and_replaces_cleanly(tiny: Path, home: Store,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """Case 3: `convert --name EXISTING` used to replace the model silently and orphan its
    file; now it refuses and says to pass --replace, which swaps the files with none left over."""
    assert cli(["convert", str(tiny), "--name", "tiny", "--no-check", "-q"]) == 0
    first = home.get("tiny")
    capsys.readouterr()

    assert cli(["convert", str(tiny), "--name", "tiny", "--quant", "Q8_0", "--no-check", "-q"]) == 1
    err = capsys.readouterr().err
    assert "already has a model named 'tiny'" in err and "--replace" in err, err
    assert home.get("tiny") == first
    assert sorted(p.name for p in (home.root / "tiny").iterdir()) == ["tiny-Q4_K_M.gguf", "tiny.imatrix.gguf"]

    assert cli(["convert", str(tiny), "--name", "tiny", "--quant", "Q8_0", "--no-check", "-q", "--replace"]) == 0
    assert home.get("tiny").quant == "Q8_0"
    assert sorted(p.name for p in (home.root / "tiny").iterdir()) == ["tiny-Q8_0.gguf"]
    assert not (home.root / ".jobs").exists()


def test_list_escapes_control_and_bidi_characters_from_file_names(home: Store, starter_gguf: Path,
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """Case 3: an imported file's name (kept as the model's source) with a newline and an RTL
    override used to split its `localchat list` row and reorder what the terminal showed; the
    table (and the app's) now shows them as escapes, one row per model."""
    weird = tmp_path / "ok\nFAKE-ROW\u202eevil.gguf"
    os.link(starter_gguf, weird)
    assert cli(["import", str(weird), "--name", "weird"]) == 0
    capsys.readouterr()
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "\u202e" not in out
    rows = [line for line in out.splitlines() if "weird" in line]
    assert len(rows) == 1 and "ok\\nFAKE-ROW\\u202eevil.gguf" in rows[0], out
    assert not any(line.startswith("FAKE-ROW") for line in out.splitlines())

    pytest.importorskip("gradio")
    from localchat.ui.context import AppContext
    from localchat.ui.models_tab import table

    cells = [c for row in table(AppContext(home)) for c in row]
    assert "import:ok\\nFAKE-ROW\\u202eevil.gguf" in cells
    assert not any("\n" in c or "\u202e" in c for c in cells)
