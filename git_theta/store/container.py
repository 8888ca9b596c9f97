"""The container every stored tensor object uses: a self-describing header plus the update payload.

Layout: ``b"GTO1"``, a little-endian u32 header length, the header as canonical JSON (sorted keys),
then the payload the update type wrote. The header names the update type, dtype, shape and, for a
delta, the digest of the base tensor it applies to, so an object can be decoded knowing only its
chain. Payloads that are a list of frames use :func:`pack_frames`: each frame is a method byte
(0 raw, 1 zstd) and a u64 length before its bytes.
"""

import json
import struct

from git_theta.errors import ObjectCorruptError

MAGIC = b"GTO1"
RAW, ZSTD = 0, 1
_FRAME_HEAD = struct.Struct("<BQ")
MAX_HEADER = 1 << 20


def header_bytes(header):
    """The container prefix for ``header`` (a JSON-able dict)."""
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<I", len(body)) + body


def unpack(data, oid="?"):
    """Split an object into (header dict, payload memoryview); ObjectCorruptError if malformed."""
    view = memoryview(data)
    if bytes(view[:4]) != MAGIC or len(view) < 8:
        raise ObjectCorruptError(f"object {oid} is not a git-theta object")
    (length,) = struct.unpack("<I", view[4:8])
    if length > MAX_HEADER or 8 + length > len(view):
        raise ObjectCorruptError(f"object {oid} has a corrupt header")
    try:
        header = json.loads(bytes(view[8 : 8 + length]))
    except ValueError:
        raise ObjectCorruptError(f"object {oid} has a corrupt header") from None
    if not _well_formed(header):
        raise ObjectCorruptError(f"object {oid} has a corrupt header")
    return header, view[8 + length :]


def _well_formed(header):
    """The fields every decoder relies on have the right types (the rest is the update's business)."""
    if not isinstance(header, dict) or not isinstance(header.get("update"), str):
        return False
    if "dtype" in header and not isinstance(header["dtype"], str):
        return False
    shape = header.get("shape", [])
    return isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)


def frame(method, data):
    """One frame's bytes: header then data (returned as two parts to avoid a copy)."""
    return [_FRAME_HEAD.pack(method, len(data)), data]


def iter_frames(payload, oid="?"):
    """Yield (method, memoryview) for each frame of a payload."""
    pos = 0
    end = len(payload)
    while pos < end:
        if pos + _FRAME_HEAD.size > end:
            raise ObjectCorruptError(f"object {oid} is truncated")
        method, length = _FRAME_HEAD.unpack_from(payload, pos)
        pos += _FRAME_HEAD.size
        if pos + length > end or method not in (RAW, ZSTD):
            raise ObjectCorruptError(f"object {oid} is truncated or corrupt")
        yield method, payload[pos : pos + length]
        pos += length
