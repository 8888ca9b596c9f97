"""Decoding without fresh memory per tensor: recycled output buffers, chunked deltas, scratch
planes, the selective base cache and the enlarged pipe to git."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from git_theta.tensors import buffers, compression, planes
from git_theta import registry as plugins
from git_theta.updates.chain import DecodedCache, decode_tensor, encode_tensor, tensor_digest
from git_theta.errors import ObjectCorruptError
from git_theta.store.objects import ObjectStore
from git_theta.updates.base import TensorData

from conftest import save_safetensors


def tensor(name, values):
    data = values.tobytes()
    return TensorData(name, "F32", values.shape, data, tensor_digest(data))


def test_pool_reuses_buffers_by_size_within_its_bound():
    pool = buffers.BufferPool(limit=100)
    first = pool.take(40)
    assert isinstance(first, bytearray) and len(first) == 40
    pool.give(first)
    assert pool.free_bytes == 40
    assert pool.take(30) is not first  # sizes must match exactly
    assert pool.take(40) is first and pool.free_bytes == 0
    older, newer = bytearray(60), bytearray(60)
    pool.give(older)
    pool.give(newer)  # 120 bytes > 100: the oldest is dropped
    assert pool.free_bytes == 60 and pool.take(60) is newer
    pool.give(bytearray(101))  # larger than the whole pool: not kept
    assert pool.free_bytes == 0


def test_new_buffer_takes_from_the_pool_only_inside_using():
    pool = buffers.BufferPool(limit=1 << 20)
    kept = bytearray(64)
    pool.give(kept)
    assert buffers.new_buffer(64) is not kept
    with buffers.using(pool):
        assert buffers.new_buffer(64) is kept
    assert buffers.new_buffer(16) == bytearray(16)


def test_decompress_into_checks_the_size():
    data = np.random.default_rng(0).integers(0, 4, 50_000, dtype=np.uint8).tobytes()
    method, packed = compression.compress(data)
    assert method == compression.ZSTD
    out = memoryview(bytearray(len(data)))
    assert bytes(compression.decompress_into(method, packed, out)) == data
    for wrong in (len(data) - 1, len(data) + 1):
        with pytest.raises(ObjectCorruptError, match="bytes, expected"):
            compression.decompress_into(method, packed, memoryview(bytearray(wrong)), "abc")
    with pytest.raises(ObjectCorruptError):
        compression.decompress_into(method, bytes(packed)[: len(packed) // 2], out)
    with pytest.raises(ObjectCorruptError, match="expected"):
        compression.decompress_into(compression.RAW, b"xyz", memoryview(bytearray(4)))


@pytest.mark.parametrize("update_name", ["dense", "int-delta", "sparse"])
def test_tensors_spanning_many_chunks_round_trip(tmp_path, monkeypatch, update_name):
    """Chunked decoding (the int-delta folds chunk by chunk into its base) is exact at chunk edges."""
    monkeypatch.setattr(planes, "CHUNK_BYTES", 4096 + 12)  # a step that is not a power of two
    monkeypatch.setattr(planes, "PIECE_BYTES", 1000)  # pieces that do not divide a chunk
    monkeypatch.setattr(planes, "INTERLEAVE_BYTES", 100)  # interleaved in pieces too, a last short one
    rng = np.random.default_rng(1)
    base = rng.standard_normal(10_001).astype(np.float32)
    new = base * (1 + 1e-4 * rng.standard_normal(base.size)).astype(np.float32)
    new[::97] = np.array([np.nan, -0.0, np.inf], np.float32)[np.arange(new[::97].size) % 3]
    store = ObjectStore(tmp_path / "objects", fsync=False)
    base_entry = encode_tensor(store, tensor("w", base))
    entry = encode_tensor(
        store, tensor("w", new), update_name, None if update_name == "dense" else tensor("w", base), base_entry
    )
    assert entry.update == update_name
    assert bytes(decode_tensor(store, entry)) == new.tobytes()


def test_base_cache_keeps_only_the_bases_it_is_told(tmp_path):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    rng = np.random.default_rng(2)
    base = rng.standard_normal(256).astype(np.float32)
    new = base.copy()
    new[3] += 1
    base_entry = encode_tensor(store, tensor("w", base))
    entry = encode_tensor(store, tensor("w", new), "sparse", tensor("w", base), base_entry)
    cache = DecodedCache(1 << 20)
    cache.keep_only(set())
    decode_tensor(store, entry, cache=cache)
    chain = tuple(r.oid for r in base_entry.objects)  # a base is cached under the chain it decodes
    assert cache.get(chain) is None  # no copy made for a base nobody shares
    cache.keep_only({base_entry.objects[0].oid})
    decode_tensor(store, entry, cache=cache)
    assert cache.get(chain) == base.tobytes()


class HoldingFormat:
    """A format that keeps every tensor until the end (so its buffers must not be recycled)."""

    name = "safetensors"

    def join(self, fields, source, out, path):
        held = list(source.iter_data(sorted(source.specs)))
        for _, data in held:
            out.write(bytes(data))


class StreamingFormat(HoldingFormat):
    releases_tensors = True

    def join(self, fields, source, out, path):
        for _, data in source.iter_data(sorted(source.specs)):
            out.write(bytes(data))


def test_smudge_recycles_buffers_only_for_formats_that_release_them(repo, monkeypatch):
    from git_theta.filter.clean import Cleaner
    from git_theta.git.repo import Repo
    from git_theta.filter.smudge import Smudger

    monkeypatch.chdir(repo.path)
    repo.git("config", "theta.packThreshold", "0")  # decoded tensors (raw ones are slices of a pack)
    rng = np.random.default_rng(3)
    tensors = {f"layer.{i}.weight": rng.standard_normal((32, 32)).astype(np.float32) for i in range(6)}
    save_safetensors(repo.file("model.safetensors"), tensors)
    handle = Repo(str(repo.path))
    cleaner, smudger = Cleaner(handle), Smudger(handle)
    try:
        with open(repo.file("model.safetensors"), "rb") as f:
            manifest_bytes = cleaner.clean(f, "model.safetensors")
        expected = b"".join(tensors[name].tobytes() for name in sorted(tensors))
        manifest, _ = smudger.prepare(manifest_bytes, "model.safetensors")
        out = io.BytesIO()
        smudger.write(manifest, HoldingFormat(), "model.safetensors", out)
        assert out.getvalue() == expected and smudger.buffers.free_bytes == 0
        out = io.BytesIO()
        smudger.write(manifest, StreamingFormat(), "model.safetensors", out)
        assert out.getvalue() == expected and smudger.buffers.free_bytes > 0
        # a second file reuses the buffers the first one left, and is still exact
        out = io.BytesIO()
        smudger.write(manifest, plugins.get("format", "safetensors"), "model.safetensors", out)
        with open(repo.file("model.safetensors"), "rb") as f:
            assert out.getvalue() == f.read()
    finally:
        cleaner.close()
        smudger.close()
        handle.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="F_SETPIPE_SZ is Linux's")
def test_the_filter_enlarges_its_pipe_to_git():
    code = (
        "import fcntl, sys\n"
        "from git_theta.filter.process import protect_stdout\n"
        "out = protect_stdout()\n"
        "print(fcntl.fcntl(out.fileno(), fcntl.F_GETPIPE_SZ), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert proc.stdout == ""
    assert int(proc.stderr.strip()) >= 1 << 20


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_zero_planes_are_skipped_not_lost(monkeypatch, itemsize):
    """Planes of zeros (a delta's high bytes) are interleaved as words without them; a plane that
    compresses as well but is not zero (all ones), and a plane zero in one chunk only, decode
    exactly too, as whole chunks and as pieces."""
    monkeypatch.setattr(planes, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(planes, "PIECE_BYTES", 5000)
    skipped = []
    real = planes._words_from_planes
    monkeypatch.setattr(
        planes, "_words_from_planes", lambda p, w: (skipped.append(sum(x is None for x in p)), real(p, w))
    )
    rng = np.random.default_rng(itemsize)
    count = 3 * (1 << 16) // itemsize + 5  # three chunks and a bit
    grid = rng.integers(0, 256, (count, itemsize), dtype=np.uint8)
    grid[:, itemsize // 2 :] = 0  # the high half of every element is zero
    if itemsize > 1:
        grid[:, -1] = 1  # except the top byte: constant, tiny once compressed, not zero
        grid[: count // 3, -1] = 0  # ... and zero in the first chunk
    data = grid.tobytes()
    encoded = b"".join(bytes(p) for p in planes.encode_planes(data, itemsize))
    out = bytearray(len(data))
    planes.decode_planes(encoded, len(data), itemsize, out=out)
    assert bytes(out) == data
    pieces = bytearray(len(data))
    for start, piece in planes.iter_decoded_chunks(encoded, len(data), itemsize):
        pieces[start : start + len(piece)] = piece.tobytes()
    assert bytes(pieces) == data
    if itemsize > 1:
        # the zero high half; the constant top byte only where it is zero (the first chunk)
        assert max(skipped) == itemsize // 2 and min(skipped) == max(1, itemsize // 2 - 1)


def test_the_largest_tensor_is_decoded_ahead_yet_written_in_file_order(repo, monkeypatch):
    """A large tensor at the end of the file starts decoding first (it would otherwise keep one
    worker busy alone at the end), and the bytes still come out in file order, exact."""
    from concurrent.futures import ThreadPoolExecutor

    from git_theta.filter import smudge
    from git_theta.filter.clean import Cleaner
    from git_theta.git.repo import Repo
    from git_theta.manifest import Manifest

    monkeypatch.chdir(repo.path)
    monkeypatch.setattr(smudge, "EARLY_MIN", 8192)
    monkeypatch.setattr(smudge, "BATCH_BYTES", 1)  # a worker task per tensor
    rng = np.random.default_rng(5)
    tensors = {f"h.{i}.weight": rng.standard_normal((32, 32)).astype(np.float32) for i in range(6)}
    tensors["wte.weight"] = rng.standard_normal((64, 64)).astype(np.float32)  # 16 KiB, last
    save_safetensors(repo.file("model.safetensors"), tensors)
    handle = Repo(str(repo.path))
    with open(repo.file("model.safetensors"), "rb") as f:
        manifest_bytes = Cleaner(handle).clean(f, "model.safetensors")
    manifest = Manifest.parse(manifest_bytes, source="model.safetensors")
    submitted = []

    class Recording(smudge.StoreTensorSource):
        def _decode_many(self, entries, joined=False):
            submitted.extend(e.name for e in entries)
            return super()._decode_many(entries, joined)

    names = sorted(tensors)
    for workers, first in ((2, "wte.weight"), (1, "h.0.weight")):  # one worker: nothing to balance
        submitted.clear()
        with ThreadPoolExecutor(1) as pool:  # one thread runs the tasks in the order submitted
            source = Recording(manifest, handle.store, pool, "model.safetensors", 1 << 20, workers=workers)
            out = [(name, bytes(data)) for name, data in source.iter_data(names)]
        assert [name for name, _ in out] == names
        assert all(data == tensors[name].tobytes() for name, data in out)
        assert submitted[0] == first and sorted(submitted) == names
    handle.close()


def test_iter_bytes_joins_runs_of_small_tensors_and_still_checks_each(repo, monkeypatch):
    """A format writing tensors back to back gets a run of small tensors as one write; the bytes
    are those of iter_data, and a damaged member in the run is still refused."""
    from concurrent.futures import ThreadPoolExecutor

    from git_theta.filter import smudge
    from git_theta.filter.clean import Cleaner
    from git_theta.git.repo import Repo
    from git_theta.manifest import Manifest

    monkeypatch.chdir(repo.path)
    rng = np.random.default_rng(5)
    tensors = {f"t{i:04d}": rng.standard_normal(64).astype(np.float32) for i in range(600)}
    tensors["big"] = rng.standard_normal(300_000).astype(np.float32)
    save_safetensors(repo.file("model.safetensors"), tensors)
    handle = Repo(str(repo.path))
    with open(repo.file("model.safetensors"), "rb") as f:
        manifest = Manifest.parse(Cleaner(handle).clean(f, "model.safetensors"), source="model.safetensors")
    names = sorted(tensors)
    with ThreadPoolExecutor(2) as pool:
        source = smudge.StoreTensorSource(manifest, handle.store, pool, "model.safetensors", 1 << 20, workers=2)
        runs = [bytes(data) for data in source.iter_bytes(names)]
    assert b"".join(runs) == b"".join(tensors[name].tobytes() for name in names)
    assert 1 < len(runs) < len(names) // 10  # runs, not a write per tensor
    victim = manifest.tensors["t0300"]
    pack = handle.store.path(victim.objects[0].pack.oid)
    handle.close()
    assert pack.is_file()
    raw = bytearray(pack.read_bytes())
    start = raw.index(tensors["t0300"].tobytes())
    raw[start] ^= 0xFF  # bit rot inside the pack, after it was written
    os.chmod(pack, 0o644)
    pack.write_bytes(raw)
    handle = Repo(str(repo.path))
    with ThreadPoolExecutor(2) as pool, pytest.raises(ObjectCorruptError, match="t0300") as caught:
        source = smudge.StoreTensorSource(manifest, handle.store, pool, "model.safetensors", 1 << 20, workers=2)
        list(source.iter_bytes(names))
    maps = list(handle.store._pack_maps.values())
    handle.close()  # while the traceback is alive: it holds no view of a pack
    assert caught.value and maps and all(mapped.closed for mapped in maps)
