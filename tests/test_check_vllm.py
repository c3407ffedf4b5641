"""`localchat check-vllm` (and `info`) on a GPTQ folder `convert --to gptq` writes, and on hand-broken
copies of it: each copy breaks one of vLLM's rules for its Marlin path (localchat/engine/vllm_check.py
cites them) and the command names that rule and exits 1.

One quantization of a tiny 2-layer LLaMA (64- and 128-wide layers, so the default group size 128
falls back) serves the module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gptqmodel")

from localchat.cli import main as cli  # noqa: E402
from localchat.store import Store  # noqa: E402

from .checkpoints import starter_hf, tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def gptq_store(tmp_path_factory: pytest.TempPathFactory, starter_gguf: Path) -> Store:
    """A tiny LLaMA through `localchat convert --to gptq` with every default but the scale search."""
    from localchat.convert.command import main as convert_main

    base = tmp_path_factory.mktemp("check-vllm")
    src = tiny_model("LlamaForCausalLM", base / "tiny", starter_hf(starter_gguf))
    old = os.environ.get("LOCALCHAT_HOME")
    os.environ["LOCALCHAT_HOME"] = str(base / "home")
    try:
        assert convert_main([str(src), "--to", "gptq", "--name", "tiny-gptq", "--fast", "--no-check", "-q"]) == 0
    finally:
        if old is None:
            os.environ.pop("LOCALCHAT_HOME")
        else:
            os.environ["LOCALCHAT_HOME"] = old
    return Store(base / "home")


def folder_of(store: Store) -> Path:
    return store.path_of(store.get("tiny-gptq").files[0].path)


def broken_copy(store: Store, tmp_path: Path, **changes: object) -> Path:
    """A copy of the folder with `changes` in both of its quantization configs (None deletes a key)."""
    out = tmp_path / "broken"
    shutil.copytree(folder_of(store), out)
    for name, inner in (("config.json", "quantization_config"), ("quantize_config.json", None)):
        path = out / name
        data = json.loads(path.read_text())
        q = data[inner] if inner else data
        for key, value in changes.items():
            if value is None:
                q.pop(key, None)
            else:
                q[key] = value
        path.write_text(json.dumps(data, indent=2))
    return out


def check(target: str | Path, capsys: pytest.CaptureFixture, *extra: str) -> tuple[int, str]:
    rc = cli(["check-vllm", str(target), *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_convert_to_gptq_writes_what_vllms_marlin_path_reads(gptq_store: Store, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`--to gptq` with its defaults: symmetric 4-bit, group size 64 (128 does not divide the 64-wide
    layers; the fallback stays within Marlin's sizes), desc_act false, v1 zero-points with an explicit
    checkpoint_format 'gptq'; check-vllm (by store name) and info say vLLM serves it with Marlin."""
    folder = folder_of(gptq_store)
    q = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (q["bits"], q["group_size"], q["sym"], q["desc_act"]) == (4, 64, True, False)
    assert q["checkpoint_format"] == "gptq"
    monkeypatch.setenv("LOCALCHAT_HOME", str(gptq_store.root))
    rc, out = check("tiny-gptq", capsys)
    assert rc == 0, out
    assert "vLLM serves it with its Marlin (gptq_marlin) kernels" in out
    assert "zero-points: v1 in all 14 quantized modules" in out
    assert cli(["info", str(folder)]) == 0
    assert "vLLM: served with its Marlin (gptq_marlin) kernels" in capsys.readouterr().out


