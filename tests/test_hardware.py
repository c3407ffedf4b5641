"""Hardware probes on this machine, and the parts that read vendor tools' output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psutil
import pytest

from localchat.hardware import ENV_REPORT, GIB, Accelerator, HardwareReport, Runtimes, probe, probe_machine
from localchat.hardware.nvidia import NvidiaProbeError, parse_nvidia_smi
from localchat.planner import plan
from tests.test_planner import Q4


def test_probe_this_machine() -> None:
    r = probe_machine()
    assert r.cpu.physical_cores == psutil.cpu_count(logical=False)
    assert r.cpu.logical_cores >= r.cpu.physical_cores
    assert 0 < r.memory.available_bytes <= r.memory.total_bytes
    assert r.runtimes.llama_cpp and r.runtimes.llama_cpp_version
    if shutil.which("nvidia-smi") is None:
        assert r.on("cuda") == ()
    assert r.errors == (), r.errors
    assert HardwareReport.from_dict(json.loads(r.to_json())) == r


def test_parse_nvidia_smi() -> None:
    out = "0, NVIDIA GeForce RTX 3060 Laptop GPU, 6144, 5800, 8.6, 550.54\n1, NVIDIA H100 80GB HBM3, 81559, 81000, 9.0, 550.54\n"
    gpus = parse_nvidia_smi(out)
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 3060 Laptop GPU", "NVIDIA H100 80GB HBM3"]
    assert gpus[0].total_bytes == 6144 * 1024**2
    assert gpus[1].compute == "9.0" and {g.library for g in gpus} == {"cuda"}


def test_parse_nvidia_smi_error_names_the_line() -> None:
    with pytest.raises(NvidiaProbeError, match="line 2"):
        parse_nvidia_smi("0, A, 1, 1, 8.6, 1\nNVIDIA-SMI has failed\n")


def test_probe_failure_is_reported_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    import localchat.hardware as hw

    def broken() -> list:
        raise NvidiaProbeError("nvidia-smi exited 9: driver/library version mismatch")

    monkeypatch.setattr(hw, "probe_nvidia", broken)
    r = hw.probe_machine()
    assert r.on("cuda") == ()
    assert [(e.probe, e.message) for e in r.errors] == [
        ("nvidia", "NvidiaProbeError: nvidia-smi exited 9: driver/library version mismatch")]


def test_a_saved_report_stands_in_for_the_probe(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """$LOCALCHAT_HARDWARE_REPORT plans as if on the machine it describes; a bad file is named."""
    from dataclasses import replace

    gpu = Accelerator("cuda", 0, "NVIDIA H100 80GB HBM3", 80 * 1024**3, 79 * 1024**3, "9.0")
    report = replace(probe_machine(), accelerators=(gpu,))
    path = tmp_path / "h100.json"
    path.write_text(report.to_json())
    monkeypatch.setenv(ENV_REPORT, str(path))
    assert probe() == report
    path.write_text("{not json")
    with pytest.raises(ValueError, match="h100.json: not a hardware report"):
        probe()


def _amd_card(drm: Path, card: str, vendor: str, total: int, used: str, product: str | None = None) -> None:
    dev = drm / card / "device"
    dev.mkdir(parents=True)
    (dev / "vendor").write_text(vendor + "\n")
    (dev / "device").write_text("0x744c\n")
    (dev / "mem_info_vram_total").write_text(f"{total}\n")
    (dev / "mem_info_vram_used").write_text(used + "\n")
    if product is not None:
        (dev / "product_name").write_text(product + "\n")


def test_amd_gpus_are_read_from_the_drivers_sysfs_files(tmp_path: Path) -> None:
    """AMD GPUs come from amdgpu's VRAM counters as ROCm accelerators; other vendors' cards and
    display connectors are left out."""
    from localchat.hardware.amd import probe_amd

    _amd_card(tmp_path, "card1", "0x1002", 24 * GIB, str(2 * GIB), "AMD Radeon RX 7900 XTX")
    _amd_card(tmp_path, "card0", "0x8086", 8 * GIB, "0")  # an Intel GPU
    _amd_card(tmp_path, "card2", "0x1002", 16 * GIB, str(16 * GIB))  # no product_name: named by PCI id
    (tmp_path / "card1-DP-1").mkdir()
    assert probe_amd(tmp_path) == [
        Accelerator("rocm", 0, "AMD Radeon RX 7900 XTX", 24 * GIB, 22 * GIB),
        Accelerator("rocm", 1, "AMD GPU 0x744c", 16 * GIB, 0),
    ]
    assert probe_amd(tmp_path / "no-such-dir") == []


def test_amd_probe_error_names_the_file_and_lands_in_the_report(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A counter that is not a number is an error naming the card, recorded in the report."""
    import localchat.hardware as hw
    import localchat.hardware.amd as amd

    _amd_card(tmp_path, "card0", "0x1002", 24 * GIB, "garbage")
    monkeypatch.setattr(amd, "SYSFS_DRM", tmp_path)
    monkeypatch.setattr(hw, "probe_amd", lambda: amd.probe_amd(tmp_path))
    r = hw.probe_machine()
    assert r.on("rocm") == ()
    [error] = [e for e in r.errors if e.probe == "amd"]
    assert f"{tmp_path / 'card0' / 'device'}: cannot read the VRAM counters" in error.message


