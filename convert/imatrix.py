"""Importance matrices for GGUF quantization, computed in torch from the HF checkpoint.

An importance matrix holds, for every linear weight of the decoder layers, the mean of the
squared input activations of each input column over a calibration text: the quantizer
weighs each column's rounding error by it, so the columns the model leans on are kept
closest. This is llama.cpp's own definition (tools/imatrix), and the file is llama.cpp's
GGUF imatrix format (`<name>.in_sum2` sums and `<name>.counts` token counts), so
`llama-quantize --imatrix` reads it too. The quantizer is llama.cpp's
`llama_model_quantize`, which takes the matrix through `llama_model_quantize_params.imatrix`
(see convert/quantize.py): its per-tensor type mixes (Q4_K_M's Q6_K tensors and so on)
stay exactly llama.cpp's.

The calibration is the same as GPTQ's: localchat's conversations rendered with the
model's own chat template, plus prose. The model is built with its weights on the meta
device and run a layer at a time: each decoder layer's weights are read from the checkpoint,
every calibration row goes through it a few rows at a time, and the layer is dropped, the
rows' hidden states waiting on disk for the next layer. Memory is one layer plus one chunk
of rows (7B: 1-2 GB), neither the model nor the number of rows.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from localchat.fsutil import atomic_path
from localchat.gguf_file import IMATRIX_SUFFIX

from .checkpoint import Checkpoint

SUFFIX = IMATRIX_SUFFIX
DEFAULT_SEQ_LEN = 512  # llama.cpp's imatrix chunk size
DEFAULT_SAMPLES = 64  # rows: the shipped set is ~12 of them; a bigger --calibration file is capped here
DEFAULT_BATCH_ROWS = 4  # rows through a layer at once: ~0.5 GB of activations at 7B
SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
KEY_SOURCE = "localchat.imatrix.source"  # fingerprint of the weights and calibration it was computed from


class ImatrixError(ValueError):
    """An importance matrix that cannot be made or read; the message names the file."""


@dataclass
class Imatrix:
    """Per GGUF weight name: the sum of squared inputs per input column and the tokens summed."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    dataset: str
    chunk_size: int
    chunk_count: int
    source: str = ""  # `fingerprint()` of what it was computed from

    def means(self) -> dict[str, np.ndarray]:
        """What the quantizer weighs columns by (llama-quantize divides the same way)."""
        return {n: (s / max(self.counts[n], 1)).astype(np.float32) for n, s in self.sums.items()}


def _decoder_layers(model: Any) -> Any:
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return inner, inner.layers


class _RowStore:
    """Every calibration row's hidden state between two decoder layers, in float32, in an unlinked
    temporary file read and written a chunk of rows at a time.

    The layer loop needs all rows' states at each layer boundary (rows x tokens x hidden: 8 MB a
    row at 7B, 32 MB at 8192 wide). On disk, with plain reads and writes (no memory map, whose
    touched pages would count in the process's RSS), memory holds one chunk whatever the number of
    rows, and float32 keeps the residual stream exactly as the whole-model forward had it: bf16 or
    f16 would round it again at every layer (and f16 overflows on some models' large activations).
    """

    def __init__(self, rows: int, row_shape: tuple[int, ...], folder: Path | None) -> None:
        import tempfile

        self.row_shape = row_shape
        self.row_bytes = int(np.prod(row_shape)) * 4
        self.folder = folder or Path(tempfile.gettempdir())
        self.file = tempfile.TemporaryFile(dir=self.folder, prefix="imatrix-rows-")
        self.file.truncate(rows * self.row_bytes)

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.row_shape), dtype=np.float32)
        self.file.seek(start * self.row_bytes)
        if self.file.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise ImatrixError(f"{self.folder}: a short read of the calibration rows' hidden states kept there")
        return out

    def write(self, start: int, rows: np.ndarray) -> None:
        self.file.seek(start * self.row_bytes)
        self.file.write(np.ascontiguousarray(rows, dtype=np.float32).data)

    def close(self) -> None:
        self.file.close()


