"""Golden test vectors of the normative specifications in ``docs/spec/``.

Stored objects outlive the code that wrote them: a checkout years from now must decode today's
objects to the same bits. These vectors freeze what is on disk. For each one, encoding the given
tensor gives exactly these bytes, and decoding these bytes gives exactly this tensor:

- ``tests/vectors/objects.json``: one object of every built-in update type and header variant
  (dense, sparse with gaps/bitmap/Rice positions and XOR/zigzag values, int-delta, low-rank with
  each product and order and residual form, ia3), plus the older object forms readers still accept;
- inline below: a manifest v1, a chunk index, and the bf16 rounding that low-rank and ia3
  predictions and merge results go through (stored residuals depend on it bit for bit).

The vectors were produced once by the code and are never regenerated: a change that makes one fail
changes the on-disk format, which needs a new header value (old objects keep decoding), not an
edited vector. Parts of the container and manifest are also rebuilt here from the spec's text,
independently of the code, so the spec and the code are checked against each other.
"""

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import xxhash

from git_theta.updates import chain as codec
from git_theta.store import container as object_codec
from git_theta.tensors.bits import from_float
from git_theta.manifest import Manifest, ObjectRef, TensorEntry
from git_theta.store.objects import ObjectStore
from git_theta.updates.base import TensorData

VECTORS = json.loads((Path(__file__).parent / "vectors" / "objects.json").read_text())["vectors"]
ITEMSIZE = {"F32": 4, "BF16": 2, "I8": 1}


def _tensor(vector, key="tensor"):
    data = bytes.fromhex(vector[key])
    return TensorData("t", vector["dtype"], tuple(vector["shape"]), data, hashlib.sha256(data).hexdigest())


def _options(vector):
    if "factors" in vector:
        f = vector["factors"]
        a = np.frombuffer(bytes.fromhex(f["a"]), dtype="<f4").reshape(f["a_shape"])
        b = np.frombuffer(bytes.fromhex(f["b"]), dtype="<f4").reshape(f["b_shape"])
        return {"factors": (a, b)}
    if "scale" in vector:
        s = vector["scale"]
        return {"scale": np.frombuffer(bytes.fromhex(s["data"]), dtype="<f4").reshape(s["shape"])}
    return {}


def _base_entry(store, vector):
    """The base tensor stored as a dense keyframe (its own bytes are not part of the vector)."""
    if vector["base"] is None:
        return None, None
    base = _tensor(vector, "base")
    return base, codec.encode_tensor(store, base, "dense")


def _frames(obj):
    header, payload = object_codec.unpack(obj)
    return header, list(object_codec.iter_frames(payload))


def test_the_vectors_cover_every_builtin_update_type_and_header_variant():
    headers = [object_codec.unpack(bytes.fromhex(v["object"]))[0] for v in VECTORS]
    assert {h["update"] for h in headers} == {"dense", "sparse", "int-delta", "low-rank", "ia3"}
    sparse = [h for h in headers if h["update"] == "sparse"]
    assert {h["index"] for h in sparse} == {"gaps", "bitmap", "rice"}
    assert {h.get("values", "xor") for h in sparse} == {"xor", "zigzag"}
    low_rank = [h for h in headers if h["update"] == "low-rank"]
    assert {(h.get("product"), h.get("order")) for h in low_rank} == {(None, None), ("f32", "exact")}
    assert {h["residual"] for h in low_rank} >= {"dense", "gaps", "bitmap"}
    methods = {m for v in VECTORS for m, _ in _frames(bytes.fromhex(v["object"]))[1]}
    assert methods == {object_codec.RAW, object_codec.ZSTD}


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_decoding_the_bytes_gives_exactly_the_tensor(tmp_path, vector):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    obj = bytes.fromhex(vector["object"])
    assert hashlib.sha256(obj).hexdigest() == vector["oid"]
    ref = store.put_bytes(obj)
    assert ref == ObjectRef(vector["oid"], len(obj))
    tensor = _tensor(vector)
    _, base_entry = _base_entry(store, vector)
    chain = (ref,) + (base_entry.objects if base_entry is not None else ())
    update = object_codec.unpack(obj)[0]["update"]
    entry = TensorEntry("t", tensor.dtype, tensor.shape, tensor.digest, update, chain)
    # the normal read (checksum) and fsck's read (sha256 of the result) both give the tensor
    assert bytes(codec.decode_tensor(store, entry)) == tensor.data
    assert bytes(codec.decode_tensor(store, entry, full=True)) == tensor.data


