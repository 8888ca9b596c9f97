"""git's pkt-line framing, as used by the long-running filter protocol.

A packet is four hex digits giving the total length (including those four) followed by the payload;
``0000`` is a flush packet. Payloads are at most 65516 bytes.
"""

import os

from git_theta.errors import FilterProtocolError

MAX_PAYLOAD = 65516
FLUSH = b"0000"


class PktReader:
    """Reads packets from a binary stream."""

    def __init__(self, stream):
        self._stream = stream

    def _read_exact(self, n):
        data = self._stream.read(n)
        if data is None or len(data) != n:
            if not data:
                raise EOFError("end of input")
            raise FilterProtocolError(f"truncated pkt-line: wanted {n} bytes, got {len(data)}")
        return data

    def read_packet(self):
        """Return the next payload as bytes, or None for a flush packet. EOFError at clean EOF."""
        length = self.read_length()
        if length is None:
            return None
        return self._read_exact(length) if length else b""

    def read_length(self):
        """Read the next packet's length line: its payload's size, None for a flush packet (the
        payload, if any, is to be read next with :meth:`read_payload_into` or ``read_packet``'s
        way). EOFError at clean EOF."""
        head = self._read_exact(4)
        try:
            length = int(head, 16)
        except ValueError:
            raise FilterProtocolError(f"bad pkt-line length {head!r}") from None
        if length == 0:
            return None
        if length < 4 or length > MAX_PAYLOAD + 4:
            raise FilterProtocolError(f"bad pkt-line length {length}")
        return length - 4

    def read_payload_into(self, view):
        """Read a payload of exactly ``len(view)`` bytes into ``view`` (no copy in between)."""
        got = 0
        readinto = getattr(self._stream, "readinto", None)
        while got < len(view):
            if readinto is not None:
                n = readinto(view[got:])
            else:
                data = self._stream.read(len(view) - got)
                n = len(data or b"")
                view[got : got + n] = data or b""
            if not n:
                raise FilterProtocolError(f"truncated pkt-line: wanted {len(view)} bytes, got {got}")
            got += n

    def read_text_list(self):
        """Read text packets up to a flush; return them without trailing newlines."""
        items = []
        while True:
            packet = self.read_packet()
            if packet is None:
                return items
            try:
                items.append(packet.decode("utf-8").rstrip("\n"))
            except UnicodeDecodeError:
                raise FilterProtocolError(f"pkt-line text is not UTF-8: {packet[:40]!r}") from None

    def read_key_values(self):
        """Read ``key=value`` packets up to a flush into a dict (later keys win)."""
        result = {}
        for item in self.read_text_list():
            key, sep, value = item.partition("=")
            if not sep:
                raise FilterProtocolError(f"expected key=value, got {item!r}")
            result[key] = value
        return result


class PktContentReader:
    """A file-like ``read()`` over content packets that ends at the flush packet.

    Lets a checkpoint reader consume git's content stream incrementally, without holding the whole
    file in memory. ``drain()`` consumes whatever the reader left unread.
    """

    def __init__(self, pkt_reader):
        self._pkt = pkt_reader
        self._buffer = b""
        self._pos = 0
        self._done = False

    def readable(self):
        return True

    def _fill(self):
        if self._done:
            return False
        packet = self._pkt.read_packet()
        if packet is None:
            self._done = True
            return False
        self._buffer = packet
        self._pos = 0
        return True

    def read(self, n=-1):
        if n is None or n < 0:
            parts = [self._buffer[self._pos :]]
            self._buffer, self._pos = b"", 0
            while self._fill():
                parts.append(self._buffer)
                self._buffer = b""
            return b"".join(parts)
        out = bytearray(n)
        got = self.readinto(out)
        del out[got:]
        return out  # bytes-like: a copy to bytes would be one more pass over every byte

    def readinto(self, buf):
        """Read into ``buf``; a whole packet that fits is read straight into it (the content of
        a checkpoint crosses the pipe into its final buffer with no copy in between)."""
        view = memoryview(buf).cast("B")
        filled = 0
        while filled < len(view):
            if self._pos < len(self._buffer):
                take = min(len(view) - filled, len(self._buffer) - self._pos)
                view[filled : filled + take] = memoryview(self._buffer)[self._pos : self._pos + take]
                self._pos += take
                filled += take
                continue
            if self._done:
                break
            length = self._pkt.read_length()
            if length is None:
                self._done = True
                break
            if length <= len(view) - filled:
                self._pkt.read_payload_into(view[filled : filled + length])
                filled += length
            else:
                self._buffer, self._pos = self._pkt._read_exact(length) if length else b"", 0
        return filled

    def drain(self):
        """Consume the rest of the content (up to and including the flush)."""
        self._buffer, self._pos = b"", 0
        while self._fill():
            pass


