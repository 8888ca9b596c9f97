"""Huge tensors in pieces: memory near one copy of the tensor, not two or three.

A tensor of at least ``theta.streamThreshold`` bytes (64 MiB by default) takes this path:

- **Reading** (clean): its bytes go from git's pipe into one buffer, once; a second thread hashes
  each piece (sha256 for the digest, xxh3 for the stat cache) while the next piece is read, so
  the hashes cost no pass of their own. The buffer grows with the bytes that actually arrive, so
  a header claiming terabytes fails as a truncated file, not as an allocation.
- **Encoding** (clean, a dense keyframe): byte planes are compressed chunk by chunk on worker
  threads and handed to the object writer in order as they finish, a few chunks ahead; the object
  file is hashed and written incrementally. The encoded tensor is never held whole.
- **Decoding** (smudge, a dense keyframe): the object is memory-mapped, and the pages of each
  chunk's frames are dropped from the process once the chunk is decoded, so the mapping does not
  add a second tensor's worth of resident memory. In the filter process the decoded pieces go to
  git as they come (:func:`iter_decoded_releasing`, checked after the last one: git drops a file
  whose status ends in error); elsewhere they fill one buffer, checked before a byte is written.

What stays whole is the tensor's own buffer in clean, which needs it for dedup and deltas.
"""

import hashlib
import mmap
import queue
import threading

from git_theta.store.container import _FRAME_HEAD

#: bytes read from the pipe (and hashed) at a time
PIECE = 8 << 20
#: the buffer for a tensor being read starts at this size and grows by a quarter (at least this
#: much) at a time, ahead of the bytes that arrive
FIRST_BYTES = 8 << 20
#: encoded chunks in flight ahead of the object writer, per worker thread
AHEAD = 2


class _Hasher:
    """sha256 and xxh3-128 of a buffer's pieces, computed on a thread of their own, in order."""

    def __init__(self):
        import xxhash

        self.sha = hashlib.sha256()
        self.xxh = xxhash.xxh3_128()
        self._todo = queue.Queue()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="theta-hash", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._todo.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    self.sha.update(item)  # releases the GIL: overlaps the next read
                    self.xxh.update(item)
            except BaseException as exc:  # noqa: BLE001 - reported by drain()
                self._error = exc
            finally:
                del item
                self._todo.task_done()

    def add(self, view):
        self._todo.put(view)

    def drain(self):
        """Wait until every piece given so far is hashed (and no view of the buffer is held)."""
        self._todo.join()
        if self._error is not None:
            raise self._error

    def close(self):
        self._todo.put(None)
        self._thread.join()


class HashedBuffer(bytearray):
    """A tensor's bytes as :func:`read_hashed` read them, with the hashes it computed on the way:
    ``sha256`` (the tensor digest, hex) and ``xxh3`` (the stat cache's fingerprint, hex)."""

    sha256 = ""
    xxh3 = ""


