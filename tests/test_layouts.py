"""Layouts (git_theta/filter/layouts.py): a many-tensor file smudged once is written again from
the layout its smudge recorded, byte for byte, and only while every pack it slices is intact."""

import io
import sqlite3

import numpy as np
import pytest

from conftest import damage_object, save_safetensors
from git_theta import config, registry
from git_theta import manifest as manifest_module
from git_theta.errors import GitThetaError, ObjectMissingError
from git_theta.filter.layouts import Layout, LayoutRecorder
from git_theta.filter.smudge import Smudger
from git_theta.git.repo import Repo
from git_theta.manifest import Manifest
from git_theta.store import cache as cache_module

MODEL = "model.safetensors"
ROWS = manifest_module.COLUMNS_FROM + 44


def _checkpoint(path, seed=0, big=False):
    """``ROWS`` small tensors of two dtypes (all stored raw, in a pack); ``big``: and one large
    tensor (stored on its own, decoded at checkout)."""
    rng = np.random.default_rng(seed)
    tensors = {
        f"block.{i}.norm": rng.standard_normal(16).astype(np.float32 if i % 4 else np.float16) for i in range(ROWS)
    }
    if big:
        tensors["zz.head"] = rng.standard_normal((300, 256)).astype(np.float32)
    save_safetensors(path, tensors)
    return path.read_bytes()


def _sql(repo, statement):
    """The first value ``statement`` gives in the repository's cache (committed)."""
    db = sqlite3.connect(repo.path / ".git" / "theta" / "cache.sqlite3")
    try:
        with db:
            row = db.execute(statement).fetchone()
        return row[0] if row else None
    finally:
        db.close()


def _layouts(repo):
    return _sql(repo, "SELECT COUNT(*) FROM layouts")


def _smudge(repo, data):
    """(what :meth:`Smudger.prepare` gave, the bytes written) for manifest ``data``, in process."""
    smudger = Smudger(Repo(repo.path))
    try:
        prepared = smudger.prepare(data, MODEL)
        out = io.BytesIO()
        smudger.write(*prepared, MODEL, out)
        return prepared[0], out.getvalue()
    finally:
        smudger.close()
        smudger.repo.store.close()


def _checked_out(repo, big=False):
    """(file bytes, manifest bytes) of :func:`_checkpoint` committed, then checked out through git
    (recording its layout, if it gets one)."""
    original = _checkpoint(repo.file(MODEL), big=big)
    repo.commit("v1", MODEL)
    data = repo.show(f"HEAD:{MODEL}")
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    return original, data


def _replayed(repo, monkeypatch, data, expected):
    """Smudge manifest ``data`` in this process: written from its recorded layout alone, its
    manifest never parsed, to ``expected``."""
    with monkeypatch.context() as patch:
        patch.setattr(Manifest, "parse", classmethod(lambda cls, *a, **k: pytest.fail("manifest parsed")))
        prepared, written = _smudge(repo, data)
    assert isinstance(prepared, Layout) and written == expected


def _replays_without_parsing(repo, monkeypatch, data, expected):
    """Check the file out through git (recording its layout), then smudge manifest ``data``
    again in this process: written from the layout alone, its manifest never parsed."""
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == expected and _layouts(repo) == 1
    _replayed(repo, monkeypatch, data, expected)


def _forget_layouts(repo):
    """Drop every layout (those an add recorded), so that the next checkout records its own."""
    _sql(repo, "DELETE FROM layouts")
    assert _layouts(repo) == 0


def _replays_what_the_add_recorded(repo, monkeypatch, expected):
    """The version just committed (never checked out) smudges from the layout its add recorded,
    its manifest never parsed, to the bytes it was added from."""
    data = repo.show(f"HEAD:{MODEL}")
    _replayed(repo, monkeypatch, data, expected)
    return data


