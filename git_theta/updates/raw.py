"""``raw``: a small tensor stored as its own bytes in a pack (a keyframe without a container).

The object is exactly the tensor's bytes, so its id is the tensor digest: one sha256 per tensor at
clean (not a digest plus an object id), no header, no compression, and a manifest line that names
the object by its pack alone (manifest v3, :mod:`git_theta.manifest`). Clean stores small tensors
this way when they go into a pack; they are not worth the byte planes and zstd frames of ``dense``
(per-tensor costs dominate a 4 KiB tensor), and a delta may still stack on one.

Decoding recognises a raw object by its id alone: an object whose id is the digest of the tensor it
decodes to *is* those bytes (sha256 is collision resistant), so nothing in the object can lie about
its kind. The decoded bytes are still hashed with sha256 before use, like any unverified pair.
"""

from git_theta.tensors.buffers import new_buffer
from git_theta.updates.base import UpdateType


class RawUpdate(UpdateType):
    """The tensor's bytes as the object; written by clean for small packed tensors only."""

    name = "raw"
    keyframe = True

    def encode(self, tensor, base=None):
        return None  # raw objects have no container: clean stores them itself (ObjectStore.put_raw)

    def decode(self, header, payload, base, spec, oid="?"):
        out = new_buffer(len(payload))
        out[:] = payload
        return out


def raw_header(entry):
    """The header a raw object would have: what decoders check of any object."""
    return {"update": RawUpdate.name, "dtype": entry.dtype, "shape": list(entry.shape)}
