"""Clean: turn a checkpoint byte stream into a manifest, storing each new tensor in the object store.

The reader thread pulls one tensor at a time from the stream (git's pipe); worker threads hash and
encode tensors in parallel (hashlib, numpy and zstandard release the GIL). The bytes of tensors in
flight are bounded by a budget, so memory stays near the largest tensor, not the checkpoint. A
tensor whose bytes are already stored (same digest in the parent manifest, the digest index or the
stat cache) costs no new bytes and no encoding.

A changed tensor (same name, dtype and shape as in the parent manifest, different digest) is stored
as the smallest exact encoding of its change (:mod:`git_theta.updates.choose`) against the parent's tensor,
decoded from the store; the delta names its base by tensor digest. Chains are cut by a dense
keyframe when they cost too much (:mod:`git_theta.tensors.keyframes`), and stack at most ``theta.maxFullDeltas``
whole-tensor deltas: past that, a whole-tensor change is taken against the chain's keyframe.
``git theta add`` can force an update type or supply the update (an adapter) for one ``git add``:
it passes the request in ``GIT_THETA_ADD_REQUEST``.
"""

import itertools
import json
import operator
import os
import threading
from hashlib import sha256
from concurrent.futures import ThreadPoolExecutor

from git_theta import registry as plugins
from git_theta.formats.detect import SNIFF_BYTES, detect_format
from git_theta.updates.chain import (
    chain_headers,
    decode_tensor,
    encode_tensor,
    encode_update,
    encoded_size,
    keyframe_entry,
    object_size,
    store_encoded,
    tensor_digest,
)
from git_theta.dtypes import nbytes
from git_theta.errors import (
    CheckpointError,
    ConfigError,
    ManifestError,
    ObjectCorruptError,
    ObjectMissingError,
    PluginError,
    UpdateError,
)
from git_theta.manifest import RAW, MAX_MANIFEST, Manifest, ObjectRef, RawTable, TensorEntry, is_manifest, is_raw
from git_theta.formats.peekable import PeekableReader
from git_theta.store.trust import batched
from git_theta.config import settings_for
from git_theta.filter.layouts import CleanRecord, layout_key_of, pick
from git_theta.filter.smudge import INLINE_BELOW, done
from git_theta.tensors.keyframes import chain_fits, chain_room, chain_versions, needs_keyframe, skip_depth, span_of
from git_theta.tensors.streaming import hashes_of
from git_theta.updates.base import Encoded, TensorData, TensorRun

BATCH_BYTES = 1 << 20  # tensors handed to a worker together, up to this many bytes...
BATCH_TENSORS = 4096  # ...or this many (a future per tiny tensor costs more than the tensor)


def parent_manifest(repo, path, base_spec=None, prefer_head=False, parse=Manifest.parse):
    """The manifest this path had in the index (or else HEAD), if any: the base for dedup and deltas.

    ``base_spec`` (``REV:PATH``, from ``git theta add --base``) names another one explicitly;
    ``prefer_head`` looks at HEAD before the index.
    """
    if repo is None:
        return None
    if base_spec is not None:
        data = repo.read_blob(base_spec)
        if not data or not is_manifest(data):
            raise UpdateError(
                f"{path}: --base {base_spec} is not a git-theta checkpoint",
                hint="name a tracked checkpoint as REV:PATH, e.g. HEAD~1:model.safetensors",
            )
        return Manifest.parse(data, source=base_spec)
    # 'git theta add' re-encodes a version that a plain 'git add' may already have put in the
    # index: its deltas are taken against the committed version first.
    order = (f"HEAD:{path}", f":{path}") if prefer_head else (f":{path}", f"HEAD:{path}")
    for spec in order:
        try:
            data = repo.read_blob(spec)
        except Exception:
            data = None
        if data and is_manifest(data):
            try:
                return parse(data, source=spec)
            except ManifestError:
                return None
    return None


