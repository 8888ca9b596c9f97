"""The trust ledger: which (object chain -> tensor digest) pairs this clone has checked itself.

A manifest's sha256 digest names a tensor, but it binds bytes only when this clone computed it
(DESIGN §12). A repository's author can write a manifest that keeps a tensor's genuine digest and
points it at a valid, correctly content-addressed object that decodes to other bytes, with a
read-time checksum (xxh3, unkeyed) recomputed to match. So a pair is *trusted* only once this
clone either

- decoded the chain and hashed the result with sha256, equal to the digest (checkout, fsck, a
  diff or merge input, clean verifying a parent or index entry before reusing it), or
- encoded the chain itself from bytes whose sha256 it computed (clean, merge).

Until then every decode hashes its result with sha256 before a byte is kept (a huge keyframe's
checkout hands its bytes to git as they decode, and git drops the file if they hash otherwise);
afterwards the object's xxh3 checksum suffices (it catches accidental corruption at a tenth of the
cost). Dedup and delta bases reuse trusted pairs only.

The ledger lives in the local SQLite cache (``<git common dir>/theta/cache.sqlite3``, table
``trusted``), which no fetch, clone or push can write: a pair is keyed by the sha256 of its digest
and its object ids, so the key says nothing a repository could forge. Losing the table costs one
sha256 pass per tensor at the next checkout, never correctness; ``forget`` empties it.
"""

import contextlib
import hashlib
import threading

#: chains deeper than ``theta.maxChainDepth`` are refused before decoding, past this margin: a
#: repository written with a larger setting (or before it was lowered) still checks out.
CHAIN_MARGIN = 16


def max_chain_objects(max_depth):
    """The longest object chain decoding accepts: ``max_depth`` deltas, the margin, a keyframe."""
    return max(0, int(max_depth)) + CHAIN_MARGIN + 1


def pair_key(entry):
    """The ledger key of ``entry``'s pair: sha256 over its digest and its chain's object ids."""
    hasher = hashlib.sha256(entry.digest.encode())
    for ref in entry.objects:
        hasher.update(b" " + ref.oid.encode())
    return hasher.digest()


def batched(trust):
    """``trust.batch()``, or nothing to do for a store without a ledger (None)."""
    return contextlib.nullcontext() if trust is None else trust.batch()


class TrustLedger:
    """Trusted pairs of one repository, read from and written to its :class:`~git_theta.store.cache.Cache`.

    Positive answers are remembered for the process (a pair never stops being trusted, since
    objects are immutable and named by their hash); a checkout asks SQLite once per file
    (:meth:`prefetch`), not once per tensor.
    """

    def __init__(self, cache):
        self._cache = cache
        self._known = set()
        self._absent = set()  # keys :meth:`prefetch` found untrusted (until recorded)
        self._lock = threading.Lock()
        self._batches = 0  # open :meth:`batch` blocks
        self._pending = set()  # keys recorded within them, not written yet

    def prefetch(self, entries):
        """Look up the pairs of ``entries`` in one query, so :meth:`trusted` asks SQLite nothing
        for them. A pair found untrusted is answered untrusted until it is recorded: at worst a
        pair another process verified meanwhile is verified again, never the other way round."""
        keys = {pair_key(e) for e in entries}
        with self._lock:
            keys -= self._known
        if not keys:
            return
        found = self._cache.trusted_among(keys)
        if found is None:  # the cache is unusable: ask per pair as before
            return
        with self._lock:
            self._known |= found
            self._absent |= keys - found

    def trusted(self, entry):
        """True when this clone has verified or encoded ``entry``'s (chain -> digest) pair."""
        key = pair_key(entry)
        with self._lock:
            if key in self._known:
                return True
            if key in self._absent:
                return False
        if self._cache.is_trusted(key):
            with self._lock:
                self._known.add(key)
            return True
        return False

    def record(self, entries):
        """Record the pairs of ``entries`` (TensorEntry objects) as trusted."""
        keys = {pair_key(e) for e in entries}
        with self._lock:
            keys -= self._known
            self._known |= keys
            self._absent -= keys
            if self._batches:
                self._pending |= keys
                return
        if keys:
            self._cache.put_trusted(keys)

    @contextlib.contextmanager
    def batch(self):
        """Within this block, pairs recorded are written to the cache together when it ends (one
        transaction, not one per tensor: a re-add of 20,000 tensors with 200 changed spent 0.1 s
        committing 200 of them); this process knows them at once. Blocks may nest."""
        with self._lock:
            self._batches += 1
        try:
            yield
        finally:
            with self._lock:
                self._batches -= 1
                keys = self._pending if not self._batches else set()
                if keys:
                    self._pending = set()
            if keys:
                self._cache.put_trusted(keys)

    def forget(self):
        """Forget every trusted pair: the next decode of each tensor is sha256-verified again."""
        with self._lock:
            self._known.clear()
            self._absent.clear()
        self._cache.forget_trusted()
