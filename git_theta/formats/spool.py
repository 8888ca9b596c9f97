"""Spooling git's stream to a temporary file, for formats that need to seek (zip archives).

git hands clean a pipe; zip readers need the central directory at the end of the file, so the bytes
are copied to a named temporary file first (disk, not memory; ``TMPDIR`` chooses where). The copy
is fingerprinted (xxh3-128) on the way, and checkout fingerprints what it writes, so the cleaner
recognises bytes it has seen (after ``touch``, ``git status`` re-cleans) without parsing them: the
stat cache keeps, under :func:`whole_file_key`, the fingerprint of the file last cleaned or
checked out at each path and its manifest.
"""

import tempfile
from contextlib import contextmanager

CHUNK = 1 << 20


def whole_file_key(path):
    """The stat-cache row of ``path``'s whole-file fingerprint (git paths never start with '/')."""
    return "/whole-file/" + path


def _disk_full(exc):
    """A full temp file system is the user's to fix (TMPDIR), not a bug: say which one."""
    from git_theta.errors import DiskFullError

    DiskFullError.check(
        exc,
        tempfile.gettempdir(),
        "copying the file to a temporary file",
        hint="free space there, or point TMPDIR at a larger file system, then run the command again",
    )


class Spool:
    """A named temporary copy of a binary stream (deleted on close) and the xxh3-128 of its bytes."""

    def __init__(self, stream, suffix=""):
        import xxhash

        try:
            self.file = tempfile.NamedTemporaryFile(prefix="git-theta-spool-", suffix=suffix)
        except OSError as exc:
            _disk_full(exc)
            raise
        try:
            digest = xxhash.xxh3_128()
            while True:
                chunk = stream.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                self.file.write(chunk)
            self.file.flush()
            self.file.seek(0)
        except BaseException as exc:
            self.file.close()
            _disk_full(exc)
            raise
        self.name = self.file.name
        self.fingerprint = digest.hexdigest()

    # A Spool is also a readable, seekable binary file, for formats that do not use spooled().
    def read(self, n=-1):
        return self.file.read(n)

    def readinto(self, buf):
        return self.file.readinto(buf)

    def seek(self, offset, whence=0):
        return self.file.seek(offset, whence)

    def tell(self):
        return self.file.tell()

    def readable(self):
        return True

    def seekable(self):
        return True

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextmanager
def spooled(stream, suffix=""):
    """``stream`` as a seekable named file, rewound: the cleaner's Spool itself, or a new one."""
    if isinstance(stream, Spool):  # the cleaner spooled it already (and closes it)
        stream.file.seek(0)
        yield stream.file
        return
    with Spool(stream, suffix) as spool:
        yield spool.file


class _Fingerprinted:
    """A stream wrapper taking the xxh3-128 of every byte that passes through it (the same
    fingerprint :class:`Spool` and :func:`~git_theta.formats.peekable.read_ahead` take)."""

    def __init__(self, stream):
        import xxhash

        self._stream = stream
        self._digest = xxhash.xxh3_128()

    @property
    def fingerprint(self):
        """xxh3-128 of everything passed through so far."""
        return self._digest.hexdigest()


class FingerprintReader(_Fingerprinted):
    """A binary reader passing ``stream`` through, fingerprinting every byte read (without
    holding the bytes, unlike ``read_ahead``)."""

    def readinto(self, buf):
        view = memoryview(buf).cast("B")
        n = self._stream.readinto(view)
        self._digest.update(view[:n])
        return n

    def read(self, n=-1):
        data = self._stream.read(n)
        self._digest.update(data)
        return data

    def readable(self):
        return True


class WriteOnly(_Fingerprinted):
    """Exposes only ``write``/``flush`` of a binary stream, fingerprinting what passes through.

    Zip writers produce different bytes for seekable and unseekable outputs (data descriptors);
    hiding ``seek``/``tell`` makes checkout write the same bytes whatever ``out`` is.
    """

    def write(self, data):
        self._digest.update(data)
        self._stream.write(data)
        return len(data)

    def flush(self):
        """Nothing: the caller of join ends the output (a pkt-line flush is a packet boundary)."""