def stat_key(path):
    """The identity of a work-tree file as git's index sees it, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


class AddRequest:
    """What ``git theta add`` asked for one path: a forced update type, an adapter, a base."""

    def __init__(self, update_type=None, update_path=None, base=None):
        self.update_type = update_type
        self.update_path = update_path
        self.base = base
        self.adapter = None

    @classmethod
    def for_path(cls, settings, path):
        """The request for ``path`` from the ``addRequest`` setting (JSON by path), or None."""
        raw = settings.get("addRequest")
        if not raw:
            return None
        try:
            requests = json.loads(raw)
            item = requests.get(path)
        except (ValueError, AttributeError):
            raise ConfigError(f"GIT_THETA_ADD_REQUEST is not valid JSON: {raw[:80]!r}") from None
        if item is None:
            return None
        request = cls(item.get("update_type"), item.get("update_path"), item.get("base"))
        if request.update_type is not None:
            plugins.get("update", request.update_type, needed_by=f"{path} (--update-type)")
        if request.update_path:
            from git_theta.filter.adapters import load_adapter

            request.adapter = load_adapter(request.update_path, request.update_type)
            if item.get("targets") is not None:  # a shard of a sharded model: its own targets only
                request.adapter.restrict(item["targets"])
        return request


class _Budget:
    """Bounds the bytes of tensors in flight; one tensor may always proceed when none are."""

    def __init__(self, limit):
        self._limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def wait_below(self):
        with self._cond:
            while self._used > 0 and self._used >= self._limit:
                self._cond.wait()

    def add(self, n):
        with self._cond:
            self._used += n

    def release(self, n):
        with self._cond:
            self._used -= n
            self._cond.notify_all()


class Cleaner:
    """Cleans checkpoints for one repository (reused across files by the filter process)."""

    def __init__(self, repo, settings=None):
        self.repo = repo
        self.settings = settings or settings_for(repo)
        self.store = repo.store
        self.cache = repo.cache
        self._pool = None
        from git_theta.git.models import ParentModels

        self._models = ParentModels(repo)  # a tensor's base by name anywhere in its model
        self._deferred = None  # bookkeeping kept for settle() while a clean(defer=True) runs

    def _executor(self):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.settings.threads(), thread_name_prefix="theta-clean")
        return self._pool

    def close(self):
        try:
            self.settle()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def clean(self, stream, path, defer=False):
        """Read a checkpoint (or a manifest) from ``stream``; return the manifest bytes.

        With ``defer``, the caches' bookkeeping (the stat cache's rows, the layout, the digest
        rows: what only makes later commands faster) waits for :meth:`settle`. The filter
        process settles right after answering git, so it writes them while git hashes and
        compresses the manifest (0.4 s for the 24 MB of 200,000 tensors), and before it reads
        the next file's request, so the next clean finds them as if written at once."""
        self.settle()
        self._deferred = [] if defer else None
        try:
            with batched(self.store.trust):  # the pairs its new encodings make: one write
                return self._clean(stream, path)
        except BaseException:
            self._deferred = None  # a clean that failed leaves no rows to write later
            raise

    def settle(self):
        """Do the bookkeeping a ``clean(defer=True)`` left (see :meth:`clean`)."""
        deferred, self._deferred = self._deferred, None
        for work in deferred or ():
            work()

    def _bookkeep(self, work):
        """Run ``work`` now, or at :meth:`settle` when the clean was deferred."""
        if self._deferred is None:
            work()
        else:
            self._deferred.append(work)

    def _remember_file(self, path, fingerprint, data):
        """Keep the whole-file stat row: the file at ``path`` whose bytes have ``fingerprint``
        cleans to manifest ``data`` (bookkeeping: see :meth:`clean`)."""
        from git_theta.formats.spool import whole_file_key

        self._bookkeep(lambda: self.cache.put_stat(whole_file_key(path), fingerprint, data, {}))

    def _clean(self, stream, path):
        reader = PeekableReader(stream)
        head = reader.peek(SNIFF_BYTES)
        if is_manifest(head):
            data = reader.read(MAX_MANIFEST + 1)
            if len(data) > MAX_MANIFEST:
                raise ManifestError(f"{path}: manifest is larger than {MAX_MANIFEST} bytes")
            Manifest.parse(data, source=path)  # validate; a manifest passes through unchanged
            return data
        fmt = detect_format(self.repo, path, head)
        request = AddRequest.for_path(self.settings, path)
        key = stat_key(path) if self.settings.get_bool("statCache") else None
        # An explicit request re-encodes: the stat cache would hand back the last clean unchanged.
        cached = self.cache.get_stat(path, key) if key and request is None else None
        if not getattr(fmt, "spools", False):
            return self._clean_streamed(fmt, reader, path, key, cached, request)
        from git_theta.formats.spool import Spool, whole_file_key

        # A zip format reads the whole file before its first tensor anyway: copy it once with a
        # fingerprint, and a file whose bytes were cleaned or checked out before (touch, git
        # status) costs that copy, not a parse (for torch, not even the import of torch).
        remember = self.settings.get_bool("statCache") and request is None
        with Spool(reader) as spool:
            if remember:
                hit = self.cache.get_stat(whole_file_key(path), spool.fingerprint)
                if hit is not None and self._objects_here(hit[0]):
                    return hit[0]
            data = self._clean_checkpoint(fmt, spool, path, key, cached, request)
            if remember:
                fingerprint = spool.fingerprint
                self._remember_file(path, fingerprint, data)
            return data

    def _clean_streamed(self, fmt, reader, path, key, cached, request):
        """Clean a format read as a stream. A file of up to ``theta.memoryBudget`` bytes is read
        ahead and fingerprinted first: bytes cleaned or checked out before at this path (``touch``,
        ``git status`` after a checkout) cost that read and one lookup, not a parse of every tensor."""
        from git_theta.formats.peekable import ReplayReader, read_ahead
        from git_theta.formats.spool import FingerprintReader, whole_file_key

        limit = self.settings.get_int("memoryBudget")
        try:
            size = os.stat(path).st_size  # the work-tree file git is reading, usually
        except OSError:
            size = 0
        if not self.settings.get_bool("statCache") or request is not None or size > limit:
            # A file larger than the budget streams as it comes: nothing is held for it.
            return self._clean_checkpoint(fmt, reader, path, key, cached, request)
        if not self.cache.has_stat(whole_file_key(path)):
            # Nothing cached for this path (a file added for the first time): no lookup can hit,
            # so the file streams, fingerprinted on the way, and its row is written for next time.
            # Reading it all ahead first would leave git waiting until the whole file was read.
            hashing = FingerprintReader(reader)
            data = self._clean_checkpoint(fmt, hashing, path, None, None, request)
            while hashing.read(1 << 20):  # the fingerprint is of the whole file, read or not
                pass
            fingerprint = hashing.fingerprint
            self._remember_file(path, fingerprint, data)
            return data
        chunks, fingerprint = read_ahead(reader, limit)
        if fingerprint is not None:
            hit = self.cache.get_stat(whole_file_key(path), fingerprint)
            if hit is not None and self._objects_here(hit[0]):
                return hit[0]
        if fingerprint is not None:
            # The whole-file row below answers every re-clean the per-tensor row would (same stat,
            # same bytes): no per-tensor fingerprints to take and store.
            key = cached = None
        data = self._clean_checkpoint(fmt, ReplayReader(chunks, reader), path, key, cached, request)
        if fingerprint is not None:
            self._remember_file(path, fingerprint, data)
        return data

    def _objects_here(self, data):
        """True when ``data`` is a valid manifest whose objects are all in the local store."""
        from git_theta.manifest import skim

        try:
            # Raw lines are skimmed: their objects are members of the pack lines' packs.
            manifest, packs = skim(data, source="stat cache")
        except ManifestError:
            return False
        trust = self.store.trust
        needed = {ref.oid for ref in [*packs, *manifest.all_objects()]}
        return all(self.store.freshen(oid) for oid in needed) and (
            trust is None or all(is_raw(e) or trust.trusted(e) for e in manifest.tensors.values())
        )

    def _clean_checkpoint(self, fmt, reader, path, key, cached, request=None):
        import xxhash

        parent = parent_manifest(
            self.repo, path, request.base if request else None, request is not None, self._models.parsed
        )
        # A tensor's parent version by name: the file's own, then other files of the same model
        # (a re-shard moves tensors between files). Then entries by digest, to reuse: those and
        # the stat-cached manifest's.
        sources = [parent] if parent else []
        if request is None or request.base is None:
            sources += self._models.manifests(path, prefer_head=request is not None)
        parent_entries = EntryIndex(sources, by_digest=False)
        max_depth = self.settings.get_int("maxChainDepth")
        delta_min = self.settings.get_int("deltaMinBytes")
        cached_entries, fingerprints_before = {}, {}
        if cached is not None:
            try:
                cached_entries = Manifest.parse(cached[0], source="stat cache").tensors
                fingerprints_before = cached[1]
            except ManifestError:
                cached_entries = {}
        known = EntryIndex(sources, by_digest=True, extra=cached_entries)

        remember = key is not None or bool(cached_entries)  # per-tensor fingerprints are of use
        budget = _Budget(self.settings.get_int("memoryBudget"))
        pool = self._executor()
        # Entries this clean made, by content: a file with many identical tensors (600k empty ones
        # in a hostile header) stores and looks up each content once, not once per tensor.
        made_here = {}

        def check(tensor):
            """(entry, fingerprint) when the stat cache already has this tensor, else (None, fingerprint)
            with the tensor's digest set."""
            size = len(tensor.data)
            if size != nbytes(tensor.dtype, tensor.shape):
                raise CheckpointError(
                    f"{path}: tensor {tensor.name!r} has {size} bytes, expected "
                    f"{nbytes(tensor.dtype, tensor.shape)} for {tensor.dtype} {list(tensor.shape)}"
                )
            hashed = hashes_of(tensor.data)  # a huge tensor was hashed while it was read
            if not remember:
                tensor.digest = hashed[0] if hashed else tensor_digest(tensor.data)
                return None, None
            fingerprint = hashed[1] if hashed else xxhash.xxh3_128_hexdigest(tensor.data)
            previous = cached_entries.get(tensor.name)
            if (
                previous is not None
                and fingerprints_before.get(tensor.name) == fingerprint
                and previous.dtype == tensor.dtype
                and previous.shape == tuple(tensor.shape)
                and self._all_local(previous)
                and self._vouched(previous, path, check=False)
            ):
                return previous, fingerprint
            tensor.digest = hashed[0] if hashed else tensor_digest(tensor.data)
            return None, fingerprint

        def clean_new(tensor, stored):
            """The entry of a tensor the stat cache did not have: one this clean already made for
            the same content (a file of many identical tensors stores and looks up each content
            once), an existing entry storing these bytes, else a new encoding."""
            content = (tensor.digest, tensor.dtype, tuple(tensor.shape))
            same = made_here.get(content) if request is None else None
            if same is not None:
                return _renamed(same, tensor.name)
            entry = self._reuse(tensor, known, path, stored)
            if entry is None:
                entry = self._encode_changed(tensor, parent_entries.get(tensor.name), path, budget, request, max_depth)
            made_here.setdefault(content, entry)
            return entry

        def process(batch):
            """(entry, fingerprint) of each tensor of ``batch``: one digest-index query per batch."""
            try:
                checked = [check(tensor) for tensor in batch]
                # With an explicit request, only the parent's entries are reused: the digest index
                # would hand back the encoding the request is meant to replace.
                # A small tensor goes into a pack as its own bytes, found by its digest among the
                # packs' members (ObjectStore.put_raw): the index is asked about larger ones only.
                small = self.store.stores_raw
                lookups = [
                    t
                    for t, (e, _) in zip(batch, checked)
                    if e is None and t.digest not in known and not small(len(t.data))
                ]
                stored = self.cache.get_digests(lookups) if request is None and lookups else {}
                results = []
                for tensor, (entry, fingerprint) in zip(batch, checked):
                    if entry is None:
                        entry = clean_new(tensor, stored)
                    if record is not None:
                        record.stored(tensor.name, entry, tensor.data)
                    results.append((entry, fingerprint))
                return results
            finally:
                budget.release(sum(len(t.data) for t in batch))

        def process_run(run):
            """The results of a run of small tensors (a TensorRun): those with nothing to reuse
            or delta against (no parent version, content not met before) go into the pack as
            they are, all at once, and come back as one tuple of table columns; the others are
            cleaned one by one as any tensor."""
            try:
                bounds = run.bounds
                views = list(map(memoryview(run.data).__getitem__, map(slice, bounds, bounds[1:])))
                digests = [sha256(data).hexdigest() for data in views]
                rows = range(len(digests))
                sizes = list(map(operator.sub, bounds[1:], bounds))
                if record is not None:
                    record.read(run.names, sizes)  # in file order: runs are cleaned as they are read
                results, kept = [], []
                if known or parent_entries or made_here:
                    # Unchanged tensors stored raw in a pack here (200,000 of them in a new
                    # version) are found a column at a time and keep their rows, no entry made;
                    # only the others (new, changed, met before in this clean) are looked at
                    # one by one.
                    homes = self._raw_homes(known, run, digests, sizes) if known else [None] * len(digests)
                    if made_here:
                        contents = zip(digests, run.dtypes, run.shapes)
                        homes = [None if c in made_here else h for c, h in zip(contents, homes)]
                    kept = [i for i, home in enumerate(homes) if home is not None]
                    rows = []
                    for i in itertools.compress(range(len(homes)), map(operator.not_, homes)):
                        name, digest = run.names[i], digests[i]
                        content = (digest, run.dtypes[i], run.shapes[i])
                        if content not in made_here and digest not in known:
                            if sizes[i] < delta_min or name not in parent_entries:
                                rows.append(i)  # new, or too small for a delta (_encode_changed)
                                continue
                        # Its own copy: a pack keeps what it is given until written, and a view
                        # would keep the whole run's buffer (4 MiB) for one small tensor.
                        tensor = TensorData(name, run.dtypes[i], run.shapes[i], bytes(views[i]), digest)
                        entry = clean_new(tensor, {})
                        if record is not None:
                            record.stored(name, entry, tensor.data)
                        results.append((entry, None))
                if len(rows) == len(digests):
                    results.append(
                        _RunRows(
                            (run.names, run.dtypes, run.shapes, digests, sizes, self.store.put_raw_many(digests, views))
                        )
                    )
                    return results
                # Its own copy of each (as above), and the rows kept and stored here as one part,
                # in file order: a file's rows then reach the table sorted, with nothing to sort.
                new = self.store.put_raw_many(pick(digests, rows), list(map(bytes, pick(views, rows))))
                for i, home in zip(rows, new):
                    homes[i] = home
                order = sorted(rows + kept)  # two ascending runs: merged, not sorted
                columns = (run.names, run.dtypes, run.shapes, digests, sizes, homes)
                results.append(_RunRows(tuple(pick(column, order) for column in columns)))
                return results
            finally:
                budget.release(len(run.data))

        def submit(job, batch, batch_bytes):
            """A worker's future, or one done in place for small tensors (see INLINE_BELOW): a
            worker would only add hand-offs of the GIL and lock contention."""
            if batch_bytes < INLINE_BELOW * len(batch):
                return done(job(batch))
            return pool.submit(job, batch)

        # What the file is made of, for the layout its checkout will write (filter/layouts.py).
        recording, record = self.settings.get_bool("layoutCache"), None
        # Small objects go into packs, written (one fsync, one rename each) before the manifest.
        with self.store.packing():
            futures = []
            checkpoint = fmt.split(reader, path)
            checkpoint.stream_threshold = self.settings.get_int("streamThreshold")
            try:
                # Small tensors go to the workers in batches: a future, a lock round and an index
                # query per tensor cost more than hashing a small tensor.
                batch, batch_bytes = [], 0
                # Without per-tensor fingerprints or a request, a format may hand over runs of
                # small tensors (stored raw in the pack) as columns: 200,000 tensors of a few
                # hundred bytes are not 200,000 objects of each kind along the way.
                small = min(INLINE_BELOW, self.store.raw_limit)
                runs = not remember and request is None and small > 0
                for tensor in checkpoint.runs(small) if runs else checkpoint.tensors():
                    if record is None and recording and checkpoint.prelude is not None:
                        record = CleanRecord(checkpoint.prelude)  # the header is read by now
                    if isinstance(tensor, TensorRun):
                        if batch:
                            futures.append(submit(process, batch, batch_bytes))
                            batch, batch_bytes = [], 0
                        budget.add(len(tensor.data))
                        futures.append(done(process_run(tensor)))
                        continue
                    if record is not None:
                        record.read([tensor.name], [len(tensor.data)])
                    budget.add(len(tensor.data))
                    batch.append(tensor)
                    batch_bytes += len(tensor.data)
                    if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_TENSORS:
                        futures.append(submit(process, batch, batch_bytes))
                        batch, batch_bytes = [], 0
                        budget.wait_below()
                if batch:
                    futures.append(submit(process, batch, batch_bytes))
                results = [result for f in futures for result in f.result()]
            except BaseException:
                for f in futures:
                    f.cancel()
                for f in futures:
                    if not f.cancelled():
                        try:
                            f.result()
                        except BaseException:
                            pass
                raise
            manifest = Manifest(format=fmt.name, fields=dict(checkpoint.fields))
            package = plugins.provider("format", fmt.name)
            if package not in (None, plugins.BUILTIN_PACKAGE):
                # So a clone without the plugin is told which package to install (plugins.get).
                manifest.fields[plugins.PACKAGE_FIELD] = package
            for key_name, data in checkpoint.blobs.items():
                manifest.blobs[key_name] = self.store.put_bytes(data)
        fingerprints = {}
        entries, rows = manifest.tensors, []
        for result in results:
            if isinstance(result, _RunRows):
                rows.append(result.columns)
                continue
            entry, fingerprint = result
            if entry.name in entries:
                raise CheckpointError(f"{path}: tensor name {entry.name!r} appears twice")
            entries[entry.name] = entry
            fingerprints[entry.name] = fingerprint
        if rows:  # names are unique within a file (the format checked), so across rows and entries
            manifest.add_table(RawTable.of_rows(rows))
        if request is not None and request.adapter is not None:
            request.adapter.finish(path, list(manifest.tensors))
        data = manifest.serialize()
        # Raw entries are found by their digest among the packs' members: no index row needed.
        unique = {(e.digest, e.dtype, e.shape): e for e in entries.values() if not is_raw(e)}
        self._bookkeep(lambda: self.cache.put_digests(unique.values()))  # one row per content
        if key is not None and stat_key(path) == key:
            self._bookkeep(lambda: self.cache.put_stat(path, key, data, fingerprints))
        if record is not None:
            self._bookkeep(lambda: self._record_layout(record, manifest, data, fmt.name))
        return data

    def _record_layout(self, record, manifest, data, format_name):
        """Record the layout of the file just cleaned (``record``) for manifest ``data``: its
        first checkout is then written as a later one is (filter/layouts.py)."""
        key = layout_key_of(data, format_name)
        if key is None:
            return
        layout = record.layout(self.store, *manifest.columns())
        if layout is not None:
            self.cache.put_layout(key, layout.to_bytes())

    def _raw_homes(self, known, run, digests, sizes):
        """The pack of each tensor of ``run`` (a TensorRun, with their ``digests`` and
        ``sizes``) to reuse as it is, else None: a raw table row of ``known`` (see
        EntryIndex.raw_rows) with the same digest, dtype, shape and size, in a pack here that
        holds the tensor (freshened, as _all_local does); the others take the per-tensor path.
        A manifest's rows are claims: each pack is asked for all its candidates at once. Done a
        column at a time: a re-add of 200,000 unchanged tensors took 2 s one by one."""
        homes = [None] * len(digests)
        for table, at, mine in known.raw_rows(digests):
            whole = len(at) == len(digests)  # every tensor a row of this table: no copies of the run's columns
            same = map(
                operator.and_,
                map(operator.eq, pick(table.dtypes, mine), run.dtypes if whole else pick(run.dtypes, at)),
                map(
                    operator.and_,
                    map(operator.eq, pick(table.shapes, mine), run.shapes if whole else pick(run.shapes, at)),
                    map(operator.eq, pick(table.sizes, mine), sizes if whole else pick(sizes, at)),
                ),
            )
            ok = list(same)
            numbers = pick(table.numbers, mine)
            if len(set(numbers)) == 1:
                groups = {numbers[0]: list(itertools.compress(at, ok))}
            else:  # one pass, however many packs the table names
                groups = {}
                for i, number, good in zip(at, numbers, ok):
                    if good:
                        groups.setdefault(number, []).append(i)
            for number, positions in groups.items():
                pack = table.distinct[number]
                held = self.store.in_pack(pack.oid, pick(digests, positions))
                for i in itertools.compress(positions, held):
                    homes[i] = pack
        return homes

    def _encode_changed(self, tensor, base_entry, path, budget, request, max_depth):
        """Store a tensor whose bytes are new: as a delta of its parent version when that is smaller.

        A tensor under ``theta.deltaMinBytes`` is stored whole without trying: a delta object's
        header alone is 230-290 bytes (it names the base's digest), so measured on fine-tune
        steps no fp32 tensor of 512 bytes or less had a smaller delta, while trying cost ~0.2 ms
        each (45 s for 200,000 changed tensors), and a delta costs every checkout a decode.
        """
        supplied = None
        if request is not None and request.adapter is not None:
            key, supplied = request.adapter.lookup(tensor.name)
            if supplied is not None:
                request.adapter.used.add(key)
        forced = request is not None and (request.update_type or request.adapter)
        usable = (
            base_entry is not None
            and (forced or len(tensor.data) >= self.settings.get_int("deltaMinBytes"))
            and base_entry.dtype == tensor.dtype
            and base_entry.shape == tuple(tensor.shape)
            and self._all_local(base_entry)
        )
        if not usable:
            if supplied is not None:
                raise UpdateError(
                    f"{path}: tensor {tensor.name!r}: no earlier version of the same dtype and shape "
                    f"to apply {supplied.key!r} from {request.adapter.source} to",
                    hint="name the version the adapter was trained on with --base REV:PATH",
                )
            return self._keyframe(tensor)
        size = nbytes(base_entry.dtype, base_entry.shape)
        deep = needs_keyframe(base_entry, max_depth, self.settings.get_int("keyframePercent"))
        headers = None if supplied is not None or deep else self._chain_headers(base_entry)
        if headers is not None and chain_versions(headers) + 1 > max_depth:
            deep, headers = True, None  # theta.maxChainDepth counts versions, skipped ones too
        full_headers = self._full_chain_headers(headers)
        # A partial delta may skip the newest deltas of the chain (tensors/keyframes.py): its base
        # is then an older version on the parent's chain, decoded on the way to the parent.
        skip = None
        if full_headers is None and headers and not forced and self.settings.get_bool("skipDeltas"):
            skip = self._skip_base(base_entry, headers)
        held = size * (1 if full_headers is None and skip is None else 2)  # decoded bases are bytes in flight
        budget.add(held)
        try:
            try:
                keyframe = None
                if full_headers is not None:
                    key_entry = keyframe_entry(base_entry, full_headers)
                    keyframe = TensorData(
                        key_entry.name,
                        key_entry.dtype,
                        key_entry.shape,
                        decode_tensor(self.store, key_entry, path),
                        key_entry.digest,
                    )
                    # The parent starts from the keyframe just decoded: one keyframe decode, not two.
                    base_bytes = decode_tensor(self.store, base_entry, path, known=(key_entry, keyframe.data))
                elif skip is not None:
                    skip_bytes = decode_tensor(self.store, skip[0], path)
                    base_bytes = decode_tensor(self.store, base_entry, path, known=(skip[0], skip_bytes))
                else:
                    base_bytes = decode_tensor(self.store, base_entry, path)
            except (ObjectCorruptError, ObjectMissingError):
                if supplied is not None:
                    raise
                # The new bytes are in hand: store them whole rather than on a damaged base.
                return self._keyframe(tensor)
            base = TensorData(base_entry.name, base_entry.dtype, base_entry.shape, base_bytes, base_entry.digest)
            if supplied is not None:
                request.adapter.check(path, tensor, base, supplied)
            if deep:
                return self._keyframe(tensor)  # a keyframe bounds the chain
            # What the chain rule (_fits) leaves a delta, known before one is encoded; none for an
            # update the user named, which _fits keeps as asked.
            percent = None if forced else self.settings.get_int("maxChainPercent")
            if keyframe is not None:
                # The chain holds theta.maxFullDeltas whole-tensor deltas already: only a partial
                # delta (sparse) may stack on the parent; anything else is taken on the keyframe.
                result = _partial_delta(tensor, base, request)
                if result is None:
                    room = chain_room(key_entry, size, percent) if percent is not None else None
                    result = _encode_against(tensor, keyframe, request, None, room)
                    base, base_entry = keyframe, key_entry
            else:
                room = chain_room(base_entry, size, percent) if percent is not None and skip is None else None
                result = _encode_against(tensor, base, request, supplied, room)
                if result is not None and skip is not None and not getattr(result[0], "full_pass", True):
                    # The change from the parent is partial (what it is decides the type): the same
                    # type then takes it against the older version, with the skipped deltas' changes.
                    skip_entry, span = skip
                    older = TensorData(
                        skip_entry.name, skip_entry.dtype, skip_entry.shape, skip_bytes, skip_entry.digest
                    )
                    merged = encode_update(tensor, result[0].name, older)
                    replaced = sum(
                        ref.size for ref in base_entry.objects[: len(base_entry.objects) - len(skip_entry.objects)]
                    )
                    # Taken when the version's chain reads no more than stacking would (the skipped
                    # deltas plus this one), and stays a small change: a skipped delta that was a
                    # whole-tensor change (a forced sparse) would make it near a keyframe's size.
                    if (
                        merged is not None
                        and encoded_size(merged[1]) <= encoded_size(result[1]) + replaced
                        and 2 * encoded_size(merged[1]) <= len(tensor.data)
                    ):
                        update, encoded = merged
                        result = update, Encoded({**encoded.header, "span": span}, encoded.parts)
                        base, base_entry = older, skip_entry
            if result is None:
                return self._keyframe(tensor)  # no delta could fit the chain rule (_fits)
            if self.store.stores_raw(len(tensor.data)) and (
                result[0].keyframe or (not forced and object_size(tensor, *result, base) >= len(tensor.data))
            ):
                # A small tensor's raw keyframe is its bytes alone: a delta object whose header
                # and payload come to as much (a one-element change of a 320-byte tensor: 333
                # bytes) saves nothing and adds a chain to decode. An update the user named is
                # kept as asked.
                return self._keyframe(tensor)
            if not self._fits(result, base_entry, size, request):
                return self._keyframe(tensor)  # reading this version stays near its raw size
            return store_encoded(self.store, tensor, *result, base=base, base_entry=base_entry)
        finally:
            budget.release(held)

    def _fits(self, result, base_entry, raw_bytes, request):
        """False when ``result`` is a delta whose chain on ``base_entry`` would pass
        ``theta.maxChainPercent`` of the tensor's raw size (:func:`chain_fits`); an update type
        or adapter the user named is kept as asked."""
        update, encoded = result
        if update.keyframe or (request is not None and (request.update_type or request.adapter)):
            return True
        return chain_fits(base_entry, encoded_size(encoded), raw_bytes, self.settings.get_int("maxChainPercent"))

    def _keyframe(self, tensor):
        """A new keyframe of ``tensor``: its own bytes in the pack being filled when it is small
        (``raw``: no second sha256, no header, no compression), else ``dense``."""
        if self.store.stores_raw(len(tensor.data)):
            ref = self.store.put_raw(tensor.data, tensor.digest)
            return TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.digest, RAW, (ref,))
        return encode_tensor(self.store, tensor)

    def _chain_headers(self, entry):
        """The object headers of ``entry``'s chain (see :func:`chain_headers`), or None for a lone
        keyframe or a chain that cannot be read (left to the decode to report)."""
        if entry.chain_depth == 0:
            return None
        try:
            return chain_headers(self.store, entry)
        except (ObjectCorruptError, ObjectMissingError):
            return None

    def _skip_base(self, entry, headers):
        """``(entry of an older version on entry's chain, span)`` when a new partial delta should
        skip the chain's newest deltas (:func:`skip_depth`), else None. Only partial deltas are
        skipped; a delta without a ``span`` covers one version."""
        spans = []
        for header in headers[:-1]:
            try:
                partial = not getattr(plugins.get("update", header.get("update")), "full_pass", True)
            except PluginError:
                break
            span = span_of(header)
            if not partial or span is None:
                break
            spans.append(span)
        skipped, span = skip_depth(spans)
        digest = headers[skipped - 1].get("base") if skipped else None
        if not isinstance(digest, str):
            return None
        update = str(headers[skipped].get("update", "dense"))  # the keyframe's, when every delta is skipped
        return TensorEntry(entry.name, entry.dtype, entry.shape, digest, update, entry.objects[skipped:]), span

    def _full_chain_headers(self, headers):
        """``headers`` (of a chain, see :meth:`_chain_headers`) when the chain stacks
        ``theta.maxFullDeltas`` whole-tensor deltas already, else None.

        Each whole-tensor delta (int-delta, low-rank) costs a checkout a pass over the tensor, as
        much as the keyframe itself: stacking them would make checkout time grow with history. A
        change against the keyframe is a little larger than against the previous version (the
        steps add up), but decoding it is one keyframe plus one delta, however long the history.
        Reads only object headers; a chain that cannot be read is left to the decode to report.
        """
        if headers is None:
            return None
        try:
            full = sum(getattr(plugins.get("update", h.get("update")), "full_pass", True) for h in headers[:-1])
        except PluginError:
            return None
        return headers if full >= max(1, self.settings.get_int("maxFullDeltas")) else None

    def _all_local(self, entry):
        # freshen, not has: a reused object must look recent to a concurrent 'git theta prune'
        return all(self.store.freshen(ref.oid) for ref in entry.objects)

    def _vouched(self, entry, path, check=True):
        """True when ``entry``'s (chain -> digest) pair is trusted (see git_theta.store.trust), or,
        with ``check``, decodes now to bytes whose sha256 is its digest (then it is recorded).

        A parent manifest, the digest index and the stat cache can all hold pairs this clone never
        checked (a repository's author wrote them): reusing one unchecked could store another
        tensor's bytes under this tensor's digest.
        """
        trust = self.store.trust
        # A raw object's id is the digest itself: the store holds it only if its bytes hash to it.
        if trust is None or is_raw(entry) or trust.trusted(entry):
            return True
        if not check:
            return False
        try:
            decode_tensor(self.store, entry, path)  # sha256-verified, and recorded when it matches
            return True
        except (ObjectCorruptError, ObjectMissingError, PluginError):
            return False

    def _reuse(self, tensor, known, path, stored=None):
        """An existing entry storing exactly these bytes, renamed for this tensor, or None.

        ``stored`` is the digest index's answer for a batch (:meth:`Cache.get_digests`)."""
        # Reuse only entries whose objects are here: the bytes are in hand, so storing them again
        # is always possible, while an entry pointing at objects nobody has would lose the tensor.
        entry = known.get(tensor.digest)
        if (
            entry is not None
            and entry.dtype == tensor.dtype
            and entry.shape == tuple(tensor.shape)
            and self._all_local(entry)
            and self._vouched(entry, path)
        ):
            return _renamed(entry, tensor.name)
        if self.store.stores_raw(len(tensor.data)):
            # Stored raw in some pack already (any file, branch or version): its id is the digest.
            ref = self.store.packed_ref(tensor.digest)
            if ref is not None and ref.size == len(tensor.data):
                return TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.digest, RAW, (ref,))
        stored = (stored or {}).get((tensor.digest, tensor.dtype, tuple(tensor.shape)))
        if stored:
            update, *refs = stored.split(" ")
            try:
                objects = tuple(ObjectRef.parse(r) for r in refs)
            except ManifestError:
                return None
            entry = TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.digest, update, objects)
            if objects and self._all_local(entry) and self._vouched(entry, path):  # same rules as above
                return entry
        return None


