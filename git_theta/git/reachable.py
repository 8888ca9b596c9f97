"""Which objects a set of commits needs: the manifests they introduce and the objects those list.

A push must send every object of every manifest in the pushed commits, not only the tips: a
colleague may check out any of them. ``git rev-list --objects NEW --not OLD`` lists exactly the blobs
the pushed range adds; the ones that are manifests give the objects, whole delta chains included
(the manifest lists each tensor's chain).

A manifest is recognised by its content (a blob that starts with the manifest magic), never by
today's ``filter`` attribute of its path: the tracking patterns and the paths change over history
(``git mv`` into ``models/``, a narrowed pattern), and an old version at a path no longer tracked
still needs its objects on the remote.
"""

from git_theta.errors import ManifestError
from git_theta.git.inventory import theta_paths, tracked_files
from git_theta.manifest import MAGIC, Manifest, is_manifest

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
    if not blobs:
        return []
    sizes = repo.git(
        "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)", input="\n".join(blobs).encode() + b"\n"
    )
    result, broken = [], []
    for line in sizes.decode().splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[1] != "blob" or not len(MAGIC) <= int(parts[2]) <= MAX_MANIFEST:
            continue
        data = repo.read_blob(parts[0])
        if data and is_manifest(data):
            path = blobs[parts[0]]
            try:
                result.append((path, Manifest.parse(data, source=f"{path} ({parts[0][:12]})")))
            except ManifestError as exc:
                broken.append((path, exc))
    # A file that merely starts like a manifest (an example in the docs) is no checkpoint; one at a
    # path tracked today is, and a push must not go on without its objects.
    tracked = theta_paths(repo, sorted({path for path, _ in broken}))
    for path, exc in broken:
        if path in tracked:
            raise exc
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
