"""Download a model from the Hugging Face Hub into the store.

Downloads land in `<store>/.partial/<name>/` (huggingface-hub resumes an interrupted one
from there), are checked against the Hub's sha256 and, for GGUF, against our header
check, and only then move into `<store>/<name>/` and the manifest.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from ..fsutil import check_disk, sha256_file
from ..gguf_file import read_gguf
from .manifest import ModelEntry, ModelFile, Store
from .names import check_name, check_relative, check_repo_id

PREFERRED_GGUF = "q4_k_m"
HF_CHECKPOINT_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                          "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
                          "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
                          "adapter_config.json", "chat_template.jinja")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PullError(RuntimeError):
    pass


def default_name(repo: str, filename: str | None) -> str:
    base = PurePosixPath(filename).stem if filename else repo.split("/")[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.").lower()[:128] or "model"


def _hub_error(repo: str, exc: Exception) -> PullError:
    from huggingface_hub import errors

    if isinstance(exc, (errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError)):
        return PullError(f"cannot reach the Hugging Face Hub to pull {repo}: this machine is offline "
                         f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}); models already "
                         "in the store still work")
    if isinstance(exc, errors.GatedRepoError):
        return PullError(f"{repo} is gated: accept its licence on huggingface.co and set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return PullError(f"no repository {repo} on the Hugging Face Hub (or it is private: set HF_TOKEN)")
    if isinstance(exc, errors.EntryNotFoundError):
        return PullError(f"{repo} has no such file: {exc}")
    return PullError(f"cannot pull {repo}: {type(exc).__name__}: {exc}; check the network connection")


def _choose_files(repo: str, filename: str | None, revision: str | None) -> tuple[str, list[str]]:
    """(format, files to fetch)."""
    if filename:
        fmt = "gguf" if filename.endswith(".gguf") else "hf"
        return fmt, [check_relative(filename)]
    from huggingface_hub import list_repo_files

    files = list_repo_files(repo, revision=revision)
    ggufs = [f for f in files if f.endswith(".gguf")]
    if len(ggufs) == 1:
        return "gguf", ggufs
    preferred = [f for f in ggufs if PREFERRED_GGUF in f.lower()]
    if len(preferred) == 1:
        return "gguf", preferred
    if ggufs:
        raise PullError(f"{repo} has {len(ggufs)} GGUF files; name one: " + ", ".join(ggufs))
    wanted = [f for f in files if any(PurePosixPath(f).match(p) for p in HF_CHECKPOINT_PATTERNS)
              and "/" not in f]
    if not any(f.endswith(".safetensors") for f in wanted):
        raise PullError(f"{repo} has neither GGUF nor safetensors files (files: {', '.join(files[:20])})")
    return "hf", [check_relative(f) for f in wanted]


def pull(repo: str, filename: str | None = None, store: Store | None = None, name: str | None = None,
         revision: str | None = None, progress: Any = None) -> ModelEntry:
    """Fetch `filename` (or the repo's GGUF, or its HF checkpoint) into the store."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    from ..store import default_store

    store = store or default_store()
    check_repo_id(repo)
    if filename is not None:
        check_relative(filename)
    name = check_name(name or default_name(repo, filename))
    try:
        fmt, files = _choose_files(repo, filename, revision)
        partial = store.root / ".partial" / name
        partial.mkdir(parents=True, exist_ok=True)
        metas = {f: get_hf_file_metadata(hf_hub_url(repo, f, revision=revision)) for f in files}
        need = sum(m.size or 0 for m in metas.values())
        check_disk(store.root, need, f"pulling {repo}")
        fetched: dict[str, Path] = {}
        for f in files:
            fetched[f] = Path(hf_hub_download(repo, f, revision=revision, local_dir=partial,
                                              tqdm_class=progress))
    except PullError:
        raise
    except Exception as exc:  # network and hub errors become one clear message
        from huggingface_hub import errors

        if isinstance(exc, (errors.HfHubHTTPError, errors.LocalEntryNotFoundError,
                            errors.OfflineModeIsEnabled, errors.EntryNotFoundError, OSError)) \
                or "connect" in type(exc).__name__.lower():
            raise _hub_error(repo, exc) from None
        raise

    final_dir = store.model_dir(name)
    final_dir.mkdir(parents=True, exist_ok=True)
    entry_files = []
    for f, local in fetched.items():
        digest = sha256_file(local)
        expected = (metas[f].etag or "").strip('"').lower()
        if _SHA256.match(expected) and digest != expected:
            local.unlink()
            raise PullError(f"{repo}/{f}: sha256 {digest} does not match the Hub's {expected}; "
                            "the damaged download was deleted, run pull again")
        if f.endswith(".gguf"):
            read_gguf(local)
        target = final_dir / PurePosixPath(f).name
        os.replace(local, target)
        entry_files.append(ModelFile(str(target.relative_to(store.root)), target.stat().st_size, digest))
    shutil.rmtree(partial, ignore_errors=True)
    quant = read_gguf(store.root / entry_files[0].path).quant if fmt == "gguf" else "source"
    entry = ModelEntry(name=name, format=fmt, quant=quant, files=entry_files,
                       source=f"hf:{repo}" + (f"@{revision}" if revision else ""),
                       sha256=entry_files[0].sha256)
    store.add(entry)
    return entry
