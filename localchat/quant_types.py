"""The quant types `localchat convert` writes, described once: the converter, its CLI and the app's
Convert form read this list (a light module, so the app offers them without importing the converter)."""

from __future__ import annotations

# Quant name -> (llama_ftype, approximate bits per weight, for the disk check).
QUANT_TYPES: dict[str, tuple[str, float]] = {
    "F16": ("LLAMA_FTYPE_MOSTLY_F16", 16.0),
    "Q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", 8.5),
    "Q6_K": ("LLAMA_FTYPE_MOSTLY_Q6_K", 6.6),
    "Q5_K_M": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", 5.7),
    "Q5_0": ("LLAMA_FTYPE_MOSTLY_Q5_0", 5.5),
    "Q4_K_M": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9),
    "Q4_K_S": ("LLAMA_FTYPE_MOSTLY_Q4_K_S", 4.6),
    "Q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", 4.5),
    "IQ4_XS": ("LLAMA_FTYPE_MOSTLY_IQ4_XS", 4.3),
    "Q3_K_M": ("LLAMA_FTYPE_MOSTLY_Q3_K_M", 3.9),
    "Q2_K": ("LLAMA_FTYPE_MOSTLY_Q2_K", 3.0),
    # A per-tensor mix for a size (convert/automix.py) over Q4_K_M's ftype; the disk check's bits are its default.
    "AUTO": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", 4.9),
}
# Types offered only with an importance matrix: llama.cpp quantizes them without one, but its
# own guidance is that these low-bit types need one, and bench_quant_ppl.py measures why.
NEEDS_IMATRIX = ("IQ4_XS", "Q3_K_M", "Q2_K", "AUTO")
# Types whose kernels weigh their rounding by an importance matrix (F16 is not quantized; llama.cpp's
# Q8_0 kernel takes no weights).
USES_IMATRIX = tuple(q for q in QUANT_TYPES if q not in ("F16", "Q8_0"))
DEFAULT_QUANT = "Q4_K_M"
GPTQ_BITS = (4, 8)  # what `--to gptq --bits` takes
