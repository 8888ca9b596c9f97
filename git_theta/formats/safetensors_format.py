"""safetensors checkpoints, streamed tensor by tensor, given back byte for byte.

The file is an 8-byte little-endian header length, a JSON header (``__metadata__`` plus, per tensor,
dtype, shape and data offsets) and the tensor bytes. Clean reads the header, then each tensor in
offset order straight from git's pipe. The header is not stored when the safetensors library itself
would write the same bytes (the usual case); otherwise its exact bytes go to the store as the blob
``header``, so checkout is byte-identical either way. The ``metadata`` field keeps ``__metadata__``
readable in the manifest.
"""

import bisect
import itertools
import json
import operator
import re
import struct

from git_theta.dtypes import DTYPES, nbytes
from git_theta.errors import CheckpointError
from git_theta.manifest import strictly_ascending
from git_theta.updates.base import TensorData, TensorRun
from git_theta.formats.base import CheckpointFormat, CheckpointReader
from git_theta.tensors.streaming import read_hashed

MAX_HEADER = 100_000_000  # the safetensors library's own limit
_PREALLOCATE = 64 << 20  # tensors up to this size are read into one preallocated buffer
# The order in which the safetensors library writes tensors: by dtype rank (descending), then name.
_WRITE_RANK = {
    name: rank
    for rank, name in enumerate(
        "BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
    )
}


def _canonical_order(items):
    """Tensor (name, dtype, shape) tuples in the order the safetensors library writes them."""
    return list(zip(*_canonical_columns(*_columns(items))))


def _columns(items):
    """(names, dtypes, shapes) of (name, dtype, shape) tuples."""
    return tuple(list(map(operator.itemgetter(i), items)) for i in range(3))


def _canonical_columns(names, dtypes, shapes):
    """The columns (names, dtypes, shapes) reordered as the safetensors library writes tensors:
    by dtype rank (descending), then name. Columns already in that order come back as they are
    (a manifest's 200,000 raw tensors of one dtype, already sorted by name)."""
    order = None
    if not strictly_ascending(names):
        order = sorted(range(len(names)), key=names.__getitem__)
    if len(set(dtypes)) > 1:
        ranks = [-_WRITE_RANK.get(dtype, -1) for dtype in dtypes]
        order = sorted(order if order is not None else range(len(names)), key=ranks.__getitem__)  # stable
    if order is None or order == list(range(len(names))):
        return names, dtypes, shapes
    return tuple([column[i] for i in order] for column in (names, dtypes, shapes))


def build_header(metadata, ordered):
    """Header bytes (padded with spaces to 8) as the safetensors library writes them, for tensor
    (name, dtype, shape) tuples in file order; see :func:`build_header_columns`."""
    return build_header_columns(metadata, *_columns(ordered))


def build_header_columns(metadata, names, dtypes, shapes):
    """Header bytes (padded with spaces to 8) as the safetensors library writes them.

    The same text as ``json.dumps(header, separators=(",", ":"), ensure_ascii=False)`` (the
    tests compare the two), written a column at a time: the part after each name repeats for
    every tensor of one dtype and shape, and 200,000 small dicts cost more than the strings.
    """
    parts = []
    if metadata is not None:
        parts.append('"__metadata__":' + json.dumps(metadata, separators=(",", ":"), ensure_ascii=False))
    if names:
        quote = json.encoder.encode_basestring  # what json.dumps(..., ensure_ascii=False) uses
        kinds = {}  # (dtype, shape) -> (size, the entry's text up to its offsets)
        for dtype, shape in set(zip(dtypes, shapes)):
            dims = ",".join(str(int(d)) for d in shape)
            kinds[dtype, shape] = (nbytes(dtype, shape), f'{{"dtype":{quote(dtype)},"shape":[{dims}],"data_offsets":[')
        if len(kinds) == 1:
            ((size, text),) = kinds.values()
            sizes, texts = itertools.repeat(size, len(names)), itertools.repeat(text)
        else:
            rows = list(map(kinds.__getitem__, zip(dtypes, shapes)))
            sizes, texts = (size for size, _ in rows), (text for _, text in rows)
        offsets = list(itertools.accumulate(sizes, initial=0))
        parts += map("%s:%s%d,%d]}".__mod__, zip(map(quote, names), texts, offsets, itertools.islice(offsets, 1, None)))
    raw = ("{" + ",".join(parts) + "}").encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


class _Pairs(list):
    """A JSON object as parsed: its (key, value) pairs in order, duplicates kept to be refused.

    Used as json's ``object_pairs_hook``: a list subclass is built in C, where a Python hook
    made of every one of 200,000 header entries a Python call."""


