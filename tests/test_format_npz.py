"""The npz format: bit-exact arrays, order/compression/layout kept, refusals, real git."""

import io
import os
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from format_helpers import described, join, object_files, roundtrip, split, store_files
from git_theta.errors import CheckpointError
from git_theta.formats.npz_format import NpzFormat

FMT = NpzFormat()
DTYPES = ["<f8", "<f4", "<f2", "<c8", "<i8", "<i4", "<i2", "i1", "<u8", "<u4", "<u2", "u1", "?", ">f4"]


def npz(arrays, compressed=False):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def assert_same(expected, raw):
    """Same names in the same order, same dtypes (byte order too), shapes and bits."""
    with np.load(io.BytesIO(raw), allow_pickle=False) as back:
        assert back.files == list(expected)
        for name, array in expected.items():
            got = back[name]
            assert got.dtype == array.dtype and got.shape == array.shape, name
            assert got.tobytes() == array.tobytes(), name
            assert got.flags.f_contiguous == array.flags.f_contiguous, name


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    n = int(np.prod(shape))
    if dtype.kind == "b":
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool).reshape(shape)
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()  # random bits: NaN payloads, -0.0...


@settings(max_examples=15, deadline=None)
@given(
    st.dictionaries(st.from_regex(r"[a-z][a-z0-9_./]{0,6}", fullmatch=True), arrays(), min_size=1, max_size=4),
    st.booleans(),
)
def test_property_roundtrip_bit_exact(named, compressed):
    reader, tensors, raw = roundtrip(FMT, npz(named, compressed), "a.npz")
    assert_same(named, raw)
    assert described(*split(FMT, raw, "a.npz")) == described(reader, tensors)  # re-clean is identical
    assert raw == join(FMT, reader, tensors, "a.npz")  # deterministic checkout


def test_order_compression_layout_and_timestamps_kept():
    named = {
        "z_last_name_first": np.arange(6, dtype=">i4").reshape(2, 3),
        "a": np.asfortranarray(np.linspace(-1, 1, 6).reshape(2, 3)),
        "scalar": np.array(-0.0, dtype=np.float16),
        "empty": np.zeros((0, 5), np.float32),
        "nan": np.array([np.nan, -np.inf], np.float64),
    }
    for compressed in (False, True):
        reader, _, raw = roundtrip(FMT, npz(named, compressed), "a.npz")
        assert_same(named, raw)
        assert reader.fields.get("compression") == ("deflated" if compressed else None)
        infos = zipfile.ZipFile(io.BytesIO(raw)).infolist()
        expected_method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
        assert {i.compress_type for i in infos} == {expected_method}
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}


def test_object_arrays_and_unknown_dtypes_are_refused():
    buf = io.BytesIO()
    np.savez(buf, ok=np.ones(2), bad=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CheckpointError) as info:
        list(FMT.split(io.BytesIO(buf.getvalue()), "a.npz").tensors())
    assert "'bad'" in info.value.message and "object array" in info.value.message and info.value.hint
    with pytest.raises(CheckpointError) as info:
        list(FMT.split(io.BytesIO(npz({"labels": np.array(["cat", "dog"])})), "a.npz").tensors())
    assert "<U3" in info.value.message and info.value.hint


def test_truncated_and_corrupt_archives():
    raw = npz({"w": np.random.default_rng(0).standard_normal(256)})
    crc_broken = bytearray(raw)
    crc_broken[400] ^= 0xFF  # inside the array data: the member's CRC no longer matches
    for bad in (raw[: len(raw) // 2], bytes(crc_broken)):
        with pytest.raises(CheckpointError) as info:
            list(FMT.split(io.BytesIO(bad), "a.npz").tensors())
        assert "a.npz" in info.value.message and "corrupt" in info.value.message and info.value.hint


def test_sniff_tells_npz_from_torch_and_safetensors():
    assert FMT.sniff(npz({"w": np.ones(1)})[:4096], "weights.bin")
    assert not FMT.sniff(b"PK\x03\x04" + b"\x00" * 22 + b"\x10\x00\x00\x00archive/data.pkl", "x.npz")
    assert not FMT.sniff(b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "x.npz")


def test_commit_modify_checkout_through_git(repo):
    path = repo.file("arrays.npz")
    rng = np.random.default_rng(1)
    v1 = {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": np.zeros(8, np.float16), "step": np.array(1)}
    path.write_bytes(npz(v1, compressed=True))
    repo.commit("v1", "arrays.npz")
    stored = repo.show("HEAD:arrays.npz").decode()
    assert (
        stored.startswith(
            (
                "git-theta manifest v1\nformat npz\n",
                "git-theta manifest v2\nformat npz\n",
                "git-theta manifest v3\nformat npz\n",
            )
        )
        and "field compression deflated" in stored
    )
    v2 = dict(v1, step=np.array(2))
    path.write_bytes(npz(v2, compressed=True))
    before = set(object_files(repo))
    repo.commit("v2", "arrays.npz")
    assert len(set(object_files(repo)) - before) == 1  # only the changed array is stored

    repo.git("checkout", "HEAD~1", "--", "arrays.npz")
    assert_same(v1, path.read_bytes())
    first = path.read_bytes()
    os.utime(path, (1, 1))  # git re-cleans the smudged archive: same manifest, status unchanged
    # With the stat cache off, git's re-clean really parses the smudged file again.
    status = repo.git("-c", "theta.statCache=false", "status", "--porcelain").stdout
    assert status == "M  arrays.npz\n"
    path.unlink()
    repo.git("checkout", "--", "arrays.npz")
    assert path.read_bytes() == first


def test_bad_npz_on_add_fails_and_keeps_the_index(repo):
    path = repo.file("arrays.npz")
    path.write_bytes(npz({"w": np.ones(64)}))
    repo.commit("v1", "arrays.npz")
    entry = repo.git("ls-files", "-s", "arrays.npz").stdout
    before = store_files(repo)
    path.write_bytes(npz({"w": np.arange(64.0)})[:300])
    proc = repo.git("add", "arrays.npz", check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "arrays.npz" in errors[0], proc.stderr
    assert repo.git("ls-files", "-s", "arrays.npz").stdout == entry
    assert store_files(repo) == before


class _Attributes:
    """Stands in for Repo in detect_format: answers ``theta-format`` like git check-attr."""

    def __init__(self, value):
        self.value = value

    def attribute(self, path, name):
        return self.value


def test_detection_content_first_then_the_attribute():
    from git_theta.formats.detect import detect_format

    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({"w": torch.ones(1)}, buf)
    head_pt, head_npz = buf.getvalue()[:4096], npz({"w": np.ones(1)})[:4096]
    # Content decides whatever the name says...
    assert detect_format(_Attributes("unspecified"), "weights.pt", head_npz).name == "npz"
    assert detect_format(_Attributes("unspecified"), "arrays.npz", head_pt).name == "torch"
    assert detect_format(_Attributes("unspecified"), "model.bin", head_pt).name == "torch"
    # ...and the theta-format attribute overrides content.
    assert detect_format(_Attributes("torch"), "arrays.npz", head_npz).name == "torch"
