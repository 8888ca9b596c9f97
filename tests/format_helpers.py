"""Test helpers for checkpoint formats: the in-memory round trip of :mod:`git_theta.formats.memory`
and inspection of a repository's object store."""

from pathlib import Path

from git_theta.formats.memory import MemorySource, join, roundtrip, split  # noqa: F401 (re-exported for tests)


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
