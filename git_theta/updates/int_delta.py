"""``int-delta``: the integer difference of the bit patterns, zigzag-coded, in byte planes.

For a fine-tune where nearly every float moves a little, new and old bit patterns share sign,
exponent and high mantissa bits, so their integer difference is small: zigzag coding makes it a small
unsigned number whose high byte planes are almost all zero and compress to nearly nothing. Wrapping
integer arithmetic makes it exact for every bit pattern.
"""

import numpy as np

from git_theta.tensors import hashing
from git_theta.tensors.bits import as_bits
from git_theta.errors import ObjectCorruptError
from git_theta.tensors.planes import encode_sections, iter_decoded_chunks, section_spans
from git_theta.updates.base import Encoded, UpdateType, writable_base

_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def zigzag_delta(new_bits, base_bits):
    """Zigzag-coded wrapping difference ``new - base`` as unsigned integers of the same width."""
    width = new_bits.dtype.itemsize * 8
    diff = np.subtract(new_bits, base_bits).view(_SIGNED[new_bits.dtype.itemsize])
    out = np.left_shift(diff, 1)
    np.right_shift(diff, width - 1, out=diff)  # in place: two temporaries instead of four
    np.bitwise_xor(out, diff, out=out)
    return out.view(new_bits.dtype)


def apply_zigzag_delta(base_bits, zigzag, into=None):
    """Inverse of :func:`zigzag_delta`: ``base + unzigzag(zigzag)``, wrapping.

    Works in place in ``zigzag`` when it is writable (decoders pass freshly decoded arrays), so
    decoding a delta touches one new array rather than four.
    """
    one = zigzag.dtype.type(1)
    signed = _SIGNED[zigzag.dtype.itemsize]
    sign = np.bitwise_and(zigzag, one)
    np.negative(sign.view(signed), out=sign.view(signed))  # 0 -> 0, 1 -> all ones
    out = zigzag if zigzag.flags.writeable else zigzag.copy()
    np.right_shift(out, one, out=out)
    np.bitwise_xor(out, sign, out=out)
    if into is not None:  # write the sum straight into the caller's buffer (may be base_bits)
        np.add(out, base_bits, out=into)
        return into
    np.add(out, base_bits, out=out)
    return out


class IntDeltaUpdate(UpdateType):
    """A delta storing every element's (small) change of bit pattern."""

    name = "int-delta"
    auto = True

    def encode(self, tensor, base=None):
        if base is None:
            return None
        zz = zigzag_delta(as_bits(tensor.data, tensor.dtype), as_bits(base.data, base.dtype))
        parts, sections = encode_sections([zz])
        return Encoded({"sections": sections}, parts)

    def decode(self, header, payload, base, spec, oid="?"):
        sections = header.get("sections")
        if not isinstance(sections, list) or len(sections) != 1:
            raise ObjectCorruptError(f"object {oid} has a corrupt header")
        ((dtype, count, frames),) = section_spans(payload, sections, oid)
        digest = hashing.claim()  # each piece of the result is final once added: hashed hot
        base = writable_base(base)
        base_bits = as_bits(base, spec.dtype)
        if dtype.itemsize != base_bits.dtype.itemsize or count != len(base_bits):
            raise ObjectCorruptError(f"object {oid}: delta does not match its base")
        # A chunk at a time, into the base: no tensor-sized temporary is allocated.
        for start, chunk in iter_decoded_chunks(frames, count * dtype.itemsize, dtype.itemsize, oid):
            part = base_bits[start // dtype.itemsize : (start + len(chunk)) // dtype.itemsize]
            apply_zigzag_delta(part, chunk.view(base_bits.dtype), into=part)
            if digest is not None:
                digest.feed(start, part)
        return base
