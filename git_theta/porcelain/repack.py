"""``git theta repack``: rewrite packs that hold dead tensors, keeping only the live ones.

A pack holds the small objects of one ``git add``. When history is rewritten (amend, rebase, a
deleted branch) some of its members may no longer be referenced by any reachable manifest while
others still are: ``git theta prune`` keeps the whole pack (it is one object), so the dead members'
bytes stay. Repack writes the live members of such a pack into a new pack and deletes the old one.

Manifests keep naming the old pack (they are in git history and cannot change): a member is found
by its own id in whichever local pack holds it, and the old pack is recorded as *replaced*
(``theta/replaced/<old pack id>``) so ``git theta fetch`` and checkout do not download it again
while every member they need is here. A replaced pack is downloaded again only when a manifest
needs a member that was dead when it was repacked (smudge fetches the packs of missing members).

What keeps a remote valid: a pack that reachable manifests name is replaced only when a remote is
recorded to hold it (``git theta push`` records what it uploaded), so a clone can still fetch
it and a later push never needs its bytes. Packs modified within ``theta.pruneExpire`` are left
alone (a running ``git add`` may be reusing their members).

Crash safety: the new pack is written (temp file, fsync, rename) and registered before the old one
is touched, then the replacement is recorded, then the old pack moves to the trash and is deleted
(put back if a writer freshened it meanwhile, as prune does). A crash at any point leaves every
member readable; running repack again finishes the job.
"""

import hashlib
import time
from dataclasses import dataclass, field

from git_theta.errors import GitThetaError, ObjectCorruptError
from git_theta.testhooks import kill_point


@dataclass
class RepackResult:
    packs_rewritten: int = 0
    members_kept: int = 0
    members_dropped: int = 0
    bytes_freed: int = 0
    kept_unpushed: int = 0  # partly dead, but the remote may lack it and manifests name it
    kept_recent: int = 0
    dry_run: bool = False
    new_packs: list = field(default_factory=list)

    def as_dict(self):
        return dict(self.__dict__)


def live_objects(repo):
    """(member oids, home oids) every reachable manifest references; refuses an unreadable one,
    which could name any member."""
    from git_theta.errors import ManifestError
    from git_theta.manifest import Manifest
    from git_theta.git.scan import iter_manifests

    members, homes = set(), set()
    for use, data in iter_manifests(repo, "all", work_trees=True):
        try:
            manifest = Manifest.parse(data, source=use.describe())
        except ManifestError as exc:
            raise GitThetaError(
                f"{use.describe()}: cannot be read, so no pack is repacked ({exc.message})",
                hint="fix or remove that manifest (git theta fsck --all lists it), then repack again",
            ) from None
        members.update(ref.oid for ref in manifest.member_objects())
        homes.update(ref.oid for ref in manifest.all_objects())
    return members, homes


def repack(repo, expire=3600, dry_run=False, now=None):
    """Rewrite every pack that holds unreferenced members; return a :class:`RepackResult`."""
    from git_theta.porcelain.prune import _delete, pushed_oids
    from git_theta.store.packs import pack_bytes

    store = repo.store
    result = RepackResult(dry_run=dry_run)
    cutoff = (time.time() if now is None else now) - (expire or 0)
    live, named = live_objects(repo)
    pushed = pushed_oids(repo) or set()
    for pack in store.pack_oids():
        members = store.pack_members(pack)
        if not members:
            continue
        keep = sorted(m for m in members if m in live)
        if not keep or len(keep) == len(members):
            continue  # all dead: prune deletes it; all live: nothing to reclaim
        path = store.path(pack)
        try:
            if path.stat().st_mtime > cutoff:
                result.kept_recent += 1
                continue
        except FileNotFoundError:
            continue
        if pack in named and pack not in pushed:
            result.kept_unpushed += 1
            continue
        dropped = len(members) - len(keep)
        result.packs_rewritten += 1
        result.members_kept += len(keep)
        result.members_dropped += dropped
        if dry_run:
            result.bytes_freed += sum(members[m] for m in members if m not in live)
            continue
        chosen = {}
        for oid in keep:
            data = store.read(oid)
            # The new pack is trusted as this clone's own: every member must be what its id says.
            if hashlib.sha256(data).hexdigest() != oid:
                raise ObjectCorruptError(
                    f"pack {pack}: member {oid} is corrupt; nothing of this pack was repacked",
                    hint="run 'git theta fsck --repair' to fetch it again",
                )
            chosen[oid] = data
        new = store.put_chunks(pack_bytes(chosen), split=False, pack=False)
        result.new_packs.append(new.oid)
        store.mark_replaced(pack, new.oid)
        kill_point()
        size = path.stat().st_size
        if _delete(path, repo.theta_dir / "trash", pack, cutoff):
            store.forget_pack(pack)
            result.bytes_freed += size - new.size
        else:  # freshened by a concurrent writer: it stays, with its members in both packs
            store.unmark_replaced(pack)
    return result
