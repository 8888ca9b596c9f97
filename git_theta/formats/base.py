"""The checkpoint-format plugin interface.

A format turns a checkpoint byte stream into named tensors plus file-level data (``fields``: short
single-line texts kept in the manifest; ``blobs``: side objects kept in the store), and writes the
checkpoint back from them. Register a format as an entry point in the ``git_theta.formats`` group.
Tensors are raw little-endian C-order bytes with a dtype from :mod:`git_theta.dtypes`.
"""


class CheckpointReader:
    """What :meth:`CheckpointFormat.split` returns.

    Iterate :meth:`tensors` once; afterwards ``fields`` and ``blobs`` are complete. Readers should
    yield each tensor as soon as its bytes are read so memory stays bounded by the largest tensor.
    """

    def __init__(self, stream=None, path=None):
        self.stream = stream  # the checkpoint's bytes, as git sends them
        self.path = path  # the work-tree path, for messages
        self.fields = {}
        self.blobs = {}  # key -> bytes (the clean pipeline stores them)
        #: set by clean (``theta.streamThreshold``): a reader may read tensors of at least this
        #: many bytes with :func:`git_theta.tensors.streaming.read_hashed`, which hashes them
        #: while they arrive (None: never)
        self.stream_threshold = None
        #: the file's bytes before its first tensor, set by a reader whose file is exactly these
        #: bytes followed by each tensor's bytes in the order it yields them (safetensors): clean
        #: then records how the version it adds is written back (filter/layouts.py). None: not so
        self.prelude = None

    def tensors(self):
        """Yield :class:`git_theta.updates.base.TensorData` objects (without digest)."""
        raise NotImplementedError

    def runs(self, small):
        """Like :meth:`tensors`, but consecutive tensors of at most ``small`` bytes may come as
        one :class:`git_theta.updates.base.TensorRun`. A format that reads many small tensors
        back to back overrides this; by default every tensor comes on its own."""
        return self.tensors()


class TensorSource:
    """What a format's :meth:`CheckpointFormat.join` reads tensors from (given by smudge).

    ``specs`` maps each tensor name to its manifest entry (``dtype``, ``shape``). ``iter_data(names)``
    yields ``(name, bytes-like)`` in the order asked, decoding ahead in parallel; for a format with
    ``releases_tensors`` the bytes may be reused once the next item is requested. ``iter_bytes``
    gives the same bytes without names, small tensors joined, for formats that write tensors
    back to back. ``read_blob(key)``
    returns a side object's bytes.
    """

    specs = {}

    def described(self):
        """``(names, dtypes, shapes)``: three lists, one row per tensor. A format that needs no
        more than this about each tensor asks for it: a source may then make no entry per tensor."""
        specs = self.specs
        return list(specs), [e.dtype for e in specs.values()], [e.shape for e in specs.values()]

    def iter_data(self, names):
        raise NotImplementedError

    def iter_bytes(self, names):
        """The bytes of the tensors ``names``, in order, for a format that writes them back to
        back: bytes-likes whose concatenation is those tensors (a run of small tensors may come
        as one), so 200,000 tensors are not 200,000 writes."""
        for _, data in self.iter_data(names):
            yield data

    def read_blob(self, key):
        raise NotImplementedError


class CheckpointFormat:
    """Base class of checkpoint formats. ``name`` is written into manifests: never change it."""

    name = ""
    #: file name suffixes this format usually has (a hint for sniffing; content decides).
    suffixes = ()
    #: True when split needs the whole file first (zip): the cleaner then copies git's stream to a
    #: :class:`~git_theta.formats.spool.Spool` once and passes it as ``stream``; a file whose
    #: whole-file fingerprint matches the one last cleaned or checked out at its path is not parsed.
    spools = False
    #: True when :meth:`join` is done with each tensor's bytes once it asks ``iter_data`` for the
    #: next one (it writes them out and keeps no reference): smudge then decodes later tensors
    #: into the same buffers instead of allocating new ones.
    releases_tensors = False

    def sniff(self, head, path):
        """True when ``head`` (the first bytes of the file, up to 4 KiB) looks like this format."""
        raise NotImplementedError

    def split(self, stream, path):
        """Return a :class:`CheckpointReader` reading the checkpoint from binary ``stream``."""
        raise NotImplementedError

    def join(self, fields, source, out, path):
        """Write the checkpoint to binary ``out`` from manifest ``fields`` and a TensorSource."""
        raise NotImplementedError


#: JSON side data longer than this goes to a blob instead of a single-line manifest field.
MAX_FIELD_CHARS = 2048


def dump_json(value):
    """Canonical single-line JSON (ASCII, no spaces): the same value always gives the same text."""
    import json

    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def put_json(reader, key, value):
    """Keep ``value`` as the manifest field ``key`` when short, else as the blob ``key``.

    Short values stay readable in ``git diff``; long ones (a big optimizer structure) would make
    one enormous manifest line, so they become a side object.
    """
    text = dump_json(value)
    if len(text) <= MAX_FIELD_CHARS:
        reader.fields[key] = text
    else:
        reader.blobs[key] = text.encode("ascii")


def get_json(fields, source, key, path):
    """The value :func:`put_json` kept under ``key`` (field or blob), or None when absent."""
    import json

    from git_theta.errors import ManifestError

    if key in fields:
        text = fields[key]
    elif key in getattr(source, "blob_keys", ()):
        text = bytes(source.read_blob(key)).decode("ascii", "replace")
    else:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"{path}: manifest {key!r} is not valid JSON ({exc})") from None
