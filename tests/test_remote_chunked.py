"""Chunked objects (theta.maxObjectSize): split on write, reassembled and verified on read."""

import hashlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from git_theta.store import chunked
from git_theta.errors import ObjectCorruptError
from git_theta.store.objects import ObjectStore


@settings(max_examples=25, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), limit=st.integers(min_value=64, max_value=1500))
@example(data=chunked.MAGIC, limit=64)  # ordinary content that starts like an index stays itself
@example(data=chunked.MAGIC + b"12 " + b"0" * 64 + b"\n", limit=64)
def test_split_round_trip(tmp_path_factory, data, limit):
    store = ObjectStore(tmp_path_factory.mktemp("store"), fsync=False, max_object_size=limit)
    ref = store.put_chunks([data[:7], data[7:]])
    assert store.read(ref.oid, verify=True) == data
    parts = store.chunk_parts([ref])
    if len(data) > limit:
        assert ref.oid != hashlib.sha256(data).hexdigest()  # the manifest names the chunk index
        assert sum(p.size for p in parts) == len(data) and all(p.size <= limit for p in parts)
    else:
        assert ref.oid == hashlib.sha256(data).hexdigest() and parts == []
    assert store.missing([ref]) == []


def test_missing_and_corrupt_parts_are_reported(tmp_path):
    store = ObjectStore(tmp_path, fsync=False, max_object_size=100)
    ref = store.put_bytes(bytes(range(256)) * 2)
    first, second = store.chunk_parts([ref])[:2]
    path = store.path(second.oid)
    path.write_bytes(b"x" * second.size)  # same size, other bytes
    with pytest.raises(ObjectCorruptError):
        store.read(ref.oid)
    path.unlink()
    assert store.missing([ref]) == [second]
    assert chunked.parse_index(store.path(ref.oid).read_bytes())[2][0] == first
