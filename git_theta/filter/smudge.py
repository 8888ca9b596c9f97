"""Smudge: write a checkpoint back from its manifest, decoding tensors ahead in parallel.

A many-tensor file added or smudged before is written from the layout recorded then
(filter/layouts.py).

Content that is not a manifest (a file committed before it was tracked) passes through unchanged.
Every object is checked for presence before anything is written, so a missing object fails the file
cleanly; every decoded tensor is checked against its digest, so corrupt data is never written out.
Delta chains are decoded once per tensor; bases shared between tensors or files of one git command
(one filter process) are kept in a bounded cache (``theta.baseCache`` bytes).
"""

import itertools
import threading
from contextlib import contextmanager
from hashlib import sha256
from collections import Counter, deque
from itertools import repeat
from concurrent.futures import Future, ThreadPoolExecutor

from git_theta import registry as plugins
from git_theta.tensors.buffers import BufferPool, new_buffer, using
from git_theta.updates.chain import DecodedCache, decode_tensor, stream_tensor, streamable
from git_theta.errors import ObjectMissingError
from git_theta.filter.layouts import Layout, LayoutRecorder, layout_key_of, locate_rows, pack_slices, pick
from git_theta.formats.base import TensorSource
from git_theta.manifest import Manifest, ObjectRef, is_manifest, is_raw
from git_theta.config import settings_for
from git_theta.store.trust import batched
from git_theta.testhooks import kill_point, kill_points

BATCH_BYTES = 1 << 20  # consecutive tensors decoded by one worker task, up to this many bytes...
BATCH_TENSORS = 4096  # ...or this many (a future per tiny tensor costs more than the tensor)
EARLY_MIN = 16 << 20  # tensors from this size may be decoded ahead of file order (iter_data)


