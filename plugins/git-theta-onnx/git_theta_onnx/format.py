"""ONNX models: initializers as tensors, the rest of the model as one side object, byte-identical.

An ONNX file is a protobuf ``ModelProto``; its weights are the ``initializer`` tensors of the main
graph (``ModelProto.graph`` = field 7, ``GraphProto.initializer`` = field 5), normally with their
bytes in ``TensorProto.raw_data`` (field 9, little-endian). Clean walks the protobuf wire format as
the file streams in, without re-serialising anything: each initializer's ``raw_data`` payload
becomes a tensor, and everything else - every byte of the file except those payloads - is the
side object ``blob graph``. The ``field tensor.NNNNN <name> <offset> <size>`` lines say where each
payload was cut out. Checkout splices the payloads back in, so the file is **byte-identical**
however it was written (field order, packed or unpacked dims, unknown fields all survive).

Initializers kept inside the graph blob (not tensors): external data (``data_location=EXTERNAL``),
values held in typed fields (``float_data``...) instead of ``raw_data``, dtypes git-theta has no
name for (strings, 4-bit, complex128), and initializers of subgraphs (``If``/``Loop`` bodies).
"""

from git_theta.plugin_api import (
    ByteCursor,
    CheckpointError,
    CheckpointFormat,
    CheckpointReader,
    TensorData,
    escape_name,
    nbytes,
    unescape_name,
)

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
# ONNX TensorProto.DataType names -> git-theta dtype names.
_DTYPES = {
    "FLOAT": "F32",
    "DOUBLE": "F64",
    "FLOAT16": "F16",
    "BFLOAT16": "BF16",
    "FLOAT8E4M3FN": "F8_E4M3",
    "FLOAT8E5M2": "F8_E5M2",
    "FLOAT8E8M0": "F8_E8M0",
    "COMPLEX64": "C64",
    "INT8": "I8",
    "INT16": "I16",
    "INT32": "I32",
    "INT64": "I64",
    "UINT8": "U8",
    "UINT16": "U16",
    "UINT32": "U32",
    "UINT64": "U64",
    "BOOL": "BOOL",
}


def _onnx():
    import onnx  # protobuf classes; imported only when an ONNX file is actually seen

    return onnx