@pytest.mark.parametrize("vector", [v for v in VECTORS if v["encode"]], ids=lambda v: v["name"])
def test_encoding_the_tensor_gives_exactly_the_bytes(tmp_path, vector):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    base, base_entry = _base_entry(store, vector)
    update = object_codec.unpack(bytes.fromhex(vector["object"]))[0]["update"]
    entry = codec.encode_tensor(store, _tensor(vector), update, base=base, base_entry=base_entry, **_options(vector))
    got = store.read(entry.objects[0].oid)
    want = bytes.fromhex(vector["object"])
    got_header, got_frames = _frames(got)
    want_header, want_frames = _frames(want)
    assert got_header == want_header
    assert [m for m, _ in got_frames] == [m for m, _ in want_frames]
    if all(m == object_codec.RAW for m, _ in want_frames):
        assert bytes(got) == want and entry.objects[0].oid == vector["oid"]
    else:
        # zstd frames: the compressed bytes are libzstd's; what they hold is the format
        import zstandard

        for (method, g), (_, w) in zip(got_frames, want_frames):
            if method == object_codec.RAW:
                assert bytes(g) == bytes(w)
            else:
                assert zstandard.ZstdDecompressor().decompress(bytes(g)) == zstandard.ZstdDecompressor().decompress(
                    bytes(w)
                )


def _dense_object_from_spec(dtype, shape, data):
    """A dense object built from docs/spec/container.md and updates.md alone (no git_theta code):
    byte planes, each a raw frame (method 0, u64 length); the JSON header with the bound checksum."""
    itemsize = ITEMSIZE[dtype]
    digest = hashlib.sha256(data).digest()
    check = "xxh3-128d:" + xxhash.xxh3_128_hexdigest(digest + data)
    header = {"check": check, "dtype": dtype, "shape": list(shape), "update": "dense"}
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("ascii")
    payload = b""
    if data:
        for k in range(itemsize):
            plane = data[k::itemsize]
            payload += struct.pack("<BQ", 0, len(plane)) + plane
    return b"GTO1" + struct.pack("<I", len(body)) + body + payload


@pytest.mark.parametrize("name", ["dense-f32", "dense-bf16", "dense-i8-scalar", "dense-empty"])
def test_the_spec_text_rebuilds_the_dense_vectors(name):
    vector = next(v for v in VECTORS if v["name"] == name)
    data = bytes.fromhex(vector["tensor"])
    assert _dense_object_from_spec(vector["dtype"], vector["shape"], data).hex() == vector["object"]


MANIFEST = (
    "git-theta manifest v1\n"
    "format safetensors\n"
    'field metadata {"step":"10"}\n'
    "blob header " + "ab" * 32 + ":120\n"
    "tensor emb%20w%25 BF16 [2,3] " + "11" * 32 + " dense " + "cd" * 32 + ":140\n"
    "tensor w F32 [] " + "22" * 32 + " sparse " + "ef" * 32 + ":90 " + "01" * 32 + ":107\n"
).encode()


def test_manifest_v1_bytes():
    manifest = Manifest(
        format="safetensors",
        fields={"metadata": '{"step":"10"}'},
        blobs={"header": ObjectRef("ab" * 32, 120)},
        tensors={
            "w": TensorEntry(
                "w", "F32", (), "22" * 32, "sparse", (ObjectRef("ef" * 32, 90), ObjectRef("01" * 32, 107))
            ),
            "emb w%": TensorEntry("emb w%", "BF16", (2, 3), "11" * 32, "dense", (ObjectRef("cd" * 32, 140),)),
        },
    )
    assert manifest.serialize() == MANIFEST
    parsed = Manifest.parse(MANIFEST)
    assert parsed == manifest and parsed.serialize() == MANIFEST
    assert parsed.tensors["w"].chain_depth == 1


