"""Copy a real GGUF with some metadata changed, using the reference `gguf` package, so tests
can run llama.cpp on a model whose chat template (or anything else) is not what it shipped."""

from __future__ import annotations

from pathlib import Path

import gguf


def rewrite_gguf(src: Path, dst: Path, strings: dict[str, str | None]) -> Path:
    """Write `dst` = `src` with each key in `strings` set to its value, or dropped if None."""
    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in strings:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for key, value in strings.items():
        if value is not None:
            w.add_string(key, value)
    for t in r.tensors:
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
