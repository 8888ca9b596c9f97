"""File layouts: how a many-tensor file is written, kept so that the same manifest is written
again without working it out anew.

A checkpoint whose tensors are small raw tensors in packs (a mixture-of-experts checkpoint, an
optimizer state) is written as its format's own bytes (a safetensors header) and slices of packs.
Working that out from a 200,000-line manifest is most of such a checkout: parsing the manifest,
finding every tensor in its pack's index and rendering the header took ~0.6 s, writing the bytes
~0.1 s (measured on the development machine, docs/storage.md). So the first smudge of a manifest
records the layout it wrote: the literal bytes (the header, and the few tensors it decoded, such
as a new version's changed tensors stored as deltas), and for each slice its pack, offset and
length. A later smudge of the same manifest bytes (back to a branch, a version checked out again)
replays it: a sha256 of the manifest, one cache lookup, the packs' check, and the writes. The add
of a version records the same layout from what it read (:class:`CleanRecord`), so even the first
checkout of a version added in this clone is a replay.

Trust (DESIGN §12): a layout lives in the local cache, which nothing a repository or a remote
ships can write, and only this clone's own smudge or clean records one, from intact packs and
tensors it verified before writing them (or hashed for the manifest it wrote). It is keyed by
the sha256 of the manifest bytes and the format's name and version, and stored with zstd's
checksum. Every pack it slices must still be intact
(:meth:`~git_theta.store.objects.ObjectStore.intact_pack`) when it is replayed; otherwise the
manifest is smudged as usual. A replay writes exactly the bytes the recorded smudge wrote.
"""

import hashlib
import itertools
import json
import operator
import threading

from git_theta import registry as plugins
from git_theta.manifest import is_raw


#: literal bytes (a format's headers, the few tensors decoded) a layout may hold; a smudge that
#: writes more than this outside pack slices, or decoded more than half its file, is not recorded:
#: its time goes to decoding, and its decoded bytes are not worth a place in the cache
LITERAL_LIMIT = 64 << 20
#: decoded bytes a layout may hold: a smudge that decodes more gives up its record at once, not
#: after copying 64 MiB of a dense model's tensors
DECODED_LIMIT = 16 << 20
#: the start of a stored layout
MAGIC = b"git-theta layout 1\n"
#: manifests from this size are written from a recorded layout when they were before (one with
#: fewer bytes cannot have the raw table, COLUMNS_FROM lines, that a layout is recorded for)
LAYOUT_FROM = 16 << 10


def layout_key(manifest, writer):
    """The cache key of the layout of ``manifest`` (its bytes as git hands them to the filter),
    as written by ``writer`` (the format and the version of the package that provides it: a new
    version may write a file differently, so its layouts are not those of the old one)."""
    digest = hashlib.sha256(MAGIC + writer.encode() + b"\0")
    digest.update(manifest)  # not joined first: a copy of a 24 MB manifest
    return digest.digest()


def layout_key_of(manifest, format_name):
    """The cache key of the layout of ``manifest`` (bytes) in format ``format_name``, or None:
    a manifest shorter than :data:`LAYOUT_FROM`, or a format no installed package provides."""
    if len(manifest) < LAYOUT_FROM:
        return None
    version = plugins.version("format", format_name)
    return layout_key(manifest, f"{format_name} {version}") if version is not None else None