class EntryIndex:
    """TensorEntry by name (or by digest) over several manifests, without an entry per raw line:
    a manifest's raw table is looked up through a dict of one column, and an entry is made only
    for a row asked for.

    A name belongs to the first manifest that has it (a model's other files count only for
    names the file's own parent lacks); by digest, the entries those names resolve to, then
    ``extra`` (``{name: entry}``, the stat-cached manifest), the first with a digest winning."""

    def __init__(self, manifests, by_digest, extra=None):
        self._sources = []  # ({key: entry}, None) or (table, {key: row})
        seen = set()  # names of the manifests before
        for manifest in {id(m): m for m in manifests}.values():
            entries, table = manifest.columns()
            names = table.names if table is not None else []
            if seen:
                entries = {n: e for n, e in entries.items() if n not in seen}
            self._add(entries, by_digest)
            if table is not None:
                keys = table.digests if by_digest else names
                rows = [i for i, n in enumerate(names) if n not in seen] if seen else range(len(names))
                # reversed: the first of several rows with one key wins, as for entries
                self._sources.append((table, dict(zip(map(keys.__getitem__, reversed(rows)), reversed(rows)))))
            seen.update(entries)
            seen.update(names)
        self._add(extra or {}, by_digest)

    def _add(self, entries, by_digest):
        if by_digest:
            keyed = {}
            for entry in entries.values():
                keyed.setdefault(entry.digest, entry)
            entries = keyed
        if entries:
            self._sources.append((entries, None))

    def __bool__(self):
        return bool(self._sources)

    def _find(self, key):
        for source, rows in self._sources:
            if rows is None:
                entry = source.get(key)
                if entry is not None:
                    return source, None, entry
            else:
                row = rows.get(key)
                if row is not None:
                    return source, row, None
        return None

    def get(self, key):
        """The entry of ``key``, or None."""
        found = self._find(key)
        if found is None:
            return None
        table, row, entry = found
        return entry if row is None else table.entry(row)

    def __contains__(self, key):
        return self._find(key) is not None

    def raw_rows(self, keys):
        """Where ``keys`` are first found as raw table rows: ``[(table, positions, rows)]``, for
        each table the positions in ``keys`` of the keys first found as its rows (a key an
        entry holds first is no row), and those rows; each source is asked a column at a time."""
        found_in, pending = [], range(len(keys))
        for source, index in self._sources:
            if not pending:
                break
            if index is None:  # entries: a key found here is not a raw row, and is done
                pending = list(
                    itertools.compress(pending, map(operator.not_, map(source.__contains__, pick(keys, pending))))
                )
                continue
            found = list(map(index.get, pick(keys, pending)))
            hits = list(map(operator.is_not, found, itertools.repeat(None)))
            if any(hits):
                found_in.append(
                    (source, list(itertools.compress(pending, hits)), list(itertools.compress(found, hits)))
                )
            pending = list(itertools.compress(pending, map(operator.not_, hits)))
        return found_in


