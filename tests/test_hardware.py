"""Hardware probes on this machine, and the parts that read vendor tools' output."""

from __future__ import annotations

import json
import shutil

import psutil
import pytest

from localchat.hardware import ENV_REPORT, HardwareReport, probe, probe_machine
from localchat.hardware.nvidia import NvidiaProbeError, parse_nvidia_smi


def test_probe_this_machine() -> None:
    r = probe_machine()
    assert r.cpu.physical_cores == psutil.cpu_count(logical=False)
    assert r.cpu.logical_cores >= r.cpu.physical_cores
    assert 0 < r.memory.available_bytes <= r.memory.total_bytes
    assert r.runtimes.llama_cpp and r.runtimes.llama_cpp_version
    if shutil.which("nvidia-smi") is None:
        assert r.nvidia == ()
    assert r.errors == (), r.errors
    assert HardwareReport.from_dict(json.loads(r.to_json())) == r


def test_parse_nvidia_smi() -> None:
    out = "0, NVIDIA GeForce RTX 3060 Laptop GPU, 6144, 5800, 8.6, 550.54\n1, NVIDIA H100 80GB HBM3, 81559, 81000, 9.0, 550.54\n"
    gpus = parse_nvidia_smi(out)
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 3060 Laptop GPU", "NVIDIA H100 80GB HBM3"]
    assert gpus[0].vram_total_bytes == 6144 * 1024**2
    assert gpus[1].compute_capability == "9.0"


def test_parse_nvidia_smi_error_names_the_line() -> None:
    with pytest.raises(NvidiaProbeError, match="line 2"):
        parse_nvidia_smi("0, A, 1, 1, 8.6, 1\nNVIDIA-SMI has failed\n")


def test_probe_failure_is_reported_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    import localchat.hardware as hw

    def broken() -> list:
        raise NvidiaProbeError("nvidia-smi exited 9: driver/library version mismatch")

    monkeypatch.setattr(hw, "probe_nvidia", broken)
    r = hw.probe_machine()
    assert r.nvidia == ()
    assert [(e.probe, e.message) for e in r.errors] == [
        ("nvidia", "NvidiaProbeError: nvidia-smi exited 9: driver/library version mismatch")]


def test_a_saved_report_stands_in_for_the_probe(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$LOCALCHAT_HARDWARE_REPORT plans as if on the machine it describes; a bad file is named."""
    from dataclasses import replace

    from localchat.hardware import NvidiaGpu

    gpu = NvidiaGpu(0, "NVIDIA H100 80GB HBM3", 80 * 1024**3, 79 * 1024**3, "9.0")
    report = replace(probe_machine(), nvidia=(gpu,))
    path = tmp_path / "h100.json"
    path.write_text(report.to_json())
    monkeypatch.setenv(ENV_REPORT, str(path))
    assert probe() == report
    path.write_text("{not json")
    with pytest.raises(ValueError, match="h100.json: not a hardware report"):
        probe()
