"""``sparse``: only the elements that changed, as positions plus the XOR of their bit patterns.

Positions are stored in whichever of three codings compresses smallest: the gaps between
consecutive changed indices (byte planes + zstd), a bitmap of the whole tensor (for dense changes),
or a Rice code of the gaps (``rice``: each gap's high bits in unary, its low ``k`` bits verbatim),
which comes within a few percent of the entropy of randomly placed changes and carries no zstd
table or frame per byte plane: on a 1%-changed bf16 tensor it stores ~1 byte per position against
~1.2 for zstd'd gaps. XOR of bit patterns (rather than a difference of values) makes every change
exact, NaN payloads and -0.0 included.
"""

import numpy as np

from git_theta.tensors.bits import as_bits
from git_theta.errors import ObjectCorruptError
from git_theta.tensors.planes import decode_sections, encode_sections
from git_theta.updates.base import Encoded, UpdateType, writable_base
from git_theta.updates.int_delta import apply_zigzag_delta, zigzag_delta


SAMPLE_COUNT = 1 << 14  # changes on which the coding choices are made when there are more


def changed_positions(new_bits, base_bits):
    """Flat indices where the bit patterns differ."""
    return np.flatnonzero(new_bits != base_bits)


def _narrow(values):
    """``values`` (non-negative integers) in the smallest unsigned dtype that holds them all.

    Fewer byte planes means fewer frames and no all-zero planes to store; any decoder of ``gaps``
    reads every unsigned width.
    """
    top = int(values.max()) if len(values) else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.uint64)


def encode_positions(positions, total):
    """(mode, array) for the smaller of gaps and bitmap for sorted ``positions`` among ``total``."""
    gaps = _narrow(np.diff(positions, prepend=0))
    bitmap_bytes = (total + 7) // 8
    # Gaps cost about 1-2 bytes each after compression; a bitmap costs total/8 before compression.
    if len(positions) * 2 < bitmap_bytes:
        return "gaps", gaps
    mask = np.zeros(total, dtype=bool)
    mask[positions] = True
    return "bitmap", np.packbits(mask)


def rice_parameter(count, total):
    """Rice parameter ``k`` for ``count`` positions among ``total`` elements.

    Both sides derive it from the counts (the decoder knows ``count`` from the values section), so
    it is never stored. floor(log2(ln 2 x mean gap)) is the classic choice for geometric gaps.
    """
    mean = total * 69 // (100 * count) if count else 0
    return max(0, mean.bit_length() - 1)


def encode_rice(positions, total):
    """(unary bits, low bits) as packed uint8 arrays: the ``rice`` coding of sorted ``positions``.

    The coded values are ``positions[i] - positions[i-1] - 1`` (and ``positions[0]``): each is
    written as ``value >> k`` zeros and a one (unary) and its low ``k`` bits, most significant
    first.
    """
    count = len(positions)
    k = rice_parameter(count, total)
    values = np.diff(np.asarray(positions, dtype=np.int64) - np.arange(count), prepend=0).astype(np.uint64)
    high = values >> np.uint64(k)
    ends = np.cumsum(high + np.uint64(1)) - np.uint64(1)  # where each value's terminating one sits
    unary = np.zeros(int(ends[-1]) + 1 if count else 0, dtype=np.uint8)
    unary[ends.astype(np.int64)] = 1
    return np.packbits(unary), pack_fields(values, k)


def pack_fields(values, k):
    """The low ``k`` bits of each of ``values`` (unsigned), packed back to back, most significant
    bit first: the inverse of :func:`unpack_fields`."""
    bits = np.empty((len(values), k), dtype=np.uint8)
    for column in range(k):
        bits[:, column] = (values >> values.dtype.type(k - 1 - column)) & values.dtype.type(1)
    return np.packbits(bits.ravel())


def set_bits(packed, count=None):
    """Indices of the one bits of a packed bit array (most significant bit first), as int64.

    The unpacked bits are viewed as bool: numpy's nonzero is several times faster on bool than
    on uint8 (measured 1.8 ms against 13 ms for 2.8M bits).
    """
    return np.flatnonzero(np.unpackbits(packed, count=count).view(bool))