def read_hashed(stream, size, truncated):
    """Read exactly ``size`` bytes of ``stream`` into a new :class:`HashedBuffer`, hashing them
    on the way. ``truncated(got)`` makes the exception raised when the stream ends early. Memory
    is the bytes received plus at most a quarter of them (or FIRST_BYTES), whatever ``size`` claims.
    """
    hasher = _Hasher()
    try:
        buf = HashedBuffer(min(size, FIRST_BYTES))
        got = 0
        while got < size:
            if got == len(buf):
                hasher.drain()  # a bytearray cannot grow while a view of it is exported
                for block in _zeros(min(size, len(buf) + max(FIRST_BYTES, len(buf) // 4)) - len(buf)):
                    buf += block  # realloc grows a large block in place (mremap): no copy
            end = min(len(buf), got + PIECE)
            piece = memoryview(buf)[got:end]
            filled = 0
            while filled < len(piece):
                n = stream.readinto(piece[filled:])
                if not n:
                    raise truncated(got + filled)
                filled += n
            hasher.add(piece)
            del piece
            got = end
        hasher.drain()
    finally:
        hasher.close()
    buf.sha256, buf.xxh3 = hasher.sha.hexdigest(), hasher.xxh.hexdigest()
    return buf


def hashes_of(data):
    """``(sha256 hex, xxh3-128 hex)`` of ``data`` when :func:`read_hashed` computed them, else None."""
    return (data.sha256, data.xxh3) if isinstance(data, HashedBuffer) and data.sha256 else None


def _zeros(count):
    """``count`` zero bytes as views of one block of at most a piece (no tensor-sized temporary;
    the block is calloc'ed, so its pages are never made resident)."""
    view = memoryview(bytes(min(count, PIECE)))
    while count > 0:
        take = min(count, len(view))
        yield view[:take]
        count -= take


def encoded_chunks(data, itemsize, threads):
    """The frames of :func:`git_theta.tensors.planes.encode_planes` for ``data``, chunk by chunk.

    Chunks are encoded on ``threads`` worker threads and yielded in order; at most ``AHEAD`` chunks
    per thread are encoded before the caller takes them, so memory stays a few chunks.
    """
    from concurrent.futures import ThreadPoolExecutor

    from git_theta.tensors.planes import chunk_step, encode_planes

    view = memoryview(data).cast("B")
    step = chunk_step(itemsize)
    starts = range(0, len(view), step)
    threads = max(1, threads)
    with ThreadPoolExecutor(threads, thread_name_prefix="theta-encode") as pool:
        pending = []
        position = 0
        try:
            while position < len(starts) or pending:
                while position < len(starts) and len(pending) < AHEAD * threads:
                    start = starts[position]
                    pending.append(pool.submit(encode_planes, view[start : start + step], itemsize))
                    position += 1
                yield from pending.pop(0).result()
        finally:
            for future in pending:
                future.cancel()


def frame_ends(payload, frames_per_chunk):
    """Offsets in ``payload`` at which each chunk's frames end (frame headers only are read)."""
    ends = []
    pos, count, end = 0, 0, len(payload)
    while pos + _FRAME_HEAD.size <= end:
        _, length = _FRAME_HEAD.unpack_from(payload, pos)
        pos += _FRAME_HEAD.size + length
        count += 1
        if count % frames_per_chunk == 0:
            ends.append(min(pos, end))
    return ends


class PageReleaser:
    """Drops the pages of a memory-mapped object from the process as a decoder passes them.

    ``payload`` is a memoryview of an object as :meth:`ObjectStore.read` returns it; for a large
    object that is a read-only mapping of the file, whose pages would otherwise stay resident
    until the whole tensor is decoded. Dropping a page of a file mapping loses nothing: touching
    it again reads it back from the page cache. For any other payload this does nothing.
    """

    def __init__(self, payload):
        self._map = payload.obj if isinstance(payload, memoryview) and isinstance(payload.obj, mmap.mmap) else None
        self._offset = 0
        self._done = 0
        if self._map is not None:
            import numpy as np

            base = np.frombuffer(self._map, dtype=np.uint8)
            self._offset = np.frombuffer(payload, dtype=np.uint8).ctypes.data - base.ctypes.data if len(payload) else 0
            del base

    @property
    def idle(self):
        """True when ``payload`` is not a mapping: nothing to release."""
        return self._map is None

    def through(self, position):
        """Release every whole page before ``position`` (an offset in the payload)."""
        if self._map is None:
            return
        end = (self._offset + position) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self._done:
            try:
                self._map.madvise(mmap.MADV_DONTNEED, self._done, end - self._done)
            except (AttributeError, OSError, ValueError):
                self._map = None  # no madvise here: the mapping simply stays resident
                return
            self._done = end


#: dense keyframes of at least this many bytes release their object's pages while they decode
RELEASE_BYTES = 16 << 20


def iter_decoded_releasing(payload, nbytes, itemsize, oid):
    """:func:`git_theta.tensors.planes.iter_decoded_chunks`, dropping the pages of a
    memory-mapped ``payload`` (see :class:`PageReleaser`) once each chunk's pieces are out: the
    tensor a piece at a time with neither a tensor-sized buffer nor the whole mapping resident."""
    from git_theta.tensors.planes import chunk_step, iter_decoded_chunks

    releaser = PageReleaser(payload)
    ends = [] if releaser.idle else frame_ends(payload, itemsize)
    step = chunk_step(itemsize)
    for start, piece in iter_decoded_chunks(payload, nbytes, itemsize, oid):
        yield start, piece
        end = start + len(piece)
        if ends and (end % step == 0 or end == nbytes) and (end - 1) // step < len(ends):
            releaser.through(ends[(end - 1) // step])


def decode_releasing(payload, nbytes, itemsize, oid, out, digest=None):
    """:func:`git_theta.tensors.planes.decode_planes` into ``out``, dropping the pages of a
    memory-mapped ``payload`` (see :class:`PageReleaser`) once each chunk is decoded."""
    import numpy as np

    from git_theta.tensors.planes import decode_planes, from_planes, iter_chunk_planes

    releaser = PageReleaser(payload)
    if releaser.idle:
        return decode_planes(payload, nbytes, itemsize, oid, out=out, digest=digest)
    ends = frame_ends(payload, itemsize)
    target = np.frombuffer(out, dtype=np.uint8)
    for number, (start, size, planes) in enumerate(iter_chunk_planes(payload, nbytes, itemsize, oid)):
        from_planes(planes, target[start : start + size], itemsize, digest, start)
        del planes
        if number < len(ends):
            releaser.through(ends[number])
    return out
