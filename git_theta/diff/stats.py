"""How much one tensor changed: the numbers ``git theta diff`` and ``git theta log`` report.

Both tensors are raw little-endian bytes (what :func:`git_theta.updates.chain.decode_tensor` returns). Values
are widened to float64 (bf16 and float8 by :func:`git_theta.tensors.bits.to_float`; integers and bools as
values; complex64 as complex128) a chunk at a time, so the extra memory is a few MiB whatever the
tensor size. Elements where either side is NaN or infinite are left out of the norms and counted in
``nonfinite``; "changed" compares bit patterns, so -0.0 vs 0.0 or a new NaN payload counts.
"""

import math

import numpy as np

from git_theta.tensors.bits import as_bits, to_float
from git_theta.dtypes import element_count, get_dtype

CHUNK_ELEMENTS = 1 << 16  # 512 KiB of float64 per side: the passes over a chunk stay in cache

#: the keys of a stats dict, in display order
FIELDS = (
    "delta_l2",
    "relative_change",
    "max_abs_delta",
    "cosine",
    "fraction_changed",
    "elements_changed",
    "elements",
    "old_l2",
    "new_l2",
    "nonfinite",
)


def _dot(a, b):
    """Real part of <a, b>, accumulated in float64. einsum, not BLAS: BLAS spawns threads per call,
    which on small chunks costs ten times the arithmetic (and fights the diff's own workers)."""
    if a.dtype.kind == "c":
        return float(np.einsum("i,i->", a.real, b.real) + np.einsum("i,i->", a.imag, b.imag))
    return float(np.einsum("i,i->", a, b))


def _sums(old, new):
    """(sum |new-old|^2, sum |old|^2, sum |new|^2, <old, new>, max |new-old|) of one chunk."""
    delta = new - old
    max_abs = float(np.max(np.abs(delta))) if delta.size else 0.0
    return _dot(delta, delta), _dot(old, old), _dot(new, new), _dot(old, new), max_abs


def _values(data, dtype_name):
    """float64 (complex128 for complex) values of raw bytes."""
    if get_dtype(dtype_name).kind == "complex":
        return np.frombuffer(data, dtype=get_dtype(dtype_name).numpy_name).astype(np.complex128)
    return to_float(data, dtype_name)


class Accumulator:
    """Sums over chunks (and over tensors, for a group or a file) that give the reported numbers."""

    def __init__(self):
        self.delta_sq = 0.0
        self.old_sq = 0.0
        self.new_sq = 0.0
        self.dot = 0.0
        self.max_abs = 0.0
        self.changed = 0
        self.elements = 0
        self.nonfinite = 0

    def add_values(self, old, new, changed):
        """Add one chunk: value arrays of both sides and the count of changed elements."""
        sums = _sums(old, new)
        if not all(math.isfinite(x) for x in sums):
            # A NaN or an infinity somewhere (rare): leave those elements out of the norms.
            finite = np.isfinite(old) & np.isfinite(new)
            self.nonfinite += int(finite.size - np.count_nonzero(finite))
            sums = _sums(old[finite], new[finite])
        delta_sq, old_sq, new_sq, dot, max_abs = sums
        self.delta_sq += delta_sq
        self.old_sq += old_sq
        self.new_sq += new_sq
        self.dot += dot
        self.max_abs = max(self.max_abs, max_abs)
        self.changed += int(changed)
        self.elements += int(old.size)

    def merge(self, other):
        """Fold another accumulator (another tensor) into this one."""
        self.delta_sq += other.delta_sq
        self.old_sq += other.old_sq
        self.new_sq += other.new_sq
        self.dot += other.dot
        self.max_abs = max(self.max_abs, other.max_abs)
        self.changed += other.changed
        self.elements += other.elements
        self.nonfinite += other.nonfinite

    def result(self):
        """The stats dict (keys :data:`FIELDS`); undefined ratios are None (e.g. an all-zero old)."""
        old_l2, new_l2 = math.sqrt(self.old_sq), math.sqrt(self.new_sq)
        delta_l2 = math.sqrt(self.delta_sq)
        return {
            "delta_l2": delta_l2,
            "relative_change": delta_l2 / old_l2 if old_l2 > 0 else None,
            "max_abs_delta": self.max_abs,
            "cosine": max(-1.0, min(1.0, self.dot / (old_l2 * new_l2))) if old_l2 > 0 and new_l2 > 0 else None,
            "fraction_changed": self.changed / self.elements if self.elements else 0.0,
            "elements_changed": self.changed,
            "elements": self.elements,
            "old_l2": old_l2,
            "new_l2": new_l2,
            "nonfinite": self.nonfinite,
        }


