"""Chunked objects: how an object larger than a host accepts (``theta.maxObjectSize``, 2 GiB by
default; GitHub's limit) is stored as several objects that each fit.

The store splits such an object when it is written: the parts become ordinary objects and the id the
manifest records is that of a small *chunk index*, itself an ordinary content-addressed object::

    git-theta chunked v1
    <total size> <sha256 of the whole content>
    <oid>:<size>            # one line per part, in order

Reading the index id returns the reassembled content, checked part by part and as a whole, so the
codec never sees the difference, and every object that travels (index and parts) is within the
limit. Transfers list the parts of every index they move.
"""

import hashlib

from git_theta.errors import ManifestError, ObjectCorruptError
from git_theta.manifest import ObjectRef

MAGIC = b"git-theta chunked v1\n"
MAX_INDEX = 1 << 20  # an index of a 2 TiB object at 2 GiB parts is ~80 KB: bigger is not an index


def is_index(head):
    return head[: len(MAGIC)] == MAGIC


def index_bytes(size, digest, parts):
    lines = [f"{size} {digest}"] + [str(ref) for ref in parts]
    return MAGIC + ("\n".join(lines) + "\n").encode()


def parse_index(data, oid="?"):
    """(total size, whole digest, [ObjectRef]) of a chunk index; ObjectCorruptError if malformed."""
    try:
        lines = bytes(data[len(MAGIC) :]).decode("ascii").splitlines()
        size_text, digest = lines[0].split(" ")
        parts = [ObjectRef.parse(line) for line in lines[1:]]
        size = int(size_text)
    except (ValueError, IndexError, ManifestError) as exc:  # UnicodeDecodeError is a ValueError
        raise ObjectCorruptError(f"chunk index {oid} is malformed ({type(exc).__name__})") from None
    if not parts or sum(r.size for r in parts) != size or len(digest) != 64:
        raise ObjectCorruptError(f"chunk index {oid}: its parts do not add up to {size} bytes")
    return size, digest, parts


def as_index(data, oid="?"):
    """The parsed index when ``data`` is a well-formed chunk index, else None.

    Ordinary content may begin with the magic line by chance (any bytes can be stored), so only a
    well-formed index counts as one; anything else is returned to its reader as it is.
    """
    if not is_index(data) or len(data) > MAX_INDEX:
        return None
    try:
        return parse_index(data, oid)
    except ObjectCorruptError:
        return None


def assemble(oid, index, read_part):
    """The content of a parsed chunk index, verified; ``read_part(oid)`` returns verified bytes."""
    size, digest, parts = index
    whole = b"".join(read_part(ref.oid) for ref in parts)
    if len(whole) != size or hashlib.sha256(whole).hexdigest() != digest:
        raise ObjectCorruptError(f"object {oid}: its reassembled parts do not match the chunk index")
    return whole
