"""GGUF checkpoints (llama.cpp), streamed tensor by tensor and given back byte for byte.

A GGUF file is a header (magic, version, tensor count, metadata key/value count), the metadata
key/value section, one info record per tensor (name, dims, GGML type, data offset), zero padding to
the alignment, then the tensor data at the recorded offsets, each padded to the alignment.

What the manifest keeps:

- ``blob kv``: the exact bytes of the metadata section (tokenizer vocabularies make it large, so it
  is a side object, stored once while it does not change);
- ``field version``, ``field kv_count``, ``field alignment``, ``field tail`` (zero bytes after the
  last tensor);
- ``field tensor.NNNNN <name> <ggml type> <offset>``: one line per tensor, in the file's order;
- ``field meta.<key> <json>``: a readable copy of short scalar metadata (arrays are summarised), so
  ``git diff`` shows a changed ``general.name``; checkout ignores these lines.

Plain GGML types (F32, F16, BF16, F64, I8-I64) become tensors of that dtype with the numpy shape
(GGUF dims reversed). Quantized types (Q8_0, Q4_K, ...) are kept as their raw blocks: a U8 tensor
shaped like the numpy shape with the last dimension counted in bytes (as ``gguf.GGUFReader`` shows
them), with the GGML type in the ``tensor.NNNNN`` line. Bytes come back unchanged either way.
"""

import re
import struct

from git_theta.plugin_api import (
    ByteCursor,
    CheckpointError,
    CheckpointFormat,
    CheckpointReader,
    TensorData,
    dump_json,
    escape_name,
    nbytes,
    unescape_name,
)

MAGIC = b"GGUF"
_META_MAX = 200  # longer metadata values (chat templates...) stay only in the kv blob
_FIELD_KEY = re.compile(r"[a-z][a-z0-9_.-]*\Z")
# GGML types stored as ordinary tensors of the same git-theta dtype; all others as raw U8 blocks.
_PLAIN = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
# struct codes of the fixed-size GGUF metadata value types (by GGUFValueType name).
_SCALARS = {
    "UINT8": "B",
    "INT8": "b",
    "UINT16": "H",
    "INT16": "h",
    "UINT32": "I",
    "INT32": "i",
    "FLOAT32": "f",
    "BOOL": "?",
    "UINT64": "Q",
    "INT64": "q",
    "FLOAT64": "d",
}


def _gguf():
    import gguf  # the type tables; imported only when a GGUF file is actually seen

    return gguf


def _align(n, alignment):
    return n + (-n % alignment)


def _read_string(cursor, what):
    (length,) = cursor.unpack("Q", what)
    return cursor.take(length, what)


def _value_type(code, key):
    gguf = _gguf()
    try:
        return gguf.GGUFValueType(code).name
    except ValueError:
        raise CheckpointError(f"unknown metadata value type {code} for key {key!r}") from None


def _read_value(cursor, type_name, key, nested=False):
    """Read one metadata value; return a short readable form, or None when it is too long."""
    what = f"metadata {key!r}"
    if type_name in _SCALARS:
        (value,) = cursor.unpack(_SCALARS[type_name], what)
        return value
    if type_name == "STRING":
        raw = _read_string(cursor, what)
        return raw.decode("utf-8", "replace") if len(raw) <= _META_MAX else None
    if nested:  # the spec allows arrays of arrays; no writer produces them
        raise CheckpointError(f"nested metadata arrays are not supported (key {key!r})")
    (item_code,) = cursor.unpack("I", what)
    (count,) = cursor.unpack("Q", what)
    item = _value_type(item_code, key)
    if item in _SCALARS:
        cursor.take(count * struct.calcsize("<" + _SCALARS[item]), what)
    else:
        for _ in range(count):
            _read_value(cursor, item, key, nested=True)
    return f"<{item} x {count}>"


