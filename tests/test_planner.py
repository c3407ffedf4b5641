"""Planner table tests: hardware reports written by hand for machines we do not have.

The model is LLaMA-2-7B shaped (32 layers, 4096 wide, 32 KV heads, 32k vocab), in the
sizes its real files have: Q4_K_M 4.08 GB, F16 13.5 GB, GPTQ 4-bit 3.9 GB.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from localchat.artifacts import Artifact, ModelDims
from localchat.hardware import GIB, Accelerator, CpuInfo, HardwareReport, MemoryInfo, Runtimes, load_report
from localchat.planner import (BACKEND_TABLE, MIN_CONTEXT, VLLM_MIN_PARALLEL, BackendSpec, Measured, Overrides,
                               PlanError, plan, tensor_parallel_size)

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

HARDWARE = Path(__file__).parent / "hardware"  # reports as `localchat doctor --json` writes them


def saved(name: str) -> HardwareReport:
    """A machine we do not have, from its saved report (tests/hardware/NAME.json); vLLM's environment
    is recorded in it as its probe found it."""
    return load_report(HARDWARE / f"{name}.json")


HF = artifact("hf", "F16", 13.5)  # the unquantized checkpoint, which vLLM serves as it is
MANY = Overrides(parallel=32)

# For each row of the backend table: a machine and a model it should be chosen for, and what its
# reason says (and the overrides that ask for it). A row added to the table without an entry here
# fails the test below.
WHERE_PICKED = {
    "gptq-cuda": (H100, [Q4, GPTQ], "CUDA GPU and a GPTQ checkpoint that fits in VRAM: NVIDIA H100 80GB HBM3"),
    "llamacpp-cuda": (RTX3060_LAPTOP, [Q4], "of 32 layers offloaded to NVIDIA GeForce RTX 3060 Laptop GPU"),
    "llamacpp-metal": (M2_PRO_16GB, [Q4], "Apple Silicon: all layers on Metal, within its"),
    "llamacpp-cpu": (CPU_8GB, [Q4], "weights and KV cache in RAM"),
    "gptq-cpu": (CPU_GPTQ, [GPTQ], "GPTQ weights dequantized by torch on the CPU"),
    "llamacpp-rocm": (RX7900, [Q4, F16], "all layers offloaded to AMD Radeon RX 7900 XTX (24.70 GB VRAM free)"),
    "vllm-cuda": (saved("cuda-4x24gb"), [Q4, GPTQ], "vLLM for many concurrent users: tensor parallel over 4", MANY),
    "vllm-cpu": (saved("no-gpu"), [Q4, HF], "vLLM's CPU build (float32)", Overrides(backend="vllm")),
}


@pytest.mark.parametrize("spec", BACKEND_TABLE, ids=lambda spec: spec.name)
def test_every_backend_in_the_table_is_chosen_where_it_fits_and_says_why(spec: BackendSpec) -> None:
    """Each row of the backend table wins on its own kind of machine, and the plan's reasons
    name the device it runs on."""
    report, artifacts, why, *overrides = WHERE_PICKED[spec.name]
    p = plan(report, artifacts, *overrides)
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


def test_vllm_serves_many_users_over_four_gpus_from_the_checkpoint() -> None:
    """Four 24 GB GPUs asked for 32 concurrent users: vLLM ahead of llama.cpp and GPTQ, tensor parallel
    over all 4 (32 heads split evenly), the F16 checkpoint as the best quality that fits (13.5 GB), and
    the reasons say so and how much KV cache vLLM pages for them."""
    p = plan(saved("cuda-4x24gb"), [Q4, GPTQ, HF], MANY)
    assert (p.backend, p.tensor_parallel, p.artifact.quant, p.context) == ("vllm-cuda", 4, "F16", 4096), p.describe()
    why = " ".join(p.reasons)
    assert "tensor parallel over 4 of 4 CUDA GPU(s); " in why and "of KV cache paged among the users (room for" in why
    assert "F16 chosen: the best quality that fits entirely on the GPU" in why
    assert "tensor parallel: 4 GPUs" in p.describe()


def test_vllm_is_not_chosen_for_few_users_and_says_why() -> None:
    """The same box with no --parallel (one user) or fewer than VLLM_MIN_PARALLEL: the GPTQ backend
    runs it, and the reasons say vLLM is for many users and how to ask for it."""
    for overrides in (None, Overrides(parallel=VLLM_MIN_PARALLEL - 1)):
        p = plan(saved("cuda-4x24gb"), [Q4, GPTQ], overrides)
        assert p.backend == "gptq-cuda", p.describe()
        assert (f"vllm-cuda not chosen: it is for many concurrent users (--parallel {VLLM_MIN_PARALLEL} or more, "
                "or `--backend vllm-cuda`)") in p.reasons
    assert plan(saved("cuda-4x24gb"), [Q4, GPTQ], Overrides(parallel=VLLM_MIN_PARALLEL)).backend == "vllm-cuda"


def test_vllm_splits_over_a_power_of_two_that_divides_the_heads() -> None:
    """Tensor parallel size: the most GPUs, a power of two, dividing the attention heads; a 10-head model
    on 4 GPUs runs on 2, and the plan says why."""
    assert [tensor_parallel_size(g, h) for g, h in ((4, 32), (8, 12), (3, 32), (4, 10), (0, 32), (4, 7))] == \
        [4, 4, 2, 2, 1, 1]
    dims = LLAMA7B.__class__(**{**LLAMA7B.__dict__, "n_head": 10, "n_head_kv": 10})
    ten = Artifact("gptq", "/nonexistent/ten-heads", int(3.9 * GB), int(0.1 * GB), "GPTQ-4bit-g128", dims)
    p = plan(saved("cuda-4x24gb"), [ten], MANY)
    assert p.backend == "vllm-cuda" and p.tensor_parallel == 2
    assert any("tensor parallel over 2 of 4 CUDA GPU(s), the 10 attention heads split evenly over 2" in r
               for r in p.reasons), p.reasons


def test_vllm_on_one_8gb_gpu_takes_the_gptq_folder_and_refuses_the_checkpoint() -> None:
    """One 8 GB GPU: the 3.9 GB GPTQ folder fits vLLM with a full 4096-token sequence; the 13.5 GB checkpoint
    alone is refused, naming the GPU and the weights' size."""
    p = plan(saved("cuda-1x8gb"), [GPTQ, HF], Overrides(backend="vllm"))
    assert (p.backend, p.tensor_parallel, p.artifact.format, p.context) == ("vllm-cuda", 1, "gptq", 4096)
    assert "backend vllm-cuda chosen by the user" in p.reasons
    with pytest.raises(PlanError, match=r"does not fit the GPU: vllm-cuda cannot hold the whole model on NVIDIA "
                                        r"GeForce RTX 4060 Laptop GPU \(8\.20 GB VRAM free\): needs more than its "
                                        r"13\.50 GB of weights"):
        plan(saved("cuda-1x8gb"), [HF], Overrides(backend="vllm"))


