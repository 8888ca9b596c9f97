"""Reading a checkpoint from git's pipe: many small header fields, then large tensor payloads.

:class:`ByteCursor` is the helper format plugins use in ``split``: it reads ahead in chunks so a
header of thousands of tiny fields costs few reads, hands out large payloads read straight into
their own buffer, counts the position, can record the bytes it hands out (to keep a header section
verbatim), and turns a short read into a :class:`~git_theta.errors.CheckpointError` naming the file
and what was being read.
"""

import struct

from git_theta.errors import CheckpointError

CHUNK = 1 << 16
TRUNCATED_HINT = "the file was not completely written; save or download it again"


class ByteCursor:
    """A forward-only reader over a binary stream. ``kind`` names the format in messages."""

    def __init__(self, stream, path, kind="checkpoint"):
        self._stream = stream
        self._path = path
        self._kind = kind
        self._buf = bytearray()
        self.position = 0
        #: while a bytearray, every byte handed out by take/unpack is appended to it
        self.recording = None

    def _truncated(self, what, detail=""):
        return CheckpointError(f"{self._path}: {self._kind} file is truncated in {what}{detail}", hint=TRUNCATED_HINT)

    def _fill(self, n):
        while len(self._buf) < n:
            more = self._stream.read(max(CHUNK, n - len(self._buf)))
            if not more:
                return False
            self._buf += more
        return True

    def at_end(self):
        """True when the stream has no more bytes."""
        return not self._fill(1)

    def take(self, n, what):
        """The next ``n`` bytes (small reads: header fields)."""
        if not self._fill(n):
            raise self._truncated(what)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        self.position += n
        if self.recording is not None:
            self.recording += data
        return data

    def unpack(self, fmt, what):
        """``struct.unpack`` of the next bytes; ``fmt`` without a byte-order prefix is little-endian."""
        fmt = fmt if fmt[:1] in "<>!=@" else "<" + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def take_large(self, n, what):
        """The next ``n`` bytes in a new bytearray, read straight into place (tensor payloads)."""
        out = bytearray(n)
        view = memoryview(out)
        got = min(n, len(self._buf))
        view[:got] = self._buf[:got]
        del self._buf[:got]
        while got < n:
            chunk = self._stream.read(min(n - got, 1 << 24))
            if not chunk:
                raise self._truncated(what, f" ({got} of {n} bytes)")
            view[got : got + len(chunk)] = chunk
            got += len(chunk)
        self.position += n
        if self.recording is not None:
            self.recording += out
        return out

    def skip_zeros(self, n, what):
        """Consume ``n`` padding bytes, which must be zero (other bytes would be lost on checkout)."""
        while n:
            step = min(n, CHUNK)
            if self.take(step, what).count(0) != step:
                raise CheckpointError(
                    f"{self._path}: non-zero bytes in {what}",
                    hint=f"git-theta keeps {self._kind} padding as zeros; rewrite the file with a standard writer",
                )
            n -= step

    def trailing_zeros(self, what):
        """Consume the rest of the stream, which must be zero bytes; return how many there were."""
        total = 0
        while True:
            data = bytes(self._buf) or self._stream.read(CHUNK)
            self._buf = bytearray()
            if not data:
                return total
            if data.count(0) != len(data):
                raise CheckpointError(f"{self._path}: unexpected bytes {what} (corrupt or not a {self._kind} file)")
            total += len(data)
            self.position += len(data)
