"""Turn what the user typed after --model (a store name, a GGUF file, a model folder) into
the artifacts the planner chooses from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..artifacts import Artifact, artifact_from_gguf, artifact_from_gptq, artifact_from_hf, quantization_config
from ..gguf_file import IMATRIX_SUFFIX, read_gguf
from ..planner import Measured
from .manifest import Store, StoreError, gguf_defaults


class ModelNotFound(LookupError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    artifacts: list[Artifact]
    source: str  # "store" or the path given
    defaults: dict[str, Any] = field(default_factory=dict)  # from the store entry
    measured: tuple[Measured, ...] = ()  # decode speeds `localchat bench` recorded here


SPEEDS = "speeds"  # the store entry's extra key for `localchat bench` records


def measured_of(extra: dict[str, Any]) -> tuple[Measured, ...]:
    return tuple(Measured.from_dict(d) for d in extra.get(SPEEDS, []))


def _quantization(folder: Path) -> dict[str, Any] | None:
    """The folder's quantization settings ({} for an unquantized checkpoint); None when it is not a
    readable Hugging Face folder."""
    try:
        return quantization_config(folder)[0]
    except ValueError:
        return None


def is_gptq_folder(folder: Path) -> bool:
    """AutoGPTQ's quantize_config.json (older ones name no method), or a config that says GPTQ."""
    q = _quantization(folder)
    if q is None:
        return (folder / "quantize_config.json").is_file()
    default = "gptq" if (folder / "quantize_config.json").is_file() else ""
    return str(q.get("quant_method", default)).lower() == "gptq"


def is_hf_checkpoint(folder: Path) -> bool:
    """An unquantized safetensors checkpoint: config.json, no quantization settings, weights."""
    return _quantization(folder) == {} and any(folder.glob("*.safetensors"))


def artifacts_in(folder: Path, checkpoints: bool = False) -> list[Artifact]:
    """The GGUF files and GPTQ checkpoint in a folder; with `checkpoints`, an unquantized HF checkpoint
    too (only vLLM runs one as it is: the other backends need `localchat convert` first)."""
    found = [artifact_from_gguf(p) for p in sorted(folder.glob("*.gguf")) if not p.name.endswith(IMATRIX_SUFFIX)]
    if is_gptq_folder(folder):
        found.append(artifact_from_gptq(folder))
    elif checkpoints and is_hf_checkpoint(folder):
        found.append(artifact_from_hf(folder))
    return found


def _resolve_lora(spec: str, store: Store) -> ResolvedModel:
    """A LoRA entry runs as its base model's GGUF with the adapter applied at load time."""
    entry = store.get(spec)
    base_name = entry.extra.get("base", "")
    if base_name == spec or base_name not in store.models():
        raise StoreError(f"model {spec!r} is a LoRA adapter for {base_name!r}, which is not in the store")
    adapter = store.path_of(entry.files[0].path)
    if not adapter.is_file():
        raise StoreError(f"model {spec!r}: {adapter} is missing; fine-tune again, or `localchat rm {spec}`")
    base = resolve_model(base_name, store)
    ggufs = [replace(a, lora_path=str(adapter)) for a in base.artifacts if a.format == "gguf"]
    if not ggufs:
        raise StoreError(f"model {spec!r}: its base {base_name!r} has no GGUF for the adapter to apply to")
    return ResolvedModel(spec, ggufs, "store", {**base.defaults, **entry.defaults})


def resolve_model(spec: str, store: Store, checkpoints: bool = False) -> ResolvedModel:
    """A store model first, else a GGUF file or model folder; `checkpoints`: HF checkpoints count too."""
    entries = store.models()
    if spec in entries and entries[spec].format == "lora":
        return _resolve_lora(spec, store)
    if spec in entries:
        entry = entries[spec]
        artifacts: list[Artifact] = []
        for f in entry.files:
            p = store.path_of(f.path)
            if not p.exists():
                raise StoreError(f"model {spec!r}: {p} is missing; pull or convert it again, "
                                 f"or `localchat rm {spec}`")
            if p.is_dir():
                artifacts += artifacts_in(p, checkpoints)
            elif p.suffix == ".gguf":
                artifacts.append(artifact_from_gguf(p))
            elif checkpoints and p.name == "config.json" and is_hf_checkpoint(p.parent):
                artifacts.append(artifact_from_hf(p.parent))
        if not artifacts:
            raise StoreError(f"model {spec!r} ({entry.format}) has nothing runnable yet; "
                             f"convert it with `localchat convert`")
        return ResolvedModel(spec, artifacts, "store", dict(entry.defaults), measured_of(entry.extra))
    path = Path(spec).expanduser()
    if path.is_file():  # a file outside the store: its own sampling preset, if it has one
        header = read_gguf(path)
        return ResolvedModel(path.stem, [artifact_from_gguf(path, header)], str(path), gguf_defaults(header))
    if path.is_dir():
        found = artifacts_in(path, checkpoints)
        if not found:
            raise ModelNotFound(f"{path}: no GGUF file or GPTQ checkpoint in this folder "
                                "(a Hugging Face checkpoint needs `localchat convert` first)")
        return ResolvedModel(path.name, found, str(path))
    raise ModelNotFound(f"{spec!r} is neither a model in the store at {store.root} "
                        f"(have: {', '.join(entries) or 'none'}) nor a file or folder")