def test_a_file_smudged_before_is_written_again_from_its_layout(repo, monkeypatch):
    original = _checkpoint(repo.file(MODEL))
    repo.commit("v1", MODEL)
    data = repo.show(f"HEAD:{MODEL}")
    _forget_layouts(repo)  # the add's own: this checkout records one
    _replays_without_parsing(repo, monkeypatch, data, original)
    # Through git too; it leaves the stat row that makes the next status after a touch a lookup.
    _sql(repo, "DELETE FROM stat_files")
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert _sql(repo, "SELECT COUNT(*) FROM stat_files") == 1  # before status could clean it
    assert repo.file(MODEL).read_bytes() == original and repo.status() == ""
    # Off: the manifest is smudged as usual, the same bytes.
    repo.git("config", "theta.layoutCache", "false")
    config.forget()
    prepared, written = _smudge(repo, data)
    assert isinstance(prepared, Manifest) and written == original


def test_a_new_version_of_the_format_does_not_replay_the_old_ones_layouts(repo, monkeypatch):
    original, data = _checked_out(repo)
    assert isinstance(_smudge(repo, data)[0], Layout)
    monkeypatch.setattr(registry, "version", lambda kind, name: "99.0")
    prepared, written = _smudge(repo, data)
    assert isinstance(prepared, Manifest) and written == original
    assert isinstance(_smudge(repo, data)[0], Layout) and _layouts(repo) == 2  # its own, recorded now


def test_each_version_has_its_own_layout(repo):
    first = _checkpoint(repo.file(MODEL), seed=1)
    repo.commit("v1", MODEL)
    second = _checkpoint(repo.file(MODEL), seed=2)
    repo.commit("v2", MODEL)
    for rev, expected in [("HEAD~1", first), ("HEAD", second), ("HEAD~1", first), ("HEAD", second)]:
        repo.git("checkout", "-q", rev, "--", MODEL)
        assert repo.file(MODEL).read_bytes() == expected
    assert _layouts(repo) == 2


def test_a_file_mostly_decoded_records_no_layout(repo):
    """A large decoded tensor (300 KB against 19 KB of slices): its time goes to decoding, and
    its bytes do not belong in the cache."""
    original, _ = _checked_out(repo, big=True)
    assert repo.file(MODEL).read_bytes() == original and _layouts(repo) == 0


def test_a_version_with_a_few_deltas_is_written_again_from_its_layout(repo, monkeypatch):
    """A second version whose changed tensors are deltas: the layout keeps their decoded bytes
    (verified when they were decoded) beside the slices of the unchanged ones."""
    rng = np.random.default_rng(4)
    tensors = {f"block.{i:03d}.w": rng.standard_normal(160).astype(np.float32) for i in range(ROWS)}  # 640 B
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v1", MODEL)
    for name in list(tensors)[::50]:
        tensors[name] = tensors[name].copy()
        tensors[name][:2] += 1  # two entries: a sparse delta, smaller than the tensor
    save_safetensors(repo.file(MODEL), tensors)
    expected = repo.file(MODEL).read_bytes()
    repo.commit("v2", MODEL)
    data = repo.show(f"HEAD:{MODEL}")
    updates = {e.update for e in Manifest.parse(data).tensors.values()}
    assert updates == {"raw", "sparse"}
    _replays_what_the_add_recorded(repo, monkeypatch, expected)  # the deltas' bytes as added
    _forget_layouts(repo)
    _replays_without_parsing(repo, monkeypatch, data, expected)


def test_a_version_added_here_checks_out_from_the_layout_its_add_recorded(repo, monkeypatch):
    """The add records the layout its first checkout writes: the file's header, then slices of
    the packs its tensors went into (two dtypes: not in the table's order), the same bytes a
    smudge writes and records."""
    original = _checkpoint(repo.file(MODEL))
    repo.commit("v1", MODEL)
    assert _layouts(repo) == 1
    added = _sql(repo, "SELECT layout FROM layouts")
    data = _replays_what_the_add_recorded(repo, monkeypatch, original)
    _forget_layouts(repo)
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == original
    smudged = Layout.from_bytes(_sql(repo, "SELECT layout FROM layouts"))
    assert smudged.parts == Layout.from_bytes(added).parts and _smudge(repo, data)[1] == original
    # Off: nothing is recorded.
    repo.git("config", "theta.layoutCache", "false")
    config.forget()
    _forget_layouts(repo)
    _checkpoint(repo.file(MODEL), seed=5)
    repo.commit("v2", MODEL)
    assert _layouts(repo) == 0