def unpack_fields(packed, count, k, first=0):
    """``count`` unsigned ``k``-bit fields packed back to back, most significant bit first,
    starting with field number ``first``.

    The bits are assembled a column at a time (``k`` passes over ``count`` small integers),
    several times faster than repacking each field's bits (1.7 ms against 17.6 ms for 1.4M
    2-bit fields).
    """
    dtype = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if k <= 8 * np.dtype(t).itemsize)
    skip = first * k
    bits = np.unpackbits(packed[skip // 8 :], count=skip % 8 + count * k)[skip % 8 :].reshape(count, k)
    out = bits[:, 0].astype(dtype)
    one = dtype(1)
    for column in range(1, k):
        out <<= one
        out |= bits[:, column]
    return out


#: bytes of the Rice code's unary stream decoded at a time (~1M positions at 15% density): the
#: int64 temporaries stay a few MiB, not 8 bytes x every position at once
RICE_STEP = 1 << 18


def iter_rice(unary, low, count, total, oid):
    """Inverse of :func:`encode_rice`, a run at a time: yield ``(first, positions)``, the int64
    positions of entries ``first, first + 1, ...``, each checked to lie in ``range(total)``.

    A corrupt code raises ObjectCorruptError, possibly after some runs were yielded: callers
    apply them to a buffer that is then discarded.
    """
    k = rice_parameter(count, total)
    if unary.dtype != np.uint8 or low.dtype != np.uint8 or len(low) != (count * k + 7) // 8:
        raise ObjectCorruptError(f"object {oid}: sparse rice index has the wrong size")
    done, carry, last_one = 0, 0, -1
    for start in range(0, len(unary), RICE_STEP):
        # positions[i] = (zeros before the i-th one) << k + (low bits of values 0..i) + i: the
        # high parts need no decoding of their own, and the sum is a few passes over int64.
        positions = set_bits(unary[start : start + RICE_STEP])  # where each terminating one sits
        if not len(positions):
            continue
        positions += 8 * start
        last_one = int(positions[-1])
        if done + len(positions) > count:
            raise ObjectCorruptError(f"object {oid}: sparse rice index is corrupt")
        index = np.arange(done, done + len(positions), dtype=np.int64)
        positions -= index
        if int(positions[-1]) > (total >> k):  # checked before shifting: no wrap
            raise ObjectCorruptError(f"object {oid}: sparse index out of range")
        positions <<= k
        if k:
            low_sums = np.cumsum(unpack_fields(low, len(positions), k, done), dtype=np.int64)
            low_sums += carry
            carry = int(low_sums[-1])
            positions += low_sums
        positions += index
        # Every value is >= 0, so the positions increase: only the last can be out of range.
        if positions[-1] >= total:
            raise ObjectCorruptError(f"object {oid}: sparse index out of range")
        yield done, positions
        done += len(positions)
    if done != count or len(unary) != last_one // 8 + 1:
        raise ObjectCorruptError(f"object {oid}: sparse rice index is corrupt")


def encode_index(positions, total):
    """(mode, parts, sections) of the smallest coding of sorted ``positions`` among ``total``.

    ``mode`` (``gaps``, ``bitmap`` or ``rice``) goes in the header; the sections are followed by
    the values section, whose length tells :func:`decode_index` how many positions there are.
    Many positions: Rice or not is decided on the first :data:`SAMPLE_COUNT` of them.
    """
    mode, array = encode_positions(positions, total)
    # Above a quarter of the elements the bitmap (~1 bit each at most) wins: skip the Rice try.
    if not len(positions) or len(positions) * 4 > total:
        return (mode, *encode_sections([array]))
    if len(positions) > SAMPLE_COUNT:
        head = positions[:SAMPLE_COUNT]
        if encode_index(head, int(head[-1]) + 1)[0] == "rice":
            return ("rice", *encode_sections(list(encode_rice(positions, total))))
        return (mode, *encode_sections([array]))
    parts, sections = encode_sections([array])
    rice_parts, rice_sections = encode_sections(list(encode_rice(positions, total)))
    if sum(s["bytes"] for s in rice_sections) < sum(s["bytes"] for s in sections):
        return "rice", rice_parts, rice_sections
    return mode, parts, sections


def decode_positions(mode, array, total, oid):
    """Positions of the ``gaps`` and ``bitmap`` codings (one index array)."""
    if mode == "gaps":
        positions = np.cumsum(array.astype(np.uint64), dtype=np.uint64)
        if len(positions) and positions[-1] >= total:
            raise ObjectCorruptError(f"object {oid}: sparse index out of range")
        return positions.astype(np.int64)
    if mode == "bitmap":
        if len(array) != (total + 7) // 8:
            raise ObjectCorruptError(f"object {oid}: sparse bitmap has the wrong size")
        return set_bits(array, total)
    raise ObjectCorruptError(f"object {oid}: unknown sparse index mode {mode!r}")


def iter_index(mode, arrays, total, count, oid):
    """Inverse of :func:`encode_index`: yield ``(first, positions)`` runs of the positions from
    the decoded index ``arrays`` (one run, except for the Rice code, decoded a run at a time).

    ``count`` is the number of values stored after the index (the number of positions).
    """
    if mode == "rice":
        if len(arrays) != 2:
            raise ObjectCorruptError(f"object {oid} has a corrupt header")
        yield from iter_rice(arrays[0], arrays[1], count, total, oid)
        return
    if len(arrays) != 1:
        raise ObjectCorruptError(f"object {oid} has a corrupt header")
    positions = decode_positions(mode, arrays[0], total, oid)
    if len(positions) != count:
        raise ObjectCorruptError(f"object {oid}: sparse positions and values disagree")
    yield 0, positions


def decode_index(mode, arrays, total, count, oid):
    """All the positions :func:`iter_index` yields, as one int64 array."""
    runs = [positions for _, positions in iter_index(mode, arrays, total, count, oid)]
    return np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)


def apply_changes(mode, index, values, bits, coding, oid):
    """Apply stored changes to the bit patterns ``bits`` in place, a run of positions at a time.

    ``index`` are the decoded index arrays, ``values`` the changes (viewed as ``bits``' dtype
    and consumed: the zigzag coding is undone in place), ``coding`` ``xor`` or ``zigzag``.
    """
    if values.dtype.itemsize != bits.dtype.itemsize:
        raise ObjectCorruptError(f"object {oid}: sparse positions and values disagree")
    values = values.view(bits.dtype)
    for first, positions in iter_index(mode, index, len(bits), len(values), oid):
        run = values[first : first + len(positions)]
        if coding == "xor":
            bits[positions] ^= run
        else:  # one gather and one scatter, as for XOR
            bits[positions] = apply_zigzag_delta(bits[positions], run)
    return bits


def encode_sparse_bits(new_bits, base_bits):
    """(header, parts) storing the positions and changed values where ``new_bits`` differs.

    The values are the XOR of the bit patterns or, when it compresses smaller (header
    ``"values": "zigzag"``; objects without the key are XOR), the zigzag integer difference: a
    small step of a float changes its low bits by a small amount, which XOR (flipping every bit a
    carry passes) codes less tightly, ~0.1 byte per change on bf16. Many changes: the choice is
    made on the first :data:`SAMPLE_COUNT` of them.
    """
    positions = changed_positions(new_bits, base_bits)
    mode, parts, sections = encode_index(positions, len(new_bits))
    new_values, base_values = new_bits[positions], base_bits[positions]
    head = slice(0, SAMPLE_COUNT)
    xor_size = encode_sections([new_values[head] ^ base_values[head]])[1][0]["bytes"]
    zigzag_size = encode_sections([zigzag_delta(new_values[head], base_values[head])])[1][0]["bytes"]
    header = {"index": mode}
    if zigzag_size < xor_size:
        header["values"] = "zigzag"
        value_parts, value_sections = encode_sections([zigzag_delta(new_values, base_values)])
    else:
        value_parts, value_sections = encode_sections([new_values ^ base_values])
    header["sections"] = sections + value_sections
    return header, parts + value_parts


def _changes(header, payload, base_bits, oid):
    """(index mode, index arrays, values, coding) of a ``sparse`` object; ``coding`` is ``xor``
    or ``zigzag``."""
    sections = header.get("sections")
    if not isinstance(sections, list) or len(sections) not in (2, 3):
        raise ObjectCorruptError(f"object {oid} has a corrupt header")
    *index, values = decode_sections(payload, sections, oid)
    coding = header.get("values", "xor")
    if coding not in ("xor", "zigzag"):
        raise ObjectCorruptError(f"object {oid}: unknown sparse value coding {coding!r}")
    if values.dtype.itemsize != base_bits.dtype.itemsize:
        raise ObjectCorruptError(f"object {oid}: sparse positions and values disagree")
    return header.get("index"), index, values.view(base_bits.dtype), coding


def decode_sparse(header, payload, base_bits, oid):
    """(positions, XOR of the bit patterns there) of a ``sparse`` object against ``base_bits``."""
    mode, index, values, coding = _changes(header, payload, base_bits, oid)
    positions = decode_index(mode, index, len(base_bits), len(values), oid)
    if coding == "xor":
        return positions, values
    old = base_bits[positions]
    return positions, apply_zigzag_delta(old, values) ^ old


def apply_sparse_bits(header, payload, base_bits, oid):
    """Apply the stored changes to the bit patterns ``base_bits`` in place."""
    mode, index, values, coding = _changes(header, payload, base_bits, oid)
    return apply_changes(mode, index, values, base_bits, coding, oid)


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
        base = writable_base(base)  # the changes are applied in place
        apply_sparse_bits(header, payload, as_bits(base, spec.dtype), oid)
        return base
