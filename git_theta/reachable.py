"""Which objects a set of commits needs: the manifests they introduce and the objects those list.

A push must send every object of every manifest in the pushed commits, not only the tips: a
colleague may check out any of them. ``git rev-list --objects NEW --not OLD`` lists exactly the blobs
the pushed range adds; the ones at tracked paths (``filter=theta``) that are manifests give the
objects, whole delta chains included (the manifest lists each tensor's chain).
"""

from .inventory import theta_paths, tracked_files
from .manifest import Manifest, is_manifest

MAX_MANIFEST = 256 << 20  # a bigger blob at a tracked path is a raw checkpoint, not a manifest


def manifests_in_range(repo, include, exclude=(), exclude_remote=None):
    """(path, Manifest) for every manifest blob reachable from ``include`` and not from ``exclude``
    (commit ids) nor from the remote-tracking refs of ``exclude_remote``."""
    if not include:
        return []
    args = ["rev-list", "--objects", *include, "--not", *exclude]
    if exclude_remote:
        args.append(f"--remotes={exclude_remote}")
    out = repo.git(*args, "--")
    blobs = {}
    for line in out.decode("utf-8", "surrogateescape").splitlines():
        oid, sep, path = line.partition(" ")
        if sep and path:
            blobs.setdefault(oid, path)
    tracked = theta_paths(repo, sorted(set(blobs.values())))
    candidates = [oid for oid, path in blobs.items() if path in tracked]
    if not candidates:
        return []
    sizes = repo.git(
        "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)", input="\n".join(candidates).encode() + b"\n"
    )
    result = []
    for line in sizes.decode().splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] != "blob" or int(parts[2]) > MAX_MANIFEST:
            continue
        data = repo.read_blob(parts[0])
        if data and is_manifest(data):
            result.append((blobs[parts[0]], Manifest.parse(data, source=f"{blobs[parts[0]]} ({parts[0][:12]})")))
    return result


def manifests_at(repo, revs):
    """(path, Manifest) of the tracked checkpoints in each of ``revs`` (None: the index)."""
    result = []
    for rev in revs:
        for tracked in tracked_files(repo, rev):
            if tracked.manifest is not None:
                result.append((tracked.path, tracked.manifest))
    return result


def objects_of(manifests, include=None):
    """Every ObjectRef the manifests need (each once; a packed object counts as its pack).
    ``include``: tensor-name globs; then only the matching tensors' chains (and the file-level
    blobs) are listed."""
    from fnmatch import fnmatchcase

    seen = {}
    for _path, manifest in manifests:
        for ref in manifest.blobs.values():
            seen.setdefault(ref.home.oid, ref.home)
        for name, entry in manifest.tensors.items():
            if include and not any(fnmatchcase(name, pattern) for pattern in include):
                continue
            for ref in entry.objects:
                seen.setdefault(ref.home.oid, ref.home)
    return list(seen.values())