def test_an_add_of_tensors_in_the_tables_order_records_one_slice(repo, monkeypatch):
    """One dtype, names sorted: the file's tensors are its raw table's rows in order, found a
    column at a time: the header, then one slice of the pack they went into."""
    rng = np.random.default_rng(7)
    save_safetensors(repo.file(MODEL), {f"s.{i:04d}": rng.standard_normal(12).astype(np.float32) for i in range(ROWS)})
    original = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    layout = Layout.from_bytes(_sql(repo, "SELECT layout FROM layouts"))
    assert [part[0] for part in layout.parts] == [None, 0] and layout.parts[1][3] == ROWS
    _replays_what_the_add_recorded(repo, monkeypatch, original)


def test_the_first_add_of_a_file_takes_its_layout_from_the_packs_it_wrote(repo, monkeypatch):
    """The first clean of a file knows where its tensors went (each pack's order): it neither
    reads a pack index nor binary-searches one (``locate_rows``), across two packs too."""
    from git_theta.filter import layouts
    from git_theta.filter.clean import Cleaner

    repo.git("config", "theta.packSize", "20k")  # 300 tensors of 64 bytes, 48 of index each: 2 packs
    config.forget()
    rng = np.random.default_rng(8)
    save_safetensors(repo.file(MODEL), {f"p.{i:04d}": rng.standard_normal(16).astype(np.float32) for i in range(ROWS)})
    original = repo.file(MODEL).read_bytes()
    monkeypatch.setattr(layouts, "locate_rows", lambda *a: pytest.fail("rows located"))
    handle = Repo(repo.path)
    cleaner = Cleaner(handle)
    try:
        data = cleaner.clean(io.BytesIO(original), MODEL)
    finally:
        cleaner.close()
        handle.store.close()
    assert len(Manifest.parse(data).packs()) == 2
    layout = Layout.from_bytes(_sql(repo, "SELECT layout FROM layouts"))
    assert [part[0] for part in layout.parts] == [None, 0, 1]
    prepared, written = _smudge(repo, data)
    assert isinstance(prepared, Layout) and written == original


def test_a_deferred_clean_records_its_layout_and_stat_row_when_settled(repo):
    """``clean(defer=True)`` (the filter process's) answers first and keeps its bookkeeping for
    ``settle``: the layout and the whole-file stat row appear then, as an undeferred clean
    writes them at once; ``close`` settles what is left."""
    from git_theta.filter.clean import Cleaner

    original = _checkpoint(repo.file(MODEL), seed=11)
    for settle in (True, False):
        handle = Repo(repo.path)
        cleaner = Cleaner(handle)
        try:
            data = cleaner.clean(io.BytesIO(original), MODEL, defer=True)
            assert _layouts(repo) == 0 and _sql(repo, "SELECT COUNT(*) FROM stat_files") == 0
            if settle:
                cleaner.settle()
                assert _layouts(repo) == 1 and _sql(repo, "SELECT COUNT(*) FROM stat_files") == 1
                assert cleaner.clean(io.BytesIO(original), MODEL, defer=True) == data  # the stat row's answer
        finally:
            cleaner.close()
            handle.store.close()
        assert _layouts(repo) == 1 and _sql(repo, "SELECT COUNT(*) FROM stat_files") == 1
        assert _smudge(repo, data)[1] == original
        _sql(repo, "DELETE FROM layouts")
        _sql(repo, "DELETE FROM stat_files")


def test_a_deferred_clean_that_fails_after_its_tensors_leaves_no_rows(repo, monkeypatch):
    """A deferred clean that fails once its tensors are cleaned (here: taking the file's
    fingerprint, after the layout and the digest rows were kept for later) leaves nothing to
    write later: no layout, no stat row for bytes git never got a manifest of."""
    from git_theta.filter.clean import Cleaner
    from git_theta.formats import spool

    original = _checkpoint(repo.file(MODEL), seed=12)

    def broken(self):
        raise OSError("the pipe broke")

    monkeypatch.setattr(spool.FingerprintReader, "fingerprint", property(broken))
    handle = Repo(repo.path)
    cleaner = Cleaner(handle)
    try:
        with pytest.raises(OSError):
            cleaner.clean(io.BytesIO(original), MODEL, defer=True)
        cleaner.settle()
    finally:
        cleaner.close()
        handle.store.close()
    assert _layouts(repo) == 0 and _sql(repo, "SELECT COUNT(*) FROM stat_files") == 0