class StoreTensorSource(TensorSource):
    """Decodes a manifest's tensors from the store, a few ahead of the writer, within a byte budget."""

    def __init__(self, manifest, store, pool, path, budget, cache=None, buffers=None, workers=1, stream=False):
        self.blob_keys = set(manifest.blobs)
        # The manifest's raw shorthand lines stay columns (a RawTable) unless a format asks for
        # ``specs``: a run of them is written as slices of their packs (_raw_run).
        self._entries, self._table = manifest.columns()
        self._rows = None  # name -> row of the table + 1, made when first needed
        self._manifest = manifest
        self._store = store
        self._pool = pool
        self._path = path
        self._budget = budget
        self._cache = cache
        self._buffers = buffers  # a BufferPool when the format releases each tensor it is given
        self._workers = workers  # threads of ``pool``
        self._sizes = _SizeMemo()  # (dtype, shape) -> bytes
        self.recorder = None  # a LayoutRecorder told of every pack slice handed out
        # Huge keyframes handed on a piece at a time as they decode, checked after their last
        # byte: only for an output that is discarded when that check fails (git's filter process).
        self._stream = stream

    @property
    def specs(self):
        """``{name: TensorEntry}`` of every tensor (an entry per raw line, made on first use)."""
        return self._manifest.tensors

    def described(self):
        entries, table = self._entries, self._table
        if table is not None and not entries:
            return table.names, table.dtypes, table.shapes
        names, dtypes, shapes = list(entries), [e.dtype for e in entries.values()], [e.shape for e in entries.values()]
        if table is not None:
            names, dtypes, shapes = names + table.names, dtypes + table.dtypes, shapes + table.shapes
        return names, dtypes, shapes

    def _row_of(self):
        """``{name: row + 1}`` of the raw table (never 0, so a row is true)."""
        if self._rows is None:
            self._rows = dict(zip(self._table.names, range(1, len(self._table) + 1)))
        return self._rows

    def _spec(self, name):
        """The TensorEntry of ``name``, made from its table row if it has one."""
        entry = self._entries.get(name)
        if entry is None and self._table is not None:
            entry = self._table.entry(self._row_of()[name] - 1)
        return entry

    def _decode(self, entry):
        with using(self._buffers):  # None: plain new buffers
            return decode_tensor(self._store, entry, self._path, self._cache)

    def read_blob(self, key):
        ref = self._manifest.blobs[key]
        try:
            return self._store.read(ref.oid, verify=True)
        except ObjectMissingError:
            raise ObjectMissingError(
                f"{self._path}: object {ref.oid} ({key}) is missing",
                hint="fetch it with 'git theta fetch'",
                oids=[ref.oid],
            ) from None

    def _decode_many(self, entries, joined=False):
        """The decoded bytes of ``entries``, in order; ``joined``: one bytes object of them all
        (the run of small tensors a format writes back to back: one write instead of one each)."""
        read, out, data = self._store.read, [], None
        # Joined, a small tensor's bytes are a view of its mapped pack: copied once, into the run.
        views = self._store.member_views([e.digest for e in entries]) if joined else repeat(None)
        try:
            for entry, data in zip(entries, views):
                objects = entry.objects
                if len(objects) == 1 and objects[0].oid == entry.digest:  # is_raw, 200,000 times
                    # A small tensor stored as its own bytes: a slice of its pack, hashed with
                    # sha256 (its id is its digest, so no ledger lookup); anything amiss takes the
                    # full decode, which names the damage.
                    if data is None:
                        try:
                            data = read(entry.digest)
                        except ObjectMissingError:
                            data = None
                    if data is not None and sha256(data).hexdigest() == entry.digest:
                        out.append(data)
                        continue
                out.append(self._decode(entry))
            if not joined:
                return out
            # Into a recycled buffer (batches have the same few sizes): fresh memory for every
            # run cost more in page faults than the copy itself.
            with using(self._buffers):
                whole = new_buffer(sum(map(len, out)))
            target, position = memoryview(whole), 0
            for data in out:
                end = position + len(data)
                target[position:end] = data
                position = end
            del target
            out = [data for data in out if not isinstance(data, memoryview)]  # the pack's views go
            if self._buffers is not None:
                for data in out:
                    self._buffers.give(data)  # copied into ``whole``: free for the next tensor
            return [whole]
        finally:
            # No view of a pack outlives this call, even in a traceback that keeps this frame
            # (the pack could not be closed while one is held).
            views = out = data = None

    def total_bytes(self):
        """Bytes of all the tensors."""
        shapes = Counter((e.dtype, e.shape) for e in self._entries.values())
        total = sum(self._sizes[key] * count for key, count in shapes.items())
        return total + (sum(self._table.sizes) if self._table is not None else 0)

    def iter_data(self, names):
        if self.recorder is not None:
            self.recorder.abandon()
        return self._lent(self._decoded(names, joined=False))

    def iter_bytes(self, names):
        table = self._table
        if table is None:
            yield from self._joined(names)
            return
        if not self._entries and names == table.names:  # raw tensors only, in the table's order
            yield from self._raw_run(names, None)
            return
        rows = list(map(self._row_of().get, names))
        start = 0
        for raw, group in itertools.groupby(rows, key=bool):
            count = len(list(group))
            if raw:
                yield from self._raw_run(names[start : start + count], rows[start : start + count])
            else:
                yield from self._joined(names[start : start + count])
            start += count

    def _joined(self, names):
        """The decoded bytes of ``names``, in order: decoded ahead on the pool and handed on whole
        (batches of small tensors joined), except that with ``stream`` a huge keyframe
        (:func:`streamable`) is handed on a piece at a time as it decodes, in its place: no
        tensor-sized buffer, and git receives its first bytes while the rest decode."""
        entries, store, streamed = self._entries, self._store, []
        if self._stream:
            streamed = [i for i, name in enumerate(names) if name in entries and streamable(store, entries[name])]
        start = 0
        for at in [*streamed, len(names)]:
            if start < at:
                for _, data in self._lent(self._decoded(names[start:at], joined=True)):
                    if self.recorder is not None:
                        self.recorder.expect_decoded(data)
                    yield data
            if at < len(names):
                if self.recorder is not None:
                    self.recorder.abandon()  # no literal of bytes not yet checked, nor of a huge tensor
                yield from stream_tensor(store, entries[names[at]], self._path)
            start = at + 1

    def _raw_run(self, names, rows):
        """The bytes of the raw tensors ``names`` (table ``rows`` + 1; None: every row, in
        order): slices of their packs' mappings, one per stretch a pack holds back to back (a
        first clean lays a file's small tensors out in its pack as in the file). Used when every
        member is where the manifest says, in a pack that is intact (its members checked by this
        clone, its bytes unchanged since); otherwise each tensor is decoded and verified."""
        table, store = self._table, self._store
        location = locate_rows(store, table)
        if location is None or not all(store.intact_pack(pack.oid) for pack in table.distinct):
            yield from self._joined(names)
            return
        numbers, offsets, sizes = location
        if rows is not None:
            at = [row - 1 for row in rows]
            numbers, offsets, sizes = (pick(column, at) for column in location)
        for pack, begin, size, count in pack_slices(table, numbers, offsets, sizes):
            view = store.pack_view(pack, begin, size)
            if view is None:
                raise ObjectMissingError(f"{self._path}: pack {pack} is missing or truncated", oids=[pack])
            kill_points(count)  # a crash point per tensor, as in file order
            if self.recorder is not None:
                self.recorder.expect(view, pack, begin, count)
            try:
                yield view
            finally:
                view = None  # no view of a pack outlives its write (the pack could not be closed)

    def _lent(self, items):
        """``items`` (name, bytes), each buffer taken back once the next item is asked for: the
        format is done with it then (releases_tensors)."""
        for item in items:
            yield item
            if self._buffers is not None:
                self._buffers.give(item[1])
            del item

    def _decoded(self, names, joined):
        """Yield ``(name, bytes)`` for ``names`` in order (``joined``: a batch of small tensors
        as one item, named by its first), decoding ahead on the pool within the byte budget."""
        pending = deque()  # (names, sizes, future of their decoded bytes, joined), in file order
        early = {}  # position -> future: a large tensor being decoded ahead of file order
        in_flight = 0
        names = list(names)
        memo = self._sizes
        specs = {name: self._spec(name) for name in names}
        sizes = [memo[specs[name].dtype, specs[name].shape] for name in names]
        unsubmitted = sum(sizes)
        large = sorted((i for i, size in enumerate(sizes) if size >= EARLY_MIN), key=lambda i: -sizes[i])
        position = 0
        try:
            while position < len(names) or pending:
                # Keep decoding ahead while the bytes in flight stay under the budget; small
                # tensors go to a worker in batches (a future per 16-byte tensor costs more than
                # decoding it).
                while position < len(names) and (not pending or in_flight < self._budget):
                    if not early:
                        ahead = self._take_early(names, sizes, large, position, unsubmitted)
                        if ahead is not None:
                            early[ahead] = self._pool.submit(self._decode_many, [specs[names[ahead]]])
                            unsubmitted -= sizes[ahead]
                    if position in early:  # decoded ahead: its place in the file has come
                        pending.append(
                            (names[position : position + 1], sizes[position : position + 1], early.pop(position), False)
                        )
                        in_flight += sizes[position]
                        position += 1
                        continue
                    start, batch_bytes = position, 0
                    while (
                        position < len(names)
                        and position not in early
                        and position - start < BATCH_TENSORS
                        and batch_bytes < BATCH_BYTES
                    ):
                        batch_bytes += sizes[position]
                        position += 1
                    batch = [specs[name] for name in names[start:position]]
                    together = joined and len(batch) > 1
                    if batch_bytes < INLINE_BELOW * len(batch) and all(map(is_raw, batch)):
                        # Small raw tensors: a worker would only add hand-offs of the GIL.
                        job = done(self._decode_many(batch, together))
                    else:
                        job = self._pool.submit(self._decode_many, batch, together)
                    pending.append((names[start:position], sizes[start:position], job, together))
                    in_flight += batch_bytes
                    unsubmitted -= batch_bytes
                batch_names, batch_sizes, future, together = pending.popleft()
                decoded = future.result()
                if together:
                    in_flight -= sum(batch_sizes)
                    for _ in batch_names:  # a crash point per tensor, as in file order
                        kill_point()
                    yield batch_names[0], decoded.pop()
                    continue
                decoded.reverse()  # popped from the end: the list lets go of each tensor it yields
                for name, size in zip(batch_names, batch_sizes):
                    in_flight -= size
                    kill_point()
                    yield name, decoded.pop()
        finally:
            for _, _, future, _ in [*pending, *((None, None, f, None) for f in early.values())]:
                future.cancel()

    def _take_early(self, names, sizes, large, position, unsubmitted):
        """The position of a large tensor to decode now, ahead of file order, or None.

        Decoded in file order, a checkpoint's largest tensor (GPT-2's 150 MB embedding comes
        last) keeps one worker busy alone at the end while the other workers, the writer and git
        wait. It is started early once the other workers have about as much left to decode
        (twice that: a large tensor costs more per byte, its memory is fresh); then it finishes
        with them. One such tensor at a time; it counts against the budget from its place in
        the file on, so memory stays within the budget plus one tensor, as in file order.
        """
        while large and large[0] < position:
            large.pop(0)  # reached in file order already
        if not large or large[0] == position:
            return None
        size = sizes[large[0]]
        if 2 * size * (self._workers - 1) < unsubmitted - size:
            return None
        return large.pop(0)