def test_chunk_index_bytes(tmp_path):
    content = bytes(range(30))
    first, second = content[:16], content[16:]
    index = (
        b"git-theta chunked v1\n"
        + f"30 {hashlib.sha256(content).hexdigest()}\n".encode()
        + f"{hashlib.sha256(first).hexdigest()}:16\n{hashlib.sha256(second).hexdigest()}:14\n".encode()
    )
    store = ObjectStore(tmp_path / "objects", fsync=False, max_object_size=16)
    ref = store.put_bytes(content)
    assert ref == ObjectRef(hashlib.sha256(index).hexdigest(), len(index))
    assert store.path(ref.oid).read_bytes() == index
    assert bytes(store.read(ref.oid)) == content


#: float64 value -> the bf16 bit pattern git-theta stores (round to float32, then to nearest even
#: on the upper 16 bits; NaN keeps its top payload bits with the quiet bit set)
BF16_ROUNDING = [
    (1.0, 0x3F80),
    (-1.5, 0xBFC0),
    (0.1, 0x3DCD),
    (1 + 2**-8, 0x3F80),  # a tie: to even (down)
    (1 + 3 * 2**-8, 0x3F82),  # a tie: to even (up)
    (1 + 2**-8 + 2**-30, 0x3F80),  # double rounding: float32 first makes it a tie (directly: 0x3F81)
    (1 + 2**-8 + 2**-20, 0x3F81),  # above the tie even after float32
    (-0.0, 0x8000),
    (float("inf"), 0x7F80),
    (float("-inf"), 0xFF80),
    (3.4e38, 0x7F80),  # beyond bf16's largest finite value: infinity
    (3.3895313892515355e38, 0x7F7F),  # bf16's largest finite value
    (2.0**-133, 0x0001),  # the smallest subnormal
    (2.0**-134, 0x0000),  # half of it: a tie, to even (zero)
    (struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000))[0], 0x7FC0),  # quiet NaN
    (struct.unpack("<d", struct.pack("<Q", 0x7FF8200000000000))[0], 0x7FC1),  # NaN payload kept
]


def test_bf16_rounding_is_frozen():
    values = np.array([v for v, _ in BF16_ROUNDING], dtype=np.float64)
    got = np.frombuffer(from_float(values, "BF16"), dtype="<u2")
    assert [hex(b) for b in got] == [hex(b) for _, b in BF16_ROUNDING]


def _bf16_safetensors(path, bits):
    header = json.dumps({"w": {"dtype": "BF16", "shape": [len(bits)], "data_offsets": [0, 2 * len(bits)]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + np.array(bits, dtype="<u2").tobytes())


def test_bf16_merge_results_are_frozen(tmp_path, repo):
    """A merge computes in float32 and rounds to bf16 with the same rule: ties to even."""
    _bf16_safetensors(tmp_path / "a.safetensors", [0x3F80, 0x3F81, 0x8000, 0x4000, 0xC0A0])
    _bf16_safetensors(tmp_path / "b.safetensors", [0x3F81, 0x3F82, 0x0000, 0x4001, 0xC0A1])
    out = tmp_path / "out.safetensors"
    repo.theta("merge-files", "--operator", "linear", "a.safetensors", "b.safetensors", "-o", str(out), cwd=tmp_path)
    data = out.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    bits = np.frombuffer(data[8 + length :], dtype="<u2")
    # means 1.00390625 (tie, to even: down), 1.01171875 (tie: up), +0.0, 2.0078125 (tie: down),
    # -5.015625 (tie between -5.0 and -5.03125: to the even -5.0)
    assert [hex(b) for b in bits] == ["0x3f80", "0x3f82", "0x0", "0x4000", "0xc0a0"]
