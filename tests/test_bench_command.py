"""`localchat bench` times the real llama.cpp backend and keeps the figure in the store."""

from __future__ import annotations

import json
import subprocess
import sys

from localchat.hardware import probe
from localchat.store import Store
from localchat.store.resolve import SPEEDS, resolve_model

MODEL = "smollm2-135m-instruct"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "localchat", "bench", *args], capture_output=True, text=True,
                          timeout=300)


def test_bench_records_each_backend_once_per_device(home: Store) -> None:
    r = bench(MODEL, "--tokens", "24")
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if line.startswith("llamacpp-cpu"))
    assert float(row.split()[-3]) > 1.0  # decode tok/s
    assert f"the planner now picks llamacpp-cpu for {MODEL}" in r.stdout
    cpu = probe().cpu.model
    records = home.get(MODEL).extra[SPEEDS]
    assert [(d["backend"], d["device"]) for d in records] == [("llamacpp-cpu", cpu)]
    assert records[0]["decode_tok_s"] > 1.0 and records[0]["when"]
    first = records[0]["decode_tok_s"]
    # Measuring again replaces the record for that backend and device; other devices stay.
    home.update_extra(MODEL, SPEEDS, records + [{"backend": "llamacpp-cuda", "device": "NVIDIA A10",
                                                 "decode_tok_s": 90.0}])
    assert bench(MODEL, "--tokens", "24").returncode == 0
    records = home.get(MODEL).extra[SPEEDS]
    assert sorted((d["backend"], d["device"]) for d in records) == [("llamacpp-cpu", cpu),
                                                                    ("llamacpp-cuda", "NVIDIA A10")]
    assert resolve_model(MODEL, home).measured[-1].decode_tok_s > 1.0 and first > 1.0


def test_bench_errors_are_one_line(home: Store) -> None:
    r = bench("no-such-model")
    assert r.returncode == 1 and "localchat bench:" in r.stderr and "Traceback" not in r.stderr
    r = bench(MODEL, "--backend", "gptq-cuda")
    assert r.returncode == 1 and "no backend can run it here among gptq-cuda" in r.stderr


def test_a_backend_that_fails_to_load_is_reported_and_the_others_still_timed(home: Store, starter_gguf) -> None:
    """A model whose GPTQ folder lost its weights: gptq-cpu fails to load, llama.cpp is still timed."""
    from localchat.store import ModelEntry, ModelFile

    from .checkpoints import starter_hf
    from .conftest import link_or_copy

    folder = home.model_dir("half") / "gptq"
    folder.mkdir(parents=True)
    config = json.loads((starter_hf(starter_gguf) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True,
                                     "desc_act": False}
    (folder / "config.json").write_text(json.dumps(config))
    gguf = home.model_dir("half") / starter_gguf.name
    link_or_copy(starter_gguf, gguf)
    home.add(ModelEntry(name="half", format="gguf", quant="Q4_1", source="test", files=[
        ModelFile(str(gguf.relative_to(home.root)), gguf.stat().st_size, ""),
        ModelFile(str(folder.relative_to(home.root)), 0, "")]))
    r = bench("half", "--tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "localchat bench: gptq-cpu:" in r.stderr and "Traceback" not in r.stderr
    assert any(line.startswith("llamacpp-cpu") for line in r.stdout.splitlines())
    assert [d["backend"] for d in home.get("half").extra[SPEEDS]] == ["llamacpp-cpu"]
