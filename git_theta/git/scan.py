"""Which manifests exist where: the scans of a repository that every command starts from.

A manifest is recognised by its content (a blob that starts with the manifest magic), never by
today's ``filter`` attribute of its path: the tracking patterns and the paths change over history
(``git mv`` into ``models/``, a narrowed pattern), and an old version at a path no longer tracked
still needs its objects. Three questions, one module:

- **tracked files** of a revision or of the index and their manifests (:func:`tracked_files`,
  :func:`version_paths`, :func:`theta_paths`): ls-files, log, diff, load;
- **what a range of commits introduces** (:func:`manifests_in_range`, :func:`manifests_at`,
  :func:`objects_of`): a push sends every object of every manifest in the pushed commits, not only
  the tips (``git rev-list --objects NEW --not OLD`` lists exactly the blobs the range adds; the
  manifests among them list whole delta chains);
- **everything the repository still references** (:func:`iter_manifests`, :func:`reachable_oids`):
  fsck and prune. Roots: ``scope="head"``, the commit HEAD points at (its tree only) and the current
  worktree's index; ``scope="all"``, every ref with its whole history, every reflog entry (so
  ``stash@{n}`` too), the HEAD, index and in-progress pseudo-refs (``ORIG_HEAD``, ``MERGE_HEAD``,
  ``CHERRY_PICK_HEAD``...) of every worktree, and, with ``work_trees=True``, work-tree files that are
  themselves manifests (a skipped smudge). Blobs are enumerated with one
  ``git rev-list --objects --in-commit-order`` piped into ``git cat-file --batch-check``, so each
  blob is attributed to the first commit that introduced it in walk order, and only blobs small
  enough to be manifests are read.
"""

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from git_theta.errors import GitCommandError, ManifestError
from git_theta.git.repo import records
from git_theta.manifest import MAGIC, MAX_MANIFEST, Manifest, ObjectRef, is_manifest


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
        for (_mode, oid, stage), path in records(repo.git("ls-files", "-s", "-z")):
            if stage == "0":
                yield path, oid
    else:
        for (_mode, kind, oid), path in records(repo.git("ls-tree", "-r", "-z", "--full-tree", rev)):
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


_HEX = re.compile(rb"^([0-9a-f]{40}|[0-9a-f]{64})\b", re.M)
_OID_REF = re.compile(r"\b([0-9a-f]{64}):([0-9]{1,20})\b")
# Pseudo-refs of operations in progress: they name commits that may be referenced by nothing else.
_PSEUDO_REFS = ("ORIG_HEAD", "MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD", "REBASE_HEAD", "FETCH_HEAD", "AUTO_MERGE")


@dataclass(frozen=True)
class Use:
    """Where a manifest was found: its blob, its path and the commit (or "index"/"work tree")."""

    blob: str | None
    path: str
    commit: str | None
    where: str

    def describe(self):
        return f"{self.path} ({self.where})"


@dataclass(frozen=True)
class Worktree:
    """A worktree: its work-tree folder (None when bare, or moved away without
    ``git worktree repair``) and its own git directory (HEAD, index, pseudo-refs)."""

    path: Path | None
    git_dir: Path


class IndexUnreadableError(GitCommandError):
    """A worktree's index exists but git cannot read it: what it stages is unknown."""


def worktrees(repo):
    """Every worktree of the repository, found by its git directory, not its folder.

    The main one is the common git directory; each linked one has ``<common>/worktrees/<id>``. A
    linked worktree whose folder was moved or deleted without ``git worktree prune`` still has its
    index and HEAD there, and what it stages must stay referenced, so it is listed (path None).
    """
    out = repo.git("worktree", "list", "--porcelain").decode("utf-8", "surrogateescape")
    first = dict(line.partition(" ")[::2] for line in out.split("\n\n")[0].splitlines() if line)
    main = Path(first["worktree"]) if "worktree" in first and "bare" not in first else None
    result = [Worktree(main if main is not None and main.is_dir() else None, repo.common_dir)]
    admin_root = repo.common_dir / "worktrees"
    for admin in sorted(admin_root.iterdir()) if admin_root.is_dir() else []:
        if not (admin / "HEAD").is_file():
            continue
        try:
            folder = Path((admin / "gitdir").read_text().strip()).parent
        except OSError:
            folder = None
        result.append(Worktree(folder if folder is not None and folder.is_dir() else None, admin))
    return result


def _pseudo_ref_commits(repo, trees):
    """Commit ids named by in-progress pseudo-refs of every worktree (that exist in the repository)."""
    candidates = set()
    for tree in trees:
        for name in _PSEUDO_REFS:
            try:
                data = (tree.git_dir / name).read_bytes()
            except OSError:
                continue
            candidates.update(m.decode() for m in _HEX.findall(data))
    if not candidates:
        return []
    out = repo.git(
        "cat-file",
        "--batch-check=%(objectname) %(objecttype)",
        input="".join(c + "\n" for c in sorted(candidates)).encode(),
    ).decode()
    return [line.split()[0] for line in out.splitlines() if line.endswith(" commit")]