class Layout:
    """A smudged file as ``parts``: ``[None, length, tensors]`` for literal bytes (the next of
    ``literals``), ``[pack number, offset, length, tensors]`` for a slice of ``packs[number]``.
    ``tensors`` counts the tensors a part holds (a crash point each, as in the smudge it replays)."""

    def __init__(self, packs, parts, literals, total, budgeted=0):
        self.packs = packs
        self.parts = parts
        self.literals = literals
        self.total = total  # bytes of the file
        # The bytes Smudger.write weighs against theta.memoryBudget to fingerprint the file for
        # the stat cache (its tensors' bytes; 0 when its format spools, which is always).
        self.budgeted = budgeted
        self.text = None  # the manifest it is the layout of (set when it is replayed)

    def to_bytes(self):
        """The layout as stored in the cache (zstd-compressed)."""
        import zstandard

        head = json.dumps(
            {"total": self.total, "budgeted": self.budgeted, "packs": self.packs, "parts": self.parts}
        ).encode()
        body = b"".join([MAGIC, b"%d\n" % len(head), head, *self.literals])
        # With zstd's own checksum: a layout damaged on disk fails to decompress, and is ignored.
        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(body)

    @classmethod
    def from_bytes(cls, stored):
        """The layout :meth:`to_bytes` stored, or None when ``stored`` is not one (a cache is a
        hint: anything unexpected means the manifest is smudged as usual)."""
        import zstandard

        try:
            body = zstandard.ZstdDecompressor().decompress(stored)
            if not body.startswith(MAGIC):
                return None
            length, _, rest = body[len(MAGIC) :].partition(b"\n")
            head = json.loads(rest[: int(length)])
            literal = memoryview(rest)[int(length) :]
            packs, parts, total, budgeted = head["packs"], head["parts"], int(head["total"]), int(head["budgeted"])
            literals, position, size = [], 0, 0
            for part in parts:
                if part[0] is None:
                    literals.append(literal[position : position + part[1]])
                    position += part[1]
                    size += part[1]
                elif isinstance(packs[part[0]], str) and min(part[1:]) >= 0:
                    size += part[2]
                else:
                    return None
        except (zstandard.ZstdError, ValueError, KeyError, TypeError, IndexError):
            return None
        if position != len(literal) or size != total:
            return None
        return cls(packs, parts, literals, total, budgeted)

    def pieces(self, store):
        """Yield ``(bytes, tensors)`` of the file in order: literal bytes and views of packs
        (each dropped before the next is yielded); None for a slice its pack no longer holds."""
        literals = iter(self.literals)
        for part in self.parts:
            if part[0] is None:
                yield next(literals), part[2]
                continue
            view = store.pack_view(self.packs[part[0]], part[1], part[2])
            try:
                yield view, part[3]
            finally:
                view = None


class _Parts:
    """A layout's parts as they are laid down, in file order: literal bytes that follow literal
    bytes join their part, and a slice that continues the last slice of the same pack joins it."""

    def __init__(self):
        self.packs = {}  # pack oid -> number
        self.parts = []
        self._pieces = []  # per literal part, its pieces (copies: a writer may reuse its buffers)

    def literal(self, data):
        """Literal bytes ``data`` come next."""
        size = memoryview(data).nbytes
        piece = data if type(data) is bytes else bytes(data)
        last = self.parts[-1] if self.parts else None
        if last is not None and last[0] is None:
            last[1] += size
            self._pieces[-1].append(piece)
        else:
            self.parts.append([None, size, 0])
            self._pieces.append([piece])

    def slice(self, pack, offset, size, tensors):
        """``size`` bytes of ``pack`` at ``offset``, holding ``tensors`` tensors, come next."""
        number = self.packs.setdefault(pack, len(self.packs))
        last = self.parts[-1] if self.parts else None
        if last is not None and last[0] == number and last[1] + last[2] == offset:
            last[2] += size
            last[3] += tensors
        else:
            self.parts.append([number, offset, size, tensors])

    def layout(self, total, budgeted):
        """The :class:`Layout` of the parts laid down (one piece is kept as it is, not copied)."""
        literals = [b"".join(pieces) for pieces in self._pieces]
        return Layout(list(self.packs), [list(p) for p in self.parts], literals, total, budgeted)


class LayoutRecorder:
    """The smudge's output, written through, with a record of its layout.

    The tensor source announces each slice of a pack it hands out (:meth:`expect`); when the
    format writes exactly that object next, it is recorded as the slice. Anything else written is
    recorded as literal bytes, up to :data:`LITERAL_LIMIT`: the format's own bytes, and the
    tensors the smudge decoded (a few changed tensors stored as deltas, verified as every decoded
    tensor is). A source that hands tensors to the format as arrays calls :meth:`abandon`.
    """

    def __init__(self, out, limit=LITERAL_LIMIT, decoded_limit=DECODED_LIMIT):
        self._out = out
        self._limit = limit
        self._decoded_limit = decoded_limit
        self._parts = _Parts()
        self._literal_bytes = 0
        self._decoded_bytes = 0
        self._total = 0
        self._expected = None
        self.broken = False

    def expect(self, view, pack, offset, tensors):
        """``view`` (of ``pack`` at ``offset``, holding ``tensors`` tensors) is handed out next."""
        self._expected = (view, pack, offset, tensors)

    def expect_decoded(self, data):
        """``data``, decoded tensors (verified), is handed out next: literal bytes that count
        against the half of the file a layout may have decoded."""
        self._expected = (data, None, None, None)

    def abandon(self):
        """Record nothing for this file."""
        self.broken = True
        self._parts = _Parts()

    def writable(self):
        return True

    def write(self, data):
        written = self._out.write(data)
        if not self.broken:
            self._note(data)
        return written

    def flush(self):
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()

    def _note(self, data):
        expected, self._expected = self._expected, None
        size = memoryview(data).nbytes
        self._total += size
        if expected is not None and expected[0] is data and expected[1] is None:
            self._decoded_bytes += size  # then kept below as literal bytes, as any other
            if self._decoded_bytes > self._decoded_limit:
                self.abandon()
                return
        elif expected is not None and expected[0] is data:
            _, pack, offset, tensors = expected
            self._parts.slice(pack, offset, size, tensors)
            return
        self._literal_bytes += size
        if self._literal_bytes > self._limit:
            self.abandon()
        else:
            self._parts.literal(data)

    def layout(self, budgeted=0):
        """The :class:`Layout` written (``budgeted``: see :class:`Layout`), or None (abandoned,
        mostly decoded, or not a slice of a pack in it)."""
        if self.broken or not self._parts.packs or 2 * self._decoded_bytes > self._total:
            return None
        return self._parts.layout(self._total, budgeted)


