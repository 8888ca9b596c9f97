"""Huge tensors in pieces (git_theta/tensors/streaming.py): read once while hashed, a dense keyframe
encoded chunk by chunk while it is written, decoded while the mapped object's pages are dropped.
Small thresholds (``theta.streamThreshold``, patched chunk sizes) exercise the path with small
tensors; every round trip is checked byte for byte."""

import hashlib
import io
import mmap

import numpy as np
import pytest
import xxhash

from conftest import save_safetensors
from git_theta.errors import CheckpointError
from git_theta.manifest import Manifest
from git_theta.store.container import header_bytes, unpack
from git_theta.tensors import planes, streaming

MODEL = "model.safetensors"


class _Dribble(io.RawIOBase):
    """A stream that hands out at most ``most`` bytes per readinto (a pipe's partial reads)."""

    def __init__(self, data, most):
        self._data, self._pos, self._most = memoryview(data), 0, most

    def readinto(self, buf):
        n = min(len(buf), self._most, len(self._data) - self._pos)
        buf[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


def test_read_hashed_grows_with_the_bytes_and_hashes_them(monkeypatch):
    monkeypatch.setattr(streaming, "FIRST_BYTES", 4096)  # several growth steps
    monkeypatch.setattr(streaming, "PIECE", 1000)  # pieces that straddle the growth steps
    data = np.random.default_rng(0).integers(0, 256, 50_001, dtype=np.uint8).tobytes()
    buf = streaming.read_hashed(_Dribble(data, 777), len(data), lambda got: AssertionError(got))
    assert bytes(buf) == data and isinstance(buf, bytearray)
    assert streaming.hashes_of(buf) == (hashlib.sha256(data).hexdigest(), xxhash.xxh3_128_hexdigest(data))
    assert streaming.hashes_of(bytearray(data)) is None  # only bytes it hashed itself


def test_read_hashed_stops_at_the_end_of_a_short_stream(monkeypatch):
    monkeypatch.setattr(streaming, "FIRST_BYTES", 4096)
    with pytest.raises(EOFError, match="got 10000"):
        streaming.read_hashed(_Dribble(bytes(10_000), 512), 1 << 40, lambda got: EOFError(f"got {got}"))


def test_streamed_encoding_is_byte_identical(monkeypatch):
    monkeypatch.setattr(planes, "CHUNK_BYTES", 4096)  # many chunks, encoded out of order
    data = (0.02 * np.random.default_rng(1).standard_normal(10_001)).astype(np.float32).tobytes()
    whole = b"".join(bytes(p) for p in planes.encode_planes(data, 4))
    for threads in (1, 3):
        assert b"".join(bytes(p) for p in streaming.encoded_chunks(data, 4, threads)) == whole


def _mapped_rss(address):
    """Resident bytes of the mapping of this process that contains ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="needs madvise")
def test_decoding_drops_the_mapped_pages_it_has_passed(tmp_path, monkeypatch):
    monkeypatch.setattr(planes, "CHUNK_BYTES", 256 << 10)
    tensor = (0.02 * np.random.default_rng(2).standard_normal(1 << 20)).astype(np.float32)  # 4 MiB
    path = tmp_path / "object"
    path.write_bytes(header_bytes({"update": "dense"}) + b"".join(bytes(p) for p in planes.encode_planes(tensor, 4)))
    rss = {}
    for label, decode in (
        ("plain", lambda payload, out: planes.decode_planes(payload, tensor.nbytes, 4, out=out)),
        ("releasing", lambda payload, out: streaming.decode_releasing(payload, tensor.nbytes, 4, "?", out)),
    ):
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        _, payload = unpack(mapped)
        out = decode(payload, bytearray(tensor.nbytes))
        assert bytes(out) == tensor.tobytes()
        rss[label] = _mapped_rss(np.frombuffer(mapped, dtype=np.uint8).ctypes.data)
        del payload, out
        mapped.close()
    assert rss["plain"] > 3 << 20  # without releasing, the whole mapped object stays resident
    assert rss["releasing"] < 1 << 20  # released chunk by chunk: about one chunk is left


def _state(seed, big=(1 << 18,)):
    rng = np.random.default_rng(seed)
    return {
        "embed.weight": (0.02 * rng.standard_normal(big)).astype(np.float32),
        "small.bias": (0.02 * rng.standard_normal(16)).astype(np.float32),
    }


def test_a_huge_tensor_round_trips_through_git_and_stores_the_same_object(repo, make_repo):
    """Above theta.streamThreshold the tensor takes the streaming path (read hashed, encoded in
    pieces); the object is the one the ordinary path writes, and every version checks out exact."""
    repo.git("config", "theta.streamThreshold", "65536")
    state = _state(0)
    save_safetensors(repo.file(MODEL), state)
    first = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    streamed = Manifest.parse(repo.show(f"HEAD:{MODEL}")).tensors

    ordinary = make_repo("ordinary")
    ordinary.theta("track", "*.safetensors")
    ordinary.file(MODEL).write_bytes(first)
    ordinary.commit("v1")
    assert Manifest.parse(ordinary.show(f"HEAD:{MODEL}")).tensors == streamed  # same ids, same digests

    state["embed.weight"][::97] += np.float32(1e-3)  # a sparse change: a delta on the streamed keyframe
    save_safetensors(repo.file(MODEL), state)
    second = repo.file(MODEL).read_bytes()
    repo.commit("v2", MODEL)
    assert Manifest.parse(repo.show(f"HEAD:{MODEL}")).tensors["embed.weight"].chain_depth == 1
    for rev, data in (("HEAD~1", first), ("HEAD", second)):
        repo.file(MODEL).unlink()
        repo.git("checkout", "-q", rev, "--", MODEL)
        assert repo.file(MODEL).read_bytes() == data
    repo.git("checkout", "-q", "HEAD", "--", MODEL)
    assert repo.status() == ""  # the hashes taken while reading feed the stat cache too


def test_checkout_hands_a_huge_keyframe_to_git_as_it_decodes(repo, monkeypatch):
    """Above theta.streamThreshold the filter process writes a keyframe to git a piece at a time
    as it decodes, with no tensor-sized buffer, and checks it after its last piece: exact, the
    pair trusted from then on (sha256 the first time, the object's checksum after), a delta on
    it decoded whole as before."""
    from git_theta.filter.smudge import Smudger
    from git_theta.git.repo import Repo
    from git_theta.updates import chain

    repo.git("config", "theta.streamThreshold", "65536")
    state = _state(3)
    save_safetensors(repo.file(MODEL), state)
    first = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    (repo.path / ".git" / "theta" / "cache.sqlite3").unlink()  # as a fresh clone: nothing trusted
    monkeypatch.setattr(planes, "PIECE_BYTES", 64 << 10)  # 16 pieces of the 1 MiB tensor
    streamed = []
    real = chain.stream_tensor

    def counted(store, entry, path):
        for piece in real(store, entry, path):
            streamed.append((entry.name, len(piece)))
            yield piece

    monkeypatch.setattr("git_theta.filter.smudge.stream_tensor", counted)
    data = repo.show(f"HEAD:{MODEL}")
    for attempt in ("untrusted", "trusted"):
        smudger = Smudger(Repo(repo.path))
        try:
            entry = Manifest.parse(data).tensors["embed.weight"]
            assert smudger.repo.store.trust.trusted(entry) is (attempt == "trusted")
            out = io.BytesIO()
            smudger.write(*smudger.prepare(data, MODEL), MODEL, out, streaming=True)
            assert out.getvalue() == first
            assert smudger.repo.store.trust.trusted(entry)
        finally:
            smudger.close()
            smudger.repo.store.close()
        assert [size for name, size in streamed] == [64 << 10] * 16 and {n for n, _ in streamed} == {"embed.weight"}
        streamed.clear()
    # Through git, and a version whose big tensor is a delta on that keyframe (decoded whole).
    state["embed.weight"][::89] += np.float32(1e-3)
    save_safetensors(repo.file(MODEL), state)
    second = repo.file(MODEL).read_bytes()
    repo.commit("v2", MODEL)
    for rev, expected in (("HEAD~1", first), ("HEAD", second)):
        repo.file(MODEL).unlink()
        repo.git("checkout", "-q", rev, "--", MODEL)
        assert repo.file(MODEL).read_bytes() == expected


@pytest.mark.parametrize("where", [0.5, 0.95])
def test_a_damaged_keyframe_handed_to_git_as_it_decodes_is_never_written(repo, where):
    """A bit flipped inside a keyframe that goes to git as it decodes: the checkout fails (at
    the frame that no longer decodes, or at the check after the last byte), names the tensor,
    and git writes no file."""
    from conftest import damage_object

    repo.git("config", "theta.streamThreshold", "65536")
    save_safetensors(repo.file(MODEL), _state(4))
    repo.commit("v1", MODEL)
    ref = Manifest.parse(repo.show(f"HEAD:{MODEL}")).tensors["embed.weight"].objects[0]
    damage_object(repo.path, ref.oid, at=int(ref.size * where))
    (repo.path / ".git" / "theta" / "cache.sqlite3").unlink()  # nothing trusted, nothing cached
    repo.file(MODEL).unlink()
    proc = repo.git("checkout", "--", MODEL, check=False)
    assert proc.returncode != 0 and "'embed.weight'" in proc.stderr, proc.stderr
    assert "internal error" not in proc.stderr
    assert not repo.file(MODEL).exists()


def test_a_huge_tensor_that_releases_its_pages_checks_out_exact(repo):
    """A keyframe above streaming.RELEASE_BYTES decodes with its pages released, and checks out exact."""
    save_safetensors(repo.file(MODEL), _state(5, big=(streaming.RELEASE_BYTES // 4 + 1000,)))
    data = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == data


def test_a_truncated_huge_tensor_names_the_tensor(repo):
    repo.git("config", "theta.streamThreshold", "65536")
    save_safetensors(repo.file(MODEL), _state(1))
    whole = repo.file(MODEL).read_bytes()
    repo.file(MODEL).write_bytes(whole[: len(whole) - 5000])
    proc = repo.git("add", MODEL, check=False)
    assert proc.returncode != 0
    assert "truncated in tensor 'embed.weight'" in proc.stderr
    assert "internal error" not in proc.stderr
    with pytest.raises(CheckpointError):  # and the library raises a typed error
        from git_theta.formats.safetensors_format import SafetensorsFormat

        reader = SafetensorsFormat().split(io.BytesIO(whole[:-5000]), MODEL)
        reader.stream_threshold = 1
        list(reader.tensors())
