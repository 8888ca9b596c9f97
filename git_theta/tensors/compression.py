"""zstandard compression of byte planes, tuned for neural-network weights.

Weight planes are either nearly incompressible (low mantissa bytes) or low-entropy symbols with no
long repeats (the sign/exponent byte). A fast-strategy zstd with a long minimum match compresses the
latter better and faster than the default level; the former are detected on a sample and stored raw,
which saves most of the time. Compressors are per thread because zstd contexts are not thread-safe.
"""

import threading

from git_theta.errors import ObjectCorruptError
from git_theta.store.container import RAW, ZSTD

SAMPLE = 64 * 1024
INCOMPRESSIBLE = 0.97  # a sample that shrinks less than this is stored raw
_local = threading.local()


def _compressor():
    comp = getattr(_local, "compressor", None)
    if comp is None:
        import zstandard

        params = zstandard.ZstdCompressionParameters(
            compression_level=1,
            strategy=zstandard.STRATEGY_FAST,
            min_match=7,
            hash_log=12,
            window_log=20,
            write_checksum=False,
            write_content_size=True,
        )
        comp = _local.compressor = zstandard.ZstdCompressor(compression_params=params)
    return comp


def _decompressor():
    dec = getattr(_local, "decompressor", None)
    if dec is None:
        import zstandard

        dec = _local.decompressor = zstandard.ZstdDecompressor()
    return dec


def compress(data):
    """Return (method, bytes-like): zstd when it pays, the raw bytes otherwise."""
    view = memoryview(data).cast("B")
    if len(view) == 0:
        return RAW, b""
    comp = _compressor()
    if len(view) > 4 * SAMPLE:
        sample = view[len(view) // 2 : len(view) // 2 + SAMPLE]
        if len(comp.compress(sample)) > INCOMPRESSIBLE * SAMPLE:
            return RAW, view
    packed = comp.compress(view)
    if len(packed) >= len(view):
        return RAW, view
    return ZSTD, packed


def declared_size(data, oid="?"):
    """The content size a zstd frame's header declares (our frames always declare it)."""
    import zstandard

    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        size = -1
    if size < 0:
        raise ObjectCorruptError(f"object {oid} has a zstd frame without a valid content size")
    return size


def decompress_into(method, data, out, oid="?"):
    """Inverse of :func:`compress`: decompress a frame into ``out`` (a writable memoryview), which
    it must fill exactly.

    Returns the bytes-like holding the result: ``out``, or for a raw frame ``data`` itself (no
    copy). Decompressing into a reused buffer spares allocating, and faulting in, a new one per
    plane.
    """
    size = len(out)
    if method == RAW:
        if len(data) != size:
            raise ObjectCorruptError(f"object {oid} decodes to {len(data)} bytes, expected {size}")
        return data
    got = 0
    try:
        with _decompressor().stream_reader(data, read_across_frames=False) as reader:
            while got < size:
                count = reader.readinto(out[got:])
                if not count:
                    break
                got += count
            extra = reader.read(1)
    except Exception as exc:  # zstandard.ZstdError
        raise ObjectCorruptError(f"object {oid} does not decompress: {exc}") from None
    if got != size or extra:
        raise ObjectCorruptError(f"object {oid} decodes to {'more' if extra else got} bytes, expected {size}")
    return out