def compute_imatrix(ckpt: Checkpoint, gguf_name: Any, calibration: str | Path | None = None,
                    seq_len: int = DEFAULT_SEQ_LEN, samples: int = DEFAULT_SAMPLES,
                    device: str | None = None, batch_rows: int = DEFAULT_BATCH_ROWS,
                    workdir: str | os.PathLike[str] | None = None) -> Imatrix:
    """The importance matrix of `ckpt`'s decoder linear layers over the calibration text.

    `gguf_name` maps an HF tensor name to its GGUF name (the family's converter), so the
    matrix is keyed as llama.cpp's quantizer looks it up.

    Layer by layer: each decoder layer's weights are read from the checkpoint once, every row
    runs through it `batch_rows` at a time, and its outputs replace its inputs in a `_RowStore`
    (a temporary file in `workdir`). Memory is one layer's float32 weights plus one chunk's
    activations, whatever the number of rows; the whole-model forward over all rows at once
    grew by ~130 MB a row at 7B.
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .gptq import calibration_batches, calibration_texts

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(str(ckpt.tokenizer_dir), trust_remote_code=False)
    rows = calibration_batches(tok, calibration_texts(tok, calibration), seq_len, samples)
    config = AutoConfig.from_pretrained(str(ckpt.config.path.parent), trust_remote_code=False)
    with init_empty_weights(include_buffers=False):  # rotary tables are buffers: computed for real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    inner, layers = _decoder_layers(model)
    prefix = {id(m): n + "." for n, m in model.named_modules()}
    have = set(ckpt.names())

    def load(module: Any) -> None:
        for name, _p in list(module.named_parameters()):
            full = prefix[id(module)] + name
            if full not in have:
                raise ImatrixError(f"{ckpt.folder}: the checkpoint has no tensor {full}, which "
                                   f"{config.architectures[0]} needs")
            set_module_tensor_to_device(module, name, device, value=ckpt.get(full).to(torch.float32))

    def drop(module: Any) -> None:
        for name, _p in list(module.named_parameters()):
            set_module_tensor_to_device(module, name, "meta")

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def collect(key: str) -> Any:
        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().to(torch.float32)
            x = x.reshape(-1, x.shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(dim=0)
            counts[key] = counts.get(key, 0) + x.shape[0]
        return hook

    ids = torch.tensor([r["input_ids"] for r in rows])
    chunks = [(i, min(i + batch_rows, len(rows))) for i in range(0, len(rows), batch_rows)]
    store = _RowStore(len(rows), (ids.shape[1], config.hidden_size), Path(workdir) if workdir else None)
    handles = []
    try:
        with torch.inference_mode():
            # Each layer's own arguments (masks, rotary tables: some models give layers different
            # ones) and the first layer's input, from the decoder run over each chunk with every
            # layer stood in for by a recorder that passes its input on.
            calls = _layer_calls(inner, layers, load, drop, ids, chunks, store, device)
            for i, layer in enumerate(layers):
                for name, mod in layer.named_modules():
                    if isinstance(mod, torch.nn.Linear):
                        key = gguf_name(prefix[id(mod)] + "weight")
                        if key is not None:
                            handles.append(mod.register_forward_pre_hook(collect(key)))
                load(layer)
                for start, stop in chunks:
                    args, kwargs = calls[i][stop - start]
                    out = layer(torch.from_numpy(store.read(start, stop)).to(device), *args, **kwargs)
                    if i + 1 < len(layers):
                        store.write(start, (out[0] if isinstance(out, tuple) else out).cpu().numpy())
                drop(layer)
    finally:
        store.close()
        for h in handles:
            h.remove()
    name = str(calibration) if calibration else "localchat calibration (chats in the model's template, prose)"
    return Imatrix({k: v.cpu().numpy().astype(np.float32) for k, v in sums.items()}, counts, name,
                   len(rows[0]["input_ids"]), len(rows))


def _layer_calls(inner: Any, layers: Any, load: Any, drop: Any, ids: Any, chunks: list[tuple[int, int]],
                 store: _RowStore, device: str) -> list[dict[int, tuple[tuple, dict]]]:
    """Run the decoder over every chunk with its layers replaced by recorders: the embeddings
    (and whatever else runs before the first layer) are written to `store`, and each layer's
    arguments besides its input are kept per chunk size (rows are all as long, so a chunk's
    masks and rotary tables depend on its size alone). Returns them per layer."""
    calls: list[dict[int, tuple[tuple, dict]]] = [{} for _ in layers]
    seen: list[Any] = []

    def recorder(i: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            calls[i].setdefault(hidden.shape[0], (args[1:], kwargs))
            if i == 0:
                seen.append(hidden)
            return hidden
        return forward

    outside = [m for m in inner.children() if m is not layers]  # embeddings, final norm, rotary tables
    for m in outside:
        load(m)
    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for start, stop in chunks:
            inner(input_ids=ids[start:stop].to(device), use_cache=False)
            store.write(start, seen.pop().float().cpu().numpy())
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        for m in outside:
            drop(m)
    return calls


def save_imatrix(im: Imatrix, path: str | os.PathLike[str]) -> Path:
    """Write `im` as llama.cpp's GGUF imatrix file (raw sums and counts); atomic."""
    import gguf

    path = Path(path)
    w = gguf.GGUFWriter(None, "imatrix")  # the arch key is ignored by readers of this file type
    w.add_type("imatrix")
    w.add_array(KEY_DATASETS, [im.dataset])
    w.add_uint32(KEY_CHUNK_COUNT, im.chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, im.chunk_size)
    w.add_string(KEY_SOURCE, im.source)
    for name in sorted(im.sums):
        w.add_tensor(name + SUM_SUFFIX, im.sums[name].astype(np.float32))
        w.add_tensor(name + COUNT_SUFFIX, np.array([im.counts[name]], dtype=np.float32))
    with atomic_path(path) as tmp:
        w.path = tmp
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def load_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an imatrix GGUF (ours or llama-imatrix's); errors name the file and the tensor."""
    import gguf

    path = Path(path)
    try:
        r = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ImatrixError(f"{path}: not a readable GGUF imatrix file ({exc})") from None
    field = r.get_field("general.type")
    if field is None or field.contents() != "imatrix":
        raise ImatrixError(f"{path}: not an importance matrix (general.type is not 'imatrix')")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32).reshape(-1) for t in r.tensors}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for tname, data in tensors.items():
        if not tname.endswith(SUM_SUFFIX):
            continue
        name = tname[: -len(SUM_SUFFIX)]
        c = tensors.get(name + COUNT_SUFFIX)
        if c is None or len(c) != 1:
            raise ImatrixError(f"{path}: tensor {tname} has no single {name + COUNT_SUFFIX} beside it")
        if not np.isfinite(data).all():
            raise ImatrixError(f"{path}: tensor {tname} holds non-finite values")
        sums[name], counts[name] = data.copy(), int(round(float(c[0])))

    def meta(key: str, default: Any) -> Any:
        f = r.get_field(key)
        return default if f is None else f.contents()

    datasets = meta(KEY_DATASETS, [])
    return Imatrix(sums, counts, datasets[0] if datasets else "", int(meta(KEY_CHUNK_SIZE, 0)),
                   int(meta(KEY_CHUNK_COUNT, 0)), str(meta(KEY_SOURCE, "")))