class CleanRecord:
    """What a clean read of a file, kept to record the layout its checkout will write: a version
    added here checks out from its layout the first time too (switching back to a branch, a
    reset, a stash), not only once a smudge has recorded one.

    A format whose file is its ``prelude`` (the bytes before the first tensor) followed by each
    tensor's bytes in the order read (safetensors) makes one; clean tells it each tensor read
    (:meth:`read`, in file order) and what it stored for each (:meth:`stored`). A tensor stored
    other than as its own bytes in a pack (a delta, a dense keyframe) is kept as literal bytes,
    up to :data:`DECODED_LIMIT` and half the file as for a smudge's decoded tensors; beyond that
    no layout is recorded. Its bytes are the ones clean hashed, so they are the tensor's.
    """

    def __init__(self, prelude, limit=DECODED_LIMIT):
        # A header past the literal limit (up to 100 MB in a hostile file) is not held a second time.
        self.broken = len(prelude) > LITERAL_LIMIT
        self.prelude = b"" if self.broken else bytes(prelude)
        self._names, self._sizes = [], []
        self._kept = {}  # name -> bytes of a tensor stored other than raw in a pack
        self._kept_bytes = 0
        self._limit = limit
        self._lock = threading.Lock()  # stored() is told from clean's workers

    def read(self, names, sizes):
        """Tensors ``names`` of ``sizes`` bytes come next in the file (the reading thread)."""
        if self.broken:
            return
        self._names += names
        self._sizes += sizes

    def stored(self, name, entry, data):
        """Tensor ``name`` (its bytes ``data``) is stored as ``entry``."""
        if self.broken or is_raw(entry):
            return
        with self._lock:
            self._kept_bytes += len(data)
            if self._kept_bytes > self._limit:
                self.broken = True
                self._kept = {}
            else:
                self._kept[name] = bytes(data)

    def layout(self, store, entries, table):
        """The :class:`Layout` of the file (the manifest's tensor ``entries`` and raw ``table``,
        their packs written), or None: a tensor not in a pack nor kept, a member not found where
        the manifest says, or too much kept."""
        budgeted = sum(self._sizes)  # as Smudger.write weighs a format that does not spool
        total = len(self.prelude) + budgeted
        if self.broken or table is None or 2 * self._kept_bytes > total:
            return None
        parts = _Parts()
        parts.literal(self.prelude)
        in_order = not entries and self._names == table.names and self._sizes == list(table.sizes)
        # Every tensor a row of the table, in its order (one dtype, names sorted), in the packs
        # this clean wrote, in their order (the first version of a file): where is known.
        written = _written_in_order(table) if in_order else None
        if written is not None:
            for pack, offset, size, count in written:
                parts.slice(pack, offset, size, count)
            return parts.layout(total, budgeted)
        location = locate_rows(store, table)
        if location is None:
            return None
        if in_order:  # the rows' stretches at once (a column at a time, 200,000 rows)
            for pack, offset, size, count in pack_slices(table, *location):
                parts.slice(pack, offset, size, count)
            return parts.layout(total, budgeted)
        rows = dict(zip(table.names, range(len(table))))
        numbers, offsets, sizes = location
        for name, size in zip(self._names, self._sizes):
            kept = self._kept.get(name)
            if kept is not None:
                parts.literal(kept)
                continue
            row = rows.get(name)
            if row is not None:
                found = (table.distinct[int(numbers[row])].oid, int(offsets[row]), int(sizes[row]))
            else:
                entry = entries.get(name)
                found = store.member(entry.digest) if entry is not None and is_raw(entry) else None
            if found is None or found[2] != size:
                return None
            parts.slice(found[0], found[1], size, 1)
        return parts.layout(total, budgeted) if parts.packs else None