def accumulate(old_data, old_dtype, new_data, new_dtype, shape):
    """An :class:`Accumulator` over two tensors of the same shape (dtypes may differ)."""
    count = element_count(shape)
    acc = Accumulator()
    old_size, new_size = get_dtype(old_dtype).itemsize, get_dtype(new_dtype).itemsize
    old_view, new_view = memoryview(old_data).cast("B"), memoryview(new_data).cast("B")
    for begin in range(0, count, CHUNK_ELEMENTS):
        end = min(count, begin + CHUNK_ELEMENTS)
        old_chunk = old_view[begin * old_size : end * old_size]
        new_chunk = new_view[begin * new_size : end * new_size]
        old, new = _values(old_chunk, old_dtype), _values(new_chunk, new_dtype)
        if old_dtype == new_dtype:
            # Bit patterns: exact, and what made the digests differ.
            changed = np.count_nonzero(as_bits(old_chunk, old_dtype) != as_bits(new_chunk, new_dtype))
        else:
            same = (old == new) | (np.isnan(old) & np.isnan(new))
            changed = same.size - np.count_nonzero(same)
        acc.add_values(old, new, changed)
    return acc


def sparse_accumulate(old_data, dtype_name, positions, xor):
    """An :class:`Accumulator` for ``old`` changed only at ``positions`` (bit patterns XOR ``xor``),
    as a ``sparse`` delta stores it, without building the new tensor: one pass over ``old`` for
    ‖old‖, the rest from the changed elements alone. None when a value is NaN or infinite (the
    caller then compares the whole tensors)."""
    if get_dtype(dtype_name).kind == "complex":
        return None
    bits = as_bits(old_data, dtype_name)
    old_p = to_float(bits[positions].tobytes(), dtype_name)
    new_p = to_float((bits[positions] ^ xor.view(bits.dtype)).tobytes(), dtype_name)
    old_sq = 0.0
    for begin in range(0, len(bits), CHUNK_ELEMENTS):
        chunk = to_float(bits[begin : begin + CHUNK_ELEMENTS].tobytes(), dtype_name)
        old_sq += _dot(chunk, chunk)
    delta_sq, old_p_sq, new_p_sq, dot_p, max_abs = _sums(old_p, new_p)
    if not all(math.isfinite(x) for x in (old_sq, delta_sq, old_p_sq, new_p_sq, dot_p)):
        return None
    acc = Accumulator()
    acc.delta_sq = delta_sq
    acc.old_sq = old_sq
    # Unchanged elements contribute the same to both sides: swap in the changed ones.
    acc.new_sq = max(0.0, old_sq - old_p_sq + new_p_sq)
    acc.dot = old_sq - old_p_sq + dot_p
    acc.max_abs = max_abs
    acc.changed = int(np.count_nonzero(xor))
    acc.elements = len(bits)
    return acc


def compare(old_data, old_dtype, new_data, new_dtype, shape):
    """The stats dict of the change from ``old_data`` to ``new_data`` (see :data:`FIELDS`)."""
    return accumulate(old_data, old_dtype, new_data, new_dtype, shape).result()