def test_vllm_refuses_a_gguf_only_model_and_says_what_it_serves() -> None:
    """Asked for vLLM with only a GGUF: refused with the formats vLLM serves and the conversion to run."""
    with pytest.raises(PlanError, match=r"backend 'vllm' runs a GPTQ folder or a Hugging Face checkpoint; the model "
                                        r"has only GGUF Q4_K_M \(llama-7b-Q4_K_M\): convert the source to a GPTQ "
                                        r"folder: `localchat convert HF_CHECKPOINT --to gptq"):
        plan(saved("cuda-4x24gb"), [Q4], Overrides(backend="vllm"))


def test_vllm_without_its_environment_is_refused_or_passed_over() -> None:
    """No vLLM environment in the report: asked by name, refused with `localchat setup-vllm`; asked for
    many users, llama.cpp serves them and the reasons say vLLM would, once made."""
    from dataclasses import replace

    box = saved("cuda-4x24gb")
    box = replace(box, runtimes=replace(box.runtimes, vllm=""))
    with pytest.raises(PlanError, match="not possible here: NVIDIA GeForce RTX 4090 found, but no vLLM environment: "
                                        "make one with `localchat setup-vllm`"):
        plan(box, [GPTQ], Overrides(backend="vllm"))
    p = plan(box, [Q4, GPTQ], MANY)
    assert p.backend == "gptq-cuda" and any("found, but no vLLM environment" in r for r in p.reasons)


def test_vllm_without_a_cuda_gpu_runs_only_when_named() -> None:
    """No GPU, and an Apple machine: many users stay on llama.cpp (vLLM is for CUDA); vLLM's CPU build runs
    only when asked for by name, and the plan says so."""
    p = plan(saved("no-gpu"), [Q4, HF], MANY)
    assert p.backend == "llamacpp-cpu"
    assert "vllm-cpu not chosen: it is for many concurrent users (`--backend vllm-cpu`)" in p.reasons
    p = plan(saved("no-gpu"), [Q4, HF], Overrides(backend="vllm"))
    assert (p.backend, p.artifact.format, p.memory.weights_bytes) == ("vllm-cpu", "hf", 2 * HF.size_bytes)
    p = plan(saved("apple-m2-16gb"), [Q4], Overrides(parallel=VLLM_MIN_PARALLEL))
    assert p.backend == "llamacpp-metal" and not any("vllm" in r for r in p.reasons)
    with pytest.raises(PlanError, match="backend 'vllm' runs a GPTQ folder or a Hugging Face checkpoint"):
        plan(saved("apple-m2-16gb"), [Q4], Overrides(backend="vllm"))


