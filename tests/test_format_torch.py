"""The torch format: structure and bit-exact tensors round trip, ties, hostile pickles, real git."""

import io
import math
import os
import struct
import subprocess
import sys
from collections import OrderedDict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from format_helpers import described, join, object_files, roundtrip, split, store_files
from git_theta.errors import CheckpointError, UnsafeCheckpointError
from git_theta.formats.torch_format import TorchFormat, tensor_names

torch = pytest.importorskip("torch")
FMT = TorchFormat()
DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.complex64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load(raw):
    return torch.load(io.BytesIO(raw), weights_only=True)


def bits(t):
    """A tensor's exact bytes (NaN payloads and -0.0 included)."""
    t = t.detach().contiguous().reshape(-1)
    return bytes(t.view(torch.uint8).numpy()) if t.numel() else b""


def assert_same(a, b, where="root"):
    """Deep equality that also checks container types, key order, float bits and tensor bits."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.requires_grad) == (b.dtype, b.shape, b.requires_grad), where
        assert bits(a) == bits(b), f"{where}: tensor bits differ"
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
        if isinstance(a, OrderedDict):  # a state dict's _metadata
            assert_same(dict(vars(a)), dict(vars(b)), f"{where}.@attrs")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}.{i}")
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), where
    else:
        assert a == b, where


def random_tensor(dtype, shape, data):
    n = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in data[:n])
    else:
        raw = data[: n * itemsize]
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(shape).clone()


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    size = 8 * max(math.prod(shape), 1)
    return random_tensor(dtype, shape, draw(st.binary(min_size=size, max_size=size)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text("abc.", min_size=1, max_size=3), tensors(), min_size=1, max_size=4), tensors())
def test_property_roundtrip_bit_exact(state, extra):
    """Any dtype and shape (0-d, empty, random bit patterns incl. NaN payloads) comes back exactly."""
    obj = {"state_dict": state, "optimizer": {"state": {0: {"exp_avg": extra}}}, "step": 7}
    reader, tensors_out, raw = roundtrip(FMT, saved(obj), "m.pt")
    assert_same(obj, load(raw))
    # What git would store again after checkout is identical (git status stays clean).
    assert described(*split(FMT, raw, "m.pt")) == described(reader, tensors_out)


def test_structure_and_leaves_round_trip():
    sd = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict carrying _metadata
    obj = {
        "state_dict": sd,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1], "amsgrad": False, "foreach": None}],
        },
        "epoch": 12,
        "big": 2**80,
        "loss": -0.0,
        "nan": float("nan"),
        "inf": float("-inf"),
        "name": "run é",
        "$key": 1,
        "$": 2,
        "bytes": b"\x00\xff",
        "complex": 1 - 2j,
        "tags": {"b", "a"},
        "size": torch.Size([2, 3]),
        "dtype": torch.bfloat16,
        "device": torch.device("cpu"),
        "param": torch.nn.Parameter(torch.ones(2)),
        "frozen_param": torch.nn.Parameter(torch.ones(1), requires_grad=False),
        "grad": torch.zeros(2, requires_grad=True),
        "scalar": torch.tensor(-0.0, dtype=torch.float16),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False]),
        "nested": [[torch.arange(3)], (torch.ones(1, dtype=torch.int8),)],
    }
    reader, tensors_out, raw = roundtrip(FMT, saved(obj), "m.pt")
    assert_same(obj, load(raw))
    names = {t.name for t in tensors_out}
    assert {
        "state_dict.weight",
        "optimizer.state.0.exp_avg",
        "optimizer.state.1.step",
        "nested.0.0",
        "nested.1.0",
    } <= names
    assert set(reader.fields) | set(reader.blobs) == {"structure"}
    assert raw == join(FMT, reader, tensors_out, "m.pt"), "checkout must be deterministic"


def test_tied_weights_and_views_share_storage():
    emb = torch.randn(6, 4)
    x = torch.arange(12.0).reshape(3, 4)
    fused = torch.arange(8.0)
    obj = {"embed.weight": emb, "lm_head.weight": emb, "x": x, "xT": x.T, "row": x[1], "q": fused[:3], "k": fused[4:]}
    obj["alone"] = torch.arange(10)[2:5]  # the only tensor on a larger storage: stored as its values
    reader, tensors_out, raw = roundtrip(FMT, saved(obj), "m.pt")
    stored = {t.name for t in tensors_out}
    # The tie and the views of x are stored once; q and k share a storage stored under q's name.
    assert stored == {"embed.weight", "x", "q%storage", "alone"}
    back = load(raw)
    assert_same({k: v.contiguous() for k, v in obj.items()}, {k: v.contiguous() for k, v in back.items()})
    ptr = lambda name: back[name].untyped_storage().data_ptr()  # noqa: E731
    assert ptr("embed.weight") == ptr("lm_head.weight")
    assert ptr("x") == ptr("xT") == ptr("row") and back["xT"].stride() == (1, 4)
    assert ptr("q") == ptr("k") and back["k"].storage_offset() == 4
    assert back["alone"].untyped_storage().nbytes() == 3 * 8
    assert described(*split(FMT, raw, "m.pt")) == described(reader, tensors_out)


def test_colliding_paths_get_unambiguous_names():
    paths = [("a.b",), ("a", "b"), ("s", "0"), ("s", 0), ("s", 1), ()]
    names = tensor_names(paths)
    assert names == ["a%2Eb", "a.b", "s.0", "s.%230", "s.1", "tensor"]
    assert len(set(tensor_names([("x", "%"), ("x", "%25")]))) == 2


def test_large_structure_goes_to_a_blob():
    obj = {"groups": [{"params": list(range(2000)), "lr": 0.1}], "w": torch.ones(2)}
    reader, tensors_out, raw = roundtrip(FMT, saved(obj), "m.pt")
    assert "structure" in reader.blobs and "structure" not in reader.fields
    assert_same(obj, load(raw))


class Marker:
    """A pickle that would create a file when loaded."""

    def __init__(self, target, how):
        self.target, self.how = str(target), how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.target}",))
        return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["system", "open"])
def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path, how):
    marker = tmp_path / "ran"
    obj = {
        "model": {"w": torch.ones(2)},
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2), "hook": Marker(marker, how)}}},
    }
    reader = FMT.split(io.BytesIO(saved(obj)), "evil.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        list(reader.tensors())
    assert "evil.pt" in info.value.message and "refused" in info.value.message
    assert info.value.hint
    assert not marker.exists()


def test_truncated_and_corrupt_checkpoints_are_checkpoint_errors():
    raw = saved({"w": torch.randn(8, 8)})
    for bad in (raw[: len(raw) // 2], raw[:200] + b"\x00" * 50 + raw[250:]):
        with pytest.raises(CheckpointError) as info:
            list(FMT.split(io.BytesIO(bad), "m.pt").tensors())
        assert not isinstance(info.value, UnsafeCheckpointError)
        assert "m.pt" in info.value.message and info.value.hint


def test_sniff_and_legacy_format(tmp_path):
    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, w=np.ones(2))
    assert FMT.sniff(saved({"w": torch.ones(1)})[:4096], "x.bin")
    assert not FMT.sniff(buf.getvalue()[:4096], "x.pt")
    legacy = tmp_path / "old.pt"
    torch.save({"w": torch.arange(4)}, legacy, _use_new_zipfile_serialization=False)
    _, _, raw = roundtrip(FMT, legacy.read_bytes(), "old.pt")
    assert_same({"w": torch.arange(4)}, load(raw))


def test_missing_torch_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError) as info:
        list(FMT.split(io.BytesIO(b"PK\x03\x04"), "m.pt").tensors())
    assert "pip install torch" in info.value.hint


def test_filter_modules_do_not_import_torch():
    code = (
        "import sys, git_theta.filter.process, git_theta.filter.clean, git_theta.filter.smudge, git_theta.registry as p\n"
        "[p.get('format', n) for n in p.names('format')]\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- through real git -------------------------------------------------------------------------------
def checkpoint(step, seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(32, 8, generator=g).to(torch.bfloat16)
    return {
        "state_dict": OrderedDict(
            [
                ("embed.weight", emb),
                ("lm_head.weight", emb),
                ("layer.weight", torch.randn(8, 8, generator=g, dtype=torch.float16)),
            ]
        ),
        "optimizer": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.full((8, 8), float(step))}}},
        "step": step,
    }


def test_commit_modify_checkout_through_git(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    path = repo.file("model.pt")
    v1 = checkpoint(1, seed=0)
    torch.save(v1, path)
    repo.commit("v1", "model.pt")
    stored = repo.show("HEAD:model.pt").decode()
    assert stored.startswith(
        (
            "git-theta manifest v1\nformat torch\n",
            "git-theta manifest v2\nformat torch\n",
            "git-theta manifest v3\nformat torch\n",
        )
    )
    assert "tensor state_dict.embed.weight BF16 [32,8]" in stored and "lm_head.weight BF16" not in stored
    assert '"step":1' in stored

    v2 = checkpoint(2, seed=0)
    v2["state_dict"]["layer.weight"] = v2["state_dict"]["layer.weight"] * 2
    torch.save(v2, path)
    objects_before = set(object_files(repo))
    repo.commit("v2", "model.pt")
    new_objects = set(object_files(repo)) - objects_before
    assert len(new_objects) == 3  # layer.weight, step and exp_avg changed; the embedding did not

    repo.git("checkout", "HEAD~1", "--", "model.pt")
    back = torch.load(path, weights_only=True)
    assert_same(v1, back)
    tied = back["state_dict"]
    assert tied["lm_head.weight"].untyped_storage().data_ptr() == tied["embed.weight"].untyped_storage().data_ptr()
    assert repo.status() == "M  model.pt\n"  # the old version staged, the work tree matches it
    os.utime(path, (1, 1))  # stat-dirty: git re-cleans the smudged file and must get the same manifest
    # With the stat cache off, git's re-clean really parses the smudged file again.
    status = repo.git("-c", "theta.statCache=false", "status", "--porcelain").stdout
    assert status == "M  model.pt\n"
    first = path.read_bytes()
    path.unlink()
    repo.git("checkout", "--", "model.pt")
    assert path.read_bytes() == first  # same manifest -> same bytes


def test_bad_pt_on_add_fails_and_keeps_the_index(repo, tmp_path):
    path = repo.file("model.pt")
    torch.save(checkpoint(1, seed=0), path)
    repo.commit("v1", "model.pt")
    entry = repo.git("ls-files", "-s", "model.pt").stdout
    before = store_files(repo)
    marker = tmp_path / "ran"
    good = saved({"w": torch.ones(4), "optimizer": {"state": {0: {"hook": Marker(marker, "system")}}}})
    for bad in (saved(checkpoint(2, seed=1))[:700], good):
        path.write_bytes(bad)
        proc = repo.git("add", "model.pt", check=False)
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "model.pt" in errors[0], proc.stderr
        assert any(line.startswith("hint:") for line in proc.stderr.splitlines())
        assert repo.git("ls-files", "-s", "model.pt").stdout == entry
        assert store_files(repo) == before  # no new object, nothing left in tmp
    assert not marker.exists()


def test_deep_nesting_and_tampered_structure_are_clean_errors():
    from git_theta.errors import ManifestError

    deep = torch.ones(1)
    for _ in range(3000):
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)  # torch.save itself recurses per level
    try:
        raw = saved(deep)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        list(FMT.split(io.BytesIO(raw), "deep.pt").tensors())
    reader, tensors_out = split(FMT, saved({"w": torch.ones(4), "v": torch.ones(4)[1:]}), "m.pt")
    for bad in (
        '{"w":{"$":"tensor","name":"nope"}}',
        '{"w":{"$":"view","of":"w","shape":[9],"stride":[1],"offset":0}}',
        '{"w":{"$":"eval"}}',
        "[" * 5000 + "]" * 5000,
        "{",
    ):
        reader.fields["structure"] = bad
        with pytest.raises(ManifestError):
            join(FMT, reader, tensors_out, "m.pt")


def test_seen_bytes_are_recognised_without_parsing(repo, monkeypatch):
    """After a clean or a checkout, re-cleaning the same bytes (touch; git status) is a lookup."""
    from git_theta.filter.clean import Cleaner
    from git_theta.git.repo import Repo
    from git_theta.filter.smudge import Smudger

    monkeypatch.chdir(repo.path)
    raw = saved(checkpoint(1, seed=0))
    handle = Repo(str(repo.path))
    cleaner, smudger = Cleaner(handle), Smudger(handle)
    try:
        manifest = cleaner.clean(io.BytesIO(raw), "model.pt")

        def no_parse(self, stream, path):
            raise AssertionError("the file was parsed again")

        monkeypatch.setattr(TorchFormat, "split", no_parse)
        assert cleaner.clean(io.BytesIO(raw), "model.pt") == manifest
        out = io.BytesIO()
        smudger.write(*smudger.prepare(manifest, "model.pt"), "model.pt", out)
        assert out.getvalue() != raw  # torch.save's bytes, not the original file's
        assert cleaner.clean(io.BytesIO(out.getvalue()), "model.pt") == manifest
        with pytest.raises(AssertionError, match="parsed again"):  # other bytes are parsed
            cleaner.clean(io.BytesIO(saved(checkpoint(2, seed=0))), "model.pt")
        with pytest.raises(AssertionError, match="parsed again"):  # the cache is per path
            cleaner.clean(io.BytesIO(raw), "other.pt")
    finally:
        cleaner.close()
        smudger.close()
        handle.close()


def test_mapped_tensors_are_read_from_the_file(tmp_path):
    """Clean reads tensor bytes with pread (bounded memory), not through torch's whole-file mapping."""
    from git_theta.formats.torch_format import StorageFile

    obj = {
        "e": torch.empty(0),
        "w": torch.randn(4, 4),
        "b": torch.ones(3, dtype=torch.bfloat16),
        "x": torch.arange(8)[2:5],
    }
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    loaded = torch.load(path, weights_only=True, mmap=True)
    with open(path, "rb") as handle:
        files = StorageFile(handle, list(loaded.values()))
        for name in ("w", "b", "x"):
            assert bytes(files.read(loaded[name])) == bits(obj[name]), name
        assert files.read(loaded["w"].T) is None  # not contiguous: read through the mapping