class _RunRows:
    """Table columns (names, dtypes, shapes, digests, sizes, packs) of a run's raw tensors."""

    __slots__ = ("columns",)

    def __init__(self, columns):
        self.columns = columns


def _encode_against(tensor, base, request, supplied, room=None):
    """(update, Encoded) for ``tensor`` against ``base``: the supplied adapter's update, else the
    forced type, else (or where those do not apply) the automatic choice; None when ``room``
    (the bytes the chain rule leaves a delta) rules every delta out (see ``choose``)."""
    result = None
    if supplied is not None:
        result = encode_update(tensor, supplied.update, base, **supplied.options())
    elif request is not None and request.update_type is not None:
        result = encode_update(tensor, request.update_type, base)
    if result is None:  # not forced, or the forced type does not apply to this tensor
        from git_theta.updates.choose import choose

        result = choose(tensor, base, room)
    return result


def _partial_delta(tensor, base, request):
    """(update, Encoded) of an update type whose decode touches only what changed (sparse), when
    one applies to ``tensor`` against ``base``: the forced type if it is such a type, else the
    smallest cheap encoding of those types (``encode_if_cheap``); None otherwise."""
    if request is not None and request.update_type is not None:
        forced = plugins.get("update", request.update_type)
        if getattr(forced, "full_pass", True):
            return None
        return encode_update(tensor, forced.name, base)
    found = []
    for update in plugins.all_plugins("update"):
        cheap = getattr(update, "encode_if_cheap", None)
        if getattr(update, "auto", False) and not getattr(update, "full_pass", True) and cheap is not None:
            encoded = cheap(tensor, base)
            if encoded is not None:
                found.append((update, encoded))
    return min(found, key=lambda r: encoded_size(r[1])) if found else None


def _renamed(entry, name):
    """``entry`` describing a tensor called ``name`` (same bytes, same objects)."""
    if entry.name == name:
        return entry
    return TensorEntry(name, entry.dtype, entry.shape, entry.digest, entry.update, entry.objects)
