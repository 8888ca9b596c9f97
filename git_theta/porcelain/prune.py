"""``git theta prune``: delete stored objects nothing references any more, safely.

An object is kept when any of these holds:

- it is **reachable**: listed by a manifest in any ref's history, reflog entry, stash entry, the
  index (every conflict stage) or HEAD of any worktree, an in-progress pseudo-ref, or a work-tree
  file that is itself a manifest (:mod:`git_theta.git.scan`). Manifests list a tensor's whole
  delta chain, so the bases of every reachable delta are reachable too;
- it is **recent**: modified less than ``theta.pruneExpire`` ago (default one hour). A running
  ``git add`` writes objects before git records the manifest in the index, and clean *freshens*
  (touches) every object it reuses, so anything a concurrent command is about to reference is
  recent;
- every object is kept when the index of any worktree (a linked one whose folder moved included)
  exists but cannot be read: what it stages is unknown, so nothing is assumed unreferenced
  (``PruneResult.kept_all`` says why);
- it is **not pushed** (unless ``--include-unpushed``): an object counts as pushed when a remote
  is recorded to hold it (``theta/remotes/<remote>/pushed``, written by ``git theta push``/the
  pre-push hook, see :func:`pushed_oids`). Without the remote feature every object counts as
  unpushed and only ``--include-unpushed`` deletes anything unreachable.

Deletion moves the object into ``theta/trash`` first and looks at its time again: a writer that
freshened it between the scan and the move shows up there and the object is put back; a writer
that comes after the move finds it missing and writes its own copy. Only then is it unlinked.
Stale temp files of crashed writers (older than the expiry) are removed too.

Known limit: freshening touches the object a manifest names; for a chunked object that is the chunk
index, not its parts. An unreachable, old chunked object reused by a concurrent ``git add`` at the
very moment prune deletes it could lose parts (its index is put back, the parts are not); the next
``git theta fsck`` reports it and ``--repair`` fetches the parts if they were pushed.
"""

import os
import re
import time
from dataclasses import dataclass, field

from git_theta.errors import ConfigError, ManifestError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_EXPIRE = re.compile(r"(\d+)\s*\.?\s*(s|sec|secs|seconds?|m|min|mins|minutes?|h|hours?|d|days?|w|weeks?)(\.ago)?\Z")


def parse_expire(text):
    """Seconds from ``now``, ``never``, a number of seconds, or ``<n>.<unit>[.ago]`` (``2.weeks.ago``)."""
    value = str(text).strip().lower()
    if value == "now":
        return 0
    if value == "never":
        return None
    if value.isdigit():
        return int(value)
    match = _EXPIRE.match(value)
    if not match:
        raise ConfigError(
            f"theta.pruneExpire must be 'now', 'never', seconds or like '1.hour' / '2.weeks.ago', not {text!r}"
        )
    return int(match.group(1)) * _UNITS[match.group(2)[0]]


@dataclass
class PruneResult:
    deleted: int = 0
    bytes_freed: int = 0
    kept_reachable: int = 0
    kept_recent: int = 0
    kept_unpushed: int = 0
    restored: int = 0  # moved aside but freshened meanwhile by a concurrent writer, so put back
    temp_files: int = 0
    dry_run: bool = False
    kept_all: str | None = None  # why nothing at all was deleted (an unreadable worktree index)
    oids: list = field(default_factory=list)

    def as_dict(self):
        return {k: v for k, v in self.__dict__.items()}


def pushed_oids(repo):
    """Objects some remote is known to hold, or None when this build has no remote feature.

    The remote feature (``git_theta.remote``) records, per remote, every oid it uploaded or found
    already present in ``theta/remotes/<remote>/pushed``; an object in any of them counts as pushed.
    """
    try:
        from git_theta.remote import transfer  # noqa: F401 - only to know the feature (and its record) exists
    except ImportError:
        return None
    pushed = set()
    for record in sorted((repo.theta_dir / "remotes").glob("*/pushed")):
        try:
            pushed.update(record.read_text().split())
        except OSError:
            continue
    return pushed


