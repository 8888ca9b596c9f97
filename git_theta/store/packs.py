"""Packs: many small objects stored, kept and transferred as one ordinary object.

A checkpoint of 20,000 small tensors would otherwise be 20,000 files, each with its own temp file,
fsync, rename, directory entries and LFS transfer. Objects of at most ``theta.packThreshold``
bytes (2 MiB by default) written during one clean are collected in memory and written as a pack
when the clean ends or the pack reaches ``theta.packSize`` bytes (64 MiB): one fsync and one rename
per pack. Tensors of at most ``theta.rawThreshold`` bytes (256 KiB) go in as their own bytes
(``raw``); larger ones as the objects their encoding makes (a dense keyframe, a delta). A pack is
an ordinary content-addressed object (its oid is the sha256 of its bytes), so any Git LFS server
holds it unchanged.

Each member keeps its own identity: its oid is the sha256 of its bytes, exactly as if it were
stored on its own, so dedup (an unchanged tensor costs no new bytes, in whichever pack it is),
delta chains and verification work as before. A manifest names the pack beside each packed object
(``<oid>:<size>@<n>``, see :mod:`git_theta.manifest`), which is what fetch, push, prune and fsck
follow: a pack is kept and moved while any manifest references an object in it.

Layout (all integers little-endian)::

    b"GTPACK1\\n"                       8 bytes
    count                               u64
    count x (oid: 32 bytes, offset: u64, size: u64), sorted by oid
    the members' bytes, at their offsets

The index is at the front so a reader finds a member with one binary search and one read. The
members' bytes follow in the order they were added (since stop 22; readers go by the offsets, so
older packs, laid out in oid order, read the same): the small tensors of one clean lie in the pack
as they lie in the file, and checkout writes a run of them as one slice of the pack. Every
number in it is checked against the pack's size before use: a pack from a server is untrusted until
its sha256 matched the oid the manifest names, and even then its index is bounds-checked.
"""

import array
import bisect
import hashlib
import itertools
import operator
import struct
import sys
import threading

from git_theta.errors import ObjectCorruptError
from git_theta.manifest import ObjectRef

MAGIC = b"GTPACK1\n"
_COUNT = struct.Struct("<Q")
_ENTRY = struct.Struct("<32sQQ")
HEAD = len(MAGIC) + _COUNT.size
DEFAULT_THRESHOLD = 2 << 20  # objects up to this many bytes go into packs
RAW_THRESHOLD = 256 << 10  # tensors up to this many bytes are stored raw in a pack
DEFAULT_SIZE = 64 << 20


def is_pack(head):
    """True when ``head`` (the first bytes of an object) starts like a pack."""
    return bytes(head[: len(MAGIC)]) == MAGIC


BLOCK = 1 << 20  # members are joined into blocks of about this size for hashing and writing


def pack_bytes(members):
    """The bytes of a pack holding ``members`` ({oid hex: bytes}), as an iterator of parts.

    The index is sorted by oid; the members' bytes follow in ``members``' order. Small members
    come joined into parts of about 1 MiB (each hashed and written while it is in cache, in one
    call: not 200,000 calls of a few hundred bytes, nor a Python step per member); a member
    larger than that comes as it is."""
    values = list(members.values())
    sizes = list(map(len, values))
    yield _index_bytes(list(members), sizes)
    ends = list(itertools.accumulate(sizes))
    start, done = 0, 0
    while start < len(values):
        stop = bisect.bisect_right(ends, done + BLOCK, start)
        if stop == start:  # larger than a block
            yield values[start]
            stop = start + 1
        else:
            yield b"".join(values[start:stop])
        done, start = ends[stop - 1], stop


#: packs of at least this many members get their index built with numpy: its import (~0.1 s)
#: costs more than sorting 50,000 ids in Python, less than sorting 200,000 (0.65 s)
NUMPY_MEMBERS = 50_000


