"""Import a GGUF file the user already has (downloaded elsewhere, or uploaded in the UI)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..fsutil import atomic_path, check_disk, sha256_file
from ..gguf_file import read_gguf
from .manifest import ModelEntry, ModelFile, Store, gguf_defaults
from .names import check_name, safe_file_name


def default_import_name(filename: str) -> str:
    stem = Path(filename).name.removesuffix(".gguf")
    return safe_file_name(stem).lower()


def import_gguf(store: Store, source: str | Path, name: str | None = None,
                filename: str | None = None) -> ModelEntry:
    """Check `source`'s GGUF header, copy it into the store atomically and register it.

    `filename` is the name the user knows the file by (an upload's temp path is not).
    """
    source = Path(source)
    shown = filename or source.name
    info = read_gguf(source)  # a damaged or non-GGUF file fails here, naming `source`
    name = check_name(name or default_import_name(shown))
    if name in store.models():
        raise FileExistsError(f"the store already has a model named {name!r}; choose another name")
    size = source.stat().st_size
    check_disk(store.root, size, f"importing {shown}")
    target = store.model_dir(name) / (check_name(default_import_name(shown), "file name") + ".gguf")
    with atomic_path(target) as part:
        shutil.copyfile(source, part)
    digest = sha256_file(target)
    entry = ModelEntry(name=name, format="gguf", quant=info.quant,
                       files=[ModelFile(str(target.relative_to(store.root)), size, digest)],
                       source=f"import:{Path(shown).name}", sha256=digest, defaults=gguf_defaults(info))
    store.add(entry)
    return entry
