"""The content-addressed object store shared by all worktrees of a repository.

Objects live at ``<git common dir>/theta/objects/ab/cd/<oid>`` where the oid is the sha256 of the
stored bytes, exactly the Git LFS object id, so any LFS server can hold them unchanged. Writes go to
a temporary file on the same file system, are fsynced and renamed into place, so a crash never leaves
a partial object under a real name. A reader that finds an object whose bytes no longer match its id
reports it; nothing corrupt is ever returned as good data.

Small objects written inside :meth:`ObjectStore.packing` go into packs instead
(:mod:`git_theta.store.packs`); every method here finds an object wherever it is, loose or packed.
Which stored objects are packs is recorded by a marker file ``theta/packs/<pack oid>``, written
once the pack's members were checked against their ids; it holds the pack's xxh3-128 then, so a
later checkout can tell the pack is unchanged without hashing every member (:meth:`ObjectStore.intact_pack`).
"""

import hashlib
import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from git_theta.errors import DiskFullError, ObjectCorruptError, ObjectMissingError
from git_theta.manifest import ObjectRef, check_oid
from git_theta.config import DEFAULTS
from git_theta.store.trust import max_chain_objects
from git_theta.testhooks import kill_point

READ_CHUNK = 1 << 20
#: what a pack's marker holds: the xxh3-128 of the pack as this clone checked it
PACK_CHECKSUM = "xxh3-128:"


