"""``git theta fsck``: is every object the repository references present, intact and decodable?

Three checks, each reported with the file, the tensor, the commit (or index) and the object id:

1. every object a reachable manifest lists is in the store (``missing``);
2. its bytes have the size the manifest says and hash to its id (``corrupt``), streamed in 1 MiB
   chunks so memory stays flat (a packed object is checked as its pack, whose hash covers it);
3. every distinct tensor entry decodes through its whole delta chain to its tensor digest
   (``bad-tensor``), reusing :func:`git_theta.updates.chain.decode_tensor`, the same code checkout runs.

A manifest that does not parse is a ``bad-manifest`` problem. Objects and tensors shared by many
manifests are checked once; both passes run on a thread pool (hashlib, zstd and numpy release the
GIL), so memory is bounded by a few tensors, not by the repository.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from git_theta.updates.chain import decode_tensor
from git_theta.errors import GitThetaError, ManifestError, ObjectCorruptError, ObjectMissingError
from git_theta.manifest import Manifest
from git_theta.git.scan import iter_manifests


@dataclass
class Problem:
    """One thing wrong, with everything needed to find it."""

    kind: str  # missing | corrupt | bad-tensor | bad-manifest
    message: str
    path: str
    where: str  # "commit <id>", "index", ...
    commit: str | None = None
    tensor: str | None = None
    oid: str | None = None
    size: int | None = None
    other_uses: int = 0  # further manifests/tensors referencing the same object
    index: str | None = None  # for a part of a chunked object: the chunk index the manifest names

    def line(self):
        subject = f"tensor {self.tensor!r}" if self.tensor else "manifest"
        more = f" (and {self.other_uses} more uses)" if self.other_uses else ""
        return f"{self.kind}: {self.path}: {subject} ({self.where}): {self.message}{more}"

    def as_dict(self):
        return asdict(self)


@dataclass
class Report:
    manifests: int = 0
    objects: int = 0
    tensors: int = 0
    bytes_checked: int = 0
    problems: list = field(default_factory=list)

    @property
    def ok(self):
        return not self.problems

    def bad_objects(self):
        """ObjectRef-like (oid, size) of missing or corrupt objects, each once."""
        seen = {}
        for p in self.problems:
            if p.kind in ("missing", "corrupt") and p.oid:
                seen.setdefault(p.oid, p.size)
        return seen


@dataclass
class _ObjectUse:
    size: int
    use: object  # reachability.Use of the first manifest that lists it
    tensor: str | None  # the first tensor (None for a side blob such as a safetensors header)
    count: int = 1
    index: str | None = None  # for a part of a chunked object: the chunk index listing it


def collect(repo, scope):
    """Walk the reachable manifests; return (report with manifest problems, objects, tensor entries)."""
    report = Report()
    objects = {}  # oid -> _ObjectUse
    tensors = {}  # (digest, dtype, shape, chain) -> (entry, [use of every manifest listing it])
    for use, data in iter_manifests(repo, scope):
        report.manifests += 1
        try:
            manifest = Manifest.parse(data, source=use.path)
        except ManifestError as exc:
            report.problems.append(Problem("bad-manifest", exc.message, use.path, use.where, use.commit, oid=use.blob))
            continue
        # A packed object is checked as its pack: the pack's sha256 covers every member.
        # A member of a pack that repack replaced is checked on its own (its new pack is named by
        # no manifest).
        replaced = {}
        for key, ref in sorted(manifest.blobs.items()):
            _note(objects, _checked_as(repo.store, ref, replaced), use, None)
        for entry in manifest.tensors.values():
            for ref in entry.objects:
                _note(objects, _checked_as(repo.store, ref, replaced), use, entry.name)
            key = (entry.digest, entry.dtype, entry.shape, entry.objects)
            tensors.setdefault(key, (entry, []))[1].append((use, entry.name))
    report.objects = len(objects)
    report.tensors = len(tensors)
    return report, objects, tensors


def _chunk_parts(store, objects, bad, report):
    """{part oid: _ObjectUse} of the chunk indexes among the good ``objects``."""
    from git_theta.manifest import ObjectRef
    from git_theta.git.scan import chunk_parts

    parts = {}

    for oid, info in sorted(objects.items()):
        if oid in bad:
            continue
        try:
            found = chunk_parts(store, [ObjectRef(oid, info.size)])  # only chunk indexes are read
        except ObjectCorruptError as exc:
            bad.add(oid)
            use = info.use
            report.problems.append(
                Problem(
                    "corrupt", exc.message, use.path, use.where, use.commit, info.tensor, oid, info.size, info.count - 1
                )
            )
            continue
        for ref in found:
            if ref.oid not in parts:
                parts[ref.oid] = _ObjectUse(ref.size, info.use, info.tensor, info.count, index=oid)
    return parts


def _checked_as(store, ref, replaced):
    """The object fsck verifies for ``ref``: its pack, or itself when that pack was replaced."""
    pack = ref.pack
    if pack is None:
        return ref
    gone = replaced.get(pack.oid)
    if gone is None:
        gone = replaced[pack.oid] = store.replaced(pack.oid) and not store.has(pack.oid)
    return ref if gone else ref.home


def _note(objects, ref, use, tensor):
    known = objects.get(ref.oid)
    if known is None:
        objects[ref.oid] = _ObjectUse(ref.size, use, tensor)
    else:
        known.count += 1


def fsck(repo, scope="head", threads=1):
    """Check everything reachable in ``scope`` ("head" or "all"); return a :class:`Report`."""
    report, objects, tensors = collect(repo, scope)
    store = repo.store

    def check_object(item):
        oid, info = item
        try:
            store.verify(oid, info.size)
            return oid, None
        except (ObjectMissingError, ObjectCorruptError) as exc:
            kind = "missing" if isinstance(exc, ObjectMissingError) else "corrupt"
            use = info.use
            message = f"object {oid} is missing" if kind == "missing" else exc.message
            if info.index:
                message += f" (a part of chunked object {info.index})"
            return oid, Problem(
                kind, message, use.path, use.where, use.commit, info.tensor, oid, info.size, info.count - 1, info.index
            )

    def check_tensor(item):
        """Decode one distinct (chain -> digest) pair; a problem for every manifest that uses it."""
        entry, uses = item
        try:
            decode_tensor(store, entry, uses[0][0].path, full=True)  # sha256, never the checksum
            return []
        except GitThetaError as exc:
            oid = entry.objects[0].oid if entry.objects else None
            # The message opens with the first use's file and tensor; each problem names its own.
            prefix = f"{uses[0][0].path}: tensor {uses[0][1]!r}: "
            message = exc.message[len(prefix) :] if exc.message.startswith(prefix) else exc.message
            return [Problem("bad-tensor", message, use.path, use.where, use.commit, name, oid) for use, name in uses]

    bad = set()
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="theta-fsck") as pool:
        for oid, problem in pool.map(check_object, sorted(objects.items())):
            if problem is None:
                report.bytes_checked += objects[oid].size
            else:
                bad.add(oid)
                report.problems.append(problem)
        # Chunked objects: the manifest names a chunk index; its parts are objects too.
        parts = _chunk_parts(store, objects, bad, report)
        for oid, problem in pool.map(check_object, sorted(parts.items())):
            if problem is None:
                report.bytes_checked += parts[oid].size
            else:
                bad.add(oid)
                bad.add(problem.index)  # its tensor cannot decode: the problem is this part
                report.problems.append(problem)
        report.objects += len(parts)
        # Decoding an entry with a known-bad object would only repeat that problem.
        decodable = [t for t in tensors.values() if not any(r.home.oid in bad for r in t[0].objects)]
        for problems in pool.map(check_tensor, decodable):
            report.problems.extend(problems)
    return report


def repair(repo, report):
    """Fetch every missing or corrupt object of ``report`` again from the remote.

    Corrupt objects are moved aside first (to ``theta/quarantine``) so the fetch can replace them.
    Returns the oids asked for. Needs the remote feature (``git_theta.remote``).
    """
    bad = report.bad_objects()
    if not bad:
        return []
    fetch = remote_fetcher()
    quarantine = repo.theta_dir / "quarantine"
    for oid in bad:
        path = repo.store.path(oid)
        if path.is_file():
            quarantine.mkdir(parents=True, exist_ok=True)
            path.replace(quarantine / oid)
    from git_theta.manifest import ObjectRef

    refs = [ObjectRef(oid, size) for oid, size in sorted(bad.items())]
    fetch(repo, refs)
    return [r.oid for r in refs]


def remote_fetcher():
    """The remote feature's ``fetch_refs(repo, refs)``, or a clear error when it is not there."""
    try:
        from git_theta.remote.transfer import fetch_refs
    except ImportError:
        raise GitThetaError(
            "fsck --repair needs the remote feature (fetching objects from the LFS server), "
            "which this installation of git-theta does not have",
            hint="upgrade git-theta, or copy the objects from a clone that has them into "
            ".git/theta/objects and run 'git theta fsck' again",
        ) from None
    return fetch_refs