def test_front_ends_that_load_in_process_never_get_vllm() -> None:
    """`chat`, `serve`'s own engine and `bench` load the backend into their process: asked for many users on
    the 4-GPU box they get the GPTQ backend and the reason names the command that runs vLLM; vLLM by name is
    refused the same way."""
    in_process = Overrides(parallel=32, in_process=True)
    p = plan(saved("cuda-4x24gb"), [Q4, GPTQ], in_process)
    assert p.backend == "gptq-cuda"
    assert ("vllm-cuda not chosen: it runs as its own server (`localchat serve --engine vllm --model NAME`)"
            in p.reasons)
    with pytest.raises(PlanError, match="backend vllm-cuda runs as its own server, not in this command"):
        plan(saved("cuda-4x24gb"), [GPTQ], Overrides(backend="vllm-cuda", in_process=True))


PC_16GB = pc(16, 12.0, runtimes=CPU_LLAMA)  # 11.17 GB usable: Q4 and f16 KV for 3 full contexts, not 4


def test_slots_default_to_four_where_the_kv_cache_of_four_fits_and_the_plan_says_so() -> None:
    """No --parallel on an H100: four slots of the full context, their f16 KV cache counted and explained."""
    p = plan(H100, [Q4])
    assert (p.slots, p.kv_cache, p.context) == (4, "f16", 4096)
    assert p.memory.kv_bytes == 4 * LLAMA7B.kv_bytes(4096)
    assert "context: 4096 tokens in each of 4 parallel slots" in p.describe()
    assert ("KV cache 8.59 GB at 4096 tokens: 4 parallel slots (the most the planner gives; --parallel sets "
            "more), f16 (the default)") in p.reasons


def test_fewer_slots_where_memory_is_short() -> None:
    """An f16 cache pinned on a 16 GB PC: the memory left after the weights holds three slots, so three."""
    p = plan(PC_16GB, [Q4], Overrides(kv_cache="f16"))
    assert (p.slots, p.context) == (3, 4096)
    assert p.memory.host_bytes <= 11.17 * GB
    assert "3 parallel slots (as many as the memory left holds), f16 (--kv-cache)" in p.describe()


def test_q8_0_kv_cache_where_it_holds_more_slots_than_f16() -> None:
    """Nothing pinned on the same PC: q8_0 takes about half of f16's memory, so all four slots fit."""
    p = plan(PC_16GB, [Q4])
    assert (p.slots, p.kv_cache, p.context) == (4, "q8_0", 4096)
    assert "q8_0 with flash attention (f16 holds only 3 slot(s))" in p.describe()


def test_q8_0_kv_cache_before_a_shorter_context() -> None:
    """A 4-core PC with 6 GB free: f16 holds one 1024-token context, q8_0 one of 2048, so q8_0 at 2048."""
    assert plan(CPU_8GB, [Q4], Overrides(kv_cache="f16")).context == 1024
    p = plan(CPU_8GB, [Q4])
    assert (p.slots, p.kv_cache, p.context) == (1, "q8_0", 2048)
    assert "q8_0 with flash attention (f16 holds no slot at this context)" in p.describe()


def test_slots_never_take_layers_off_the_gpu() -> None:
    """A 6 GB laptop GPU with part of the model on it: one slot, as a second would push layers to the CPU."""
    p = plan(RTX3060_LAPTOP, [Q4])
    assert p.slots == 1 and p.gpu_layers == plan(RTX3060_LAPTOP, [Q4], Overrides(parallel=1)).gpu_layers
    assert "1 parallel slot (as many as the memory left holds without taking layers off the GPU)" in p.describe()


def test_pinned_slots_and_kv_cache_are_kept_and_named() -> None:
    """--parallel 8 --kv-cache q4_0 are what runs; a backend that does not batch says it decodes one answer."""
    p = plan(H100, [Q4], Overrides(parallel=8, kv_cache="q4_0"))
    assert (p.slots, p.kv_cache) == (8, "q4_0")
    assert "8 parallel slots (--parallel), q4_0 with flash attention (--kv-cache)" in p.describe()
    g = plan(H100, [GPTQ], Overrides(parallel=8))
    assert (g.slots, g.kv_cache) == (1, "f16")
    assert "gptq-cuda decodes one sequence at a time with an f16 KV cache" in g.reasons
