"""The sha256 of a first checkout taken while the decoder writes each piece (tensors/hashing.py):
the same digest as hashing the result, used only when it covers every byte in order, and never
a way around the check."""

import hashlib

import numpy as np
import pytest

from git_theta.errors import ObjectCorruptError
from git_theta.store.objects import ObjectStore
from git_theta.tensors import hashing, planes
from git_theta.updates import chain
from git_theta.updates.base import TensorData
from git_theta.updates.chain import decode_tensor, encode_tensor, tensor_digest


def tensor(name, values):
    data = values.tobytes()
    return TensorData(name, "F32", values.shape, data, tensor_digest(data))


def test_running_digest_counts_only_complete_in_order_pieces():
    data = np.random.default_rng(0).bytes(1000)
    whole = hashlib.sha256(data).hexdigest()
    running = hashing.RunningDigest(1000)
    for start in range(0, 1000, 300):
        running.feed(start, data[start : start + 300])
    assert running.hexdigest() == whole
    partial = hashing.RunningDigest(1000)
    partial.feed(0, data[:600])
    assert partial.hexdigest() is None  # 400 bytes never fed
    skipped = hashing.RunningDigest(1000)
    skipped.feed(0, data[:300])
    skipped.feed(600, data[600:])  # a gap
    skipped.feed(300, data[300:600])  # late: the order is broken for good
    assert skipped.hexdigest() is None
    twice = hashing.RunningDigest(600)
    twice.feed(0, data[:300])
    twice.feed(0, data[:300])  # the same piece again
    assert twice.hexdigest() is None


def test_a_digest_is_claimed_once_and_only_inside_the_offer():
    running = hashing.RunningDigest(4)
    assert hashing.claim() is None
    with hashing.offering(running):
        assert hashing.claim() is running
        assert hashing.claim() is None  # a nested decoder (a delta's own sections) never sees it
    assert hashing.claim() is None


@pytest.mark.parametrize("dtype_size", [4, 2, 1])
def test_interleaving_feeds_every_piece_of_every_shape(dtype_size):
    rng = np.random.default_rng(dtype_size)
    data = rng.integers(0, 256, planes.INTERLEAVE_BYTES * 3 + 7 * dtype_size, dtype=np.uint8).tobytes()
    payload = b"".join(bytes(p) for p in planes.encode_planes(data, dtype_size))
    running = hashing.RunningDigest(len(data))
    out = planes.decode_planes(payload, len(data), dtype_size, digest=running)
    assert bytes(out) == data and running.hexdigest() == hashlib.sha256(data).hexdigest()


def count_full_hashes(monkeypatch):
    calls = []
    real = chain.tensor_digest

    def counting(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(chain, "tensor_digest", counting)
    return calls


def test_dense_and_int_delta_are_verified_without_a_second_pass(tmp_path, monkeypatch):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    rng = np.random.default_rng(1)
    base = (0.02 * rng.standard_normal(300_000)).astype(np.float32)
    new = base + (1e-4 * rng.standard_normal(base.size)).astype(np.float32)
    base_entry = encode_tensor(store, tensor("w", base))
    delta_entry = encode_tensor(store, tensor("w", new), "int-delta", tensor("w", base), base_entry)
    sparse_new = base.copy()
    sparse_new[::1000] += 1
    sparse_entry = encode_tensor(store, tensor("w", sparse_new), "sparse", tensor("w", base), base_entry)
    calls = count_full_hashes(monkeypatch)
    assert bytes(decode_tensor(store, base_entry)) == base.tobytes()
    assert bytes(decode_tensor(store, delta_entry)) == new.tobytes()
    assert calls == []  # both hashed piece by piece while decoding
    assert bytes(decode_tensor(store, sparse_entry)) == sparse_new.tobytes()
    assert calls == [sparse_new.nbytes]  # sparse does not claim the digest: hashed afterwards


def test_a_forged_pair_is_still_refused_when_hashed_on_the_way(tmp_path, monkeypatch):
    """The manifest names the genuine digest, the objects decode to other bytes: the running
    digest of what was decoded does not match, and nothing is returned."""
    store = ObjectStore(tmp_path / "objects", fsync=False)
    rng = np.random.default_rng(2)
    genuine = (0.02 * rng.standard_normal(100_000)).astype(np.float32)
    other = genuine.copy()
    other[5] = 7.0
    forged = encode_tensor(store, tensor("w", other))
    digest = tensor_digest(genuine.tobytes())
    entry = type(forged)(forged.name, forged.dtype, forged.shape, digest, "dense", forged.objects)
    calls = count_full_hashes(monkeypatch)
    with pytest.raises(ObjectCorruptError, match="do not match the tensor digest|does not decode"):
        decode_tensor(store, entry)
    assert calls == []  # refused by the digest taken on the way (in the strict retry too)


def test_a_decoder_feeding_out_of_order_falls_back_to_hashing_the_result(tmp_path, monkeypatch):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    values = (0.02 * np.random.default_rng(3).standard_normal(50_000)).astype(np.float32)
    entry = encode_tensor(store, tensor("w", values))
    real = planes.decode_planes

    def backwards(payload, nbytes, itemsize, oid="?", out=None, digest=None):
        result = real(payload, nbytes, itemsize, oid, out=out)
        if digest is not None:
            digest.feed(100, memoryview(result)[100:])  # not from the first byte
        return result

    monkeypatch.setattr("git_theta.updates.dense.decode_planes", backwards)
    calls = count_full_hashes(monkeypatch)
    assert bytes(decode_tensor(store, entry)) == values.tobytes()
    assert calls == [values.nbytes]
