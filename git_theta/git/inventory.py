"""Which files of a revision (or of the index) are tracked checkpoints, and their manifests."""

from dataclasses import dataclass

from git_theta.errors import ManifestError
from git_theta.manifest import Manifest, is_manifest


@dataclass
class TrackedFile:
    """A path with ``filter=theta`` and, when its stored content is a manifest, that manifest."""

    path: str
    blob: str
    manifest: Manifest | None
    error: str | None = None


def _entries(repo, rev):
    """(path, blob oid) of every file in ``rev``'s tree, or in the index (stage 0) when rev is None."""
    if rev is None:
        out = repo.git("ls-files", "-s", "-z")
        for item in out.split(b"\0"):
            if item:
                meta, _, path = item.decode("utf-8", "surrogateescape").partition("\t")
                _mode, oid, stage = meta.split()
                if stage == "0":
                    yield path, oid
    else:
        out = repo.git("ls-tree", "-r", "-z", "--full-tree", rev)
        for item in out.split(b"\0"):
            if item:
                meta, _, path = item.decode("utf-8", "surrogateescape").partition("\t")
                _mode, kind, oid = meta.split()
                if kind == "blob":
                    yield path, oid


def theta_paths(repo, paths):
    """The subset of ``paths`` whose ``filter`` attribute is ``theta``."""
    if not paths:
        return set()
    out = repo.git("check-attr", "-z", "--stdin", "filter", input="\0".join(paths).encode() + b"\0")
    fields = out.split(b"\0")
    result = set()
    for i in range(0, len(fields) - 2, 3):
        if fields[i + 2] == b"theta":
            result.add(fields[i].decode("utf-8", "surrogateescape"))
    return result


def tracked_files(repo, rev=None, paths=None):
    """TrackedFile for every tracked checkpoint in ``rev`` (or the index), sorted by path."""
    entries = dict(_entries(repo, rev))
    if paths:
        entries = {p: o for p, o in entries.items() if p in set(paths)}
    tracked = theta_paths(repo, sorted(entries))
    result = []
    for path in sorted(tracked):
        data = repo.read_blob(entries[path])
        manifest, error = None, None
        if data is not None and is_manifest(data):
            try:
                manifest = Manifest.parse(data, source=path)
            except ManifestError as exc:
                error = exc.message
        result.append(TrackedFile(path, entries[path], manifest, error))
    return result


def version_paths(repo, rev=None):
    """Every path of ``rev``'s tree (or of the index), tracked or not."""
    return {path for path, _ in _entries(repo, rev)}
