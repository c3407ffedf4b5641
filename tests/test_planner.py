"""Planner table tests: hardware reports written by hand for machines we do not have.

The model is LLaMA-2-7B shaped (32 layers, 4096 wide, 32 KV heads, 32k vocab), in the
sizes its real files have: Q4_K_M 4.08 GB, F16 13.5 GB, GPTQ 4-bit 3.9 GB.
"""

from __future__ import annotations

import pytest

from localchat.artifacts import Artifact, ModelDims
from localchat.hardware import GIB, Accelerator, CpuInfo, HardwareReport, MemoryInfo, Runtimes
from localchat.planner import BACKEND_TABLE, MIN_CONTEXT, BackendSpec, Measured, Overrides, PlanError, plan

GB = 10**9
LLAMA7B = ModelDims(n_layers=32, n_ctx_train=4096, n_embd=4096, n_head=32, n_head_kv=32,
                    head_dim=128, n_vocab=32000)


def artifact(fmt: str, quant: str, size: float) -> Artifact:
    size_b = int(size * GB)
    layer = int((size_b - 2 * 32000 * 4096 * 2 * size / 13.5) / 32)
    return Artifact(fmt, f"/nonexistent/llama-7b-{quant}", size_b, layer, quant, LLAMA7B, "LlamaForCausalLM")


Q4 = artifact("gguf", "Q4_K_M", 4.08)
F16 = artifact("gguf", "F16", 13.5)
GPTQ = artifact("gptq", "GPTQ-4bit-g128", 3.9)

ALL_LLAMA = Runtimes(llama_cpp=True, llama_cpp_version="0.3.36", llama_cpp_backends=("cuda", "cpu"), gptq=True)
METAL_LLAMA = Runtimes(llama_cpp=True, llama_cpp_version="0.3.36", llama_cpp_backends=("metal", "blas", "cpu"),
                       gptq=True)
CPU_LLAMA = Runtimes(llama_cpp=True, llama_cpp_version="0.3.36", llama_cpp_backends=("cpu",))


def cuda(name: str, total_gb: float, free_gb: float, cc: str) -> Accelerator:
    return Accelerator("cuda", 0, name, int(total_gb * GIB), int(free_gb * GIB), cc)


def mac(chip: str, mem_gb: int, free_gb: float) -> HardwareReport:
    gpu = Accelerator("metal", 0, chip, mem_gb * GIB, mem_gb * GIB, unified=True)
    return HardwareReport(cpu=CpuInfo(chip, 8, 8, "arm64", ("neon", "dotprod")),
                          memory=MemoryInfo(mem_gb * GIB, int(free_gb * GIB)), accelerators=(gpu,),
                          runtimes=METAL_LLAMA)


def pc(ram_gb: int, free_gb: float, gpus: tuple[Accelerator, ...] = (), runtimes: Runtimes = ALL_LLAMA,
       cores: int = 8) -> HardwareReport:
    return HardwareReport(cpu=CpuInfo("x86", cores, cores * 2, "x86_64", ("avx2", "fma")),
                          memory=MemoryInfo(ram_gb * GIB, int(free_gb * GIB)), accelerators=gpus, runtimes=runtimes)


M1_8GB = mac("Apple M1", 8, 6.0)
M2_PRO_16GB = mac("Apple M2 Pro", 16, 12.0)
RTX3060_LAPTOP = pc(16, 12.0, (cuda("NVIDIA GeForce RTX 3060 Laptop GPU", 6, 5.6, "8.6"),))
CPU_8GB = pc(8, 6.0, runtimes=CPU_LLAMA, cores=4)
H100 = pc(256, 200.0, (cuda("NVIDIA H100 80GB HBM3", 80, 79, "9.0"),))