def _index_bytes(oids, sizes):
    """The head and index of a pack whose members ``oids`` of ``sizes`` bytes follow it in this
    order; the index lists them sorted by oid.

    Built a column at a time (each byte of an entry is one strided copy over all entries), not
    an entry at a time: 200,000 members took 0.3 s one by one."""
    count = len(oids)
    if count >= NUMPY_MEMBERS:
        return _index_bytes_numpy(oids, sizes)
    start = HEAD + _ENTRY.size * count
    placed = list(itertools.accumulate(sizes[:-1], initial=start)) if count else []
    order = sorted(range(count), key=oids.__getitem__)
    offsets = array.array("Q", map(placed.__getitem__, order))
    lengths = array.array("Q", map(sizes.__getitem__, order))
    if sys.byteorder != "little":
        offsets.byteswap()
        lengths.byteswap()
    table = bytearray(_ENTRY.size * count)
    oid_bytes = bytes.fromhex("".join(map(oids.__getitem__, order)))
    offset_bytes, length_bytes = offsets.tobytes(), lengths.tobytes()
    for k in range(32):
        table[k :: _ENTRY.size] = oid_bytes[k::32]
    for k in range(8):
        table[32 + k :: _ENTRY.size] = offset_bytes[k::8]
        table[40 + k :: _ENTRY.size] = length_bytes[k::8]
    return MAGIC + _COUNT.pack(count) + bytes(table)


def _index_bytes_numpy(oids, sizes):
    """:func:`_index_bytes` with numpy: the same bytes (the tests compare the two)."""
    import numpy as np

    count = len(oids)
    ids = np.frombuffer(bytes.fromhex("".join(oids)), dtype=np.uint8).reshape(count, 32)
    # Each id's first 8 bytes as one number (big-endian, so numbers sort as the ids do), made
    # native: one sort on it took a quarter of the time of a sort on four big-endian words.
    first = ids[:, :8].copy().view(">u8").ravel().astype(np.uint64)
    order = np.argsort(first)
    ranked = first[order]
    if count > 1 and not (ranked[1:] != ranked[:-1]).all():  # ids sharing their first 8 bytes
        order = np.lexsort(ids.view(">u8").T[::-1])  # last key first: the first word decides
    lengths = np.array(sizes, dtype=np.uint64)
    placed = np.empty(count, dtype=np.uint64)
    placed[0] = HEAD + _ENTRY.size * count
    np.cumsum(lengths[:-1], out=placed[1:])
    placed[1:] += placed[0]
    table = np.empty((count, _ENTRY.size), dtype=np.uint8)
    table[:, :32] = ids[order]
    table[:, 32:40] = placed[order].astype("<u8").view(np.uint8).reshape(count, 8)
    table[:, 40:48] = lengths[order].astype("<u8").view(np.uint8).reshape(count, 8)
    return MAGIC + _COUNT.pack(count) + table.tobytes()


class PackIndex:
    """The index of one pack, checked against the pack's size: its columns as read, the
    ``{member oid: (offset, size)}`` dict made only when asked for (:attr:`entries`), and
    :meth:`locate` to find many members at once without it."""

    def __init__(self, oid, raw, offsets, sizes):
        self.oid = oid
        self._raw = raw  # the index entries as stored: count x 48 bytes, meant sorted by oid
        self._offsets = offsets  # array('Q'), per entry
        self._sizes = sizes
        self._entries = None
        self._columns = None

    def __len__(self):
        return len(self._offsets)

    @property
    def entries(self):
        """``{member oid: (offset, size)}``."""
        if self._entries is None:
            hexed = self._raw.hex()
            starts = range(0, 96 * len(self), 96)
            keys = map(hexed.__getitem__, map(slice, starts, range(64, 96 * len(self) + 64, 96)))
            self._entries = dict(zip(keys, zip(self._offsets, self._sizes)))
        return self._entries

    @classmethod
    def read(cls, handle, oid, total):
        """Read and check the index at the front of an open pack of ``total`` bytes."""
        head = handle.read(HEAD)
        if len(head) < HEAD or not is_pack(head):
            raise ObjectCorruptError(f"pack {oid} is not a git-theta pack")
        (count,) = _COUNT.unpack_from(head, len(MAGIC))
        # Bound the index by the file before reading it: a tampered count cannot allocate.
        if count > (total - HEAD) // _ENTRY.size:
            raise ObjectCorruptError(f"pack {oid} has a corrupt index (count {count})")
        raw = handle.read(_ENTRY.size * count)
        if len(raw) != _ENTRY.size * count:
            raise ObjectCorruptError(f"pack {oid} is truncated")
        start = HEAD + _ENTRY.size * count
        # Whole columns at once (200,000 members): the numbers read as one array of
        # little-endian u64 (6 per entry: 4 of oid, offset, size).
        words = array.array("Q", raw)
        if sys.byteorder != "little":
            words.byteswap()
        offsets, sizes = words[4::6], words[5::6]
        # The largest offset plus the largest size within the pack bounds every member's end
        # (two passes in C, where adding 200,000 pairs in Python took 20-30 ms); only when it
        # does not is each end checked.
        if count and (
            min(offsets) < start
            or (max(offsets) + max(sizes) > total and max(map(operator.add, offsets, sizes)) > total)
        ):
            raise ObjectCorruptError(f"pack {oid} has a member outside the pack")
        return cls(oid, raw, offsets, sizes)

    def locate(self, digests):
        """``(offsets, sizes, found)`` of the members whose ids are the rows of ``digests`` (a
        numpy array of 32-byte rows, uint8): numpy arrays, ``found`` False where this pack holds
        no such member (or its index is not sorted there: found by one binary search per row,
        each then compared in full, so a wrong index can only fail to find)."""
        import numpy as np

        if self._columns is None:
            table = np.frombuffer(self._raw, dtype=np.uint8).reshape(len(self), _ENTRY.size)
            self._columns = (
                np.ascontiguousarray(table[:, :8]).view(">u8").ravel(),  # the oids' first 8 bytes, in order
                table[:, :32],
                np.frombuffer(self._offsets, dtype=np.uint64),
                np.frombuffer(self._sizes, dtype=np.uint64),
            )
        keys, oids, offsets, sizes = self._columns
        if not len(keys):
            nothing = np.zeros(len(digests), dtype=np.uint64)
            return nothing, nothing, np.zeros(len(digests), dtype=bool)
        wanted = np.ascontiguousarray(digests[:, :8]).view(">u8").ravel()
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        found = (oids[at] == digests).all(axis=1)
        return offsets[at], sizes[at], found