def _written_in_order(table):
    """``[(pack oid, offset, size, rows)]``: the rows of ``table`` (a clean's own) as stretches
    of the packs that clean wrote, when each pack's rows are consecutive in the table and are
    its first members, in its order (as the first clean of a file lays them out); else None.
    No index is read, no numpy imported: the packs' own record of their order says where."""
    numbers, digests, sizes = table.numbers, table.digests, table.sizes
    found, row = [], 0
    while row < len(table):
        number = numbers[row]
        pack = table.distinct[number]
        order, count = getattr(pack, "order", None), numbers.count(number)
        if order is None or numbers[row : row + count].count(number) != count:
            return None
        if order[:count] != digests[row : row + count]:
            return None
        found.append((pack.oid, pack.start, sum(sizes[row : row + count]), count))
        row += count
    return found


#: raw tables of at least this many rows are located with numpy: its import (~55 ms) costs more
#: than looking up 20,000 rows one by one, less than looking up 200,000
NUMPY_ROWS = 50_000


def locate_rows(store, table):
    """``(numbers, offsets, sizes)``, one per row, of every raw table row's member in the pack
    its line names, or None when some row is not found there with its size. Found once per
    table (kept in ``table.location``), a column at a time: numpy arrays for a large table,
    lists for a small one."""
    if table.location is not None:
        return table.location
    # Not found is not kept: a fetch (Smudger._fetch_missing) may bring the packs meanwhile.
    large = len(table) >= NUMPY_ROWS
    if large and table.binary is None:  # a table clean made: its digests' bytes, once
        table.binary = bytes.fromhex("".join(table.digests))
    found = (_located_numpy if large else _located)(store, table)
    if found is not None:
        table.location = found
    return found


def _located(store, table):
    """:func:`locate_rows` row by row, in each pack's index dict."""
    indexes = [store.pack_index(pack.oid) for pack in table.distinct]
    if None in indexes:
        return None
    if len(indexes) == 1:
        found = list(map(indexes[0].entries.get, table.digests))
    else:  # each row in the index of its own pack, still with no Python step per row
        found = list(map(dict.get, map([index.entries for index in indexes].__getitem__, table.numbers), table.digests))
    if None in found:
        return None
    # A column at a time: zip(*found) would be one call with an argument per row.
    offsets, sizes = (list(map(operator.itemgetter(i), found)) for i in (0, 1))
    if sizes != table.sizes:
        return None
    return table.numbers, offsets, sizes


def _located_numpy(store, table):
    """:func:`locate_rows` with one binary search per pack over its index (numpy)."""
    import numpy as np

    digests = np.frombuffer(table.binary, dtype=np.uint8).reshape(len(table), 32)
    numbers = np.array(table.numbers, dtype=np.int64)
    offsets = np.zeros(len(table), dtype=np.uint64)
    sizes = np.zeros(len(table), dtype=np.uint64)
    # The rows of each pack, from one sort: a mask per pack would be packs x rows of work, and a
    # manifest may name as many packs as it has rows.
    order = np.argsort(numbers, kind="stable")
    bounds = np.searchsorted(numbers[order], np.arange(len(table.distinct) + 1))
    for number, pack in enumerate(table.distinct):
        rows = order[bounds[number] : bounds[number + 1]] if len(table.distinct) > 1 else slice(None)
        found = store.locate(pack.oid, digests[rows])
        if found is None or not found[2].all():
            return None
        offsets[rows], sizes[rows] = found[0], found[1]
    if not np.array_equal(sizes, np.array(table.sizes, dtype=np.uint64)):
        return None
    return numbers, offsets, sizes


def pick(column, at):
    """``column`` (a list or numpy array) at positions ``at``."""
    return list(map(column.__getitem__, at)) if isinstance(column, list) else column[at]


def pack_slices(table, numbers, offsets, sizes):
    """``(pack oid, offset, size, rows)`` of each stretch of rows (their ``numbers``, ``offsets``
    and ``sizes``: lists or numpy arrays, as :func:`locate_rows` gives, or some of them) lying
    back to back in one of ``table``'s packs."""
    count = len(offsets)
    if isinstance(offsets, list):
        follows = map(
            operator.and_,
            map(operator.eq, numbers[1:], numbers),
            map(operator.eq, offsets[1:], map(operator.add, offsets, sizes)),
        )
        breaks = list(itertools.compress(range(1, count), map(operator.not_, follows)))
    else:
        ends = offsets + sizes
        breaks = ((numbers[1:] != numbers[:-1]) | (offsets[1:] != ends[:-1])).nonzero()[0] + 1
        breaks = breaks.tolist()
    for first, stop in zip([0, *breaks], [*breaks, count]):
        begin = int(offsets[first])
        end = int(offsets[stop - 1]) + int(sizes[stop - 1])
        yield table.distinct[int(numbers[first])].oid, begin, end - begin, stop - first
