"""Test helpers for checkpoint formats: an in-memory split/join round trip and store inspection.

``roundtrip`` drives a format plugin the way clean and smudge do (sniff, split, iterate tensors,
join from the tensors' bytes) without git or the object store, so unit tests stay fast.
"""

import io
from pathlib import Path

from git_theta.formats.base import TensorSource
from git_theta.manifest import TensorEntry

NO_DIGEST = "0" * 64


class MemorySource(TensorSource):
    """A TensorSource over the tensors and blobs a reader produced."""

    def __init__(self, reader, tensors):
        self.specs = {t.name: TensorEntry(t.name, t.dtype, tuple(t.shape), NO_DIGEST, "dense", ()) for t in tensors}
        self._data = {t.name: bytes(t.data) for t in tensors}
        self._blobs = dict(reader.blobs)
        self.blob_keys = set(self._blobs)

    def iter_data(self, names):
        for name in names:
            yield name, self._data[name]

    def read_blob(self, key):
        return self._blobs[key]


def split(fmt, raw, path):
    """(reader, [TensorData with bytes]) after checking the format sniffs ``raw``."""
    assert fmt.sniff(raw[:4096], path), f"{fmt.name} does not recognise {path}"
    reader = fmt.split(io.BytesIO(raw), path)
    tensors = list(reader.tensors())
    for t in tensors:
        t.data = bytes(t.data)
    return reader, tensors


def join(fmt, reader, tensors, path):
    """Checkpoint bytes written back from a split."""
    out = io.BytesIO()
    fmt.join(dict(reader.fields), MemorySource(reader, tensors), out, path)
    return out.getvalue()


def roundtrip(fmt, raw, path):
    """(reader, tensors, bytes written back)."""
    reader, tensors = split(fmt, raw, path)
    return reader, tensors, join(fmt, reader, tensors, path)


def described(reader, tensors):
    """Everything a manifest would record from a split (fields, blobs, tensors with bytes)."""
    return dict(reader.fields), dict(reader.blobs), [(t.name, t.dtype, tuple(t.shape), t.data) for t in tensors]


def store_files(repo):
    """Every file under the repository's object store, relative paths (tmp included)."""
    root = Path(repo.path) / ".git" / "theta" / "objects"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def object_files(repo):
    """Stored objects only (names of 64 hex digits)."""
    return [p for p in store_files(repo) if len(Path(p).name) == 64 and not p.startswith("tmp")]