class PackWriter:
    """Collects small objects of one clean and writes them as packs (thread-safe).

    ``add`` returns the member's ObjectRef at once; its ``pack`` is a :class:`PendingPack` whose
    oid and size are set when the pack is written (:meth:`flush`), before any manifest naming it
    is handed to git. An object already in a pack the store had loaded is not added again (a
    file's unchanged header blob, say); loose objects are not looked for (clean finds unchanged
    tensors by their digest before encoding), which keeps this free of per-object file system calls.

    A pack that fills up is hashed and written on a thread of its own while the next one fills
    (hashing 64 MiB blocked the clean's reading thread for ~0.1 s); at most one is in flight, so
    memory stays within two packs, and :meth:`flush` writes the last one meanwhile.
    """

    def __init__(self, store, limit):
        self._store = store
        self._limit = limit
        self._lock = threading.Lock()
        self._pack = PendingPack()
        self._members = {}  # oid -> bytes of the pack being filled
        self._sequential = set()  # those of them added by add_many (one thread, in file order)
        self._bytes = 0
        self._writing = []  # (members, pack, future) of packs being written, oldest first
        self._flushing = {}  # members of the last pack while flush writes it
        self._thread = None

    def add(self, data, oid=None):
        oid = oid or hashlib.sha256(data).hexdigest()
        (home,) = self._add_all([oid], [data], in_order=False)
        return ObjectRef(oid, len(data), home)

    def add_many(self, oids, datas):
        """:meth:`add` for many small objects whose sha256 ids the caller computed, in file order
        (laid out first, in this order: see :meth:`_take`): for each, the pack it is in (a
        :class:`PendingPack`, or the ObjectRef of a stored pack), under one lock and with no
        ObjectRef made per object."""
        return self._add_all(oids, datas, in_order=True)

    def _add_all(self, oids, datas, in_order):
        """The pack of each object added (``in_order``: by add_many); an object already in the
        pack being filled, one being written, or a stored pack is not added again."""
        homes, full = [], []
        stored = self._store.packed_ref if self._store.holds_packs() else None
        with self._lock:
            writing = [(members, pack) for members, pack, _ in self._writing]
            members, pack, used, sequential = self._members, self._pack, self._bytes, self._sequential
            if in_order and stored is None and not writing and len(sequential) == len(members):
                # The usual run: all new, distinct, fitting the pack being filled; added a
                # column at a time (200,000 members one by one took 0.3 s).
                total = sum(map(len, datas))
                fits = HEAD + _ENTRY.size * (len(members) + len(oids)) + used + total <= self._limit
                if fits and members.keys().isdisjoint(oids) and len(set(oids)) == len(oids):
                    members.update(zip(oids, datas))
                    sequential.update(oids)
                    self._bytes = used + total
                    return [pack] * len(oids)
            for oid, data in zip(oids, datas):
                if oid in members:
                    homes.append(pack)
                    continue
                size = len(data)
                home = next((other for held, other in writing if oid in held), None) if writing else None
                if home is None and stored is not None:
                    ref = stored(oid)  # in a pack this store knew when packing began
                    if ref is not None and ref.size == size:
                        home = ref.pack
                if home is not None:
                    homes.append(home)
                    continue
                # A pack never exceeds the limit (theta.packSize, and the host's theta.maxObjectSize).
                if members and HEAD + _ENTRY.size * (len(members) + 1) + used + size > self._limit:
                    self._bytes = used
                    full.append(self._take())
                    writing.append(full[-1])  # its members are found there from now on
                    members, pack, used, sequential = self._members, self._pack, 0, self._sequential
                members[oid] = data
                if in_order:
                    sequential.add(oid)
                used += size
                homes.append(pack)
            self._bytes = used
        for taken in full:
            self._start(*taken)
        return homes

    def pending(self, oid):
        """The bytes of a member not yet written, or None."""
        with self._lock:
            for members in (self._members, self._flushing, *(members for members, _, _ in self._writing)):
                data = members.get(oid)
                if data is not None:
                    return data
            return None

    def _take(self):
        """The members of the pack being filled, in the order they are laid out, and its pack.

        Members from :meth:`add_many` (runs of a file's small tensors, added in file order by
        the reading thread) come first, in that order, so checkout finds them back to back;
        members :meth:`add` got (from any worker thread, in whatever order the workers finish)
        follow, sorted by oid: the same file always makes the same pack."""
        members, pack, sequential = self._members, self._pack, self._sequential
        self._members, self._pack, self._bytes, self._sequential = {}, PendingPack(), 0, set()
        if len(sequential) != len(members):
            laid = {oid: data for oid, data in members.items() if oid in sequential}
            laid.update((oid, members[oid]) for oid in sorted(members) if oid not in sequential)
            members = laid
        return members, pack

    def _start(self, members, pack):
        """Write a full pack on the pack thread, once the one before it is written."""
        from concurrent.futures import ThreadPoolExecutor

        self._wait()
        with self._lock:
            if self._thread is None:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="theta-pack")
            self._writing.append((members, pack, self._thread.submit(self._write, members, pack)))

    def _wait(self):
        """Wait for the packs being written; raises what writing one raised."""
        while True:
            with self._lock:
                if not self._writing:
                    return
                future = self._writing[0][2]
            try:
                future.result()
            finally:
                with self._lock:
                    self._writing.pop(0)

    def _write(self, members, pack):
        if not members:
            return
        ref = self._store.put_chunks(pack_bytes(members), split=False, pack=False)
        pack.oid, pack.size = ref.oid, ref.size
        pack.order, pack.start = list(members), HEAD + _ENTRY.size * len(members)

    def flush(self):
        """Write the pack being filled (one temp file, one fsync, one rename) on this thread
        while the pack thread finishes the one before, then wait for that one.

        The two are hashed and fsynced at once: nothing else is left to do by then (the manifest
        needs both ids), and one after the other they were the tail of every large clean (an
        84 MB add: the 64 MiB pack's write and fsync, then the last 17 MB's). No member is in
        both, so the order they are recorded in does not matter; memory stays within two packs.
        """
        with self._lock:
            members, pack = self._take()
            self._flushing = members
        try:
            self._write(members, pack)
        finally:
            with self._lock:
                self._flushing = {}
            self._wait()

    def close(self):
        """Wait for a pack still being written (its error, if any, is not raised: the caller is
        already failing) and stop the pack thread."""
        try:
            self._wait()
        except Exception:  # noqa: BLE001 - an unreferenced pack at worst; prune removes it
            pass
        if self._thread is not None:
            self._thread.shutdown()
            self._thread = None


class PendingPack:
    """The pack a member is going into; ``oid`` and ``size`` are set once it is written, with
    ``order``, its members' ids in the order their bytes follow one another from offset
    ``start`` (what the clean that wrote it needs to record the layout of its file)."""

    __slots__ = ("oid", "size", "order", "start")

    def __init__(self):
        self.oid = None
        self.size = None
        self.order = None
        self.start = None