def test_asymmetric_folder_is_not_marlins(gptq_store: Store, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """sym false: Marlin has only symmetric GPTQ types; the reason names the field and the fix."""
    rc, out = check(broken_copy(gptq_store, tmp_path, sym=False), capsys)
    assert rc == 1
    assert "sym is false: Marlin has only symmetric GPTQ types" in out and "re-quantize with sym=true" in out


def test_group_size_96_is_not_marlins(gptq_store: Store, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """group_size 96 is outside MARLIN_SUPPORTED_GROUP_SIZES [-1, 32, 64, 128]; `info` says so in one line."""
    broken = broken_copy(gptq_store, tmp_path, group_size=96)
    rc, out = check(broken, capsys)
    assert rc == 1 and "group_size is 96: Marlin reads -1, 32, 64, 128" in out
    assert cli(["info", str(broken)]) == 0
    assert "vLLM: not on its Marlin path: group_size is 96" in capsys.readouterr().out


def test_v2_zero_points_without_a_format_are_caught(gptq_store: Store, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """The weights rewritten with v2 zero-points (8 per 4-bit group instead of v1's 7) and no
    checkpoint_format: vLLM would read every zero one off. The same weights declared 'gptq_v2' pass,
    and v1 weights declared 'gptq_v2' are caught the other way."""
    from safetensors.torch import load_file, save_file

    broken = broken_copy(gptq_store, tmp_path, checkpoint_format=None, format=None)
    weights = broken / "model.safetensors"
    state = load_file(str(weights))
    v1 = {k: v.clone() for k, v in state.items()}
    for name in [k for k in state if k.endswith(".qzeros")]:
        state[name] = state[name] + 0x11111111  # every nibble 7 -> 8, no carries
    save_file(state, str(weights), metadata={"format": "pt"})
    rc, out = check(broken, capsys)
    assert rc == 1
    assert "stores v2 zero-points (8, e.g. model.layers.0." in out and "checkpoint_format is 'missing'" in out
    assert "set checkpoint_format to 'gptq_v2'" in out

    declared = broken_copy(gptq_store, tmp_path / "v2", checkpoint_format="gptq_v2")
    save_file(state, str(declared / "model.safetensors"), metadata={"format": "pt"})
    assert check(declared, capsys)[0] == 0
    save_file(v1, str(declared / "model.safetensors"), metadata={"format": "pt"})
    rc, out = check(declared, capsys)
    assert rc == 1 and "checkpoint_format is 'gptq_v2' but model.layers.0." in out
    assert "stores v1 zero-points" in out


def test_activation_order_with_groups_is_not_marlins(gptq_store: Store, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """desc_act true with groups: vLLM 0.32 refuses it; with one group per channel (-1) it is a no-op."""
    rc, out = check(broken_copy(gptq_store, tmp_path, desc_act=True), capsys)
    assert rc == 1 and "desc_act is true with groups of 64" in out
    rc, out = check(broken_copy(gptq_store, tmp_path / "pc", desc_act=True, group_size=-1), capsys)
    assert "desc_act" not in out.split("vLLM")[-1] and "group_size is -1" not in out


def test_tensor_parallel_split_must_keep_whole_groups(gptq_store: Store,
                                                      capsys: pytest.CaptureFixture) -> None:
    """Over 4 GPUs a 64-wide o_proj gives each rank 16 inputs, a quarter of a 64-group: named, with
    the fix; over 2 GPUs the 128-wide down_proj splits into whole groups but the 64-wide o_proj does not."""
    rc, out = check(folder_of(gptq_store), capsys, "--tensor-parallel", "4")
    assert rc == 1
    assert "self_attn.o_proj.qweight: 64 inputs over 4 GPUs is 16 each, not whole groups of 64" in out
    rc, out = check(folder_of(gptq_store), capsys, "--tensor-parallel", "2")
    assert rc == 1 and "o_proj" in out and "down_proj" not in out


def test_not_a_gptq_folder_says_so(tmp_path: Path, capsys: pytest.CaptureFixture, gptq_store: Store) -> None:
    """A plain HF folder (no quantization config) and a folder without config.json are named as such."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    rc, out = check(plain, capsys)
    assert rc == 1 and "not a GPTQ folder" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out = check(empty, capsys)
    assert rc == 1 and f"{empty}: no config.json" in out
