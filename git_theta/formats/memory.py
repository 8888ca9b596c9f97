"""A checkpoint format driven in memory: split and join without git or the object store.

``roundtrip`` runs a format plugin the way clean and smudge do (sniff, split, iterate tensors, join
from the tensors' bytes), so format tests, the project's and plugin authors', stay fast and check
exactly what a checkout would write.
"""

import io

from git_theta.errors import CheckpointError
from git_theta.manifest import TensorEntry
from git_theta.formats.base import TensorSource

NO_DIGEST = "0" * 64


class MemorySource(TensorSource):
    """A TensorSource over tensors held in memory (TensorData objects) and a reader's blobs."""

    def __init__(self, blobs, tensors):
        self.specs = {t.name: TensorEntry(t.name, t.dtype, tuple(t.shape), NO_DIGEST, "dense", ()) for t in tensors}
        self._data = {t.name: bytes(t.data) for t in tensors}
        self._blobs = dict(blobs)
        self.blob_keys = set(self._blobs)

    def iter_data(self, names):
        for name in names:
            yield name, self._data[name]

    def read_blob(self, key):
        return self._blobs[key]


def split(fmt, raw, path):
    """(reader, [TensorData with bytes]) of checkpoint bytes ``raw``; the format must sniff them."""
    if not fmt.sniff(raw[:4096], path):
        raise CheckpointError(f"{path}: the {fmt.name} format does not recognise this file")
    reader = fmt.split(io.BytesIO(raw), path)
    tensors = list(reader.tensors())
    for t in tensors:
        t.data = bytes(t.data)
    return reader, tensors


def join(fmt, reader, tensors, path):
    """Checkpoint bytes written back from a reader's fields and blobs and the given tensors."""
    out = io.BytesIO()
    fmt.join(dict(reader.fields), MemorySource(reader.blobs, tensors), out, path)
    return out.getvalue()


def roundtrip(fmt, raw, path):
    """(reader, tensors, bytes written back): split then join, as clean then smudge would."""
    reader, tensors = split(fmt, raw, path)
    return reader, tensors, join(fmt, reader, tensors, path)