#: batches of tensors averaging fewer bytes than this are processed in the calling thread. Hashing
#: a few KiB releases the GIL for microseconds, and a worker then waits for it behind the busy
#: reading or writing thread: measured on 20,000 tensors of 4 KiB with 1% changed, adding took
#: 0.82 s with workers and 0.68 s without.
INLINE_BELOW = 16 << 10


def _missing(store, manifest):
    """The ids of the objects ``manifest`` needs that ``store`` lacks (its raw table's members
    looked up a column at a time)."""
    entries, table = manifest.columns()
    if table is None:
        return [r.oid for r in store.missing(manifest.member_objects())]
    refs = [*manifest.blobs.values(), *(ref for e in entries.values() for ref in e.objects)]
    absent = [r.oid for r in store.missing(refs)]
    if locate_rows(store, table) is None:  # some not where the manifest says: asked one by one
        rows = [ObjectRef(d, size) for d, size in zip(table.digests, table.sizes)]
        absent += [r.oid for r in store.missing(rows)]
    return absent


def done(value):
    """A future already holding ``value`` (work done in place, where a future is expected)."""
    future = Future()
    future.set_result(value)
    return future


class _SizeMemo(dict):
    """``(dtype, shape) -> bytes``, computed once per distinct pair (20,000 tensors share a few)."""

    def __missing__(self, key):
        from git_theta.dtypes import nbytes

        size = self[key] = nbytes(*key)
        return size