#: packets gathered into one system call by :meth:`PktWriter.write_packets` (~1 MiB, the size
#: the filter grows its pipe to)
PACKETS_PER_CALL = 16


class PktWriter:
    """Writes packets to a binary stream."""

    def __init__(self, stream):
        self._stream = stream
        try:
            self._fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            self._fd = None

    def write_packet(self, payload):
        self._stream.write(_length_prefix(payload))
        self._stream.write(payload)

    def write_packets(self, payloads):
        """Write full packets, several per system call where the stream is a file descriptor.

        The payloads go to the kernel straight from the caller's buffers (``writev``): a
        buffered stream would copy every byte once more, and one call per packet wakes the
        reader for each 64 KiB.
        """
        if self._fd is None or not hasattr(os, "writev"):
            for payload in payloads:
                self.write_packet(payload)
            return
        self._stream.flush()  # keep the order of what was written before
        for first in range(0, len(payloads), PACKETS_PER_CALL):
            parts = []
            for payload in payloads[first : first + PACKETS_PER_CALL]:
                parts += [_length_prefix(payload), payload]
            _write_all(self._fd, parts)

    def write_text(self, text):
        self.write_packet(text.encode("utf-8") + b"\n")

    def flush(self):
        self._stream.write(FLUSH)
        self._stream.flush()

    def write_text_list(self, items):
        for item in items:
            self.write_text(item)
        self.flush()


def _length_prefix(payload):
    """The four hex digits that start a packet carrying ``payload``."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("pkt-line payload too long")
    return b"%04x" % (len(payload) + 4)


def _write_all(fd, parts):
    """``os.writev`` until every byte of ``parts`` is written (a pipe may take part of them)."""
    parts = [memoryview(part).cast("B") for part in parts]
    while parts:
        written = os.writev(fd, parts)
        while parts and written >= len(parts[0]):
            written -= len(parts[0])
            parts.pop(0)
        if parts and written:
            parts[0] = parts[0][written:]


class PktContentWriter:
    """A file-like ``write()`` that frames content as packets (no flush: the caller ends it)."""

    def __init__(self, pkt_writer):
        self._pkt = pkt_writer
        self._pending = bytearray()
        self.bytes_written = 0

    def writable(self):
        return True

    def write(self, data):
        view = memoryview(data).cast("B")
        self.bytes_written += len(view)
        if self._pending:
            need = MAX_PAYLOAD - len(self._pending)
            self._pending += view[:need]
            view = view[need:]
            if len(self._pending) < MAX_PAYLOAD:
                return len(data)
            self._pkt.write_packet(bytes(self._pending))
            self._pending.clear()
        full = len(view) - len(view) % MAX_PAYLOAD
        if full:  # a small tensor only joins the pending packet (200,000 of them: no flush each)
            self._pkt.write_packets([view[start : start + MAX_PAYLOAD] for start in range(0, full, MAX_PAYLOAD)])
        self._pending += view[full:]
        return len(data)

    def flush(self):
        """Send any buffered partial packet."""
        if self._pending:
            self._pkt.write_packet(bytes(self._pending))
            self._pending.clear()
