"""Whether vLLM serves a GPTQ folder with its fast Marlin kernels, and if not, why.

The rules are vLLM's own, read from its source (kept here as data so `check-vllm`, `info`,
`serve --engine vllm` and `convert --to gptq` share them):

- `GPTQMarlinConfig.is_gptq_marlin_compatible` (vllm/model_executor/layers/quantization/
  gptq_marlin.py, up to 0.1x) and `AutoGPTQConfig` (auto_gptq.py, 0.32): `quant_method` must be
  "gptq"; `bits`, `group_size`, `sym` and `desc_act` must all be present; `(bits, sym)` must be in
  `TYPE_MAP` = {(4, True): uint4b8, (8, True): uint8b128}, so only symmetric 4- or 8-bit weights.
  On the CPU (`_query_cpu_marlin_supported_quant_types`) only uint4b8, i.e. 4 bits.
- `check_marlin_supported` (utils/marlin_utils.py): `group_size` in MARLIN_SUPPORTED_GROUP_SIZES =
  [-1, 32, 64, 128].
- `normalize_and_validate_gptq_desc_act` (utils/gptq_utils.py, 0.32): `desc_act` true is a no-op
  with `group_size` -1 and refused otherwise ("GPTQ group activation ordering (desc_act=True) is no
  longer supported"); older releases ran it through a g_idx sort, slower and not across ranks.
- `GPTQConfig.from_config` (gptq.py) reads `checkpoint_format` (default "") and its kernel uses
  `use_v2_format = checkpoint_format == "gptq_v2"`: a stored zero-point is the zero minus one (v1,
  GPTQ's original layout, GPTQModel's `FORMAT.GPTQ`) unless the folder says "gptq_v2" (GPTQModel's
  `FORMAT.GPTQ_V2`, the stored zero is the zero). A folder that stores v2 zero-points without
  saying so is read off by one on every group: the garbage outputs of vLLM issue #26343.
- The Marlin kernel (kernels/linear/mixed_precision/marlin.py, `can_implement`): with tensor
  parallelism each rank's share of a row-parallel layer's input must hold whole groups.

Reading the zero-points needs no torch: the runtime's safetensors header reader
(localchat/safetensors_file.py) finds each `.qzeros` tensor's bytes and numpy reads them; the
quantization settings come from the one reader of GPTQ configs (`artifacts.quantization_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import quantization_config
from ..safetensors_file import TensorInfo, read_safetensors_header

MARLIN_GROUP_SIZES = (-1, 32, 64, 128)  # marlin_utils.MARLIN_SUPPORTED_GROUP_SIZES
MARLIN_BITS_CUDA = (4, 8)  # GPTQMarlinConfig.TYPE_MAP, symmetric only
MARLIN_BITS_CPU = (4,)  # _query_cpu_marlin_supported_quant_types
V2_FORMAT = "gptq_v2"
# Row-parallel layers: vLLM splits their input (in_features) across tensor-parallel ranks.
ROW_PARALLEL = ("o_proj", "down_proj", "w2", "dense", "out_proj", "c_proj")


@dataclass
class VllmCheck:
    """The verdict on one folder: `problems` are why vLLM's Marlin path will not (or will wrongly)
    serve it; `notes` are facts worth knowing that do not stop it."""

    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line, for `localchat info` and refusals."""
        if self.ok:
            return "vLLM: served with its Marlin (gptq_marlin) kernels"
        return "vLLM: not on its Marlin path: " + "; ".join(self.problems)


def settings_problems(q: dict[str, Any], on_cpu: bool = False, where: str = "") -> list[str]:
    """Why `q` (a quantization config, or one `dynamic` override merged onto it) is not Marlin's."""
    out: list[str] = []
    method = str(q.get("quant_method", "")).lower()
    if method != "gptq":
        return [f"{where}quant_method is {method or 'missing'!r}, not 'gptq'"]
    missing = [k for k in ("bits", "group_size", "sym", "desc_act") if q.get(k) is None]
    if missing:
        return [f"{where}{', '.join(missing)} missing: vLLM cannot tell whether Marlin fits"]
    bits, group, sym, desc_act = q["bits"], q["group_size"], q["sym"], q["desc_act"]
    if not sym:
        out.append(f"{where}sym is false: Marlin has only symmetric GPTQ types (uint4b8, uint8b128); "
                   "re-quantize with sym=true")
    allowed = MARLIN_BITS_CPU if on_cpu else MARLIN_BITS_CUDA
    if bits not in allowed:
        out.append(f"{where}bits is {bits}: Marlin reads {' or '.join(map(str, allowed))}-bit GPTQ"
                   + (" on the CPU" if on_cpu else ""))
    if group not in MARLIN_GROUP_SIZES:
        out.append(f"{where}group_size is {group}: Marlin reads {', '.join(map(str, MARLIN_GROUP_SIZES))}")
    if desc_act and group != -1:
        out.append(f"{where}desc_act is true with groups of {group}: vLLM 0.32 refuses activation order "
                   "(older releases reorder through g_idx, slower); re-quantize with desc_act=false")
    return out


TensorIndex = dict[str, tuple[Path, TensorInfo]]  # tensor name -> (its safetensors file, its entry there)


