"""Manifest v1: canonical serialisation, parsing, validation of tampered input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_theta.errors import ManifestError
from git_theta.manifest import Manifest, ObjectRef, TensorEntry, escape_name, is_manifest, unescape_name

OID_A = "a" * 64
OID_B = "b" * 64
DIGEST = "c" * 64


def sample():
    m = Manifest(format="safetensors", fields={"metadata": '{"k":"v"}'})
    m.blobs["header"] = ObjectRef(OID_B, 10)
    m.tensors["w"] = TensorEntry("w", "F32", (4, 4), DIGEST, "dense", (ObjectRef(OID_A, 99),))
    m.tensors["a b"] = TensorEntry("a b", "BF16", (), DIGEST, "sparse", (ObjectRef(OID_B, 5), ObjectRef(OID_A, 99)))
    return m


def test_layout_is_one_line_per_tensor_sorted_by_name():
    text = sample().serialize().decode()
    lines = text.splitlines()
    assert lines[0] == "git-theta manifest v1"
    assert lines[1] == "format safetensors"
    assert lines[2] == 'field metadata {"k":"v"}'
    assert lines[3] == f"blob header {OID_B}:10"
    assert lines[4] == f"tensor a%20b BF16 [] {DIGEST} sparse {OID_B}:5 {OID_A}:99"
    assert lines[5] == f"tensor w F32 [4,4] {DIGEST} dense {OID_A}:99"
    assert text.endswith("\n")


def test_parse_serialize_is_identity():
    data = sample().serialize()
    assert Manifest.parse(data).serialize() == data
    assert is_manifest(data)


def test_all_objects_lists_each_once_and_logical_size():
    m = sample()
    assert [r.oid for r in m.all_objects()] == [OID_B, OID_A]
    assert m.logical_size() == 4 * 16 + 2


@given(st.text(min_size=1, max_size=30))
@settings(max_examples=200)
def test_name_escaping_round_trips_and_never_contains_separators(name):
    escaped = escape_name(name)
    assert unescape_name(escaped) == name
    assert not any(c in escaped for c in " \n\t\r")


def corrupt(text):
    return text.encode()


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda t: t.replace("manifest v1", "manifest v9"), "unknown manifest schema"),
        (lambda t: t[:-1], "truncated"),
        (lambda t: t.replace(OID_A, "../../etc/passwd" + "0" * 48), "invalid object"),
        (lambda t: t.replace(f"{OID_A}:99", f"{OID_A.upper()}:99"), "invalid object"),
        (lambda t: t.replace("[4,4]", "[4,x]"), "invalid shape"),
        (lambda t: t.replace("[4,4]", "[99999999999,99999999999]"), "too large"),
        (lambda t: t + t.splitlines()[-1] + "\n", "duplicate tensor"),
        (lambda t: t.replace(" F32 ", " f32 "), "invalid dtype"),
        (lambda t: t + "bogus line\n", "unknown line kind"),
        (lambda t: t.replace("format safetensors", "formats x"), "must name the format"),
    ],
)
def test_tampered_manifests_are_rejected_with_the_line(mutation, message):
    text = sample().serialize().decode()
    with pytest.raises(ManifestError) as info:
        Manifest.parse(mutation(text).encode(), source="model.safetensors")
    assert message in str(info.value)
    assert "model.safetensors" in str(info.value)


def test_unknown_version_hints_at_upgrade():
    data = sample().serialize().replace(b"manifest v1", b"manifest v9")
    with pytest.raises(ManifestError) as info:
        Manifest.parse(data)
    assert "upgrade" in info.value.hint


def test_non_utf8_is_rejected():
    with pytest.raises(ManifestError):
        Manifest.parse(b"git-theta manifest v1\nformat \xff\n")