class Smudger:
    """Smudges checkpoints for one repository (reused across files by the filter process)."""

    def __init__(self, repo, settings=None):
        self.repo = repo
        self.settings = settings or settings_for(repo)
        self._pool = None
        self._lock = threading.Lock()
        self.cache = DecodedCache(self.settings.get_int("baseCache"))
        self.buffers = BufferPool(self.settings.get_int("memoryBudget"))
        self._seen_bases = set()  # delta bases of the files smudged so far by this process

    def _executor(self):
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.threads(), thread_name_prefix="theta-smudge")
            return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def prepare(self, data, path):
        """Parse and check a manifest before any output: returns (manifest, format) or None.

        None means ``data`` is not a manifest and passes through unchanged. Raises for an unknown
        format or missing objects, naming the file, the tensors and the object ids. A manifest
        whose file this clone smudged before from intact packs gives ``(Layout, None)`` instead:
        :meth:`write` writes the file from the layout recorded then, without parsing it.
        """
        if not is_manifest(data) or self.settings.get_bool("skipSmudge"):
            return None  # skip-smudge: the manifest stays in the work tree (git theta checkout)
        key = self._layout_key(data)
        if key is not None:
            layout = self._recorded_layout(key)
            if layout is not None:
                layout.text = data
                return layout, None
        manifest = Manifest.parse(data, source=path)
        manifest.text = data  # what git has: the stat cache keeps it as is (no re-serializing)
        manifest.layout_key = key  # record how it is written (write)
        fmt = plugins.get("format", manifest.format, needed_by=path, package=manifest.fields.get(plugins.PACKAGE_FIELD))
        store = self.repo.store
        # Packed objects are checked one by one: a pack that is here may still lack one a
        # (damaged or hostile) manifest names.
        missing = _missing(store, manifest)
        if missing:
            self._fetch_missing(manifest, path)
            missing = _missing(store, manifest)
        if missing:
            first = set(missing)
            names = [n for n, e in sorted(manifest.tensors.items()) if any(r.oid in first for r in e.objects)]
            shown = ", ".join(repr(n) for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ObjectMissingError(
                f"{path}: {len(missing)} object(s) missing for tensor(s) {shown} (first: {missing[0]})",
                hint=f"the file holds its manifest for now; fetch the objects with 'git theta fetch', "
                f"then write the checkpoint with 'git theta checkout {path}'",
                oids=missing,
            )
        return manifest, fmt

    def plan(self, data, path):
        """What to write for ``data``: ``(prepared, missing)``.

        ``prepared`` is :meth:`prepare`'s result, or None to pass ``data`` through unchanged. A
        file whose objects are missing passes through too: git stops a checkout at the first file
        whose filter fails, so the manifest stays in place (as Git LFS leaves pointer files) and
        every other file still checks out. ``missing`` is then the ObjectMissingError, which says
        how to fill the file in, for the caller to report. Other errors raise.
        """
        try:
            return self.prepare(data, path), None
        except ObjectMissingError as exc:
            return None, exc

    def _fetch_missing(self, manifest, path):
        """Fetch the file's missing objects from the default remote, in one batch request."""
        from git_theta.errors import GitThetaError, UsageError
        from git_theta.remote.transfer import fetch_refs

        store = self.repo.store
        # The packs of the missing members (a pack repack replaced is fetched again only now).
        homes = {ref.home.oid: ref.home for ref in store.missing(manifest.member_objects())}
        refs = list(homes.values())
        for ref in refs:
            store.unmark_replaced(ref.oid)  # it lacks a member needed now: fetch it whole again
        try:
            fetch_refs(self.repo, refs, settings=self.settings)
        except UsageError:
            return  # no remote configured: report the missing objects below
        except GitThetaError as exc:
            # Missing, like an object never fetched: the manifest stays, the other files check out.
            raise ObjectMissingError(
                f"{path}: {len(refs)} object(s) missing and the fetch failed: {exc.message}",
                hint=(exc.hint + "; " if exc.hint else "") + f"then run 'git theta checkout {path}'",
                oids=[r.oid for r in refs],
            ) from None

    def _keep_shared_bases(self, entries):
        """Tell the base cache which bases are worth a copy: those another tensor builds on too.

        That is a base shared by two tensors of this file, or one a file smudged earlier in this
        git command also used (a checkout of several versions or copies of one model).
        """
        bases = Counter(e.objects[1].oid for e in entries if len(e.objects) > 1)
        shared = {oid for oid, count in bases.items() if count > 1 or oid in self._seen_bases}
        self._seen_bases.update(bases)
        self.cache.keep_only(shared)

    def _layout_key(self, data):
        """The key of the layout of manifest ``data`` (None: it has none, or layouts are off)."""
        if not self.settings.get_bool("layoutCache"):
            return None
        lines = data[:512].split(b"\n", 2)
        if len(lines) < 3 or not lines[1].startswith(b"format "):
            return None  # parsing says what is wrong
        return layout_key_of(data, lines[1][len(b"format ") :].decode("utf-8", "replace"))

    def _recorded_layout(self, key):
        """The layout recorded for the manifest with layout key ``key``, when every pack it
        slices is here, intact and long enough; otherwise None (the manifest is smudged)."""
        stored = self.repo.cache.get_layout(key)
        layout = Layout.from_bytes(stored) if stored is not None else None
        if layout is None:
            return None
        store = self.repo.store
        if not all(store.intact_pack(pack) for pack in layout.packs):
            return None
        if any(view is None for view, _ in layout.pieces(store)):
            return None
        return layout

    @contextmanager
    def _fingerprinted(self, out, path, budgeted, text):
        """Yield ``out`` to write a file through. When a re-clean of its bytes should be one
        lookup (the whole files clean reads ahead: a format that spools, ``budgeted`` 0, or
        tensors of ``budgeted`` bytes within the memory budget), it is wrapped to fingerprint
        what passes, and the file's stat row, with manifest ``text()``, is written once the
        block has written the whole file."""
        if not (self.settings.get_bool("statCache") and budgeted <= self.settings.get_int("memoryBudget")):
            yield out
            return
        from git_theta.formats.spool import WriteOnly, whole_file_key

        fingerprinted = WriteOnly(out)
        yield fingerprinted
        self.repo.cache.put_stat(whole_file_key(path), fingerprinted.fingerprint, text(), {})

    def _write_layout(self, layout, path, out):
        """Write the file ``layout`` recorded (see :mod:`git_theta.filter.layouts`)."""
        with self._fingerprinted(out, path, layout.budgeted, lambda: layout.text) as out:
            for piece, tensors in layout.pieces(self.repo.store):
                if piece is None:  # checked by prepare: gone since (a prune running meanwhile)
                    raise ObjectMissingError(
                        f"{path}: a pack it is written from went missing", hint="run the checkout again"
                    )
                kill_points(tensors)
                out.write(piece)

    def write(self, manifest, fmt, path, out, streaming=False):
        """Write the checkpoint ``manifest`` describes to ``out`` (or, given a :class:`Layout`
        by :meth:`prepare`, the file it recorded).

        Every tensor is checked (sha256, or a trusted pair's checksum) before a byte of it is
        written, except with ``streaming``: then a huge keyframe is written as it decodes and
        checked after its last byte, and a failed check raises after part of the file went to
        ``out``. Only for an ``out`` whose reader then discards the file: git's filter protocol
        (the file ends with ``status=error`` and git writes none of it)."""
        with batched(self.repo.store.trust):  # the pairs its decodes verify: one write
            self._write(manifest, fmt, path, out, streaming)

    def _write(self, manifest, fmt, path, out, streaming=False):
        if isinstance(manifest, Layout):
            self._write_layout(manifest, path, out)
            return
        entries, table = manifest.columns()  # the raw table's tensors have no chain
        self._keep_shared_bases(entries.values())
        chained = [e for e in entries.values() if not is_raw(e)]  # raw: its id is its digest
        if self.repo.store.trust is not None:
            self.repo.store.trust.prefetch(chained)
        source = StoreTensorSource(
            manifest,
            self.repo.store,
            self._executor(),
            path,
            self.settings.get_int("memoryBudget"),
            self.cache,
            self.buffers if getattr(fmt, "releases_tensors", False) else None,
            self.settings.threads(),
            stream=streaming,
        )
        budgeted = 0 if getattr(fmt, "spools", False) else source.total_bytes()

        def text():  # what git has (prepare keeps it), else written out: no re-serializing
            return getattr(manifest, "text", None) or manifest.serialize()

        with self._fingerprinted(out, path, budgeted, text) as out:
            key = getattr(manifest, "layout_key", None)
            target = out
            if key is not None and table is not None:
                target = source.recorder = LayoutRecorder(out)
            fmt.join(manifest.fields, source, target, path)
            layout = source.recorder.layout(budgeted) if source.recorder is not None else None
            if layout is not None:
                self.repo.cache.put_layout(key, layout.to_bytes())
            self.repo.cache.put_digests(chained)
