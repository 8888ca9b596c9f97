"""What versions cost in the object store: the bytes a version adds, and the store's usage.

One meaning of "stored" everywhere (``ls-files``, ``ls-files -v``, ``log --stat``, ``du``): the
bytes of the objects a version references that its parent version did not, that is what
committing it added to the store. A tensor left unchanged adds nothing; a delta adds its own
object, not the chain beneath it; an object shared by several tensors or files counts once. The
parent version is the tree of the commit's parents (all of them, for a merge) or, for the index,
HEAD. Object sizes are the sizes manifests record (what a remote transfers), not blocks on disk.
"""

from dataclasses import dataclass, field

from git_theta.git.scan import tracked_files


def _parents(repo, rev):
    """The commits whose trees a version of ``rev`` is compared with (HEAD for the index)."""
    if rev is None:
        head = repo.git("rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).decode().strip()
        return [head] if head else []
    out = repo.git("rev-list", "--parents", "-n", "1", rev).decode().split()
    return out[1:]


def objects_at(repo, commits):
    """oids referenced by every tracked checkpoint in the trees of ``commits``."""
    known = set()
    for commit in commits:
        for tracked in tracked_files(repo, commit):
            if tracked.manifest is not None:
                known.update(ref.oid for ref in tracked.manifest.all_objects())
    return known


@dataclass
class Added:
    """What one version of one file added: ``oids`` new objects of ``bytes`` in total."""

    path: str
    bytes: int = 0
    oids: set = field(default_factory=set)


def added_by(repo, rev=None, tracked=None):
    """``{path: Added}`` for each tracked checkpoint of ``rev`` (None: the index).

    ``tracked`` is ``tracked_files(repo, rev)`` when the caller has it. An object new in two files
    of the same version counts in the first (by path) only, so the sum over files is what the
    version added.
    """
    tracked = tracked if tracked is not None else tracked_files(repo, rev)
    seen = objects_at(repo, _parents(repo, rev))
    result = {}
    for item in tracked:
        added = Added(item.path)
        if item.manifest is not None:
            for ref in item.manifest.all_objects():
                if ref.oid not in seen:
                    seen.add(ref.oid)
                    added.oids.add(ref.oid)
                    added.bytes += ref.size
        result[item.path] = added
    return result


@dataclass
class Usage:
    """Objects and bytes of one part of the store."""

    objects: int = 0
    bytes: int = 0

    def add(self, size):
        self.objects += 1
        self.bytes += size

    def as_dict(self):
        return {"objects": self.objects, "bytes": self.bytes}


def disk_usage(repo):
    """The repository's object store: total, reachable, unreachable and per file.

    Reachable means needed by a manifest of any ref, reflog entry, index or work tree (what
    ``git theta prune`` keeps); per file counts the local objects of every reachable version of
    that path, so an object two files share counts in both.
    """
    from git_theta.git.scan import chunk_parts, iter_manifests, referenced_refs

    store = repo.store
    sizes = {}
    for oid in store.iter_oids():
        try:
            sizes[oid] = store.path(oid).stat().st_size
        except OSError:
            continue
    per_path, needed = {}, {}
    for use, data in iter_manifests(repo, "all", work_trees=True):
        refs = referenced_refs(data, use.describe())
        needed.update(refs)
        per_path.setdefault(use.path or "?", {}).update(refs)
    reachable_oids = set(needed) | {ref.oid for ref in chunk_parts(store, needed.values())}
    total, reachable, unreachable = Usage(), Usage(), Usage()
    for oid, size in sizes.items():
        total.add(size)
        (reachable if oid in reachable_oids else unreachable).add(size)
    files = {}
    for path, refs in sorted(per_path.items()):
        usage = Usage()
        for oid in set(refs) | {ref.oid for ref in chunk_parts(store, refs.values())}:
            if oid in sizes:
                usage.add(sizes[oid])
        files[path] = usage
    return {"total": total, "reachable": reachable, "unreachable": unreachable, "files": files}
