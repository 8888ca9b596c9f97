"""Hostile manifests and objects: refused with one clear error, nothing written outside the store."""

import numpy as np
import pytest

from conftest import random_state_dict, save_safetensors
from git_theta.updates import chain as codec
from git_theta.store import container as object_codec
from git_theta.errors import GitThetaError, ManifestError, ObjectCorruptError
from git_theta.manifest import FIRST_LINE, Manifest
from git_theta.store.objects import ObjectStore
from git_theta.updates.base import TensorData

D = "ab" * 32
OID = "cd" * 32


def _m(*lines):
    return ("\n".join([FIRST_LINE, "format safetensors", *lines]) + "\n").encode()


HOSTILE = {
    "truncated (no final newline)": (_m(f"tensor w F32 [2] {D} dense {OID}:10")[:-1], "truncated"),
    "truncated mid-line": (_m(f"tensor w F32 [2] {D}"), "malformed tensor line"),
    "oversized shape": (_m(f"tensor w F32 [4294967296,4294967296] {D} dense {OID}:10"), "too large"),
    "too many dimensions": (_m(f"tensor w F32 [{','.join(['1'] * 65)}] {D} dense {OID}:10"), "invalid shape"),
    "non-ascii digits in shape": (_m(f"tensor w F32 [²] {D} dense {OID}:10"), "invalid shape"),
    "non-hex object id": (_m(f"tensor w F32 [2] {D} dense {'zz' * 32}:10"), "invalid object id"),
    "path-like object id": (_m(f"tensor w F32 [2] {D} dense ../../../../etc/passwd:10"), "invalid object id"),
    "path-like blob id": (_m("blob header ../../x:1"), "invalid object id"),
    "uppercase object id": (_m(f"tensor w F32 [2] {D} dense {OID.upper()}:10"), "invalid object id"),
    "duplicate tensor names": (
        _m(f"tensor w F32 [2] {D} dense {OID}:10", f"tensor w F32 [2] {D} dense {OID}:10"),
        "duplicate tensor",
    ),
    "duplicate fields": (_m("field metadata {}", "field metadata {}"), "duplicate field"),
    "bad digest": (_m(f"tensor w F32 [2] {'0' * 63} dense {OID}:10"), "invalid tensor digest"),
    "bad size": (_m(f"tensor w F32 [2] {D} dense {OID}:-1"), "invalid object reference"),
    "unknown line kind": (_m("exec rm -rf /"), "unknown line kind"),
    "bad format name": (b"git-theta manifest v1\nformat ../evil\n", "invalid format name"),
    "future schema": (b"git-theta manifest v9\nformat safetensors\n", "unknown manifest schema"),
    "not utf-8": (_m("field metadata \xff").replace(b"\xc3\xbf", b"\xff"), "not valid UTF-8"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_parser_refuses_hostile_manifest(case):
    data, expected = HOSTILE[case]
    with pytest.raises(ManifestError) as info:
        Manifest.parse(data, source="evil.safetensors")
    assert expected in info.value.message, info.value.message
    assert "\n" not in info.value.message


def _tensor(values, dtype="F32"):
    data = np.asarray(values, dtype=np.float32).tobytes()
    return TensorData("w", dtype, (len(values),), data, codec.tensor_digest(data))


def test_object_header_must_match_the_manifest(tmp_path):
    """A manifest claiming another dtype or shape for a real object is caught at decode."""
    store = ObjectStore(tmp_path / "objects")
    entry = codec.encode_tensor(store, _tensor([1.0, 2.0, 3.0, 4.0]))
    for dtype, shape in (("F16", (4,)), ("F32", (2,)), ("F32", (2, 2)), ("I32", (4,))):
        lying = type(entry)(entry.name, dtype, shape, entry.digest, entry.update, entry.objects)
        with pytest.raises(ObjectCorruptError, match="the manifest says"):
            codec.decode_tensor(store, lying, "evil.safetensors")


def test_object_whose_payload_does_not_fit_its_own_header(tmp_path):
    """Header and manifest agree on [8] but the payload holds 4 elements: caught, named."""
    store = ObjectStore(tmp_path / "objects")
    small = _tensor([1.0, 2.0, 3.0, 4.0])
    entry = codec.encode_tensor(store, small)
    header, payload = object_codec.unpack(store.read(entry.objects[0].oid))
    header = dict(header, shape=[8])
    forged = store.put_bytes(object_codec.header_bytes(header) + bytes(payload))
    lying = type(entry)("w", "F32", (8,), entry.digest, entry.update, (forged,))
    with pytest.raises(ObjectCorruptError) as info:
        codec.decode_tensor(store, lying, "evil.safetensors")
    assert forged.oid in info.value.message and "'w'" in info.value.message


def test_object_claiming_an_enormous_tensor(tmp_path):
    """A consistent forged header + manifest for 2**50 elements: an error, not a MemoryError."""
    store = ObjectStore(tmp_path / "objects")
    forged = store.put_bytes(object_codec.header_bytes({"update": "dense", "dtype": "F32", "shape": [1 << 50]}))
    entry = type(codec.encode_tensor(store, _tensor([1.0])))("w", "F32", (1 << 50,), D, "dense", (forged,))
    with pytest.raises(GitThetaError):
        codec.decode_tensor(store, entry, "evil.safetensors")


@pytest.mark.parametrize(
    "header",
    [b'{"update": ["dense"]}', b'{"update": "dense", "shape": 3}', b'{"update": "dense", "shape": [-1]}', b"[]", b"{"],
)
def test_malformed_object_headers(tmp_path, header):
    import struct

    store = ObjectStore(tmp_path / "objects")
    forged = store.put_bytes(object_codec.MAGIC + struct.pack("<I", len(header)) + header)
    entry = type(codec.encode_tensor(store, _tensor([1.0])))("w", "F32", (1,), D, "dense", (forged,))
    with pytest.raises(ObjectCorruptError, match="corrupt header"):
        codec.decode_tensor(store, entry, "evil.safetensors")


def test_checkout_of_hostile_manifests_fails_cleanly(repo, tmp_path):
    # dense objects (a raw one's id is its digest: test_packs.py covers those)
    repo.git("config", "theta.packThreshold", "0")
    save_safetensors(repo.file("model.safetensors"), random_state_dict(1))
    good = repo.file("model.safetensors").read_bytes()
    repo.commit("good", "model.safetensors")
    real = Manifest.parse(repo.show("HEAD:model.safetensors"))
    entry = real.tensors["embed.weight"]
    text = repo.show("HEAD:model.safetensors").decode()
    cases = {
        "path.safetensors": (
            text.replace(entry.objects[0].oid, "../../../../../../tmp/x" + "0" * 41),
            "invalid object id",
        ),
        "shape.safetensors": (
            text.replace("embed.weight F32 [64,16]", "embed.weight F32 [16,64]"),
            "the manifest says",
        ),
        "dtype.safetensors": (
            text.replace("embed.weight F32 [64,16]", "embed.weight F16 [64,32]"),
            "the manifest says",
        ),
        "missing.safetensors": (text.replace(entry.objects[0].oid, "e" * 64), "missing"),
    }
    for name, (content, _) in cases.items():
        blob = repo.git("hash-object", "-w", "--stdin", input=content).stdout.strip()
        repo.git("update-index", "--add", "--cacheinfo", f"100644,{blob},{name}")
    repo.git("commit", "-q", "-m", "hostile manifests")
    for name, (content, expected) in cases.items():
        repo.file(name).unlink(missing_ok=True)
        proc = repo.git("checkout", "--", name, check=False)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0] and name in errors[0], proc.stderr
        assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
        if name == "missing.safetensors":
            # a missing object leaves the manifest in place (like an LFS pointer), never garbage
            assert repo.file(name).read_text() == content
        else:
            assert proc.returncode != 0, name
            assert not repo.file(name).exists()  # nothing half-written under the real name
    assert not (tmp_path.parent / "x").exists()
    assert repo.file("model.safetensors").read_bytes() == good
    # fsck names every problem; the good checkpoint is untouched
    proc = repo.theta("fsck", check=False)
    assert proc.returncode == 1
    assert {line.split(":")[1].strip() for line in proc.stdout.splitlines()} == set(cases)
