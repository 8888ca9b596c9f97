"""Local, rebuildable caches in one SQLite file under ``<git common dir>/theta``.

- ``stat``: per work-tree path, the stat key of the file last cleaned, the manifest produced and a
  fast fingerprint (xxh3-128) of every tensor. When git re-cleans a file whose stat key is unchanged
  (``touch``, ``git status``), each tensor's bytes only need the fingerprint check, not sha256 and
  encoding. The fingerprint is checked for every tensor, so a stale entry can never be used wrongly.
  Manifest texts are kept once each, by their sha256 (``stat_texts``), apart from the small rows
  per path (``stat_files``): checking out a 24 MB manifest again only rewrites its path's row.
  A text is stored zstd-compressed (level 1, with zstd's checksum): a 200,000-tensor manifest's
  24 MB become ~7 MB, and writing them took 0.2-0.4 s of each add and checkout, compressing
  0.06-0.1 s (rows written plain before are read as they are).
  (The first layout, one table ``stat`` with the text in every row, is dropped: a cache.)
- ``digests``: tensor digest -> how it is stored (update and object chain), so a tensor already
  stored anywhere (another file, branch or shard) costs no new bytes. A hint only: clean reuses
  an entry only when the trust ledger vouches for it.
- ``layouts``: how the last few many-tensor files smudged were written (literal bytes and pack
  slices, :mod:`git_theta.filter.layouts`), by the sha256 of their manifest: smudging the same
  manifest again replays it. The :data:`LAYOUTS_KEPT` most recently used are kept.
- ``trusted``: the trust ledger (:mod:`git_theta.store.trust`), keys of the (object chain ->
  tensor digest) pairs this clone verified with sha256 or encoded itself. Nothing a repository or
  remote ships can write it.

All are caches: losing the file loses speed, never data. Any SQLite error disables the cache for
the process instead of failing the git command.
"""

import hashlib
import json
import sqlite3
import threading

_SCHEMA = """
DROP TABLE IF EXISTS stat;
CREATE TABLE IF NOT EXISTS stat_files (path TEXT PRIMARY KEY, key TEXT, text BLOB, fingerprints TEXT);
CREATE TABLE IF NOT EXISTS stat_texts (id BLOB PRIMARY KEY, manifest BLOB);
CREATE TABLE IF NOT EXISTS digests (digest TEXT, dtype TEXT, shape TEXT, entry TEXT,
                                    PRIMARY KEY (digest, dtype, shape));
CREATE TABLE IF NOT EXISTS trusted (pair BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS layouts (id BLOB PRIMARY KEY, used INTEGER, layout BLOB);
CREATE TABLE IF NOT EXISTS layout_uses (id BLOB PRIMARY KEY, used INTEGER) WITHOUT ROWID;
"""


#: the four bytes every zstd frame starts with (a manifest starts with "git-theta manifest")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _packed_text(manifest):
    """A manifest text as ``stat_texts`` stores it."""
    import zstandard

    return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(manifest)


def _unpacked_text(stored):
    """The manifest text of a ``stat_texts`` row, or None when the row is damaged."""
    stored = bytes(stored)
    if not stored.startswith(ZSTD_MAGIC):
        return stored  # written plain, before texts were compressed
    import zstandard

    from git_theta.manifest import MAX_MANIFEST

    try:
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=MAX_MANIFEST)
    except zstandard.ZstdError:
        return None


#: layouts kept (the most recently used): a 200,000-tensor file's is ~2 MB
LAYOUTS_KEPT = 16

#: values bound per ``IN (...)`` query: well under SQLite's limit on bound variables (999 before
#: 3.32), so a lookup of any number of values works on any SQLite
IN_CHUNK = 500


def _used_now(db, ident):
    """Mark layout ``ident`` as the most recently used."""
    db.execute(
        "INSERT OR REPLACE INTO layout_uses VALUES (?, (SELECT COALESCE(MAX(used), 0) + 1 FROM layout_uses))",
        (ident,),
    )


def _rows_in(db, sql, values):
    """The rows of ``sql`` (with one ``IN ({})`` placeholder) over all ``values``, queried in
    chunks of :data:`IN_CHUNK`."""
    rows = []
    for start in range(0, len(values), IN_CHUNK):
        part = values[start : start + IN_CHUNK]
        rows.extend(db.execute(sql.format(",".join("?" * len(part))), part))
    return rows


