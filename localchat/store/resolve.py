"""Turn what the user typed after --model (a store name, a GGUF file, a model folder) into
the artifacts the planner chooses from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..artifacts import Artifact, artifact_from_gguf, artifact_from_gptq
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


def is_gptq_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    if (folder / "quantize_config.json").is_file():
        return True
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return str(q.get("quant_method", "")).lower() == "gptq"


def artifacts_in(folder: Path) -> list[Artifact]:
    found = [artifact_from_gguf(p) for p in sorted(folder.glob("*.gguf")) if not p.name.endswith(IMATRIX_SUFFIX)]
    if is_gptq_folder(folder):
        found.append(artifact_from_gptq(folder))
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


def resolve_model(spec: str, store: Store) -> ResolvedModel:
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
                artifacts += artifacts_in(p)
            elif p.suffix == ".gguf":
                artifacts.append(artifact_from_gguf(p))
        if not artifacts:
            raise StoreError(f"model {spec!r} ({entry.format}) has nothing runnable yet; "
                             f"convert it with `localchat convert`")
        return ResolvedModel(spec, artifacts, "store", dict(entry.defaults), measured_of(entry.extra))
    path = Path(spec).expanduser()
    if path.is_file():  # a file outside the store: its own sampling preset, if it has one
        header = read_gguf(path)
        return ResolvedModel(path.stem, [artifact_from_gguf(path, header)], str(path), gguf_defaults(header))
    if path.is_dir():
        found = artifacts_in(path)
        if not found:
            raise ModelNotFound(f"{path}: no GGUF file or GPTQ checkpoint in this folder "
                                "(a Hugging Face checkpoint needs `localchat convert` first)")
        return ResolvedModel(path.name, found, str(path))
    raise ModelNotFound(f"{spec!r} is neither a model in the store at {store.root} "
                        f"(have: {', '.join(entries) or 'none'}) nor a file or folder")