def test_an_add_of_a_file_with_repeated_tensors_records_where_each_is(repo, monkeypatch):
    """Tensors with the same bytes are one pack member: each is a slice of it, in file order."""
    rng = np.random.default_rng(9)
    same = np.zeros(24, dtype=np.float32)
    tensors = {f"r.{i:04d}": same if i % 3 == 0 else rng.standard_normal(24).astype(np.float32) for i in range(ROWS)}
    save_safetensors(repo.file(MODEL), tensors)
    original = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    assert _layouts(repo) == 1
    _replays_what_the_add_recorded(repo, monkeypatch, original)


def test_an_add_records_the_layout_of_a_header_the_library_did_not_write(repo, monkeypatch):
    """A header kept as a blob (keys in another order, spaces): its layout holds it as read."""
    import json
    import struct

    rng = np.random.default_rng(6)
    tensors = {f"t.{i}": rng.standard_normal(8).astype(np.float32) for i in range(ROWS)}
    entries, offset = {}, 0
    for name in reversed(list(tensors)):
        entries[name] = {"shape": [8], "dtype": "F32", "data_offsets": [offset, offset + 32]}
        offset += 32
    header = json.dumps(entries, indent=1).encode()
    header += b" " * (-len(header) % 8)
    body = b"".join(tensors[name].tobytes() for name in reversed(list(tensors)))
    original = struct.pack("<Q", len(header)) + header + body
    repo.file(MODEL).write_bytes(original)
    repo.commit("v1", MODEL)
    assert "header" in Manifest.parse(repo.show(f"HEAD:{MODEL}")).blobs
    _replays_what_the_add_recorded(repo, monkeypatch, original)


