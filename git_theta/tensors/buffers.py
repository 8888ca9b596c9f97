"""Recycled tensor buffers for decoding, and per-thread scratch space.

A checkpoint's worth of freshly allocated memory costs a page fault per 4 KiB page, and on
virtual machines (where the host backs guest pages lazily) those faults cost as much time as the
decoding itself. Smudge therefore decodes each tensor into a buffer recycled from a tensor already
written out, and decoders keep their per-chunk temporaries in a scratch buffer per thread.

The pool is opt-in per thread (:func:`using`), so every other caller of the decoders (diff, merge,
fsck) gets plain, independent ``bytearray`` objects.
"""

import threading
from collections import OrderedDict, deque
from contextlib import contextmanager

_local = threading.local()


class BufferPool:
    """Free ``bytearray`` buffers by exact size, bounded in bytes (the oldest go first).

    Buffers are filed by size, so :meth:`take` and :meth:`give` cost the same however many are
    free (a scan of every free buffer made 20,000 small tensors quadratic).
    """

    def __init__(self, limit):
        self.limit = limit
        self._by_size = {}  # nbytes -> deque of bytearray, oldest first
        self._order = OrderedDict()  # id -> bytearray, oldest first (for eviction)
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def free_bytes(self):
        """Bytes held for reuse."""
        return self._bytes

    def take(self, nbytes):
        """A buffer of ``nbytes`` bytes: a recycled one (old contents) or a new, zeroed one."""
        with self._lock:
            same = self._by_size.get(nbytes)
            if same:
                buf = same.pop()
                if not same:
                    del self._by_size[nbytes]
                del self._order[id(buf)]
                self._bytes -= nbytes
                return buf
        return bytearray(nbytes)

    def give(self, buf):
        """Keep ``buf`` for reuse; the caller must hold no other reference to it or its memory."""
        if not isinstance(buf, bytearray) or len(buf) > self.limit:
            return
        with self._lock:
            if id(buf) in self._order:
                return
            self._order[id(buf)] = buf
            self._by_size.setdefault(len(buf), deque()).append(buf)
            self._bytes += len(buf)
            while self._bytes > self.limit:
                _, old = self._order.popitem(last=False)
                same = self._by_size[len(old)]
                same.popleft()  # the oldest of all is the oldest of its size
                if not same:
                    del self._by_size[len(old)]
                self._bytes -= len(old)


@contextmanager
def using(pool):
    """Make :func:`new_buffer` take from ``pool`` (None: allocate) in this thread for the duration."""
    previous = getattr(_local, "pool", None)
    _local.pool = pool
    try:
        yield pool
    finally:
        _local.pool = previous


def new_buffer(nbytes):
    """A writable ``bytearray`` of ``nbytes`` for a decoded tensor (contents undefined)."""
    pool = getattr(_local, "pool", None)
    return bytearray(nbytes) if pool is None else pool.take(nbytes)


def scratch(nbytes, slot):
    """A memoryview of ``nbytes`` of this thread's scratch buffer named ``slot``.

    The contents are valid until the next call for the same slot; callers that nest use
    different slots.
    """
    buffers = getattr(_local, "scratch", None)
    if buffers is None:
        buffers = _local.scratch = {}
    buf = buffers.get(slot)
    if buf is None or len(buf) < nbytes:
        buf = buffers[slot] = bytearray(nbytes)
    return memoryview(buf)[:nbytes]
