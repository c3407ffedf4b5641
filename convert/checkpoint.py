"""Load a Hugging Face checkpoint the way people actually have them, one tensor at a time.

One place for the GGUF and GPTQ paths alike. It reads:
- safetensors, single or sharded through `model.safetensors.index.json` (first choice);
- `.bin` files, only through `torch.load(weights_only=True)`: a pickle that needs more
  than tensors is refused, never executed;
- RLHF outputs: TRL value-head models (`v_head.*` dropped), DeepSpeed-Chat and
  ColossalChat actors (wrapper prefixes such as `module.` found and stripped);
- PEFT adapter folders (LoRA, rsLoRA, DoRA, modules_to_save), merged into their base tensor by
  tensor as convert/adapter.py reads them.
Everything dropped, stripped or merged is listed in `report`, so nothing happens silently.
The architecture comes from `config.json` `architectures`, never from a folder name.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from localchat.safetensors_file import SafetensorsError, read_safetensors_header

# Tensors that carry no model weights: value heads of RLHF critics, cached rotary tables.
DROPPABLE = (re.compile(r"^v_head\."), re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
             re.compile(r"(^|\.)score\.weight$"))
ANCHORS = ("model.embed_tokens.weight", "lm_head.weight")


class CheckpointError(ValueError):
    """A checkpoint we cannot read; the message names the file and what is wrong."""


@dataclass
class HFConfig:
    """config.json with the lookups that differ across transformers versions."""

    path: Path
    data: dict[str, Any]

    def get(self, *keys: str, default: Any = None) -> Any:
        for key in keys:
            if key in self.data and self.data[key] is not None:
                return self.data[key]
        return default

    def require(self, key: str) -> Any:
        if key not in self.data:
            raise CheckpointError(f"{self.path}: field {key!r} is missing")
        return self.data[key]

    @property
    def architecture(self) -> str:
        archs = self.data.get("architectures")
        if not archs or not isinstance(archs, list):
            raise CheckpointError(f"{self.path}: field 'architectures' is missing; cannot tell which "
                                  "model this is (it is never guessed from the name)")
        return str(archs[0])

    @property
    def rope_theta(self) -> float:
        params = self.data.get("rope_parameters") or {}
        return float(params.get("rope_theta") or self.data.get("rope_theta") or 10000.0)

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        params = self.data.get("rope_scaling") or self.data.get("rope_parameters") or {}
        kind = params.get("rope_type") or params.get("type")
        return params if kind and kind != "default" else None


def read_config(folder: Path) -> HFConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json; a Hugging Face checkpoint folder needs one")
    return HFConfig(path, read_json_object(path))


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; a bad one is refused naming the file and line."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


# generation_config.json's sampling fields, by the SamplingSettings field each becomes; the ones
# a GGUF can carry (localchat.gguf_file.SAMPLING_KEYS).
GENERATION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                     "repetition_penalty": "repeat_penalty"}


def read_generation_preset(folder: Path) -> dict[str, Any]:
    """The sampling settings the checkpoint's authors ship in `generation_config.json`, as
    SamplingSettings fields; {} without the file. ``do_sample: false`` (greedy in transformers)
    becomes temperature 0. A value out of range is refused, naming the file and the field."""
    from localchat.engine.settings import SamplingSettings

    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    data = read_json_object(path)
    preset: dict[str, Any] = {}
    for hf_name, name in GENERATION_FIELDS.items():
        value = data.get(hf_name)
        if value is None:
            continue
        try:
            SamplingSettings(**{name: value})
        except ValueError as exc:
            raise CheckpointError(f"{path}: {str(exc).replace(name, hf_name, 1)}") from None
        preset[name] = value
    if data.get("do_sample") is False and preset:  # transformers decodes greedily then
        preset = {"temperature": 0.0, **{k: v for k, v in preset.items() if k == "repeat_penalty"}}
    return preset


@dataclass
class _Source:
    """Where one tensor lives: a file and its name there."""

    file: Path
    key: str


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape), from the runtime's checked reader (localchat/safetensors_file.py)."""
    try:
        return {name: (t.dtype, t.shape) for name, t in read_safetensors_header(path).items()}
    except SafetensorsError as exc:
        raise CheckpointError(str(exc)) from None


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "WeightsUnpickler" in str(exc):
            raise CheckpointError(f"{path}: this pickle needs more than tensors to load, so it was refused "
                                  "(only weights are read, never code); re-save it with safetensors") from None
        raise CheckpointError(f"{path}: cannot read this .bin checkpoint: {exc}") from None
    if isinstance(data, dict) and "module" in data and isinstance(data["module"], dict):
        data = data["module"]  # DeepSpeed engine checkpoints nest the weights
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return data


