"""Object store: content addressing, atomic writes, verification."""

import hashlib

import pytest

from git_theta.errors import ManifestError, ObjectCorruptError, ObjectMissingError
from git_theta.store.objects import ObjectStore


def test_put_is_content_addressed_and_idempotent(tmp_path):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    ref = store.put_chunks([b"hello ", b"world"])
    assert ref.oid == hashlib.sha256(b"hello world").hexdigest()
    assert ref.size == 11
    assert store.path(ref.oid) == tmp_path / "objects" / ref.oid[:2] / ref.oid[2:4] / ref.oid
    assert store.read(ref.oid, verify=True) == b"hello world"
    assert store.put_bytes(b"hello world") == ref
    assert list(store.iter_oids()) == [ref.oid]
    assert list((tmp_path / "objects" / "tmp").iterdir()) == []


def test_missing_and_corrupt_objects_are_errors(tmp_path):
    store = ObjectStore(tmp_path, fsync=False)
    ref = store.put_bytes(b"data")
    with pytest.raises(ObjectMissingError):
        store.read("0" * 64)
    store.path(ref.oid).write_bytes(b"DATA")
    with pytest.raises(ObjectCorruptError) as info:
        store.read(ref.oid, verify=True)
    assert ref.oid in str(info.value)


def test_a_failed_write_leaves_no_object(tmp_path):
    store = ObjectStore(tmp_path, fsync=True)

    def chunks():
        yield b"partial"
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        store.put_chunks(chunks())
    assert list(store.iter_oids()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("oid", ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 64 + "/"])
def test_path_like_oids_are_refused(tmp_path, oid):
    with pytest.raises(ManifestError):
        ObjectStore(tmp_path).path(oid)
