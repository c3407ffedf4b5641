"""Download a model from the Hugging Face Hub into the store.

Downloads land in `<store>/.partial/<name>/`, where the next run resumes an interrupted
one (HTTP Range), are checked against the Hub's sha256 and, for GGUF, against our header
check, and only then move into `<store>/<name>/` and the manifest.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath

from ..fsutil import check_disk, sha256_file
from ..gguf_file import read_gguf
from .manifest import ModelEntry, ModelFile, Store, gguf_defaults
from .names import UnsafeNameError, check_name, check_relative, check_repo_id

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
    if isinstance(exc, errors.HfHubHTTPError) or "HTTPStatusError" in type(exc).__name__:
        return PullError(f"cannot pull {repo}: the Hub answered {exc}")
    return PullError(f"cannot reach the Hugging Face Hub to pull {repo}: {type(exc).__name__}: {exc}; "
                     "check the network connection")


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


def _fetch(url: str, part: Path, size: int | None, label: str, quiet: bool) -> None:
    """Download `url` into `part`, continuing from the bytes a previous run left there."""
    from huggingface_hub.utils import build_hf_headers, get_session
    from tqdm import tqdm

    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as r:
            if r.status_code == 416:  # the partial file does not match the server's: start over
                part.unlink()
                return _fetch(url, part, size, label, quiet)
            r.raise_for_status()
            resumed = r.status_code == 206
            with open(part, "ab" if resumed else "wb") as fh, \
                    tqdm(total=size, initial=have if resumed else 0, unit="B", unit_scale=True,
                         desc=label, disable=quiet) as bar:
                for block in r.iter_bytes(1 << 20):
                    fh.write(block)
                    bar.update(len(block))
    except Exception as exc:
        if "HTTPStatusError" in type(exc).__name__:
            raise
        got = part.stat().st_size if part.exists() else 0
        raise PullError(f"the download of {label} broke off at {got} of {size or '?'} bytes "
                        f"({type(exc).__name__}); run the same pull again to resume from there") from None
    got = part.stat().st_size
    if size is not None and got != size:
        raise PullError(f"the download of {label} stopped at {got} of {size} bytes; "
                        "run the same pull again to resume from there")


def pull(repo: str, filename: str | None = None, store: Store | None = None, name: str | None = None,
         revision: str | None = None, quiet: bool = False) -> ModelEntry:
    """Fetch `filename` (or the repo's GGUF, or its HF checkpoint) into the store.

    Partial downloads stay in `<store>/.partial/<name>/` so the next run resumes them.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from ..store import default_store

    store = store or default_store()
    check_repo_id(repo)
    if filename is not None:
        check_relative(filename)
    name = check_name(name or default_name(repo, filename))
    partial = store.root / ".partial" / name
    try:
        fmt, files = _choose_files(repo, filename, revision)
        metas = {f: get_hf_file_metadata(hf_hub_url(repo, f, revision=revision)) for f in files}
        need = sum(m.size or 0 for m in metas.values())
        check_disk(store.root, need, f"pulling {repo}")
        partial.mkdir(parents=True, exist_ok=True)
        fetched: dict[str, Path] = {}
        for f in files:
            part = partial / (PurePosixPath(f).name + ".part")
            _fetch(hf_hub_url(repo, f, revision=revision), part, metas[f].size, f, quiet)
            fetched[f] = part
    except (PullError, UnsafeNameError):
        raise
    except Exception as exc:  # network and hub errors become one clear message
        raise _hub_error(repo, exc) from None

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
    header = read_gguf(store.root / entry_files[0].path) if fmt == "gguf" else None
    entry = ModelEntry(name=name, format=fmt, quant=header.quant if header else "source", files=entry_files,
                       source=f"hf:{repo}" + (f"@{revision}" if revision else ""),
                       sha256=entry_files[0].sha256, defaults=gguf_defaults(header) if header else {})
    store.add(entry)
    return entry