def tensor_layout(type_name, dims):
    """(git-theta dtype, numpy shape) of a GGUF tensor with GGML type ``type_name`` and GGUF ``dims``."""
    shape = tuple(reversed(dims))
    if type_name in _PLAIN:
        return type_name, shape
    block, block_bytes = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType[type_name]]
    if not shape or shape[-1] % block:
        raise CheckpointError(
            f"row length {shape[-1] if shape else 0} is not a multiple of the {type_name} block ({block})"
        )
    return "U8", shape[:-1] + (shape[-1] // block * block_bytes,)


def gguf_dims(type_name, dtype, shape):
    """Inverse of :func:`tensor_layout`: the GGUF dims of a stored tensor."""
    if type_name in _PLAIN:
        if dtype != type_name:
            raise CheckpointError(f"stored dtype {dtype} does not match GGML type {type_name}")
        return tuple(reversed(shape))
    block, block_bytes = _gguf().GGML_QUANT_SIZES[_gguf().GGMLQuantizationType[type_name]]
    if dtype != "U8" or not shape or shape[-1] % block_bytes:
        raise CheckpointError(f"stored {dtype} {list(shape)} tensor is not whole {type_name} blocks")
    return tuple(reversed(shape[:-1] + (shape[-1] // block_bytes * block,)))


class _Reader(CheckpointReader):
    def tensors(self):
        path = self.path
        gguf = _gguf()
        cursor = ByteCursor(self.stream, path, "GGUF")
        if cursor.take(4, "the magic") != MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic)")
        (version,) = cursor.unpack("I", "the version")
        if version not in (2, 3):
            raise CheckpointError(
                f"{path}: unsupported GGUF version {version}",
                hint="big-endian GGUF files are not supported"
                if version > 0xFFFF
                else "convert it with a current llama.cpp",
            )
        tensor_count, kv_count = cursor.unpack("QQ", "the header")
        # The metadata is kept verbatim: re-serialising parsed values could change its bytes.
        cursor.recording = bytearray()
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        meta = {}
        for _ in range(kv_count):
            key = _read_string(cursor, "a metadata key").decode("utf-8", "replace")
            (code,) = cursor.unpack("I", f"metadata {key!r}")
            value = _read_value(cursor, _value_type(code, key), key)
            meta[key] = value
            if key == "general.alignment":
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
                    raise CheckpointError(f"{path}: invalid general.alignment {value!r}")
                alignment = value
        self.blobs["kv"] = bytes(cursor.recording)
        cursor.recording = None

        infos = []
        for _ in range(tensor_count):
            try:
                name = _read_string(cursor, "a tensor name").decode("utf-8")
            except UnicodeDecodeError:
                raise CheckpointError(f"{path}: a tensor name is not valid UTF-8 (corrupt file)") from None
            (n_dims,) = cursor.unpack("I", f"tensor {name!r}")
            dims = cursor.unpack("Q" * n_dims, f"tensor {name!r}")
            code, offset = cursor.unpack("IQ", f"tensor {name!r}")
            try:
                type_name = gguf.GGMLQuantizationType(code).name
            except ValueError:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has unknown GGML type {code}",
                    hint="upgrade the gguf package (pip install -U gguf) and this plugin",
                ) from None
            try:
                dtype, shape = tensor_layout(type_name, dims)
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: tensor {name!r}: {exc.message}") from None
            infos.append((name, type_name, dtype, shape, offset))

        self.fields.update(version=str(version), kv_count=str(kv_count), alignment=str(alignment))
        width = max(5, len(str(len(infos))))
        for index, (name, type_name, _, _, offset) in enumerate(infos):
            self.fields[f"tensor.{index:0{width}d}"] = f"{escape_name(name)} {type_name} {offset}"
        for key, value in meta.items():
            if value is None or not _FIELD_KEY.match("meta." + key):
                continue
            try:
                self.fields["meta." + key] = dump_json(value)
            except ValueError:  # NaN or infinity: the kv blob has it, the readable copy is skipped
                pass

        # Tensor data, in offset order, straight from the stream.
        cursor.skip_zeros(_align(cursor.position, alignment) - cursor.position, "the header padding")
        end = 0
        for name, _, dtype, shape, offset in sorted(infos, key=lambda t: t[4]):
            if offset < end:
                raise CheckpointError(f"{path}: tensor {name!r} overlaps the previous tensor (corrupt file)")
            cursor.skip_zeros(offset - end, f"the padding before tensor {name!r}")
            size = nbytes(dtype, shape)
            yield TensorData(name, dtype, shape, cursor.take_large(size, f"tensor {name!r}"))
            end = offset + size
        self.fields["tail"] = str(cursor.trailing_zeros("after the last tensor"))


def _layout(fields):
    """[(name, ggml type, offset)] from the ``tensor.NNNNN`` fields, in file order."""
    rows = []
    for key in sorted(k for k in fields if k.startswith("tensor.")):
        name, type_name, offset = fields[key].split(" ")
        rows.append((unescape_name(name), type_name, int(offset)))
    return rows


class GgufFormat(CheckpointFormat):
    """GGUF (llama.cpp) checkpoints, including quantized tensor types."""

    name = "gguf"
    releases_tensors = True  # join writes each tensor out before asking for the next
    suffixes = (".gguf",)

    def sniff(self, head, path):
        return head[:4] == MAGIC

    def split(self, stream, path):
        return _Reader(stream, path)

    def join(self, fields, source, out, path):
        gguf = _gguf()
        alignment = int(fields["alignment"])
        rows = _layout(fields)
        if sorted(name for name, _, _ in rows) != sorted(source.specs):
            raise CheckpointError(
                f"{path}: the manifest's GGUF tensor list does not match its tensors",
                hint="the manifest was edited or merged by hand; restore it from a commit",
            )
        dims, sizes = {}, {}
        for name, type_name, _ in rows:
            spec = source.specs[name]
            try:
                dims[name] = gguf_dims(type_name, spec.dtype, spec.shape)
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: tensor {name!r}: {exc.message}") from None
            sizes[name] = nbytes(spec.dtype, spec.shape)
        offsets, tail = _offsets(rows, sizes, alignment, int(fields.get("tail", "0")))

        header = bytearray(MAGIC + struct.pack("<IQQ", int(fields["version"]), len(rows), int(fields["kv_count"])))
        header += source.read_blob("kv")
        for name, type_name, _ in rows:
            encoded = name.encode("utf-8")
            header += struct.pack("<Q", len(encoded)) + encoded
            header += struct.pack(
                f"<I{len(dims[name])}QIQ",
                len(dims[name]),
                *dims[name],
                int(gguf.GGMLQuantizationType[type_name]),
                offsets[name],
            )
        header += bytes(_align(len(header), alignment) - len(header))
        out.write(header)
        end = 0
        ordered = sorted((r[0] for r in rows), key=offsets.get)
        for name, data in source.iter_data(ordered):
            out.write(bytes(offsets[name] - end))
            out.write(data)
            end = offsets[name] + sizes[name]
        out.write(bytes(tail))


def _offsets(rows, sizes, alignment, tail):
    """(offsets, trailing zeros): as recorded when they still fit the tensors, else canonical."""
    recorded = {name: offset for name, _, offset in rows}
    end = 0
    for name in sorted(recorded, key=recorded.get):
        if recorded[name] < end:
            break
        end = recorded[name] + sizes[name]
    else:
        return recorded, tail
    # A merge changed a tensor's size: lay the data out the way gguf.GGUFWriter does.
    offsets, position = {}, 0
    for name, _, _ in rows:
        offsets[name] = position
        position += _align(sizes[name], alignment)
    last = max(offsets, key=offsets.get, default=None)
    return offsets, (_align(sizes[last], alignment) - sizes[last]) if last is not None else 0