def _unique(pairs, what):
    """The dict of a parsed JSON object, refusing a key given twice."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CheckpointError(f"{what} (duplicate key {key!r})")
    return result


def parse_header(raw, path):
    """Validate a header; return (metadata or None, [(name, dtype, shape, begin, end)] by offset)."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_Pairs)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    except RecursionError:  # absurdly nested JSON
        raise CheckpointError(f"{path}: corrupt safetensors header (nested too deeply)") from None
    if not isinstance(header, _Pairs):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header = _unique(header, f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not (isinstance(metadata, _Pairs) and all(type(v) is str for _, v in metadata)):
            raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
        metadata = _unique(metadata, f"{path}: corrupt safetensors header")
    tensors = []
    sizes = {}  # (dtype, shape) -> bytes, once per distinct pair
    for name, info in header.items():
        if type(info) is not _Pairs:
            raise CheckpointError(f"{path}: tensor {name!r}: corrupt header entry")
        info = _unique(info, f"{path}: tensor {name!r}: corrupt header entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r}: unsupported dtype {dtype!r}",
                hint=f"supported: {', '.join(sorted(DTYPES))}",
            )
        # type() is int: not bool (True == 1), not float (8.0 == 8)
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
        if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int:
            raise CheckpointError(f"{path}: tensor {name!r}: invalid data_offsets {offsets!r}")
        begin, end = offsets
        shape = tuple(shape)
        size = sizes.get((dtype, shape))
        if size is None:
            size = sizes[dtype, shape] = nbytes(dtype, shape)
        if end - begin != size or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r}: data_offsets {offsets} do not match dtype {dtype} and shape {list(shape)}"
            )
        tensors.append((name, dtype, shape, begin, end))
    tensors.sort(key=lambda t: (t[3], t[4]))
    position = 0
    for name, _, _, begin, end in tensors:
        if begin != position:
            problem = "overlap" if begin < position else "leave a gap"
            raise CheckpointError(f"{path}: tensor {name!r}: data offsets {problem} (corrupt file)")
        position = end
    return metadata, tensors


def _truncated(path, what, got, size):
    return CheckpointError(
        f"{path}: file is truncated in {what} ({got} of {size} bytes)",
        hint="the checkpoint was not completely written; save it again",
    )


def _read_exact(stream, size, path, what):
    if size > _PREALLOCATE:
        # The header may claim any size: grow with the bytes that actually arrive, so a hostile
        # or truncated file fails as "truncated" instead of exhausting memory up front.
        buf = bytearray()
        while len(buf) < size:
            chunk = stream.read(min(_PREALLOCATE, size - len(buf)))
            if not chunk:
                raise _truncated(path, what, len(buf), size)
            buf += chunk
        return buf
    return _read_into(stream, bytearray(size), lambda got: _truncated(path, what, got, size))


def _read_into(stream, buf, truncated):
    """``buf`` filled from ``stream``; ``truncated(got)`` is the error when the file ends first."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        n = stream.readinto(view[got:])
        if not n:
            raise truncated(got)
        got += n
    return buf


def _read_raw_header(stream, path):
    """The header's bytes, read from the start of ``stream``."""
    head = _read_exact(stream, 8, path, "the header length")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER:
        raise CheckpointError(f"{path}: safetensors header length {length} is too large (corrupt file)")
    return bytes(_read_exact(stream, length, path, "the header"))


def _read_header(stream, path):
    """(raw header bytes, metadata, tensors) read from the start of ``stream``."""
    raw = _read_raw_header(stream, path)
    return (raw, *parse_header(raw, path))


#: one tensor entry as the safetensors library writes it (and build_header_columns does)
_ENTRY = re.compile(
    r'"((?:[^"\\]++|\\.)*+)":\{"dtype":"([A-Z0-9_]++)","shape":\[([0-9,]*+)\],"data_offsets":\[[0-9]++,[0-9]++\]\}'
)  # possessive: no backtracking (twice as fast over 200,000 entries)
_METADATA = '{"__metadata__":'


def header_columns(raw, path):
    """``(metadata, names, dtypes, shapes, sizes, canonical)`` of a header, tensors in file order;
    ``canonical`` when the safetensors library would write these very bytes for them.

    A header as the library writes it (the usual case) is read with one regex pass and accepted
    only when :func:`build_header_columns` gives back exactly its bytes from what was read: 200,000
    entries parsed as JSON objects one by one took a second. Anything else is parsed and checked
    by :func:`parse_header`, which says what is wrong."""
    quick = _canonical_header(raw)
    if quick is not None:
        return quick
    metadata, tensors = parse_header(raw, path)
    names, dtypes, shapes = _columns([t[:3] for t in tensors])
    sizes = [end - begin for _, _, _, begin, end in tensors]
    ordered = _canonical_columns(names, dtypes, shapes)[0] is names
    return (
        metadata,
        names,
        dtypes,
        shapes,
        sizes,
        ordered and build_header_columns(metadata, names, dtypes, shapes) == raw,
    )


