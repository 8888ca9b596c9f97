"""The manifests of tracked checkpoints as they are in a commit, in the index or in the work tree.

A diff compares two snapshots. Commits and the index are read with ``git ls-tree`` / ``ls-files`` and
the persistent ``git cat-file --batch``. The work tree is the index plus the files git sees as
possibly modified (``git diff-files``, which only compares stat data); those are cleaned in-process
with :class:`git_theta.filter.clean.Cleaner`, whose stat cache makes an unchanged file cheap. Nothing is
ever smudged.
"""

import fnmatch
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

from git_theta.errors import ManifestError, UsageError
from git_theta.git.scan import TrackedFile, tracked_files
from git_theta.manifest import Manifest, is_manifest

INDEX = ":index"
WORKTREE = ":worktree"
EMPTY = ":empty"


@dataclass
class Snapshot:
    """``files`` maps each tracked path to its :class:`git_theta.git.scan.TrackedFile`."""

    label: str
    files: dict = field(default_factory=dict)
    sidecars: dict = field(default_factory=dict)  # index json / adapter config path -> bytes (models)
    paths: set = field(default_factory=set)  # every path of the version (an index may name any)


def resolve_commit(repo, rev):
    """The commit id ``rev`` names; UsageError with a hint when it names none."""
    out = repo.git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    if not out.strip():
        raise UsageError(
            f"unknown revision {rev!r}",
            hint="name a commit (a branch, a tag, HEAD~1, an id); list them with 'git log --oneline'",
        )
    return out.decode().strip()


def has_head(repo):
    return bool(repo.git("rev-parse", "--verify", "--quiet", "HEAD^{commit}", check=False).strip())


class PathFilter:
    """Matches repository paths against what a user typed: files, directories or globs."""

    def __init__(self, patterns):
        self.patterns = list(patterns or [])

    def __bool__(self):
        return bool(self.patterns)

    def __call__(self, path):
        if not self.patterns:
            return True
        for pattern in self.patterns:
            pattern = pattern.rstrip("/")
            if pattern in ("", "."):
                return True
            if path == pattern or path.startswith(pattern + "/") or fnmatch.fnmatchcase(path, pattern):
                return True
        return False


def repo_paths(repo, paths, cwd=None):
    """Paths typed relative to ``cwd`` as repository paths (forward slashes, from the top)."""
    if repo.work_tree is None:
        return list(paths)
    cwd = os.path.realpath(cwd or os.getcwd())
    top = os.path.realpath(repo.work_tree)
    result = []
    for p in paths:
        absolute = os.path.normpath(os.path.join(cwd, p))
        rel = os.path.relpath(absolute, top)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep):
            raise UsageError(f"{p}: outside the repository at {top}")
        result.append("." if rel == "." else rel.replace(os.sep, "/"))
    return result


def snapshot(repo, side, paths=None, cleaner=None):
    """The :class:`Snapshot` of ``side``: a revision, :data:`INDEX`, :data:`WORKTREE` or :data:`EMPTY`."""
    match = PathFilter(paths)
    if side == EMPTY:
        return Snapshot(side)
    if side == WORKTREE:
        return _worktree(repo, match, cleaner)
    rev = None if side == INDEX else resolve_commit(repo, side)
    files = {t.path: t for t in tracked_files(repo, rev) if match(t.path)}
    from git_theta.git.models import sidecars_at
    from git_theta.git.scan import version_paths

    paths = version_paths(repo, rev)
    return Snapshot(side, files, sidecars_at(repo, rev, sorted(paths)), paths)


@contextmanager
def _at(directory):
    """Run with the process in ``directory`` (the cleaner's stat cache keys on work-tree paths)."""
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def _worktree(repo, match, cleaner):
    if repo.work_tree is None:
        raise UsageError("a bare repository has no work tree to compare", hint="name two revisions")
    base = snapshot(repo, INDEX, match.patterns)
    out = repo.git("diff-files", "-z", "--name-status", "--no-renames")
    items = out.split(b"\0")
    dirty = {}
    for status, path in zip(items[0::2], items[1::2]):
        path = path.decode("utf-8", "surrogateescape")
        if path in base.files:
            dirty[path] = status.decode()
    sidecars = _worktree_sidecars(repo, base.sidecars)
    paths = _OnDisk(base.paths, repo.work_tree)
    if not dirty:
        return Snapshot(WORKTREE, base.files, sidecars, paths)
    files = dict(base.files)
    own = cleaner is None
    if own:
        from git_theta.filter.clean import Cleaner

        cleaner = Cleaner(repo)
    try:
        with _at(repo.work_tree):
            for path, status in sorted(dirty.items()):
                if status.startswith("D") or not os.path.isfile(path):
                    del files[path]
                    continue
                files[path] = clean_file(cleaner, path)
    finally:
        if own:
            cleaner.close()
    return Snapshot(WORKTREE, files, sidecars, paths)


class _OnDisk(set):
    """The index's paths, and any file in the work tree (an index json may name a new shard)."""

    def __init__(self, paths, top):
        super().__init__(paths)
        self.top = top

    def __contains__(self, path):
        return set.__contains__(self, path) or os.path.isfile(os.path.join(self.top, path))


def _worktree_sidecars(repo, staged):
    """The index jsons and adapter configs as they are in the work tree (those git tracks)."""
    from git_theta.git.models import MAX_SIDECAR

    result = {}
    for path in staged:
        try:
            with open(os.path.join(repo.work_tree, path), "rb") as f:
                result[path] = f.read(MAX_SIDECAR)
        except OSError:
            continue
    return result


def clean_file(cleaner, path):
    """TrackedFile for the work-tree file ``path`` (relative to the current directory = top).

    Its ``blob`` is None: the cleaned manifest has no blob id until it is staged.
    """
    with open(path, "rb") as stream:
        data = cleaner.clean(stream, path)
    return TrackedFile(path, None, Manifest.parse(data, source=f"{path} (work tree)"))


def manifest_of(data, source):
    """A Manifest from stored bytes, or (None, reason) when they are not one."""
    if data is None:
        return None, "missing"
    if not is_manifest(data):
        return None, "not a manifest (committed before it was tracked?)"
    try:
        return Manifest.parse(data, source=source), None
    except ManifestError as exc:
        return None, exc.message
