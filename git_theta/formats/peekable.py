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