def test_a_layout_damaged_on_disk_is_ignored(repo):
    original, data = _checked_out(repo)
    stored = bytearray(_sql(repo, "SELECT layout FROM layouts"))
    stored[len(stored) // 2] ^= 0x01  # zstd's checksum catches it
    assert Layout.from_bytes(bytes(stored)) is None
    _sql(repo, f"UPDATE layouts SET layout = x'{stored.hex()}'")
    prepared, written = _smudge(repo, data)
    assert isinstance(prepared, Manifest) and written == original


def test_a_layout_is_not_replayed_over_a_changed_pack(repo):
    """A pack whose bytes changed since this clone checked it: the layout steps aside, and the
    member's sha256 stops the checkout, as without a layout."""
    _, data = _checked_out(repo)
    assert _layouts(repo) == 1
    damage_object(repo.path, Manifest.parse(data).columns()[1].distinct[0].oid)
    with pytest.raises(GitThetaError, match="corrupt|does not match"):
        _smudge(repo, data)


def test_a_pack_emptied_on_disk_is_missing_not_an_internal_error(repo):
    """An empty file cannot be mapped: the layout, the column path and a member's read all see a
    pack shorter than it should be, and the checkout says which objects to fetch."""
    _, data = _checked_out(repo)
    pack = Manifest.parse(data).columns()[1].distinct[0].oid
    path = repo.path / ".git" / "theta" / "objects" / pack[:2] / pack[2:4] / pack
    path.chmod(0o644)
    path.write_bytes(b"")
    with pytest.raises(ObjectMissingError, match="missing"):
        _smudge(repo, data)
    repo.file(MODEL).unlink()
    failed = repo.git("checkout", "--", MODEL, check=False)
    assert "internal error" not in failed.stderr and "git theta fetch" in failed.stderr


def test_a_layout_is_not_replayed_over_a_pack_this_clone_cannot_vouch_for(repo):
    """A marker without a checksum (recorded before there were any): every member is verified
    one by one, and the bytes are the same."""
    original, data = _checked_out(repo)
    for mark in (repo.path / ".git" / "theta" / "packs").iterdir():
        mark.write_text("")
    prepared, written = _smudge(repo, data)
    assert isinstance(prepared, Manifest) and written == original


def test_the_recorder_keeps_slices_and_literal_bytes_in_order():
    out = io.BytesIO()
    recorder = LayoutRecorder(out, limit=100)
    pack = memoryview(b"0123456789abcdef")
    recorder.write(b"head")
    recorder.write(b"er")
    first, second = pack[0:4], pack[4:10]
    recorder.expect(first, "p" * 64, 0, 2)
    recorder.write(first)
    recorder.expect(second, "p" * 64, 4, 3)  # back to back: one slice
    recorder.write(second)
    copy = bytes(pack[10:12])
    recorder.expect(pack[10:12], "p" * 64, 10, 1)
    recorder.write(copy)  # not the object handed out: literal bytes
    layout = recorder.layout()
    assert out.getvalue() == b"header0123456789ab"
    assert layout.parts == [[None, 6, 0], [0, 0, 10, 5], [None, 2, 0]] and layout.total == 18
    stored = Layout.from_bytes(layout.to_bytes())
    assert stored.parts == layout.parts and [bytes(b) for b in stored.literals] == [b"header", b"ab"]
    assert stored.packs == ["p" * 64] and stored.total == 18


def test_the_recorder_gives_up_beyond_its_literal_limit_or_when_abandoned():
    recorder = LayoutRecorder(io.BytesIO(), limit=8)
    view = memoryview(b"abcd")
    recorder.expect(view, "p" * 64, 0, 1)
    recorder.write(view)
    recorder.write(b"x" * 9)
    assert recorder.layout() is None
    recorder = LayoutRecorder(io.BytesIO())
    recorder.expect(view, "p" * 64, 0, 1)
    recorder.write(view)
    recorder.abandon()
    assert recorder.layout() is None
    assert LayoutRecorder(io.BytesIO()).layout() is None  # no slice of a pack: nothing to keep
    # Decoded tensors: within their own limit, and at most half the file.
    recorder = LayoutRecorder(io.BytesIO(), decoded_limit=6)
    recorder.expect(view, "p" * 64, 0, 1)
    recorder.write(view)
    decoded = b"dddd"
    recorder.expect_decoded(decoded)
    recorder.write(decoded)
    assert recorder.layout().parts == [[0, 0, 4, 1], [None, 4, 0]]
    more = b"eee"
    recorder.expect_decoded(more)
    recorder.write(more)  # 7 decoded bytes: past the limit
    assert recorder.layout() is None
    recorder = LayoutRecorder(io.BytesIO())
    recorder.expect(view, "p" * 64, 0, 1)
    recorder.write(view)
    most = b"ddddd"
    recorder.expect_decoded(most)
    recorder.write(most)  # 5 of 9 bytes decoded: more than half
    assert recorder.layout() is None


@pytest.mark.parametrize(
    "stored",
    [
        b"not zstd",
        Layout(["p" * 64], [[0, 0, 10, 1]], [], 11).to_bytes(),  # total does not add up
        Layout(["p" * 64], [[1, 0, 10, 1]], [], 10).to_bytes(),  # no such pack
        Layout(["p" * 64], [[0, -5, 10, 1]], [], 10).to_bytes(),  # negative offset
        Layout(["p" * 64], [[None, 4, 0]], [b"ab"], 4).to_bytes(),  # literal shorter than it says
    ],
)
def test_a_stored_layout_that_does_not_add_up_is_ignored(stored):
    assert Layout.from_bytes(stored) is None


def test_the_cache_keeps_the_most_recently_used_layouts(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "LAYOUTS_KEPT", 3)
    cache = cache_module.Cache(tmp_path / "cache.sqlite3")
    for i in range(3):
        cache.put_layout(b"%d" % i, b"layout %d" % i)
    assert cache.get_layout(b"0") == b"layout 0"  # used: now the most recent
    cache.put_layout(b"3", b"layout 3")
    assert [cache.get_layout(b"%d" % i) for i in range(4)] == [b"layout 0", None, b"layout 2", b"layout 3"]
    # A use is a row of its own: the layout's (1.4 MB for 200,000 tensors) is not written again.
    db = sqlite3.connect(tmp_path / "cache.sqlite3")
    before = db.execute("SELECT rowid, used FROM layouts ORDER BY rowid").fetchall()
    cache.get_layout(b"2")
    assert db.execute("SELECT rowid, used FROM layouts ORDER BY rowid").fetchall() == before
    db.close()
    cache.close()
