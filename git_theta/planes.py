"""Byte-plane + zstandard coding of arrays: the building block of every update type's payload.

Splitting each element's bytes into planes (all first bytes, then all second bytes, ...) puts the
bytes that carry little information (float exponents, the high bytes of small integer deltas)
together, where zstd compresses them well, and leaves near-random bytes apart, where they are stored
raw. Arrays are processed in chunks so working memory stays small.

A payload made of several arrays is a list of *sections*; :func:`encode_sections` returns the parts
and a header description, :func:`decode_sections` gives the arrays back.
"""

import numpy as np

from . import compression
from .errors import ObjectCorruptError
from .object_codec import frame, iter_frames

CHUNK_BYTES = 8 << 20


def to_planes(chunk, itemsize):
    """Byte planes of a chunk of whole elements: ``itemsize`` arrays of one byte per element."""
    raw = np.frombuffer(chunk, dtype=np.uint8)
    if itemsize == 1:
        return [raw]
    return list(np.ascontiguousarray(raw.reshape(-1, itemsize).T))


def from_planes(planes, out, itemsize):
    """Interleave ``planes`` back into ``out`` (a writable uint8 array of the chunk)."""
    if itemsize == 1:
        out[:] = planes[0]
        return
    grid = out.reshape(-1, itemsize)
    for k, plane in enumerate(planes):
        grid[:, k] = plane


def chunk_step(itemsize):
    return max(itemsize, CHUNK_BYTES - CHUNK_BYTES % itemsize)


def encode_planes(data, itemsize):
    """Frames (list of bytes-like parts) of byte-plane compressed ``data``."""
    view = memoryview(data).cast("B")
    step = chunk_step(itemsize)
    parts = []
    for start in range(0, len(view), step):
        for plane in to_planes(view[start : start + step], itemsize):
            parts.extend(frame(*compression.compress(plane)))
    return parts


def decode_planes(payload, nbytes, itemsize, oid="?"):
    """Inverse of :func:`encode_planes`: a bytearray of ``nbytes``."""
    out = bytearray(nbytes)
    target = np.frombuffer(out, dtype=np.uint8)
    frames = iter_frames(payload, oid)
    step = chunk_step(itemsize)
    for start in range(0, nbytes, step):
        size = min(step, nbytes - start)
        planes = []
        for _ in range(itemsize):
            try:
                method, data = next(frames)
            except StopIteration:
                raise ObjectCorruptError(f"object {oid} is truncated") from None
            plane = compression.decompress(method, data, size // itemsize, oid)
            planes.append(np.frombuffer(plane, dtype=np.uint8))
        from_planes(planes, target[start : start + size], itemsize)
    if next(frames, None) is not None:
        raise ObjectCorruptError(f"object {oid} has trailing data")
    return out


def encode_sections(arrays):
    """Encode numpy arrays; return (parts, description) where description goes in the header."""
    parts, description = [], []
    for array in arrays:
        array = np.ascontiguousarray(array)
        section = encode_planes(array.data if array.size else b"", array.dtype.itemsize)
        description.append(
            {"dtype": array.dtype.str, "count": int(array.size), "bytes": sum(len(p) for p in section)}
        )
        parts.extend(section)
    return parts, description


def decode_sections(payload, description, oid="?"):
    """Inverse of :func:`encode_sections`: the list of 1-D arrays."""
    arrays, pos = [], 0
    try:
        for section in description:
            dtype = np.dtype(section["dtype"])
            count, length = int(section["count"]), int(section["bytes"])
            if dtype.kind not in "uif" or count < 0 or length < 0 or pos + length > len(payload):
                raise ValueError
            raw = decode_planes(payload[pos : pos + length], count * dtype.itemsize, dtype.itemsize, oid)
            arrays.append(np.frombuffer(raw, dtype=dtype))
            pos += length
    except (KeyError, TypeError, ValueError):
        raise ObjectCorruptError(f"object {oid} has a corrupt section table") from None
    if pos != len(payload):
        raise ObjectCorruptError(f"object {oid} has trailing data")
    return arrays