def encode_varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data, pos):
    """(value, position after it) of the varint at ``data[pos]``; ValueError when malformed."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("malformed varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


class _Wire(ByteCursor):
    """A ByteCursor that also reads protobuf varints and field headers."""

    def varint(self, what):
        """(value, raw bytes) of the next varint."""
        raw = bytearray()
        while True:
            byte = self.take(1, what)[0]
            raw.append(byte)
            if not byte & 0x80:
                break
            if len(raw) > 10:
                raise CheckpointError(f"{self.path}: malformed protobuf in {what} (not an ONNX model?)")
        value, _ = decode_varint(raw, 0)
        return value, bytes(raw)

    def field(self, what):
        """The next field: (number, wire type, raw tag+length bytes, payload length or None)."""
        tag, raw = self.varint(what)
        number, wire = tag >> 3, tag & 7
        if wire == 2:
            length, raw_length = self.varint(what)
            return number, wire, raw + raw_length, length
        sizes = {0: None, 1: 8, 5: 4}
        if wire not in sizes or number == 0:
            raise CheckpointError(f"{self.path}: malformed protobuf in {what} (not an ONNX model?)")
        if wire == 0:
            _, raw_value = self.varint(what)
            return number, wire, raw + raw_value, 0
        return number, wire, raw + self.take(sizes[wire], what), 0


def _raw_data_span(payload):
    """(start of the raw_data bytes, their end, payload without the raw_data field) or None."""
    pos, found = 0, None
    while pos < len(payload):
        field_start = pos
        tag, pos = decode_varint(payload, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = decode_varint(payload, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = decode_varint(payload, pos)
            if number == _TENSOR_RAW_DATA:
                if found is not None:  # repeated raw_data (last one wins in protobuf): leave it alone
                    return None
                found = (field_start, pos, pos + length)
            pos += length
        else:
            raise ValueError("unsupported wire type")
    if pos != len(payload) or found is None:
        return None
    field_start, start, end = found
    return start, end, bytes(payload[:field_start]) + bytes(payload[end:])


class _Reader(CheckpointReader):
    def tensors(self):
        wire = _Wire(self.stream, self.path, "ONNX")
        skeleton = bytearray()
        cuts = []  # (name, offset in skeleton, size)
        seen = set()
        while not wire.at_end():
            number, kind, raw, length = wire.field("the model")
            skeleton += raw
            if kind != 2:
                continue
            if number != _MODEL_GRAPH:
                skeleton += wire.take_large(length, "the model")
                continue
            end = wire.position + length
            while wire.position < end:
                number, kind, raw, length = wire.field("the graph")
                skeleton += raw
                if kind != 2:
                    continue
                payload = wire.take_large(length, "an initializer" if number == _GRAPH_INITIALIZER else "the graph")
                tensor = self._initializer(payload, seen) if number == _GRAPH_INITIALIZER else None
                if tensor is None:
                    skeleton += payload
                    continue
                start, stop, name, dtype, shape = tensor
                skeleton += payload[:start]
                cuts.append((name, len(skeleton), stop - start))
                yield TensorData(name, dtype, shape, memoryview(payload)[start:stop])
                skeleton += payload[stop:]
            if wire.position != end:
                raise CheckpointError(f"{self.path}: malformed protobuf in the graph (not an ONNX model?)")
        self.blobs["graph"] = bytes(skeleton)
        width = max(5, len(str(len(cuts))))
        for index, (name, offset, size) in enumerate(cuts):
            self.fields[f"tensor.{index:0{width}d}"] = f"{escape_name(name)} {offset} {size}"

    def _initializer(self, payload, seen):
        """(raw_data start, end, name, dtype, shape) when this initializer can be a tensor, else None."""
        onnx = _onnx()
        try:
            span = _raw_data_span(payload)
        except ValueError:
            raise CheckpointError(f"{self.path}: malformed protobuf in an initializer (not an ONNX model?)") from None
        if span is None:
            return None
        start, stop, rest = span
        proto = onnx.TensorProto()
        try:
            proto.ParseFromString(rest)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError; a broken initializer is the model's problem
            raise CheckpointError(f"{self.path}: an initializer is not a valid TensorProto (corrupt file)") from None
        dtype = _DTYPES.get(
            onnx.TensorProto.DataType.Name(proto.data_type)
            if proto.data_type in onnx.TensorProto.DataType.values()
            else ""
        )
        shape = tuple(proto.dims)
        if (
            dtype is None
            or not proto.name
            or proto.name in seen
            or proto.data_location == _EXTERNAL
            or any(d < 0 for d in shape)
            or nbytes(dtype, shape) != stop - start
        ):
            return None
        seen.add(proto.name)
        return start, stop, proto.name, dtype, shape


class OnnxFormat(CheckpointFormat):
    """ONNX models (``.onnx``): the main graph's initializers are the tensors."""

    name = "onnx"
    releases_tensors = True  # join writes each tensor out before asking for the next
    suffixes = (".onnx",)

    def sniff(self, head, path):
        # Protobuf has no magic number: claim .onnx files that start with ModelProto.ir_version
        # (field 1, varint), which every ONNX writer emits first. Force others with theta-format=onnx.
        return path.endswith(self.suffixes) and head[:1] == b"\x08"

    def split(self, stream, path):
        return _Reader(stream, path)

    def join(self, fields, source, out, path):
        skeleton = source.read_blob("graph")
        cuts = []
        for key in sorted(k for k in fields if k.startswith("tensor.")):
            name, offset, size = fields[key].split(" ")
            cuts.append((unescape_name(name), int(offset), int(size)))
        if sorted(name for name, _, _ in cuts) != sorted(source.specs):
            raise CheckpointError(
                f"{path}: the manifest's ONNX initializer list does not match its tensors",
                hint="the manifest was edited or merged by hand; restore it from a commit",
            )
        for name, _, size in cuts:
            spec = source.specs[name]
            if nbytes(spec.dtype, spec.shape) != size:
                # The graph blob fixes every initializer's dims and byte length.
                raise CheckpointError(
                    f"{path}: tensor {name!r} is now {spec.dtype} {list(spec.shape)}, but the ONNX graph "
                    f"holds {size} bytes for it",
                    hint="ONNX initializers keep their shape and dtype; re-export the model to change them",
                )
        position = 0
        for (name, offset, _), (_, data) in zip(cuts, source.iter_data([c[0] for c in cuts])):
            out.write(skeleton[position:offset])
            out.write(data)
            position = offset
        out.write(skeleton[position:])
