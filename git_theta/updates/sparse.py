"""``sparse``: only the elements that changed, as positions plus the XOR of their bit patterns.

Positions are stored either as gaps between consecutive changed indices or as a bitmap of the
whole tensor, whichever compresses smaller. XOR of bit patterns (rather than a difference of values)
makes every change exact, NaN payloads and -0.0 included.
"""

import numpy as np

from ..bits import as_bits
from ..errors import ObjectCorruptError
from ..planes import decode_sections, encode_sections
from .base import Encoded, UpdateType
from .int_delta import as_bytearray


def changed_positions(new_bits, base_bits):
    """Flat indices where the bit patterns differ."""
    return np.flatnonzero(new_bits != base_bits)


def encode_positions(positions, total):
    """(mode, array) for the smaller encoding of sorted ``positions`` among ``total`` elements."""
    index_type = np.uint32 if total < (1 << 32) else np.uint64
    gaps = np.diff(positions, prepend=0).astype(index_type)
    bitmap_bytes = (total + 7) // 8
    # Gaps cost about 1-2 bytes each after compression; a bitmap costs total/8 before compression.
    if len(positions) * 2 < bitmap_bytes:
        return "gaps", gaps
    mask = np.zeros(total, dtype=bool)
    mask[positions] = True
    return "bitmap", np.packbits(mask)


def decode_positions(mode, array, total, oid):
    if mode == "gaps":
        positions = np.cumsum(array.astype(np.uint64), dtype=np.uint64)
        if len(positions) and positions[-1] >= total:
            raise ObjectCorruptError(f"object {oid}: sparse index out of range")
        return positions.astype(np.int64)
    if mode == "bitmap":
        if len(array) != (total + 7) // 8:
            raise ObjectCorruptError(f"object {oid}: sparse bitmap has the wrong size")
        return np.flatnonzero(np.unpackbits(array, count=total))
    raise ObjectCorruptError(f"object {oid}: unknown sparse index mode {mode!r}")


def encode_sparse_bits(new_bits, base_bits):
    """(header, parts) storing the positions and XOR values where ``new_bits`` differs."""
    positions = changed_positions(new_bits, base_bits)
    mode, index = encode_positions(positions, len(new_bits))
    xor = new_bits[positions] ^ base_bits[positions]
    parts, sections = encode_sections([index, xor])
    return {"index": mode, "sections": sections}, parts


def apply_sparse_bits(header, payload, base_bits, oid):
    """XOR the stored values into the bit patterns ``base_bits`` at the stored positions, in place."""
    sections = header.get("sections")
    if not isinstance(sections, list) or len(sections) != 2:
        raise ObjectCorruptError(f"object {oid} has a corrupt header")
    index, xor = decode_sections(payload, sections, oid)
    positions = decode_positions(header.get("index"), index, len(base_bits), oid)
    if len(positions) != len(xor) or xor.dtype.itemsize != base_bits.dtype.itemsize:
        raise ObjectCorruptError(f"object {oid}: sparse positions and values disagree")
    base_bits[positions] ^= xor.view(base_bits.dtype)
    return base_bits


class SparseUpdate(UpdateType):
    """A delta that stores only the changed elements."""

    name = "sparse"
    auto = True
    full_pass = False  # decoding touches only the changed elements

    def encode(self, tensor, base=None):
        if base is None:
            return None
        header, parts = encode_sparse_bits(as_bits(tensor.data, tensor.dtype), as_bits(base.data, base.dtype))
        return Encoded(header, parts)

    def encode_if_cheap(self, tensor, base, max_fraction=0.125):
        """The full encoding when at most ``max_fraction`` of the elements changed, else None.

        Used by the automatic choice: finding the changes is one comparison pass, and encoding a
        few of them costs less than estimating on a sample (which misjudges sparse changes).
        """
        new_bits, base_bits = as_bits(tensor.data, tensor.dtype), as_bits(base.data, base.dtype)
        if np.count_nonzero(new_bits != base_bits) > max_fraction * len(new_bits):
            return None
        header, parts = encode_sparse_bits(new_bits, base_bits)
        return Encoded(header, parts)

    def decode(self, header, payload, base, spec, oid="?"):
        if isinstance(base, bytearray):  # ours to reuse (see UpdateType.decode): XOR in place
            apply_sparse_bits(header, payload, as_bits(base, spec.dtype), oid)
            return base
        return as_bytearray(apply_sparse_bits(header, payload, as_bits(base, spec.dtype).copy(), oid))