def fingerprint(ckpt: Checkpoint, calibration: str | Path | None = None) -> str:
    """What an importance matrix depends on, cheaply: config, tensor names and shapes, the weight
    files' sizes and modification times (a retrained model in the same folder differs), the
    tokenizer and template files, and the calibration data's bytes."""
    h = hashlib.sha256()
    h.update(ckpt.config.path.read_bytes())
    for name in sorted(ckpt.names()):
        h.update(f"{name}{ckpt.shape(name)}".encode())
    for f in sorted({src.file for src in ckpt.sources.values()}):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    for f in sorted(Path(ckpt.tokenizer_dir or ckpt.folder).glob("*")):
        if f.is_file() and (f.name.startswith("tokenizer") or "template" in f.name):
            h.update(f.read_bytes())
    if calibration is not None:
        h.update(Path(calibration).read_bytes())
    else:
        data = resources.files("localchat.convert").joinpath("data")
        for n in ("calibration_chats.jsonl", "calibration_prose.txt"):
            h.update(data.joinpath(n).read_bytes())
    h.update(f"{DEFAULT_SEQ_LEN}/{DEFAULT_SAMPLES}".encode())
    return h.hexdigest()


def imatrix_for(ckpt: Checkpoint, gguf_name: Any, out: Path, calibration: str | Path | None = None,
                kept: list[Path] = ()) -> tuple[Imatrix, str]:
    """The importance matrix of `ckpt`, written to `out`: one of the `kept` files when it was
    computed from the same weights and calibration (re-quantizing to another type is then a
    matter of seconds), else computed. Returns it and a line for the report."""
    source = fingerprint(ckpt, calibration)
    for path in kept:
        try:
            im = load_imatrix(path)
        except ImatrixError:
            continue
        if im.source == source:
            save_imatrix(im, out)
            return im, f"importance matrix: reused {path.name} (same weights and calibration)"
    start = time.perf_counter()
    im = compute_imatrix(ckpt, gguf_name, calibration, workdir=out.parent)  # rows wait beside `out`
    im.source = source
    save_imatrix(im, out)
    return im, (f"importance matrix: {len(im.sums)} weights over {im.chunk_count} rows of {im.chunk_size} tokens "
                f"from {im.dataset}, in {time.perf_counter() - start:.0f} s; kept as {out.name}")