def _canonical_header(raw):
    """(metadata, names, dtypes, shapes, sizes, ordered) of a header written as the library
    writes one (``ordered``: its tensors also in the library's order), or None."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    position, metadata = 1, None
    if text.startswith(_METADATA):
        try:
            pairs, position = json.JSONDecoder(object_pairs_hook=_Pairs).raw_decode(text, len(_METADATA))
        except (ValueError, RecursionError):
            return None
        if not isinstance(pairs, _Pairs) or not all(type(v) is str for _, v in pairs):
            return None
        metadata = dict(pairs)
        if len(metadata) != len(pairs):
            return None
        position += 1  # the comma
    found = _ENTRY.findall(text, position)
    if not found:
        return None
    # A column at a time: zip(*found) makes a 200,000-argument call (0.05-0.1 s, 5x slower).
    quoted, dtypes, shape_texts = (list(map(operator.itemgetter(i), found)) for i in range(3))
    names = quoted
    if "\\" in "".join(quoted):
        try:
            names = [json.loads(f'"{q}"') if "\\" in q else q for q in quoted]
        except ValueError:
            return None
    if not set(dtypes) <= DTYPES.keys() or len(set(names)) != len(names):
        return None
    shape_of = {t: tuple(int(d) for d in t.split(",")) if t else () for t in set(shape_texts)}
    shapes = list(map(shape_of.__getitem__, shape_texts))
    if build_header_columns(metadata, names, dtypes, shapes) != raw:
        return None
    ordered = _canonical_columns(names, dtypes, shapes)[0] is names  # else the header is kept
    size_of = {key: nbytes(*key) for key in set(zip(dtypes, shapes))}
    if len(size_of) == 1:
        sizes = [*size_of.values()] * len(names)
    else:
        sizes = list(map(size_of.__getitem__, zip(dtypes, shapes)))
    return metadata, names, dtypes, shapes, sizes, ordered


def header_names(stream, path):
    """The tensor names of a safetensors file, from its header alone (no tensor is read)."""
    return [t[0] for t in _read_header(stream, path)[2]]


#: a run of small tensors is read in one piece of up to this many bytes, or this many tensors
RUN_BYTES = 4 << 20
RUN_TENSORS = 8192


class _Reader(CheckpointReader):
    def tensors(self):
        return self._items(None)

    def runs(self, small):
        return self._items(small)

    def _items(self, small):
        path = self.path
        raw = _read_raw_header(self.stream, path)
        metadata, names, dtypes, shapes, sizes, canonical = header_columns(raw, path)
        if metadata is not None:
            self.fields["metadata"] = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)
        if not canonical:
            self.blobs["header"] = raw
        self.prelude = struct.pack("<Q", len(raw)) + raw  # then the tensors, back to back
        huge = self.stream_threshold
        count, position = len(names), 0
        while position < count:
            size = sizes[position]
            if small is not None and size <= small:
                end, total = position, 0
                while end < count and sizes[end] <= small and end - position < RUN_TENSORS and total < RUN_BYTES:
                    total += sizes[end]
                    end += 1
                bounds = list(itertools.accumulate(sizes[position:end], initial=0))
                data = self._read_run(names[position:end], bounds)
                yield TensorRun(names[position:end], dtypes[position:end], shapes[position:end], bounds, data)
                position = end
                continue
            name = names[position]
            what = f"tensor {name!r}"
            if huge is not None and size >= max(huge, 1):
                # Read once into its final buffer and hashed on the way (tensors/streaming.py).
                data = read_hashed(self.stream, size, lambda got: _truncated(path, what, got, size))
            else:
                data = _read_exact(self.stream, size, path, what)
            yield TensorData(name, dtypes[position], shapes[position], data)
            position += 1
        if self.stream.read(1):
            raise CheckpointError(f"{path}: unexpected bytes after the last tensor (corrupt or not a safetensors file)")

    def _read_run(self, names, bounds):
        """The bytes of a run of tensors, read in one piece; a file that ends inside it names the
        tensor it ends in."""

        def truncated(got):
            at = bisect.bisect_right(bounds, got) - 1
            return _truncated(self.path, f"tensor {names[at]!r}", got - bounds[at], bounds[at + 1] - bounds[at])

        return _read_into(self.stream, bytearray(bounds[-1]), truncated)


class SafetensorsFormat(CheckpointFormat):
    """The safetensors format (Hugging Face)."""

    name = "safetensors"
    releases_tensors = True  # join writes each tensor out before asking for the next
    suffixes = (".safetensors",)

    def sniff(self, head, path):
        if len(head) < 10:
            return path.endswith(self.suffixes)
        (length,) = struct.unpack("<Q", head[:8])
        return 2 <= length <= MAX_HEADER and head[8:9] == b"{"

    def split(self, stream, path):
        return _Reader(stream, path)

    def join(self, fields, source, out, path):
        metadata = json.loads(fields["metadata"]) if "metadata" in fields else None
        names, dtypes, shapes = source.described()
        raw = None
        if "header" in source.blob_keys:
            stored = source.read_blob("header")
            _, tensors = parse_header(stored, path)
            # A header blob that no longer describes the tensors (after a merge changed shapes,
            # say) is replaced by a canonical one rather than producing an invalid file.
            if sorted((n, d, s) for n, d, s, _, _ in tensors) == sorted(zip(names, dtypes, shapes)):
                raw = stored
                names = [n for n, _, _, _, _ in tensors]
        if raw is None:
            names, dtypes, shapes = _canonical_columns(names, dtypes, shapes)
            raw = build_header_columns(metadata, names, dtypes, shapes)
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for data in source.iter_bytes(names):  # the data, back to back
            out.write(data)