def _tensor_index(folder: Path) -> TensorIndex:
    """Every tensor of the folder's safetensors files, with the file it is in."""
    return {name: (path, t) for path in sorted(folder.glob("*.safetensors"))
            for name, t in read_safetensors_header(path).items()}


def _read_int32(path: Path, t: TensorInfo) -> np.ndarray:
    with path.open("rb") as f:
        f.seek(t.start)
        return np.frombuffer(f.read(t.end - t.start), dtype="<i4")


def zero_point_problems(index: TensorIndex, q: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Compare the stored zero-points with the format the folder declares.

    A symmetric GPTQ layer's zero is 2**(bits-1) for every group: v1 stores it minus one (7 for
    4 bits, packed as 0x77777777), v2 stores it as it is (8, 0x88888888). Every `.qzeros` tensor is
    read (they are small: one value per group and output channel)."""
    bits, sym = q.get("bits"), q.get("sym")
    declared = str(q.get("checkpoint_format") or "")
    if not sym or bits not in (2, 4, 8):
        return [], ["zero-points not checked (asymmetric or unusual bits: v1 and v2 look alike)"]
    zeros = [n for n in index if n.endswith(".qzeros")]
    if not zeros:
        return ["no .qzeros tensors in the safetensors files: not a GPTQ checkpoint"], []
    mask, per_word = (1 << bits) - 1, 32 // bits
    layouts = {frozenset({2 ** (bits - 1) - 1}): "v1", frozenset({2 ** (bits - 1)}): "v2"}
    kinds: dict[str, list[str]] = {"v1": [], "v2": [], "other": []}
    for name in zeros:
        path, t = index[name]
        if t.dtype != "I32":
            kinds["other"].append(name)
            continue
        words = _read_int32(path, t).view(np.uint32)
        values = {int(v) for s in range(per_word) for v in np.unique((words >> (bits * s)) & mask)}
        kinds[layouts.get(frozenset(values), "other")].append(name)
    problems = []
    if kinds["v2"] and declared != V2_FORMAT:
        problems.append(f"stores v2 zero-points ({2 ** (bits - 1)}, e.g. {kinds['v2'][0]}) but checkpoint_format "
                        f"is {declared or 'missing'!r}: vLLM reads them as v1 (zero minus one) and the model "
                        f"answers garbage; set checkpoint_format to 'gptq_v2' or convert to v1")
    if kinds["v1"] and declared == V2_FORMAT:
        problems.append(f"checkpoint_format is 'gptq_v2' but {kinds['v1'][0]} stores v1 zero-points "
                        f"({2 ** (bits - 1) - 1}): vLLM would read every zero one too low")
    if kinds["other"]:
        problems.append(f"{len(kinds['other'])} qzeros tensors (e.g. {kinds['other'][0]}) hold zero-points "
                        "other than a symmetric quantizer's: the config's sym=true does not match the weights")
    if problems:
        return problems, []
    kind = "v2, declared gptq_v2" if kinds["v2"] else "v1"
    return [], [f"zero-points: {kind} in all {len(zeros)} quantized modules"]


def tensor_parallel_problems(index: TensorIndex, bits: int, group: int, tp: int) -> list[str]:
    """With `tp` ranks, each rank's slice of a row-parallel layer's input must hold whole groups
    (a qweight is [in_features / (32 / bits), out_features]: 32 / bits inputs packed per int32)."""
    if tp <= 1:
        return []
    out = []
    for name, (_, t) in sorted(index.items()):
        if not (name.endswith(".qweight") and any(f".{r}." in name for r in ROW_PARALLEL)):
            continue
        in_features = t.shape[0] * (32 // bits)
        share = in_features // tp
        if in_features % tp or (group != -1 and share % group):
            out.append(f"{name}: {in_features} inputs over {tp} GPUs is {in_features / tp:g} each, "
                       f"not whole groups of {group}: use fewer GPUs (--tensor-parallel)")
    return out[:3]


def check_folder(folder: str | Path, on_cpu: bool = False, tensor_parallel: int = 1) -> VllmCheck:
    """The full verdict on a GPTQ folder; raises ValueError only when it is not a model folder."""
    folder = Path(folder)
    q, notes = quantization_config(folder)
    result = VllmCheck(folder, q, notes=notes)
    if not q:
        result.problems.append("no quantization_config in config.json and no quantize_config.json: "
                               "not a GPTQ folder (vLLM serves it unquantized, if at all)")
        return result
    result.problems += settings_problems(q, on_cpu)
    for pattern, override in (q.get("dynamic") or {}).items():
        if isinstance(override, dict) and not str(pattern).startswith("-:"):
            result.problems += settings_problems({**q, **override}, on_cpu, where=f"dynamic rule {pattern!r}: ")
    if str(q.get("quant_method", "")).lower() == "gptq":
        index = _tensor_index(folder)  # every safetensors header, read once for both checks
        zp_problems, zp_notes = zero_point_problems(index, q)
        result.problems += zp_problems
        result.notes += zp_notes
        if not result.problems:
            result.problems += tensor_parallel_problems(index, int(q["bits"]), int(q["group_size"]),
                                                        tensor_parallel)
    return result