class Cache:
    """SQLite-backed caches; every method degrades to a no-op if the database is unusable."""

    def __init__(self, path):
        self._path = path
        self._db = None
        self._broken = False
        self._lock = threading.Lock()

    def _conn(self):
        if self._db is None and not self._broken:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(str(self._path), timeout=30, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.executescript(_SCHEMA)
                self._db = db
            except sqlite3.Error:
                self._broken = True
        return self._db

    def close(self):
        """Close the database. The last connection to close copies the write-ahead log into the
        database (SQLite's checkpoint), so a process pays for what it wrote: an add of 200,000
        tensors (its 24 MB manifest for the stat cache) left it to the next process to commit,
        and the first checkout after that add took ~0.2 s longer."""
        with self._lock:
            db, self._db = self._db, None
            if db is not None:
                try:
                    db.close()
                except sqlite3.Error:
                    pass

    def _run(self, fn, default=None):
        with self._lock:
            db = self._conn()
            if db is None:
                return default
            try:
                with db:
                    return fn(db)
            except sqlite3.Error:
                return default

    # -- stat cache ---------------------------------------------------------------------------
    def get_stat(self, path, key):
        """(manifest bytes, {tensor name: fingerprint}) for ``path`` if its stat key matches."""
        row = self._run(
            lambda db: db.execute(
                "SELECT t.manifest, f.fingerprints FROM stat_files f JOIN stat_texts t ON t.id = f.text "
                "WHERE f.path=? AND f.key=?",
                (path, key),
            ).fetchone()
        )
        if row is None:
            return None
        manifest = _unpacked_text(row[0])
        if manifest is None:
            return None
        try:
            return manifest, json.loads(row[1])
        except ValueError:
            return None

    def has_stat(self, path):
        """True when the stat cache has a row for ``path`` (whatever its key)."""
        row = self._run(lambda db: db.execute("SELECT 1 FROM stat_files WHERE path=?", (path,)).fetchone())
        return row is not None

    def put_stat(self, path, key, manifest, fingerprints):
        # Keyed by sha256: the text may come from a repository's author, who could make two
        # manifests share a weaker hash.
        ident = hashlib.sha256(manifest).digest()
        known = self._run(lambda db: db.execute("SELECT 1 FROM stat_texts WHERE id=?", (ident,)).fetchone())
        stored = None if known else _packed_text(manifest)  # checked out again: compressed once

        def put(db):
            if stored is not None:
                db.execute("INSERT OR IGNORE INTO stat_texts VALUES (?,?)", (ident, stored))
            db.execute(
                "INSERT OR REPLACE INTO stat_files VALUES (?,?,?,?)",
                (path, key, ident, json.dumps(fingerprints, sort_keys=True)),
            )
            db.execute("DELETE FROM stat_texts WHERE id NOT IN (SELECT text FROM stat_files)")

        self._run(put)

    # -- layouts (see git_theta.filter.layouts) --------------------------------------------------
    def get_layout(self, ident):
        """The stored layout with key ``ident``, or None; marks it as the most recently used.

        When it was last used is a row of its own (``layout_uses``): SQLite rewrites a whole row
        to update one column, and a 200,000-tensor file's layout (1.4 MB) rewritten at every
        replay cost ~700 page writes and their checkpoint."""

        def get(db):
            row = db.execute("SELECT layout FROM layouts WHERE id=?", (ident,)).fetchone()
            if row is not None:
                _used_now(db, ident)
            return row

        row = self._run(get)
        return bytes(row[0]) if row is not None else None

    def put_layout(self, ident, layout):
        """Keep ``layout`` (bytes) under key ``ident``, dropping all but the most recently used."""

        def put(db):
            db.execute("INSERT OR REPLACE INTO layouts VALUES (?, 0, ?)", (ident, layout))
            _used_now(db, ident)
            kept = "SELECT id FROM layout_uses ORDER BY used DESC LIMIT ?"
            db.execute(f"DELETE FROM layouts WHERE id NOT IN ({kept})", (LAYOUTS_KEPT,))
            db.execute(f"DELETE FROM layout_uses WHERE id NOT IN ({kept})", (LAYOUTS_KEPT,))

        self._run(put)

    # -- digest index -------------------------------------------------------------------------
    def get_digest(self, digest, dtype, shape):
        """The stored ``update oid:size ...`` text for a tensor with this digest, dtype and shape."""
        row = self._run(
            lambda db: db.execute(
                "SELECT entry FROM digests WHERE digest=? AND dtype=? AND shape=?",
                (digest, dtype, json.dumps(list(shape))),
            ).fetchone()
        )
        return row[0] if row else None

    def get_digests(self, tensors):
        """{(digest, dtype, shape): stored text} for those of ``tensors`` (with digest, dtype and
        shape) the index knows, in one query."""
        digests = sorted({t.digest for t in tensors})
        rows = self._run(
            lambda db: _rows_in(db, "SELECT digest, dtype, shape, entry FROM digests WHERE digest IN ({})", digests),
            default=[],
        )
        found = {}
        for digest, dtype, shape, entry in rows:
            try:
                found[(digest, dtype, tuple(json.loads(shape)))] = entry
            except (ValueError, TypeError):
                continue
        return found

    def put_digests(self, entries):
        """Remember how each TensorEntry in ``entries`` is stored."""
        rows = [
            (
                e.digest,
                e.dtype,
                json.dumps(list(e.shape)),
                " ".join([e.update, *(str(r) for r in e.objects)]),
            )
            for e in entries
        ]
        if rows:
            self._run(lambda db: db.executemany("INSERT OR REPLACE INTO digests VALUES (?,?,?,?)", rows))

    # -- trust ledger (see git_theta.store.trust) ------------------------------------------------
    def is_trusted(self, key):
        """True when the pair with ledger key ``key`` (bytes) is recorded as trusted."""
        return self._run(lambda db: db.execute("SELECT 1 FROM trusted WHERE pair=?", (key,)).fetchone()) is not None

    def trusted_among(self, keys):
        """The set of ``keys`` recorded as trusted, or None when the cache is unusable."""
        keys = list(keys)
        return self._run(
            lambda db: {bytes(row[0]) for row in _rows_in(db, "SELECT pair FROM trusted WHERE pair IN ({})", keys)}
        )

    def put_trusted(self, keys):
        """Record the ledger keys ``keys`` as trusted."""
        self._run(lambda db: db.executemany("INSERT OR IGNORE INTO trusted VALUES (?)", [(k,) for k in keys]))

    def forget_trusted(self):
        """Forget every trusted pair."""
        self._run(lambda db: db.execute("DELETE FROM trusted"))
