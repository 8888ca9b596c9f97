"""A binary reader that lets the first bytes be inspected before the real reader takes over."""


class PeekableReader:
    """Wraps a binary stream; ``peek(n)`` returns up to ``n`` leading bytes without consuming them."""

    def __init__(self, stream):
        self._stream = stream
        self._head = b""

    def peek(self, n):
        while len(self._head) < n:
            more = self._stream.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, n=-1):
        if n is None or n < 0:
            data, self._head = self._head + self._stream.read(), b""
            return data
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._stream.read(n - len(data))
            return data
        return self._stream.read(n)

    def readinto(self, buf):
        view = memoryview(buf).cast("B")
        if self._head:
            take = min(len(self._head), len(view))
            view[:take] = self._head[:take]
            self._head = self._head[take:]
            return take
        if hasattr(self._stream, "readinto"):
            return self._stream.readinto(view)
        data = self._stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readable(self):
        return True


class ReplayReader:
    """A binary reader that gives back ``chunks`` (bytes read ahead) and then the rest of ``stream``.

    Each chunk is let go once it has been read, so the bytes held shrink as the reader advances.
    """

    def __init__(self, chunks, stream):
        from collections import deque

        self._chunks = deque(chunks)
        self._offset = 0  # into the first chunk
        self._stream = stream

    def readinto(self, buf):
        view = memoryview(buf).cast("B")
        if not self._chunks:
            return self._stream.readinto(view)
        chunk = self._chunks[0]
        take = min(len(chunk) - self._offset, len(view))
        view[:take] = memoryview(chunk)[self._offset : self._offset + take]  # no copy in between
        self._offset += take
        if self._offset == len(chunk):
            self._chunks.popleft()
            self._offset = 0
        return take

    def read(self, n=-1):
        if n is None or n < 0:
            parts = [bytes(memoryview(self._chunks.popleft())[self._offset :])] if self._chunks else []
            parts += self._chunks
            self._chunks.clear()
            self._offset = 0
            return b"".join(parts) + self._stream.read()
        out = bytearray()
        while len(out) < n and self._chunks:
            chunk = self._chunks[0]
            end = min(len(chunk), self._offset + n - len(out))
            out += chunk[self._offset : end]
            self._offset = end
            if end == len(chunk):
                self._chunks.popleft()
                self._offset = 0
        if len(out) < n:
            out += self._stream.read(n - len(out))
        return bytes(out)

    def readable(self):
        return True


def read_ahead(stream, limit, chunk=1 << 20):
    """(chunks, fingerprint): up to ``limit`` bytes read from ``stream``, and the xxh3-128 of the
    whole stream when it ended within them (else None: more bytes follow)."""
    import xxhash

    digest = xxhash.xxh3_128()
    chunks, total = [], 0
    while total <= limit:
        data = stream.read(chunk)
        if not data:
            return chunks, digest.hexdigest()
        digest.update(data)
        chunks.append(data)
        total += len(data)
    return chunks, None