@pytest.mark.parametrize(
    "name, report, artifacts, backend, quant, full_context, all_layers",
    [
        ("8 GB M1", M1_8GB, [Q4, F16], "llamacpp-metal", "Q4_K_M", False, True),
        ("16 GB M2 Pro", M2_PRO_16GB, [Q4, F16], "llamacpp-metal", "Q4_K_M", True, True),
        ("RTX 3060 laptop, GGUF", RTX3060_LAPTOP, [Q4, F16], "llamacpp-cuda", "Q4_K_M", True, False),
        ("RTX 3060 laptop, GGUF + GPTQ", RTX3060_LAPTOP, [Q4, GPTQ], "llamacpp-cuda", "Q4_K_M", True, False),
        ("CPU-only 8 GB", CPU_8GB, [Q4, F16], "llamacpp-cpu", "Q4_K_M", False, False),
        ("H100, GGUF", H100, [Q4, F16], "llamacpp-cuda", "F16", True, True),
        ("H100, GGUF + GPTQ", H100, [Q4, F16, GPTQ], "gptq-cuda", "GPTQ-4bit-g128", True, True),
    ],
)
def test_plan_table(name: str, report: HardwareReport, artifacts: list[Artifact], backend: str,
                    quant: str, full_context: bool, all_layers: bool) -> None:
    p = plan(report, artifacts)
    assert p.backend == backend, (name, p.describe())
    assert p.artifact.quant == quant, name
    assert (p.context == 4096) is full_context, (name, p.context)
    assert MIN_CONTEXT <= p.context <= 4096
    if backend != "llamacpp-cpu":
        assert (p.gpu_layers == 32) is all_layers, (name, p.gpu_layers)
        assert p.gpu_layers > 0
    else:
        assert p.gpu_layers == 0
    assert p.reasons, "a plan always says why"
    # The estimate never exceeds what the machine has.
    reserve = max(GIB, report.memory.total_bytes // 10)
    assert p.memory.host_bytes <= report.memory.available_bytes - reserve, name


def test_partial_offload_says_how_many_layers() -> None:
    p = plan(RTX3060_LAPTOP, [Q4])
    assert f"{p.gpu_layers} of 32 layers offloaded to NVIDIA GeForce RTX 3060 Laptop GPU" in " ".join(p.reasons)
    # what stays in RAM is the rest of the model
    assert p.memory.device_bytes <= 5.6 * GIB - 512 * 1024**2
    assert p.memory.host_bytes + p.memory.device_bytes == p.memory.total_bytes


def test_gptq_not_fitting_is_explained() -> None:
    p = plan(RTX3060_LAPTOP, [Q4, GPTQ])
    assert any("gptq-cuda cannot hold the whole model" in r for r in p.reasons)


def test_context_shrinks_before_refusing() -> None:
    p = plan(CPU_8GB, [Q4])
    assert p.context < 4096
    assert any("context shrunk from 4096" in r for r in p.reasons)


def test_refuses_with_needs_and_has() -> None:
    tiny_pc = pc(4, 3.0, runtimes=CPU_LLAMA)
    with pytest.raises(PlanError, match=r"needs 4\.\d+ GB, has 2\.\d+ GB usable RAM"):
        plan(tiny_pc, [Q4, F16])


def test_cuda_without_gpu_build_falls_back_and_says_why() -> None:
    report = pc(64, 60.0, RTX3060_LAPTOP.accelerators, runtimes=CPU_LLAMA)
    p = plan(report, [Q4])
    assert p.backend == "llamacpp-cpu"
    assert any("built without GPU support" in r for r in p.reasons)


def test_overrides() -> None:
    p = plan(H100, [Q4, F16], Overrides(backend="llamacpp-cpu", threads=3, context=1024, quant="q4_k_m"))
    assert (p.backend, p.threads, p.context, p.artifact.quant) == ("llamacpp-cpu", 3, 1024, "Q4_K_M")
    p = plan(RTX3060_LAPTOP, [Q4], Overrides(gpu_layers=10))
    assert p.gpu_layers == 10
    with pytest.raises(PlanError, match="valid: gptq-cuda, llamacpp-cuda, llamacpp-metal, llamacpp-cpu"):
        plan(H100, [Q4], Overrides(backend="vulkan"))
    with pytest.raises(PlanError, match="not possible here"):
        plan(CPU_8GB, [Q4], Overrides(backend="llamacpp-metal"))
    with pytest.raises(PlanError, match="the model has: Q4_K_M"):
        plan(CPU_8GB, [Q4], Overrides(quant="Q8_0"))


def test_context_capped_at_training_length() -> None:
    p = plan(H100, [Q4], Overrides(context=32768))
    assert p.context == 4096
    assert any("capped at the model's trained length" in r for r in p.reasons)


def test_plan_is_pure() -> None:
    """Same inputs, same plan; no file is touched (the artifact paths do not exist)."""
    assert plan(M1_8GB, [Q4, F16]) == plan(M1_8GB, [Q4, F16])


def test_report_round_trips_through_json() -> None:
    import json

    for report in (M1_8GB, RTX3060_LAPTOP, H100, CPU_8GB):
        again = HardwareReport.from_dict(json.loads(report.to_json()))
        assert again == report
        assert plan(again, [Q4, F16, GPTQ]) == plan(report, [Q4, F16, GPTQ])


CPU_GPTQ = pc(32, 24.0, runtimes=Runtimes(llama_cpp=True, llama_cpp_version="0.3.36", llama_cpp_backends=("cpu",),
                                          gptq=True))


def test_gptq_only_model_runs_on_the_cpu_through_torch_and_says_so() -> None:
    p = plan(CPU_GPTQ, [GPTQ])
    assert p.backend == "gptq-cpu" and p.gpu_layers == 0 and p.memory.device_bytes == 0
    assert any("no CUDA GPU for the GPTQ checkpoint" in r and "convert the source to GGUF" in r for r in p.reasons)


def test_cpu_prefers_gguf_over_gptq_when_it_has_both() -> None:
    assert plan(CPU_GPTQ, [Q4, GPTQ]).backend == "llamacpp-cpu"
    assert plan(CPU_GPTQ, [Q4, GPTQ], Overrides(backend="gptq-cpu")).backend == "gptq-cpu"


def test_gptq_on_cuda_when_it_fits_and_cpu_without_gptqmodel() -> None:
    assert plan(H100, [GPTQ]).backend == "gptq-cuda"
    with pytest.raises(PlanError, match="torch \\+ GPTQModel are not installed"):
        plan(pc(32, 24.0, (cuda("RTX 4090", 24, 23, "8.9"),), runtimes=CPU_LLAMA), [GPTQ])


H100_NAME = "NVIDIA H100 80GB HBM3"


def test_measured_speed_puts_llamacpp_ahead_of_a_slower_gptq_and_says_so() -> None:
    """`localchat bench` figures for this card outrank the default GPTQ-first order."""
    slow_gptq = [Measured("gptq-cuda", H100_NAME, 41.0, "2026-11-23"), Measured("llamacpp-cuda", H100_NAME, 160.0)]
    p = plan(H100, [Q4, GPTQ], measured=slow_gptq)
    assert p.backend == "llamacpp-cuda" and p.gpu_layers == LLAMA7B.n_layers
    why = " ".join(p.reasons)
    assert "measured decode speed: llamacpp-cuda 160 tok/s on NVIDIA H100" in why
    assert "gptq-cuda 41 tok/s" in why and "llamacpp-cuda first (ahead of the default order)" in why
    assert "2026-11-23" in why
    # A faster GPTQ keeps its place, and the reasons still show the figures.
    fast_gptq = [Measured("gptq-cuda", H100_NAME, 200.0), Measured("llamacpp-cuda", H100_NAME, 160.0)]
    p = plan(H100, [Q4, GPTQ], measured=fast_gptq)
    assert p.backend == "gptq-cuda" and any("gptq-cuda first" in r for r in p.reasons)


def test_measured_speed_counts_only_on_the_device_it_was_taken_on() -> None:
    other_card = [Measured("gptq-cuda", "NVIDIA A10", 20.0), Measured("llamacpp-cuda", "NVIDIA A10", 90.0)]
    p = plan(H100, [Q4, GPTQ], measured=other_card)
    assert p.backend == "gptq-cuda" and not any("measured" in r for r in p.reasons)
    one_side = [Measured("llamacpp-cuda", H100_NAME, 160.0)]  # nothing to compare with
    assert plan(H100, [Q4, GPTQ], measured=one_side).backend == "gptq-cuda"


def test_measured_speed_never_beats_the_user_or_moves_work_off_the_gpu() -> None:
    slow_gptq = [Measured("gptq-cuda", H100_NAME, 41.0), Measured("llamacpp-cuda", H100_NAME, 160.0)]
    assert plan(H100, [Q4, GPTQ], Overrides(backend="gptq-cuda"), measured=slow_gptq).backend == "gptq-cuda"
    # A CPU figure above the GPU's (a tiny model, say) does not send a GPU machine to the CPU:
    # GPU and CPU backends are ranked apart.
    cpu_fast = [Measured("llamacpp-cpu", "x86", 500.0), Measured("llamacpp-cuda", H100_NAME, 160.0)]
    assert plan(H100, [Q4], measured=cpu_fast).backend == "llamacpp-cuda"


RX7900 = pc(64, 48.0, (Accelerator("rocm", 0, "AMD Radeon RX 7900 XTX", 24 * GIB, 23 * GIB, "gfx1100"),),
            runtimes=Runtimes(llama_cpp=True, llama_cpp_version="0.3.36", llama_cpp_backends=("rocm", "cpu")))

# For each row of the backend table: a machine and a model it should be chosen for, and what its
# reason says. A row added to the table without an entry here fails the test below.
WHERE_PICKED = {
    "gptq-cuda": (H100, [Q4, GPTQ], "CUDA GPU and a GPTQ checkpoint that fits in VRAM: NVIDIA H100 80GB HBM3"),
    "llamacpp-cuda": (RTX3060_LAPTOP, [Q4], "of 32 layers offloaded to NVIDIA GeForce RTX 3060 Laptop GPU"),
    "llamacpp-metal": (M2_PRO_16GB, [Q4], "Apple Silicon: all layers on Metal, within its"),
    "llamacpp-cpu": (CPU_8GB, [Q4], "weights and KV cache in RAM"),
    "gptq-cpu": (CPU_GPTQ, [GPTQ], "GPTQ weights dequantized by torch on the CPU"),
    "llamacpp-rocm": (RX7900, [Q4, F16], "all layers offloaded to AMD Radeon RX 7900 XTX (24.70 GB VRAM free)"),
}


@pytest.mark.parametrize("spec", BACKEND_TABLE, ids=lambda spec: spec.name)
def test_every_backend_in_the_table_is_chosen_where_it_fits_and_says_why(spec: BackendSpec) -> None:
    """Each row of the backend table wins on its own kind of machine, and the plan's reasons
    name the device it runs on."""
    report, artifacts, why = WHERE_PICKED[spec.name]
    p = plan(report, artifacts)
    assert p.backend == spec.name, p.describe()
    assert f"backend: {spec.name}" in p.describe()
    assert any(why in r for r in p.reasons), p.reasons


class _FakeVulkanEngine:
    """Stands in for a backend module: what the registry builds from the table's dotted path."""

    def __init__(self, plan: object) -> None:
        self.plan = plan


def test_a_new_row_in_the_table_is_all_a_backend_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend the code has never heard of, added as one row, is planned for (chosen, refused
    with its own reason, forced by name) and loaded by the engine registry, with no other change."""
    from dataclasses import replace

    import localchat.planner as planner
    from localchat.engine.registry import load_backend

    vulkan = BackendSpec("llamacpp-vulkan", "gguf", "vulkan", lambda rt: "vulkan" in rt.llama_cpp_backends,
                         "{device} found, but llama.cpp has no Vulkan", planner._fit_llamacpp,
                         explain="{part} layers on Vulkan on {where}",
                         engine="tests.test_planner:_FakeVulkanEngine")
    monkeypatch.setattr(planner, "BACKEND_TABLE", planner.BACKEND_TABLE + (vulkan,))
    arc = pc(32, 24.0, (Accelerator("vulkan", 0, "Intel Arc A770", 16 * GIB, 15 * GIB),),
             runtimes=Runtimes(True, "0.3.36", ("vulkan", "cpu")))

    p = plan(arc, [Q4])
    assert p.backend == "llamacpp-vulkan" and p.gpu_layers == 32
    assert any(r.startswith("all layers on Vulkan on Intel Arc A770") for r in p.reasons), p.reasons
    engine = load_backend(p)
    assert isinstance(engine, _FakeVulkanEngine) and engine.plan is p

    p = plan(replace(arc, runtimes=CPU_LLAMA), [Q4])
    assert p.backend == "llamacpp-cpu" and "Intel Arc A770 found, but llama.cpp has no Vulkan" in p.reasons
    assert plan(arc, [Q4], Overrides(backend="llamacpp-cpu")).backend == "llamacpp-cpu"
    with pytest.raises(PlanError, match="valid: .*llamacpp-rocm, llamacpp-vulkan"):
        plan(arc, [Q4], Overrides(backend="llamacpp-opencl"))