class ObjectStore:
    """Content-addressed storage of immutable byte objects."""

    def __init__(self, root, fsync=True, max_object_size=0, pack_threshold=None, pack_size=None, raw_threshold=None):
        from git_theta.store import packs

        self.root = Path(root)
        self.fsync = fsync
        self.max_object_size = max_object_size  # 0: never split (see chunked.py)
        # Set by the repository (Repo.store): the trust ledger and the longest chain decoding
        # accepts. Without a ledger nothing is trusted, so every decode is sha256-verified.
        self.trust = None
        self.max_chain_objects = max_chain_objects(DEFAULTS["maxChainDepth"][0])
        # Also set by the repository: dense keyframes of at least this many bytes are encoded in
        # pieces on this many threads while they are written (git_theta/tensors/streaming.py).
        self.stream_threshold = DEFAULTS["streamThreshold"][0]
        self.threads = 1
        self.pack_threshold = packs.DEFAULT_THRESHOLD if pack_threshold is None else pack_threshold
        self.raw_threshold = packs.RAW_THRESHOLD if raw_threshold is None else raw_threshold
        self.pack_size = packs.DEFAULT_SIZE if pack_size is None else pack_size
        if max_object_size:  # a pack is an object: it must fit the host too
            self.pack_size = min(self.pack_size, max_object_size)
            self.pack_threshold = min(self.pack_threshold, self.pack_size // 4)
        self._tmp = self.root / "tmp"
        self._root_text = str(self.root)
        self._packs_dir = self.root.parent / "packs"  # beside objects/: every file in there is an object
        self._indexes = {}  # pack oid -> PackIndex, of the packs loaded so far, in load order
        self._member_map = None  # member oid -> pack oid: see _members
        self._pack_sizes = {}  # pack oid -> size
        self._pack_refs = {}  # pack oid -> its ObjectRef, one per pack (see packed_ref)
        self._packs_seen = None  # mtime of the packs folder when it was last listed
        self._fresh_packs = set()  # packs this process has freshened already
        self._pack_maps = {}  # pack oid -> read-only mmap of it (members are read as slices)
        self._intact = set()  # packs whose checksum intact_pack matched in this process
        self._packs_lock = threading.Lock()
        self._packer = None

    def path(self, oid):
        """Filesystem path of an object (the oid is validated: never a path fragment)."""
        check_oid(oid)
        return self.root / oid[:2] / oid[2:4] / oid

    def _loose(self, oid):
        """Path text of a loose object (cheaper than :meth:`path` for per-tensor calls)."""
        check_oid(oid)
        return os.path.join(self._root_text, oid[:2], oid[2:4], oid)

    def has(self, oid):
        return (
            self._member(oid) is not None
            or os.path.isfile(self._loose(oid))
            or self._member(oid, reload=True) is not None
        )

    # -- packs ----------------------------------------------------------------------------------
    @contextmanager
    def packing(self):
        """Within this block, objects of at most ``pack_threshold`` bytes go into packs, written
        when the block ends (or a pack is full). An exception discards the pack being filled:
        nothing references it yet."""
        from git_theta.store.packs import PackWriter

        if self.pack_threshold <= 0 or self._packer is not None:
            yield
            return
        self._load_packs()
        self._packer = packer = PackWriter(self, self.pack_size)
        try:
            yield
            packer.flush()
        finally:
            packer.close()
            self._packer = None

    @property
    def raw_limit(self):
        """Tensors of at most this many bytes are stored as their own bytes (``raw``) in a pack."""
        return min(self.raw_threshold, self.pack_threshold)

    def stores_raw(self, nbytes):
        """True when a tensor of ``nbytes`` keyframed now is stored raw in the pack being filled
        (and found by its digest among packs' members). A larger one is encoded, and its objects
        still go into the pack when they are at most ``pack_threshold`` bytes."""
        return self._packer is not None and nbytes <= self.raw_limit

    def put_raw(self, data, oid):
        """Store a small tensor's own bytes in the pack being filled; ``oid`` is their sha256,
        which the caller computed (the tensor digest: no second hash). Returns the ObjectRef."""
        return self._packer.add(data, oid)

    def holds_packs(self):
        """True when a pack was loaded (so an object may be found in one)."""
        return bool(self._indexes)

    def put_raw_many(self, oids, datas):
        """:meth:`put_raw` for many small tensors: the pack each is in (see PackWriter.add_many)."""
        return self._packer.add_many(oids, datas)

    def member(self, oid):
        """``(pack oid, offset, size)`` of packed object ``oid`` in a pack here, or None."""
        return self._member(oid, reload=True)

    def _member(self, oid, reload=False):
        """(pack oid, offset, size) of a packed object, or None."""
        pack = self._members.get(oid)
        if pack is None and reload:
            self._load_packs()
            pack = self._members.get(oid)
        index = None if pack is None else self._indexes.get(pack)  # None: forgotten meanwhile
        return None if index is None else (pack, *index.entries[oid])

    def _load_packs(self):
        """Read the index of every pack recorded since the packs folder was last listed."""
        try:
            seen = os.stat(self._packs_dir).st_mtime_ns
        except FileNotFoundError:
            return
        with self._packs_lock:
            if seen == self._packs_seen:
                return
            for name in os.listdir(self._packs_dir):
                if len(name) == 64 and name not in self._pack_sizes:
                    try:
                        self._index_pack(name, verify=False)
                    except (OSError, ObjectCorruptError):
                        continue  # pruned or damaged: its members are missing (fsck says which)
            self._packs_seen = seen

    def _index_pack(self, oid, verify):
        """Record the members of stored pack ``oid``. With ``verify`` (a pack this clone did not
        write) every member is hashed first: an index's claims are not trusted."""
        from git_theta.store.packs import PackIndex

        path = self._loose(oid)
        with open(path, "rb") as handle:
            total = os.fstat(handle.fileno()).st_size
            index = PackIndex.read(handle, oid, total)
            if verify:
                for member, (offset, size) in index.entries.items():
                    data = os.pread(handle.fileno(), size, offset)
                    if hashlib.sha256(data).hexdigest() != member:
                        raise ObjectCorruptError(f"pack {oid}: member {member} does not match its id")
        self._indexes[oid] = index
        # The member map is made again when next asked for (the pack loaded first still wins):
        # updating it now cost 0.2 s per 200,000-member pack a clean writes, asked for or not.
        self._member_map = None
        self._pack_sizes[oid] = total

    @property
    def _members(self):
        """``{member oid: pack oid}`` of every pack loaded (a member in several packs: the first
        loaded); where in its pack is that pack's index's to say. Made when a single member is
        first asked about: a checkout of 200,000 raw tensors finds them a column at a time
        (:meth:`locate`) instead. Made of the packs' own dicts in C (``dict.fromkeys``): a tuple
        per member took 0.1-0.2 s for a 200,000-member pack, each re-add."""
        members = self._member_map
        if members is None:
            members = {}
            for oid, index in reversed(list(self._indexes.items())):  # the first loaded wins
                members.update(dict.fromkeys(index.entries, oid))
            self._member_map = members
        return members

    def pack_index(self, pack):
        """The PackIndex of stored pack ``pack``, or None when it is not here."""
        self._load_packs()
        return self._indexes.get(pack)

    def locate(self, pack, digests):
        """``(offsets, sizes, found)`` of the rows of ``digests`` (numpy, 32 bytes each) in
        stored pack ``pack`` (see :meth:`PackIndex.locate`), or None when it is not here."""
        index = self.pack_index(pack)
        return None if index is None else index.locate(digests)

    def in_pack(self, pack, oids):
        """For each of ``oids``, whether stored pack ``pack`` holds the object; the pack is
        freshened when it holds any, as :meth:`freshen` does for an object reused (once per
        process)."""
        index = self._indexes.get(pack) or self.pack_index(pack)
        entries = index.entries if index is not None else {}
        held = list(map(entries.__contains__, oids))
        if not any(held) or not self._freshen_pack(pack):
            return [False] * len(oids)
        return held

    def _register_pack(self, oid, verify, checksum=None):
        """Record a stored pack: index its members, then write its marker, which holds the
        xxh3-128 of the pack's bytes as they were when this clone checked (or wrote) them
        (``checksum``, when the writer took it on the way)."""
        self._index_pack(oid, verify)
        if checksum is None:
            import xxhash

            hasher = xxhash.xxh3_128()
            with open(self._loose(oid), "rb") as handle:
                while chunk := handle.read(READ_CHUNK):
                    hasher.update(chunk)
            checksum = hasher.hexdigest()
        self._packs_dir.mkdir(parents=True, exist_ok=True)
        # Not atomic, and need not be: a torn marker only fails intact_pack (members are then
        # verified one by one, as in a store from before markers held a checksum).
        (self._packs_dir / oid).write_text(PACK_CHECKSUM + checksum + "\n")

    def intact_pack(self, oid):
        """True when pack ``oid`` still holds the bytes this clone checked when it recorded the
        pack: every member's sha256 was its id then (a pack this clone wrote, or one it received
        and verified member by member), and an xxh3-128 of the whole pack, recorded in the local
        marker no fetch can write, matches now. Its members may then be used without a sha256
        each (the trusted fast path, DESIGN §12); checked once per process."""
        if oid in self._intact:
            return True
        try:
            recorded = (self._packs_dir / check_oid(oid)).read_text()
        except (OSError, UnicodeDecodeError):
            return False
        if not recorded.startswith(PACK_CHECKSUM):
            return False  # recorded before markers held a checksum
        mapped = self._pack_map(oid)
        if mapped is None:
            return False
        import xxhash

        if recorded.strip() != PACK_CHECKSUM + xxhash.xxh3_128_hexdigest(mapped):
            return False
        self._intact.add(oid)
        return True

    def pack_view(self, oid, offset, size):
        """A memoryview of ``size`` bytes at ``offset`` of stored pack ``oid`` (its mapping, no
        copy), or None when the pack is not here or is shorter. Drop it before :meth:`close`."""
        mapped = self._pack_map(oid)
        if mapped is None or offset + size > len(mapped):
            return None
        return memoryview(mapped)[offset : offset + size]

    def pack_oids(self):
        """The ids of the packs this store holds (recorded by their markers), sorted."""
        self._load_packs()
        return sorted(oid for oid in self._pack_sizes if os.path.isfile(self._loose(oid)))

    def _replaced_path(self, oid):
        check_oid(oid)
        return self.root.parent / "replaced" / oid

    def replaced(self, oid):
        """True when pack ``oid`` was rewritten by ``git theta repack``: the members reachable
        then are in another pack here, so the pack itself need not be fetched again."""
        return os.path.isfile(self._replaced_path(oid))

    def mark_replaced(self, oid, by):
        """Record that pack ``oid`` was repacked into pack ``by`` (written before it is deleted)."""
        path = self._replaced_path(oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(by + "\n")

    def unmark_replaced(self, oid):
        try:
            os.unlink(self._replaced_path(oid))
        except FileNotFoundError:
            pass

    def forget_pack(self, oid):
        """Forget a deleted pack: its marker, and members found only in it."""
        try:
            os.unlink(self._packs_dir / oid)
        except FileNotFoundError:
            pass
        with self._packs_lock:
            self._pack_sizes.pop(oid, None)
            self._pack_refs.pop(oid, None)
            self._intact.discard(oid)
            mapped = self._pack_maps.pop(oid, None)
            self._indexes.pop(oid, None)
            self._member_map = None  # made again: a member also in another pack is found there
        if mapped is not None:
            _unmap(mapped)

    def packed_ref(self, oid):
        """The ObjectRef (pack included) of an object in a pack already loaded, freshened; else None."""
        found = self._member(oid)
        if found is None or not self._freshen_pack(found[0]):
            return None
        pack = found[0]
        # One ref per pack, not one per member: a table of the members found (a re-add of
        # 200,000 tensors) then names a handful of packs, not thousands of copies of them.
        home = self._pack_refs.get(pack)
        if home is None:
            home = self._pack_refs[pack] = ObjectRef(pack, self._pack_sizes[pack])
        return ObjectRef(oid, found[2], home)

    def _freshen_pack(self, pack):
        if pack in self._fresh_packs:
            return True
        try:
            os.utime(self._loose(pack))
        except PermissionError:
            pass
        except FileNotFoundError:
            return False
        self._fresh_packs.add(pack)
        return True

    def pack_members(self, oid):
        """{member oid: size} of a stored pack (checked index), or None if ``oid`` is no pack."""
        from git_theta.store.packs import MAGIC, PackIndex

        try:
            with open(self._loose(oid), "rb") as handle:
                if handle.read(len(MAGIC)) != MAGIC:
                    return None
                handle.seek(0)
                index = PackIndex.read(handle, oid, os.fstat(handle.fileno()).st_size)
        except FileNotFoundError:
            return None
        return {member: size for member, (_, size) in index.entries.items()}

    def freshen(self, oid):
        """Mark an object as just used (its mtime); False when it is not present.

        Writers that find an object already stored, and clean when it reuses one, call this
        instead of :meth:`has`: ``git theta prune`` keeps recently touched objects and re-checks
        the time after moving an object aside, so an object being reused is never lost (the same
        rule as git's loose objects).
        """
        found = self._member(oid)
        if found is not None:
            return self._freshen_pack(found[0])
        packer = self._packer
        if packer is not None and packer.pending(oid) is not None:
            return True
        try:
            os.utime(self._loose(oid))
            return True
        except FileNotFoundError:
            found = self._member(oid, reload=True)
            return found is not None and self._freshen_pack(found[0])
        except PermissionError:  # a shared, read-only store: present, but prune is not ours to run
            return self.has(oid)

    def size(self, oid):
        """Stored size of an object, or None when it is not present."""
        found = self._member(oid)
        if found is not None:
            return found[2]
        try:
            return os.stat(self._loose(oid)).st_size
        except FileNotFoundError:
            found = self._member(oid, reload=True)
            return None if found is None else found[2]

    def _already_stored(self, oid, size):
        """True when object ``oid`` of ``size`` bytes is stored already (then freshened)."""
        if size <= self.pack_threshold:
            return self.size(oid) == size and self.freshen(oid)
        # Larger than a pack member (a pack, a tensor's object): only a loose copy can be it. The
        # member map is not asked, so a clean that just wrote a 200,000-member pack does not
        # make it (0.2 s) to store the next one.
        path = self._loose(oid)
        try:
            if os.stat(path).st_size != size:
                return False
            os.utime(path)
        except FileNotFoundError:
            return False
        except PermissionError:  # a shared, read-only store: present, but prune is not ours to run
            pass
        return True

    def put_chunks(self, chunks, expect=None, split=True, pack=True):
        """Store the concatenation of ``chunks`` (bytes-like); return its ObjectRef.

        Hashes while writing, so the data is never held twice. Writing an object that already
        exists costs the temp file only and leaves the existing object untouched. With ``expect``
        (an ObjectRef, e.g. a download) bytes whose size or sha256 differ never enter the store:
        the temp file is removed and ObjectCorruptError raised. Inside :meth:`packing`, a small
        object (``chunks`` a list) goes into the pack being filled instead.
        """
        packer = self._packer
        if packer is not None and pack and expect is None and isinstance(chunks, (list, tuple)):
            total = sum(len(c) for c in chunks)
            if total <= self.pack_threshold:
                return packer.add(b"".join(chunks))
        from git_theta.store.packs import MAGIC as PACK_MAGIC

        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="obj-")
        except OSError as exc:
            DiskFullError.check(exc, self.root, "storing an object")
            raise
        digest = hashlib.sha256()
        # A pack this clone writes (pack=False, nothing expected) records its xxh3 in its marker:
        # taken on the way, not by reading the pack back.
        checksum = None
        if pack is False and expect is None:
            import xxhash

            checksum = xxhash.xxh3_128()
        size = 0
        head = b""
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    if checksum is not None:
                        checksum.update(chunk)
                    out.write(chunk)
                    if size < len(PACK_MAGIC):
                        head += bytes(chunk[: len(PACK_MAGIC) - size])
                    size += len(chunk)
                if self.fsync:
                    out.flush()
                    os.fsync(out.fileno())
            kill_point()
            oid = digest.hexdigest()
            if expect is not None and (oid, size) != (expect.oid, expect.size):
                raise ObjectCorruptError(
                    f"object {expect.oid} arrived corrupt: {size} bytes hashing to {oid[:12]}…, "
                    f"expected {expect.size} bytes",
                    hint="the copy on the remote is damaged; re-push it from a clone that has it",
                )
            if split and expect is None and self.max_object_size and size > self.max_object_size:
                return self._split(tmp_name, oid, size)
            final = self.path(oid)
            if self._already_stored(oid, size):
                os.unlink(tmp_name)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp_name, final)
            kill_point()
            if head == PACK_MAGIC and oid not in self._pack_sizes:
                mine = checksum is not None  # written here: its members' ids were computed here
                self._try_register(oid, verify=not mine, checksum=checksum.hexdigest() if mine else None)
            return ObjectRef(oid, size)
        except BaseException as exc:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            DiskFullError.check(exc, self.root, "storing an object")
            raise

    def _try_register(self, oid, verify, checksum=None):
        """Record a pack just stored; anything else that merely starts like one stays an object."""
        try:
            self._register_pack(oid, verify, checksum)
        except ObjectCorruptError:
            if not verify:
                raise

    def put_bytes(self, data):
        return self.put_chunks([data])

    def _split(self, tmp_name, oid, size):
        """Store an over-large object as parts plus a chunk index; return the index's ref."""
        from git_theta.store import chunked

        step = self.max_object_size
        parts = []
        with open(tmp_name, "rb") as handle:
            for offset in range(0, size, step):
                parts.append(self.put_chunks(_blocks(handle, min(step, size - offset)), split=False))
        os.unlink(tmp_name)
        # Never packed: transfers find the parts by reading the index as a file of its own.
        return self.put_chunks([chunked.index_bytes(size, oid, parts)], split=False, pack=False)

    def chunk_parts(self, refs):
        """The parts of every chunk index among ``refs`` that is present locally."""
        from git_theta.store import chunked

        parts = []
        for ref in refs:
            if ref.size > chunked.MAX_INDEX or len(chunked.MAGIC) > ref.size or ref.pack is not None:
                continue
            try:
                with open(self.path(ref.oid), "rb") as handle:
                    data = handle.read(chunked.MAX_INDEX)
            except FileNotFoundError:
                continue
            index = chunked.as_index(data, ref.oid)
            if index is not None:
                parts.extend(index[2])
        return parts

    def missing(self, refs):
        """The refs (and parts of chunked objects) that are not in the store."""
        if not refs:
            return []
        members = self._members  # the common case, 200,000 times: a member of a loaded pack
        absent = [r for r in refs if r.oid not in members and not self.has(r.oid) and not self.replaced(r.oid)]
        return absent + [p for p in self.chunk_parts(refs) if not self.has(p.oid)]

    def read(self, oid, verify=False):
        """Return an object's bytes. With ``verify`` the sha256 is checked against the id.

        Readers that check the decoded tensor against its digest may skip ``verify``: that end to
        end check is stronger and catches the same corruption.
        """
        data = self._read_member(oid)
        if data is None:
            try:
                data = _map(self._loose(oid))
            except FileNotFoundError:
                data = self._read_member(oid, reload=True)
                if data is None:
                    raise ObjectMissingError(f"object {oid} is missing", oids=[oid]) from None
        elif not verify:
            return data  # a chunk index is never packed (_split): a member is always its own bytes
        if verify:
            self.verify_bytes(oid, data)
        from git_theta.store import chunked

        index = chunked.as_index(data, oid)
        if index is not None:
            return chunked.assemble(oid, index, lambda part: self.read(part, verify=True))
        return data

    def member_views(self, oids):
        """For each of ``oids``, a memoryview of the packed object's bytes inside its pack's
        mapping (no copy), or None when it is not in a pack mapped already. Unverified, like
        :meth:`read`; drop them before :meth:`close` (a mapping with views cannot be closed)."""
        members, maps, out = self._members, self._pack_maps, []
        for oid in oids:
            pack = members.get(oid)
            mapped = None if pack is None else maps.get(pack)
            index = None if mapped is None else self._indexes.get(pack)
            if index is None:
                out.append(None)  # not packed, or its pack not mapped yet: read() maps it
                continue
            offset, size = index.entries[oid]
            view = memoryview(mapped)[offset : offset + size]
            out.append(view if len(view) == size else None)
        return out

    def _read_member(self, oid, reload=False):
        """A packed (or still pending) object's bytes, or None."""
        found = self._member(oid, reload)
        if found is None:
            packer = self._packer
            return None if packer is None else packer.pending(oid)
        pack, offset, size = found
        mapped = self._pack_map(pack)
        if mapped is None:
            return None
        # A slice of the mapping: no system call per member (packs are never rewritten in place).
        data = mapped[offset : offset + size]
        if len(data) != size:
            raise ObjectCorruptError(f"pack {pack} is truncated (member {oid})")
        return data

    def _pack_map(self, pack):
        """The read-only mapping of stored pack ``pack`` (kept for the process), or None when it
        is not here. An empty file (a pack truncated on disk) cannot be mapped: its bytes are
        ``b""``, so every reader finds it shorter than it should be (a member's read says the pack
        is truncated, a slice is not there, its checksum does not match)."""
        mapped = self._pack_maps.get(pack)
        if mapped is not None:
            return mapped
        import mmap

        try:
            with open(self._loose(pack), "rb") as handle:
                # Mapped whole at once: a pack is read for most of its members, and one populate
                # costs less than a page fault per 64 KiB touched.
                flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
                mine = mmap.mmap(handle.fileno(), 0, flags=flags, prot=mmap.PROT_READ)
        except FileNotFoundError:
            return None
        except ValueError:  # empty
            return b""
        with self._packs_lock:
            mapped = self._pack_maps.setdefault(pack, mine)
        if mapped is not mine:
            mine.close()
        return mapped

    def close(self):
        """Close the packs kept open for reading."""
        with self._packs_lock:
            maps, self._pack_maps = self._pack_maps, {}
        for mapped in maps.values():
            _unmap(mapped)

    def verify(self, oid, size=None):
        """Check a stored object by streaming it through sha256 (memory: one chunk).

        Raises ObjectMissingError, or ObjectCorruptError when its size or hash is wrong.
        """
        digest = hashlib.sha256()
        actual_size = 0
        member = self._read_member(oid, reload=True) if not os.path.isfile(self._loose(oid)) else None
        try:
            if member is not None:
                digest.update(member)
                actual_size = len(member)
            else:
                with open(self.path(oid), "rb") as handle:
                    while chunk := handle.read(READ_CHUNK):
                        digest.update(chunk)
                        actual_size += len(chunk)
        except FileNotFoundError:
            raise ObjectMissingError(f"object {oid} is missing", oids=[oid]) from None
        if size is not None and actual_size != size:
            raise ObjectCorruptError(
                f"object {oid} has {actual_size} bytes, the manifest says {size}",
                hint="delete it and fetch it again: git theta fsck --repair",
            )
        if digest.hexdigest() != oid:
            raise ObjectCorruptError(
                f"object {oid} is corrupt (its bytes hash to {digest.hexdigest()[:12]}…)",
                hint="delete it and fetch it again: git theta fsck --repair",
            )

    @staticmethod
    def verify_bytes(oid, data):
        actual = hashlib.sha256(data).hexdigest()
        if actual != oid:
            raise ObjectCorruptError(
                f"object {oid} is corrupt (its bytes hash to {actual[:12]}…)",
                hint="delete it and fetch it again: git theta fetch",
            )

    def iter_oids(self):
        """Every oid present in the store."""
        if not self.root.is_dir():
            return
        for first in sorted(self.root.iterdir()):
            if len(first.name) != 2 or not first.is_dir():
                continue
            for second in sorted(first.iterdir()):
                for obj in sorted(second.iterdir()):
                    if len(obj.name) == 64:
                        yield obj.name


def _blocks(handle, count, block=1 << 20):
    """Yield ``count`` bytes of ``handle`` in blocks."""
    while count > 0:
        data = handle.read(min(block, count))
        if not data:
            raise OSError("object file shrank while it was being split")
        count -= len(data)
        yield data


MAP_THRESHOLD = 1 << 20


def _map(path):
    """An object's bytes: small ones read, large ones memory-mapped read-only.

    Mapping saves copying a large object out of the page cache before it is decoded. Objects are
    never rewritten in place (writes go to a temp file renamed over the name), so a mapping never
    sees its file change under it.
    """
    import mmap

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < MAP_THRESHOLD:
            return f.read()
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _unmap(mapped):
    """Close a pack's mapping; one a view still holds (a failed read's traceback) goes with it."""
    try:
        mapped.close()
    except BufferError:
        pass