def test_llama_cpp_build_is_recorded_as_its_ggml_backends() -> None:
    """The runtimes probe names the GPU libraries the installed llama.cpp was built for, from
    ggml's backend registry, which agrees with llama.cpp's own GPU-offload flag."""
    import llama_cpp

    backends = probe_machine().runtimes.llama_cpp_backends
    assert "cpu" in backends
    gpu = set(backends) & {"cuda", "metal", "rocm", "vulkan", "sycl", "musa", "cann", "opencl"}
    assert bool(gpu) == bool(llama_cpp.llama_supports_gpu_offload()), backends


def test_a_failing_llama_cpp_backend_probe_is_reported_and_keeps_the_cpu(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A llama.cpp whose ggml registry cannot be read is still used on the CPU; the report says why
    its GPU backends are unknown."""
    import localchat.hardware as hw

    def broken() -> tuple[str, ...]:
        raise AttributeError("undefined symbol: ggml_backend_reg_count")

    monkeypatch.setattr(hw, "probe_llama_cpp_backends", broken)
    r = hw.probe_machine()
    assert r.runtimes.llama_cpp and r.runtimes.llama_cpp_backends == ("cpu",)
    assert ("llama.cpp backends", "AttributeError: undefined symbol: ggml_backend_reg_count") in [
        (e.probe, e.message) for e in r.errors]
    assert plan(r, [Q4]).backend == "llamacpp-cpu"


CUDA_METAL_ROCM = (
    Accelerator("cuda", 0, "NVIDIA GeForce RTX 4090", 24 * GIB, 22 * GIB, "8.9", "550.54"),
    Accelerator("metal", 0, "Apple M3 Max", 64 * GIB, 64 * GIB, unified=True),
    Accelerator("rocm", 0, "AMD Radeon RX 7900 XTX", 24 * GIB, 23 * GIB),
)


def test_a_report_with_cuda_metal_and_rocm_accelerators_round_trips_and_doctor_lists_each() -> None:
    """One list of accelerators, whoever made them: saved and read back unchanged, each printed
    by `localchat doctor` with its library, memory and compute capability."""
    from dataclasses import replace

    from localchat.commands.doctor import describe_report

    report = replace(probe_machine(), accelerators=CUDA_METAL_ROCM,
                     runtimes=Runtimes(True, "0.3.36", ("cuda", "cpu"), False))
    assert HardwareReport.from_dict(json.loads(report.to_json())) == report
    assert [g.name for g in report.on("rocm")] == ["AMD Radeon RX 7900 XTX"]
    text = describe_report(report)
    assert "gpu:     cuda #0 NVIDIA GeForce RTX 4090, 25.77 GB VRAM (23.62 GB free), compute 8.9" in text
    assert "gpu:     metal #0 Apple M3 Max, 68.72 GB unified memory" in text
    assert "gpu:     rocm #0 AMD Radeon RX 7900 XTX, 25.77 GB VRAM (24.70 GB free)" in text
    assert "llama.cpp 0.3.36 (ggml backends: cuda, cpu)" in text


def test_a_report_saved_before_the_accelerator_list_still_plans(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`doctor --json` files written by earlier versions (an `nvidia` list, an `apple` entry, one
    GPU-offload flag) read as accelerators and a llama.cpp built for their GPUs' libraries."""
    old = {"cpu": {"model": "x86", "physical_cores": 8, "logical_cores": 16, "arch": "x86_64",
                   "simd": ["avx2"]},
           "memory": {"total_bytes": 64 * GIB, "available_bytes": 60 * GIB},
           "nvidia": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "vram_total_bytes": 80 * GIB,
                       "vram_free_bytes": 79 * GIB, "compute_capability": "9.0", "driver": "550.54"}],
           "apple": None,
           "runtimes": {"llama_cpp": True, "llama_cpp_version": "0.3.30", "llama_cpp_gpu_offload": True,
                        "gptq": False},
           "errors": []}
    path = tmp_path / "box.json"
    path.write_text(json.dumps(old))
    monkeypatch.setenv(ENV_REPORT, str(path))
    r = probe()
    h100 = Accelerator("cuda", 0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, "9.0", "550.54")
    assert r.accelerators == (h100,)
    assert r.runtimes.llama_cpp_backends == ("cpu", "cuda")
    assert plan(r, [Q4]).backend == "llamacpp-cuda"
    mac = dict(old, nvidia=[], apple={"chip": "Apple M2", "unified_memory_bytes": 16 * GIB, "metal": True},
               runtimes=dict(old["runtimes"], llama_cpp_gpu_offload=False))
    path.write_text(json.dumps(mac))
    r = probe()
    assert r.accelerators == (Accelerator("metal", 0, "Apple M2", 16 * GIB, 16 * GIB, unified=True),)
    assert r.runtimes.llama_cpp_backends == ("cpu",)
    assert plan(r, [Q4]).backend == "llamacpp-cpu"


def test_only_doctor_and_serve_vllm_ask_the_vllm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking vLLM's environment starts a child Python: the probe every front end runs (chat, serve, the
    app) leaves it out, and `doctor`'s probe (vllm=True) records what it says."""
    import localchat.hardware as hw

    asked: list[str] = []
    monkeypatch.setattr(hw, "probe_vllm", lambda: asked.append("vllm") or "/venv/bin/python")
    assert probe_machine(llama_cpp=False).runtimes.vllm == "" and asked == []
    assert probe_machine(llama_cpp=False, vllm=True).runtimes.vllm == "/venv/bin/python" and asked == ["vllm"]