def _rev_list_blobs(repo, options, commits):
    """(blob oid, path, commit) of blobs reachable from ``options`` (``--all``...) and ``commits``
    that are small enough to be manifests."""
    rev_list = subprocess.Popen(
        ["git", "rev-list", "--objects", "--in-commit-order", *options, "--stdin"],
        cwd=repo.cwd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    check = subprocess.Popen(
        ["git", "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize) %(rest)"],
        cwd=repo.cwd,
        stdin=rev_list.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    rev_list.stdout.close()  # cat-file owns it now
    rev_list.stdin.write("".join(c + "\n" for c in commits).encode())
    rev_list.stdin.close()
    commit = None
    try:
        for raw in check.stdout:
            line = raw.decode("utf-8", "surrogateescape").rstrip("\n")
            fields = line.split(" ", 3)
            if len(fields) < 3:  # "<oid> missing": nothing to read
                continue
            oid, kind, size, *rest = fields
            if kind == "commit":
                commit = oid
            elif kind == "blob" and int(size) <= MAX_MANIFEST:
                yield oid, rest[0] if rest else "", commit
    finally:
        check.stdout.close()
        check.wait()
        error = rev_list.stderr.read().decode("utf-8", "replace").strip()
        if rev_list.wait() != 0:
            raise GitCommandError(f"git rev-list failed: {error.splitlines()[-1] if error else '?'}")


def _index_blobs(tree):
    """(blob oid, path) of every index entry of a worktree, conflict stages included.

    Read through the worktree's git directory, so a worktree whose folder moved is read too; an
    index that exists but cannot be read raises IndexUnreadableError (nothing may be assumed gone).
    """
    import os

    if not (tree.git_dir / "index").exists():
        return  # a bare repository, or a worktree that never staged anything
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_DIR"] = str(tree.git_dir)
    out = subprocess.run(["git", "ls-files", "-s", "-z"], cwd=tree.git_dir, env=env, capture_output=True)
    if out.returncode != 0:
        error = out.stderr.decode("utf-8", "replace").strip().splitlines()
        raise IndexUnreadableError(
            f"cannot read the index of worktree {tree.path or tree.git_dir}: {error[-1] if error else '?'}",
            hint="fix or remove that worktree (git worktree repair / git worktree remove), then try again",
        )
    for (mode, oid, _stage), path in records(out.stdout):
        if mode != "160000":  # submodules are commits, not blobs
            yield oid, path


def _work_tree_manifests(tree, paths):
    """(path, bytes) of work-tree files that are manifests rather than checkpoints."""
    for path in sorted(paths):
        try:
            with open(tree.path / path, "rb") as handle:
                if not is_manifest(handle.read(len(MAGIC))):
                    continue
                handle.seek(0)
                data = handle.read(MAX_MANIFEST + 1)
        except OSError:
            continue
        if len(data) <= MAX_MANIFEST:
            yield path, data


def iter_manifests(repo, scope="all", work_trees=False):
    """Yield ``(Use, manifest bytes)`` for every distinct manifest blob reachable in ``scope``.

    Each blob is yielded once, with the first place it was found.
    """
    if scope not in ("head", "all"):
        raise ValueError(scope)
    seen = set()
    trees = worktrees(repo)
    if scope == "all":
        current = trees
        options, commits = ["--all", "--reflog"], _pseudo_ref_commits(repo, trees)
    else:
        current = [Worktree(repo.work_tree, repo.git_dir)] if repo.work_tree else []
        head = repo.git("rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).decode().strip()
        options, commits = ["--no-walk"], [head] if head else []
    # The index first: a staged manifest is attributed to the index, its most recent home.
    for tree in current:
        label = "index" if tree.git_dir == repo.git_dir else f"index of worktree {tree.path or tree.git_dir}"
        index_paths = set()
        for oid, path in _index_blobs(tree):
            index_paths.add(path)
            if oid not in seen:
                seen.add(oid)
                data = repo.read_blob(oid)
                if data is not None and is_manifest(data):
                    yield Use(oid, path, None, label), data
        if work_trees and tree.path is not None:
            for path, data in _work_tree_manifests(tree, index_paths):
                yield Use(None, path, None, f"work tree {tree.path}"), data
    if options != ["--no-walk"] or commits:
        for oid, path, commit in _rev_list_blobs(repo, options, commits):
            if oid in seen:
                continue
            seen.add(oid)
            data = repo.read_blob(oid)
            if data is not None and is_manifest(data):
                yield Use(oid, path, commit, f"commit {commit[:12]}" if commit else "?"), data


def referenced_refs(manifest_bytes, source):
    """{oid: ObjectRef} a manifest references. An unparseable one still protects every oid it names."""
    try:
        manifest = Manifest.parse(manifest_bytes, source=source)
        # Members too: a pack that repack wrote holds them under no name a manifest uses.
        return {ref.oid: ref for ref in (*manifest.all_objects(), *manifest.member_objects())}
    except ManifestError:
        text = manifest_bytes.decode("utf-8", "replace")
        return {oid: ObjectRef(oid, int(size)) for oid, size in _OID_REF.findall(text)}


def reachable_oids(repo):
    """Every object id needed by a manifest reachable from any ref, reflog, index or work tree,
    including the parts of chunked objects (whose index is what the manifest names)."""
    needed = {}
    for use, data in iter_manifests(repo, "all", work_trees=True):
        needed.update(referenced_refs(data, use.describe()))
    return set(needed) | {ref.oid for ref in chunk_parts(repo.store, needed.values())}


def chunk_parts(store, refs):
    """The parts of the chunk indexes among ``refs`` (present locally); empty without chunking.

    Only objects that start with the chunk-index magic are read in full.
    """
    list_parts = getattr(store, "chunk_parts", None)
    if list_parts is None:
        return []
    from git_theta.store.chunked import MAGIC as INDEX_MAGIC, MAX_INDEX

    indexes = []
    for ref in refs:
        if ref.size > MAX_INDEX:
            continue
        try:
            with open(store.path(ref.oid), "rb") as handle:
                if handle.read(len(INDEX_MAGIC)) == INDEX_MAGIC:
                    indexes.append(ref)
        except OSError:
            continue
    return list_parts(indexes)
