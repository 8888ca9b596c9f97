"""Spooling git's stream to a temporary file, for formats that need to seek (zip archives).

git hands clean a pipe; zip readers need the central directory at the end of the file, so the bytes
are copied to an unnamed-on-close temporary file first (disk, not memory).
"""

import shutil
import tempfile

CHUNK = 1 << 20


def spool(stream, suffix=""):
    """Copy ``stream`` to a named temporary file (deleted on close); return it, rewound."""
    tmp = tempfile.NamedTemporaryFile(prefix="git-theta-spool-", suffix=suffix)
    try:
        shutil.copyfileobj(stream, tmp, CHUNK)
        tmp.flush()
        tmp.seek(0)
    except BaseException:
        tmp.close()
        raise
    return tmp


class WriteOnly:
    """Exposes only ``write``/``flush`` of a binary stream.

    Zip writers produce different bytes for seekable and unseekable outputs (data descriptors);
    hiding ``seek``/``tell`` makes checkout write the same bytes whatever ``out`` is.
    """

    def __init__(self, out):
        self._out = out

    def write(self, data):
        self._out.write(data)
        return len(data)

    def flush(self):
        """Nothing: the caller of join ends the output (a pkt-line flush is a packet boundary)."""
