"""Dense encoding (byte planes + zstd) round-trips every bit pattern of every dtype."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_theta.codec import decode_tensor, encode_tensor, tensor_digest
from git_theta.dtypes import DTYPES, nbytes
from git_theta.errors import ObjectCorruptError, ObjectMissingError
from git_theta.object_store import ObjectStore
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
