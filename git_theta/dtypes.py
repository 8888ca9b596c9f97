"""The dtype vocabulary shared by every format: safetensors' dtype names.

Every checkpoint format maps its own dtypes onto these names, so manifests, codecs, diffs and merges
speak one language. Only the element size matters for storage; the numpy view is what arithmetic
(diffs, merges, deltas) works on.
"""

from dataclasses import dataclass

from git_theta.errors import CheckpointError


@dataclass(frozen=True)
class DType:
    """One element type: its stable name, byte size and how to view its bits."""

    name: str
    itemsize: int
    kind: str  # "float", "int", "uint", "bool", "complex"
    numpy_name: str | None  # numpy dtype holding the values, when numpy has one
    bits_name: str  # unsigned integer numpy dtype of the same width (the raw bit pattern)


_TABLE = [
    DType("F64", 8, "float", "<f8", "<u8"),
    DType("F32", 4, "float", "<f4", "<u4"),
    DType("F16", 2, "float", "<f2", "<u2"),
    DType("BF16", 2, "float", None, "<u2"),
    DType("F8_E4M3", 1, "float", None, "u1"),
    DType("F8_E5M2", 1, "float", None, "u1"),
    DType("F8_E8M0", 1, "float", None, "u1"),
    DType("C64", 8, "complex", "<c8", "<u8"),
    DType("I64", 8, "int", "<i8", "<u8"),
    DType("I32", 4, "int", "<i4", "<u4"),
    DType("I16", 2, "int", "<i2", "<u2"),
    DType("I8", 1, "int", "i1", "u1"),
    DType("U64", 8, "uint", "<u8", "<u8"),
    DType("U32", 4, "uint", "<u4", "<u4"),
    DType("U16", 2, "uint", "<u2", "<u2"),
    DType("U8", 1, "uint", "u1", "u1"),
    DType("BOOL", 1, "bool", "?", "u1"),
]
DTYPES = {d.name: d for d in _TABLE}


def get_dtype(name):
    """Return the DType called ``name`` or raise CheckpointError."""
    try:
        return DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r}", hint=f"known dtypes: {', '.join(sorted(DTYPES))}") from None


def element_count(shape):
    """Number of elements of a tensor of ``shape`` (1 for a 0-d scalar)."""
    n = 1
    for dim in shape:
        n *= dim
    return n


def nbytes(dtype_name, shape):
    """Size in bytes of a tensor of this dtype and shape."""
    return get_dtype(dtype_name).itemsize * element_count(shape)
