"""PEFT adapter folders, read in one place for every path that uses them: the checkpoint loader
merges one into its base tensor by tensor, the GGUF LoRA exporter writes its A/B matrices, and
fine-tuning's export reads its adapter through the checkpoint loader.

What the folder holds means what PEFT's own code makes of it (peft/tuners/lora/layer.py,
variants.py, dora.py), worked here on one tensor at a time, in float32:
- LoRA: W + s * B @ A, with s = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`;
  `rank_pattern` and `alpha_pattern` give single modules their own r and alpha;
- `fan_in_fan_out` (GPT-2-style Conv1D weights stored as (in, out)) and LoRA on an embedding
  (`lora_embedding_A/B`, a (vocab, hidden) weight): the same update, transposed to the weight;
- DoRA (`use_dora`): W' = m * (W + s*B@A) / ||W + s*B@A||, the norm per output row taken over
  the inputs, m the saved `lora_magnitude_vector`;
- `modules_to_save`: whole tensors saved under the module's own name, which replace the base's.
Anything else (another peft_type, bias training, initialisations that rewrite the base, settings
this reader does not know) is refused with the folder and the setting named: a wrong model that
loads without an error is worse than no model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, CheckpointError, load_bin, safetensors_header

PEFT_PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # safetensors first
# Fields this reader acts on; every other one must say "off" (None, False, empty) or be listed in NO_EFFECT.
READ = frozenset({"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out",
                  "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights", "bias", "lora_bias"})
# Fields that only steer training or choose which modules get an adapter: the saved tensors say the rest.
NO_EFFECT = frozenset({"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                       "inference_mode", "target_modules", "exclude_modules", "lora_dropout",
                       "layers_to_transform", "layers_pattern", "megatron_core", "qalora_group_size",
                       "ensure_weight_tying", "runtime_config",
                       "eva_config", "loftq_config", "corda_config", "lora_ga_config"})  # init's own settings
# Initialisations that leave the base untouched. PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA rewrite the base
# weights when training starts, so their adapter fits only that rewritten base (PEFT can save them as
# plain LoRA with `path_initial_model_for_weight_conversion`).
KEEPS_BASE = ("gaussian", "eva", "orthogonal")
TENSOR_KINDS = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_[AB]"
                          r"|lora_magnitude_vector(?:\.weight)?|base_layer\.weight)$")


class AdapterError(CheckpointError):
    """An adapter folder we cannot read or use as asked; the message names the folder and the setting."""


@dataclass
class Update:
    """How the adapter changes one tensor of the base: keys into the adapter's weights file."""

    target: str  # the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    a: str | None = None  # LoRA A (r, in) and B (out, r): the update is scale * B @ A as (out, in)
    b: str | None = None
    magnitude: str | None = None  # DoRA's m, one per output row
    replacement: str | None = None  # a modules_to_save tensor (or an embedding PEFT saved whole)
    scale: float = 1.0
    transposed: bool = False  # the base tensor is stored (in, out): Conv1D under fan_in_fan_out, embeddings
    embedding: bool = False

    @property
    def low_rank(self) -> bool:
        return self.a is not None