def prune(repo, expire=3600, include_unpushed=False, dry_run=False, now=None):
    """Delete unreachable objects older than ``expire`` seconds (None: never); return PruneResult."""
    from git_theta.manifest import ObjectRef
    from git_theta.git.scan import IndexUnreadableError, chunk_parts, reachable_oids

    now = time.time() if now is None else now
    result = PruneResult(dry_run=dry_run)
    if expire is None:
        result.kept_reachable = sum(1 for _ in repo.store.iter_oids())
        return result
    cutoff = now - expire
    # Scan the store's times before walking the refs: an object written after this snapshot is
    # recent by definition, so a manifest that appears during the walk cannot lose its objects.
    candidates = []
    for oid in repo.store.iter_oids():
        try:
            st = repo.store.path(oid).stat()
        except FileNotFoundError:
            continue
        candidates.append((oid, st.st_mtime, st.st_size))
    try:
        reachable = reachable_oids(repo)
    except IndexUnreadableError as exc:
        result.kept_reachable = len(candidates)
        result.kept_all = exc.message
        return result
    pushed = None if include_unpushed else pushed_oids(repo)
    doomed = []
    kept = []
    for oid, mtime, size in candidates:
        if oid in reachable or _holds_live(repo.store, oid, reachable):
            result.kept_reachable += 1
        elif mtime > cutoff:
            result.kept_recent += 1
            kept.append(ObjectRef(oid, size))
        elif not include_unpushed and (pushed is None or oid not in pushed):
            result.kept_unpushed += 1
            kept.append(ObjectRef(oid, size))
        else:
            doomed.append((oid, size))
    # A chunked object kept for being recent or unpushed keeps its parts, however old they are.
    parts_of_kept = {ref.oid for ref in chunk_parts(repo.store, kept)}
    trash = repo.theta_dir / "trash"
    for oid, size in doomed:
        if oid in parts_of_kept:
            result.kept_reachable += 1
        elif dry_run or _delete(repo.store.path(oid), trash, oid, cutoff):
            result.deleted += 1
            result.bytes_freed += size
            result.oids.append(oid)
        else:
            result.restored += 1
    result.temp_files = _clean_temp(repo.store.root / "tmp", cutoff, dry_run)
    if not dry_run:
        _recover_trash(trash, repo.store, cutoff)
    return result


def _holds_live(store, oid, reachable):
    """True when ``oid`` is a pack holding an object a reachable manifest uses: a pack written by
    ``git theta repack`` is named by no manifest (they name the pack it replaced)."""
    from git_theta.errors import ObjectCorruptError

    try:
        members = store.pack_members(oid)  # None for anything that is not a pack
    except ObjectCorruptError:
        return False
    return bool(members) and not reachable.isdisjoint(members)


def _delete(path, trash, oid, cutoff):
    """Move ``path`` to the trash, re-check its time, unlink it; False if it was put back."""
    trash.mkdir(parents=True, exist_ok=True)
    aside = trash / f"{oid}.{os.getpid()}"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return True  # someone else deleted it: nothing to free, nothing lost
    try:
        if aside.stat().st_mtime > cutoff:
            # Freshened by a writer after the scan: it is in use again. Put it back unless a
            # writer already stored a fresh copy (then both are the same bytes and ours can go).
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
    except FileNotFoundError:  # a concurrent prune finished it (see _recover_trash)
        pass
    return True


def _recover_trash(trash, store, cutoff):
    """Finish what a prune killed half-way left in the trash: put back what is recent, drop the rest."""
    if not trash.is_dir():
        return
    for entry in trash.iterdir():
        oid = entry.name.split(".")[0]
        try:
            if entry.stat().st_mtime > cutoff and len(oid) == 64:
                target = store.path(oid)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(entry, target)
                except FileExistsError:
                    pass
            entry.unlink()
        except (FileNotFoundError, ManifestError):
            continue


def _clean_temp(tmp_dir, cutoff, dry_run):
    """Remove temp files of writers that died (older than the cutoff); return how many."""
    count = 0
    if not tmp_dir.is_dir():
        return 0
    for entry in tmp_dir.iterdir():
        try:
            if entry.stat().st_mtime <= cutoff:
                if not dry_run:
                    entry.unlink()
                count += 1
        except FileNotFoundError:
            continue
    return count