@dataclass
class Checkpoint:
    folder: Path
    config: HFConfig
    sources: dict[str, _Source]  # final tensor name -> where it is
    report: list[str] = field(default_factory=list)
    _bin_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict)
    _patches: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    _shapes: dict[str, list[int]] = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # where tokenizer files are (an adapter's base, say)

    def __post_init__(self) -> None:
        if self.tokenizer_dir is None:
            self.tokenizer_dir = self.folder

    @property
    def architecture(self) -> str:
        return self.config.architecture

    def names(self) -> list[str]:
        return list(self.sources)

    def shape(self, name: str) -> list[int]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        if src.file.suffix == ".safetensors":
            from safetensors import safe_open

            # Open per tensor on purpose: a handle kept open keeps every page it touched mapped,
            # and the whole model would end up in RSS (7B: 1.5-2.4 GB peak this way, not 13 GB).
            with safe_open(str(src.file), framework="pt") as f:
                t = f.get_tensor(src.key)
        else:
            if src.file not in self._bin_cache:
                self._bin_cache = {src.file: load_bin(src.file)}  # one .bin shard in memory at a time
            t = self._bin_cache[src.file][src.key]
        patch = self._patches.get(name)
        return patch(t) if patch else t

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.sources:
            yield name, self.get(name)


def _weight_files(folder: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = folder / index
        if p.is_file():
            try:
                weight_map = json.loads(p.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{p}: not a valid shard index ({exc})") from None
            files = sorted({folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{p}: lists shards that are missing: {', '.join(missing)}")
            return files
    st = sorted(folder.glob("*.safetensors"))
    st = [f for f in st if not f.name.startswith("adapter_model")]
    if st:
        return st
    bins = sorted(p for p in folder.glob("*.bin") if not p.name.startswith(("adapter_model", "training_args")))
    if bins:
        return bins
    raise CheckpointError(f"{folder}: no weights found (model.safetensors, shards with an index, or "
                          "pytorch_model.bin)")


def _wrapper_prefix(names: list[str]) -> str:
    """The wrapper prefix in front of the model's own tensor names ('' when there is none)."""
    for anchor in ANCHORS:
        hits = [n[: -len(anchor)] for n in names if n.endswith(anchor)]
        if "" in hits:
            return ""
        for prefix in hits:
            if sum(k.startswith(prefix) for k in names) >= len(names) // 2:
                return prefix
    return ""


def load_checkpoint(folder: str | Path, base: str | Path | None = None) -> Checkpoint:
    """Open an HF folder (or a PEFT adapter folder merged into `base`) for streaming."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, base)
    config = read_config(folder)
    config.architecture  # noqa: B018 - fail early on a config without architectures
    sources: dict[str, _Source] = {}
    shapes: dict[str, list[int]] = {}
    for f in _weight_files(folder):
        if f.suffix == ".safetensors":
            for key, (_, shape) in safetensors_header(f).items():
                sources[key], shapes[key] = _Source(f, key), shape
        else:
            for key, t in load_bin(f).items():
                sources[key], shapes[key] = _Source(f, key), list(t.shape)
    report: list[str] = []
    prefix = _wrapper_prefix(list(sources))
    if prefix:
        stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sources.items()}
        shapes = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in shapes.items()}
        report.append(f"stripped the wrapper prefix {prefix!r} from {sum(k.startswith(prefix) for k in sources)} "
                      "tensor names (DeepSpeed-Chat / ColossalChat actor layout)")
        sources = stripped
    dropped = [k for k in sources if any(p.search(k) for p in DROPPABLE)]
    for k in dropped:
        sources.pop(k)
    if any(k.startswith("v_head.") for k in dropped):
        report.append(f"dropped the value head ({', '.join(k for k in dropped if k.startswith('v_head.'))}) "
                      "of a TRL PPO model")
    if any(not k.startswith("v_head.") for k in dropped):
        report.append(f"dropped {sum(not k.startswith('v_head.') for k in dropped)} non-weight tensors "
                      "(rotary caches, classifier heads)")
    return Checkpoint(folder, config, sources, report, _shapes=shapes)


def _load_adapter(folder: Path, base: str | Path | None) -> Checkpoint:
    """The base checkpoint with the PEFT adapter in `folder` merged into it as each tensor is read
    (convert/adapter.py says what each kind of adapter does to a tensor)."""
    from .adapter import CONFIG, read_adapter

    adapter = read_adapter(folder)
    base_path = Path(base) if base else Path(str(adapter.config.get("base_model_name_or_path") or ""))
    if not base_path.is_dir():
        raise CheckpointError(f"{folder / CONFIG}: base model {str(base_path)!r} is not a local folder; pass "
                              "--base PATH (models are never fetched from a hub here)")
    ckpt = load_checkpoint(base_path)
    adapter.fit(ckpt)
    for name in adapter.updates:
        def merge(w: torch.Tensor, name: str = name) -> torch.Tensor:
            return adapter.merge(name, w).to(w.dtype if w.dtype != torch.bfloat16 else torch.float32)

        ckpt._patches[name] = merge
    merged = [u for u in adapter.updates.values() if u.low_rank]
    replaced = [u.target for u in adapter.updates.values() if not u.low_rank]
    ckpt.report.append(f"merged the LoRA adapter {folder.name} ({adapter.describe()}) into {len(merged)} "
                       f"weights of {base_path.name}"
                       + (f"; replaced {', '.join(replaced)} (modules_to_save)" if replaced else ""))
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
        ckpt.tokenizer_dir = folder
    return ckpt