@dataclass
class Adapter:
    """An adapter folder, opened for streaming: tensors are read when a merge asks for them."""

    folder: Path
    config: dict[str, Any]
    weights: Path
    updates: dict[str, Update]  # base tensor name -> its update
    shapes: dict[str, list[int]]  # adapter tensor key -> shape
    _bin: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG

    def tensor(self, key: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[key]
        from safetensors import safe_open

        with safe_open(str(self.weights), framework="pt") as f:  # one tensor mapped at a time
            return f.get_tensor(key)

    def factors(self, u: Update) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in float32 with the update s * B @ A laid out as (out, in); the scale stays apart."""
        return self.tensor(u.a).float(), self.tensor(u.b).float()

    def merge(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The base tensor `name` (as `w`) with this adapter merged, in float32."""
        u = self.updates[name]
        out = (self.tensor(u.replacement) if u.replacement else w).float()
        if not u.low_rank:
            return out
        a, b = self.factors(u)
        rows = out.T if u.transposed else out  # (out, in): rows are output features, as in nn.Linear
        rows = rows + (b @ a) * u.scale
        if u.magnitude:
            m = self.tensor(u.magnitude).float()
            rows = rows * (m / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
        return (rows.T if u.transposed else rows).contiguous()

    def fit(self, ckpt: Checkpoint) -> None:
        """Every update names a tensor of the base and has its shape, checked from headers before a merge."""
        base, names = ckpt.folder, set(ckpt.names())
        for u in self.updates.values():
            key = u.replacement or u.a
            if u.target not in names:
                raise AdapterError(f"{self.weights}: tensor {key!r} changes {u.target!r}, which the base "
                                   f"model at {base} does not have (a different base, or tied embeddings)")
            want = list(ckpt.shape(u.target))
            if u.replacement and self.shapes[u.replacement] != want:
                raise AdapterError(f"{self.weights}: tensor {u.replacement!r} has shape "
                                   f"{self.shapes[u.replacement]}, the base's {u.target!r} {want} (at {base})")
            if u.low_rank:
                (r, n_in), (n_out, r_b) = self.shapes[u.a], self.shapes[u.b]
                got = [n_in, n_out] if u.transposed else [n_out, n_in]
                if r != r_b or got != want:
                    raise AdapterError(f"{self.weights}: {u.a!r} {self.shapes[u.a]} and {u.b!r} "
                                       f"{self.shapes[u.b]} do not make an update of {u.target!r} {want} "
                                       f"(base at {base})")
                if u.magnitude and self.shapes[u.magnitude] != [n_out]:
                    raise AdapterError(f"{self.weights}: {u.magnitude!r} has shape {self.shapes[u.magnitude]}, "
                                       f"not [{n_out}] (one per output row of {u.target!r})")

    def describe(self) -> str:
        """The adapter's kind in words, for reports."""
        c = self.config
        kinds = ["DoRA" if c.get("use_dora") else "LoRA", f"r={c.get('r', 8)}",
                 f"alpha={c.get('lora_alpha', 8):g}"]
        kinds += [name for name, key in (("rsLoRA", "use_rslora"), ("fan_in_fan_out", "fan_in_fan_out"),
                                         ("rank_pattern", "rank_pattern"), ("alpha_pattern", "alpha_pattern"))
                  if c.get(key)]
        return ", ".join(kinds)

    def only_low_rank(self, why: str) -> list[Update]:
        """The updates, each a plain scale * B @ A on an (out, in) weight; anything more is refused
        with its setting named. `why` says who asks (a GGUF LoRA adapter, say)."""
        merge_hint = f"merge it into its base instead: localchat convert {self.folder} --base BASE"
        for u in self.updates.values():
            if u.magnitude:
                raise AdapterError(f"{self.config_path}: use_dora: DoRA rescales every output row of W + B@A "
                                   f"by its norm, which {why} cannot express; {merge_hint}")
            if u.embedding:
                raise AdapterError(f"{self.config_path}: target_modules: the LoRA on the embedding "
                                   f"{u.target!r} does not fit {why}; {merge_hint}")
            if u.replacement:
                raise AdapterError(f"{self.config_path}: modules_to_save: {u.target!r} is replaced whole, "
                                   f"which {why} cannot express; {merge_hint}")
            if u.transposed:
                raise AdapterError(f"{self.config_path}: fan_in_fan_out: Conv1D layers (weights stored "
                                   f"(in, out)) are in no architecture {why} is written for")
        return list(self.updates.values())


def read_adapter(folder: str | Path) -> Adapter:
    """Open a PEFT adapter folder: its config checked field by field, its tensors sorted into updates."""
    folder = Path(folder)
    cfg = _read_config(folder)
    weights = next((folder / n for n in WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise AdapterError(f"{folder}: no {' or '.join(WEIGHTS)}")
    bin_tensors = None
    if weights.suffix == ".safetensors":
        shapes = {k: list(shape) for k, (_, shape) in safetensors_header(weights).items()}
    else:
        bin_tensors = load_bin(weights)  # weights_only, memory-mapped
        shapes = {k: list(t.shape) for k, t in bin_tensors.items()}
    updates = _updates(folder, cfg, weights, shapes)
    if not any(u.low_rank or u.replacement for u in updates.values()):
        raise AdapterError(f"{weights}: no LoRA tensors in it")
    return Adapter(folder, cfg, weights, updates, shapes, bin_tensors)


def _read_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, every field either read below, known to change nothing, or off."""
    path = folder / CONFIG
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read the adapter config: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if str(cfg.get("peft_type") or "LORA").upper() != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg['peft_type']!r}: only LORA adapters (with DoRA, rsLoRA) "
                           "can be read")
    init = cfg.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init in KEEPS_BASE):
        raise AdapterError(f"{path}: init_lora_weights {init!r} rewrites the base weights when training "
                           "starts, so the adapter fits only that rewritten base; save it as a plain LoRA "
                           "(PEFT's path_initial_model_for_weight_conversion)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias {cfg['bias']!r}: adapters that train the base's biases are not "
                           "supported")
    if cfg.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias: LoRA with a trained bias on B is not supported")
    for key, value in cfg.items():
        if key not in READ and key not in NO_EFFECT and value not in (None, False, {}, [], ""):
            raise AdapterError(f"{path}: {key} = {json.dumps(value)}: a setting this reader does not know "
                               "how to merge, so the adapter is refused rather than merged wrongly")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise AdapterError(f"{path}: {key} is {value!r}, not a positive number")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise AdapterError(f"{path}: {key} must map module names to numbers")
    return cfg


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first pattern that matches the end of the module name, dot-aligned."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _updates(folder: Path, cfg: dict[str, Any], weights: Path,
             shapes: dict[str, list[int]]) -> dict[str, Update]:
    """Sort the adapter's tensors by the base tensor each one changes."""
    saved = tuple(cfg.get("modules_to_save") or ())
    parts: dict[str, dict[str, str]] = {}  # module -> {lora_A: key, lora_B: key, ...}
    updates: dict[str, Update] = {}
    for key in shapes:
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{weights}: tensor {key!r} does not start with {PEFT_PREFIX!r}, as PEFT "
                               "saves them")
        name = key[len(PEFT_PREFIX):]
        m = TENSOR_KINDS.match(name)
        module = name.rsplit(".", 1)[0]
        if m:
            parts.setdefault(m["module"], {})[m["kind"].split(".")[0]] = key
        elif any(module == s or module.endswith("." + s) for s in saved):
            updates[name] = Update(name, replacement=key)
        else:
            raise AdapterError(f"{weights}: tensor {key!r} is none of LoRA's A/B, DoRA's magnitude or a "
                               f"modules_to_save tensor ({CONFIG} lists {list(saved)})")
    for module, got in parts.items():
        updates[module + ".weight"] = _low_rank(folder / CONFIG, cfg, weights, shapes, module, got)
    return updates


def _low_rank(config: Path, cfg: dict[str, Any], weights: Path, shapes: dict[str, list[int]], module: str,
              got: dict[str, str]) -> Update:
    """One module's LoRA (or DoRA) update, its scale as PEFT's update_layer sets it."""
    embedding = "lora_embedding_A" in got or "lora_embedding_B" in got
    a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a not in got or b not in got:
        raise AdapterError(f"{weights}: {module}: has {', '.join(got)}, not both {a} and {b}")
    for key in (got[a], got[b]):
        if len(shapes[key]) != 2:
            raise AdapterError(f"{weights}: {key!r} has shape {shapes[key]}, not a matrix")
    dora, magnitude = bool(cfg.get("use_dora")), got.get("lora_magnitude_vector")
    if bool(magnitude) != dora:
        raise AdapterError(f"{config}: use_dora is {str(dora).lower()} but {module} "
                           f"{'has no' if dora else 'has a'} lora_magnitude_vector")
    r = shapes[got[a]][0]
    want = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    if r != want:
        raise AdapterError(f"{weights}: {got[a]!r} has rank {r}; {config} says r = {want} for {module} "
                           f"(field {'rank_pattern' if cfg.get('rank_pattern') else 'r'})")
    alpha = float(_pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
    return Update(module + ".weight", a=got[a], b=got[b], magnitude=magnitude, replacement=got.get("base_layer"),
                  scale=alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r,
                  transposed=embedding or bool(cfg.get("fan_in_fan_out")), embedding=embedding)
