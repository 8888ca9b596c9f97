"""Dense encoding (byte planes + zstd) round-trips every bit pattern of every dtype."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_theta.updates.chain import decode_tensor, encode_tensor, tensor_digest
from git_theta.dtypes import DTYPES, nbytes
from git_theta.errors import ObjectCorruptError, ObjectMissingError
from git_theta.store.objects import ObjectStore
from git_theta.updates.base import TensorData

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


@given(dtype=st.sampled_from(sorted(DTYPES)), shape=shapes, data=st.data())
@settings(max_examples=60, deadline=None)
def test_every_dtype_and_shape_round_trips_bit_exact(tmp_path_factory, dtype, shape, data):
    store = ObjectStore(tmp_path_factory.mktemp("store"), fsync=False)
    raw = data.draw(st.binary(min_size=nbytes(dtype, shape), max_size=nbytes(dtype, shape)))
    tensor = TensorData("t", dtype, shape, raw, tensor_digest(raw))
    entry = encode_tensor(store, tensor)
    assert entry.update == "dense" and entry.chain_depth == 0
    assert bytes(decode_tensor(store, entry)) == raw


def test_special_float_bit_patterns_survive(tmp_path):
    store = ObjectStore(tmp_path, fsync=False)
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45], dtype=np.float32).view(np.uint32)
    values = np.concatenate([values, np.array([0x7FC00001, 0xFFFFFFFF, 0x7F800001], dtype=np.uint32)])
    raw = values.tobytes()
    entry = encode_tensor(store, TensorData("x", "F32", (len(values),), raw, tensor_digest(raw)))
    assert bytes(decode_tensor(store, entry)) == raw


def test_weights_compress_with_byte_planes(tmp_path):
    """Trained-weight-like fp32 data stores below 0.9 of raw (the exponent plane compresses)."""
    store = ObjectStore(tmp_path, fsync=False)
    raw = (np.random.default_rng(0).standard_normal(1 << 18) * 0.02).astype(np.float32).tobytes()
    entry = encode_tensor(store, TensorData("w", "F32", (1 << 18,), raw, tensor_digest(raw)))
    assert entry.objects[0].size < 0.9 * len(raw)


def test_corrupt_and_missing_objects_name_the_tensor(tmp_path):
    store = ObjectStore(tmp_path, fsync=False)
    raw = np.arange(64, dtype=np.float32).tobytes()
    entry = encode_tensor(store, TensorData("layer.w", "F32", (64,), raw, tensor_digest(raw)))
    path = store.path(entry.objects[0].oid)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ObjectCorruptError) as info:
        decode_tensor(store, entry, "model.safetensors")
    assert "model.safetensors" in str(info.value) and "layer.w" in str(info.value)
    path.unlink()
    with pytest.raises(ObjectMissingError) as info:
        decode_tensor(store, entry, "model.safetensors")
    assert entry.objects[0].oid in str(info.value)


def _store_with_header(store, tensor, **header_changes):
    """Store ``tensor`` dense, with chosen header fields changed (None removes a field)."""
    from git_theta.updates.chain import encode_update, tensor_checksum
    from git_theta.manifest import TensorEntry
    from git_theta.store.container import header_bytes

    update, encoded = encode_update(tensor, "dense")
    header = dict(encoded.header, update="dense", dtype=tensor.dtype, shape=list(tensor.shape))
    header["check"] = tensor_checksum(tensor.data, tensor.digest)
    for key, value in header_changes.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    ref = store.put_chunks([header_bytes(header), *encoded.parts])
    return TensorEntry(tensor.name, tensor.dtype, tuple(tensor.shape), tensor.digest, "dense", (ref,))


def test_reads_check_the_recorded_checksum_and_digest(tmp_path, monkeypatch):
    """New objects record an xxh3-128 checksum over the tensor's digest and bytes; a read of a
    trusted pair checks it (a wrong checksum or a manifest naming another tensor fails), fsck's
    full read hashes with sha256, objects recording the digest beside a checksum of the bytes alone
    (written before) are checked both ways, and objects without either are checked with sha256."""
    from git_theta.store.cache import Cache
    from git_theta.updates.chain import tensor_checksum
    from git_theta.store.container import unpack
    from git_theta.store.trust import TrustLedger

    store = ObjectStore(tmp_path / "objects", fsync=False)
    store.trust = TrustLedger(Cache(tmp_path / "cache.sqlite3"))  # encode_tensor records its pairs
    raw = np.arange(64, dtype=np.float32).tobytes()
    tensor = TensorData("layer.w", "F32", (64,), raw, tensor_digest(raw))
    entry = encode_tensor(store, tensor)
    header, _ = unpack(store.read(entry.objects[0].oid))
    assert "digest" not in header and header["check"] == tensor_checksum(raw, tensor.digest)
    assert header["check"] != tensor_checksum(raw, tensor_digest(b"another tensor"))
    assert bytes(decode_tensor(store, entry)) == raw

    other = np.ones(64, dtype=np.float32).tobytes()
    # An object whose bytes are not the tensor its header records: the checksum catches it (and
    # the diagnostic retry, which hashes with sha256, confirms and names the object).
    swapped = _store_with_header(
        store,
        TensorData("layer.w", "F32", (64,), other, tensor_digest(other)),
        check=tensor_checksum(raw, tensor.digest),
    )
    swapped = entry.__class__(entry.name, entry.dtype, entry.shape, tensor.digest, "dense", swapped.objects)
    with pytest.raises(ObjectCorruptError, match="layer.w"):
        decode_tensor(store, swapped, "model.safetensors")
    # A damaged checksum field over intact bytes: the sha256 retry proves the bytes right.
    wrong = _store_with_header(store, tensor, check=tensor_checksum(b"something else", tensor.digest))
    assert bytes(decode_tensor(store, wrong)) == raw
    import git_theta.updates.chain as codec

    calls = []
    hasher = codec.checksum_hasher
    monkeypatch.setattr(codec, "tensor_checksum", lambda *args: calls.append("whole") or tensor_checksum(*args))
    monkeypatch.setattr(codec, "checksum_hasher", lambda *args: calls.append("running") or hasher(*args))
    decode_tensor(store, entry)
    # A plain read checks the checksum, taken as the decoder writes the bytes (no second pass)...
    assert calls == ["running"]
    calls.clear()
    decode_tensor(store, entry, full=True)
    assert not calls  # ...fsck's full read hashes with sha256 instead
    monkeypatch.undo()

    def renamed(stored):  # the manifest names another tensor for the same objects
        return entry.__class__(entry.name, entry.dtype, entry.shape, tensor_digest(other), "dense", stored.objects)

    with pytest.raises(ObjectCorruptError, match="manifest was altered"):
        decode_tensor(store, renamed(entry), "model.safetensors")

    earlier = _store_with_header(store, tensor, digest=tensor.digest, check=tensor_checksum(raw))
    assert bytes(decode_tensor(store, earlier)) == raw
    with pytest.raises(ObjectCorruptError, match="manifest was altered"):
        decode_tensor(store, renamed(earlier), "model.safetensors")

    old = _store_with_header(store, tensor, check=None)
    assert bytes(decode_tensor(store, old)) == raw
    with pytest.raises(ObjectCorruptError, match="tensor digest"):
        decode_tensor(store, renamed(old), "model.safetensors")
