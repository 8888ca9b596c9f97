"""Raw tensors as columns: a v3 manifest's raw shorthand lines parsed a column at a time
(git_theta/manifest.py ``_read_columns``), and checkout writing them as slices of intact packs
(git_theta/filter/smudge.py ``_raw_run``). Both must give exactly what the line-by-line paths
give, refuse what they refuse, and step aside whenever a pack cannot be vouched for."""

import hashlib
import operator
import io
import struct

import numpy as np
import pytest

from conftest import damage_object, save_safetensors
from git_theta import manifest as manifest_module
from git_theta.errors import GitThetaError, ManifestError
from git_theta.filter import layouts as layouts_module
from git_theta.filter import smudge as smudge_module
from git_theta.filter.smudge import Smudger
from git_theta.git.repo import Repo
from git_theta.manifest import Manifest, ObjectRef, TensorEntry
from git_theta.store import packs

MODEL = "model.safetensors"
ROWS = manifest_module.COLUMNS_FROM + 44


def _digest(i):
    return hashlib.sha256(b"%d" % i).hexdigest()


def _manifest():
    """A v3 manifest with every kind of line the column parser meets: raw tensors of two dtypes
    and shapes in two packs, names that need escaping, and chained tensors between them."""
    first, second = ObjectRef("a" * 64, 1000), ObjectRef("b" * 64, 2000)
    tensors = {}
    for i in range(ROWS):
        name = f"layer {i}.w%" if i % 97 == 0 else f"layer.{i}.w"
        dtype, shape = ("F32", (4,)) if i % 3 else ("F16", (2, 3))
        size = 16 if i % 3 else 12
        tensors[name] = TensorEntry(
            name, dtype, shape, _digest(i), "raw", (ObjectRef(_digest(i), size, first if i % 5 else second),)
        )
    for i in range(5):
        name = f"layer.{i * 50}.z"
        tensors[name] = TensorEntry(
            name, "F32", (8,), _digest(-i), "sparse", (ObjectRef("c" * 64, 77), ObjectRef("d" * 64, 32, first))
        )
    return Manifest("safetensors", {"metadata": '{"a":"b"}'}, {"header": ObjectRef("e" * 64, 99)}, tensors)


def _line_by_line(data, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(manifest_module, "COLUMNS_FROM", 10**9)
        return Manifest.parse(data)


def test_columns_read_what_the_line_parser_reads(monkeypatch):
    data = _manifest().serialize()
    assert data.startswith(b"git-theta manifest v3\n")
    quick = Manifest.parse(data)
    entries, table = quick.columns()
    assert table is not None and len(table) == ROWS and len(entries) == 5  # no entry per raw line
    slow = _line_by_line(data, monkeypatch)
    assert slow.columns()[1] is None
    assert quick == slow and list(quick.tensors) == list(slow.tensors)
    assert quick.serialize() == data == slow.serialize()
    assert quick.packs() == slow.packs() and quick.all_objects() == slow.all_objects()


def _mutations():
    """(what, edit of the manifest's lines) that the column parser must not read otherwise than
    the line parser does."""

    def edit(change):
        def apply(lines):
            lines = list(lines)
            change(lines, [i for i, line in enumerate(lines) if " raw @" in line])
            return lines

        return apply

    def token(k, index, fn):
        def change(lines, raw):
            parts = lines[raw[k]].split(" ")
            parts[index] = fn(parts[index])
            lines[raw[k]] = " ".join(parts)

        return edit(change)

    def swap(lines, raw):
        lines[raw[3]], lines[raw[4]] = lines[raw[4]], lines[raw[3]]

    def duplicate(lines, raw):
        lines.insert(raw[7], lines[raw[7]])

    def pack_last(lines, raw):
        lines.append(lines.pop(next(i for i, line in enumerate(lines) if line.startswith("pack "))))

    def shifted(lines, raw):
        lines[raw[1]] += " tensor"
        lines[raw[2]] = lines[raw[2]].split(" ", 1)[1]

    return [
        ("unchanged", edit(lambda lines, raw: None)),
        ("out of order", edit(swap)),
        ("twice", edit(duplicate)),
        ("pack line after tensors", edit(pack_last)),
        ("uppercase digest", token(10, 4, str.upper)),
        ("tab in digest", token(10, 4, lambda d: d[:10] + "\t" + d[11:])),
        ("space in digest", token(10, 4, lambda d: d[:-1] + " ")),
        ("extra token", token(5, 6, lambda p: p + " x")),
        ("no shape", token(6, 3, lambda s: "")),
        ("unknown dtype", token(8, 2, lambda d: "Q99")),
        ("bad shape", token(9, 3, lambda s: "[4,x]")),
        ("no such pack", token(11, 6, lambda p: "@" + "f" * 12)),
        ("empty name", token(12, 1, lambda n: "")),
        ("update not raw", token(13, 5, lambda u: "dense")),
        ("shifted tokens", edit(shifted)),
    ]


def _outcome(parse):
    try:
        manifest = parse()
    except ManifestError as exc:
        return ("error", exc.message)
    return ("ok", manifest.format, manifest.fields, manifest.blobs, manifest.tensors)


@pytest.mark.parametrize("what,change", _mutations(), ids=[m[0] for m in _mutations()])
def test_columns_refuse_what_the_line_parser_refuses(what, change, monkeypatch):
    lines = _manifest().serialize().decode().split("\n")[:-1]
    data = ("\n".join(change(lines)) + "\n").encode()
    assert _outcome(lambda: Manifest.parse(data)) == _outcome(lambda: _line_by_line(data, monkeypatch))
    if what != "unchanged":
        assert data != _manifest().serialize()


# -- checkout ------------------------------------------------------------------------------------
def _checkpoint(path):
    """Small tensors of two dtypes (so the file's order is not the names' order) around two
    large ones (stored on their own, as entries)."""
    rng = np.random.default_rng(3)
    tensors = {
        f"block.{i}.norm": rng.standard_normal(16).astype(np.float32 if i % 4 else np.float16) for i in range(ROWS)
    }
    tensors["block.100.big"] = rng.standard_normal((256, 300)).astype(np.float32)
    tensors["zz.head"] = rng.standard_normal((300, 256)).astype(np.float32)
    save_safetensors(path, tensors)


def _smudged(repo, monkeypatch, data=None):
    """The checkpoint (HEAD's, or manifest ``data``) smudged in this process, and the tensors
    decoded one by one meanwhile."""
    decoded = []
    original = smudge_module.StoreTensorSource._decode_many

    def counting(self, entries, joined=False):
        decoded.extend(e.name for e in entries)
        return original(self, entries, joined)

    monkeypatch.setattr(smudge_module.StoreTensorSource, "_decode_many", counting)
    smudger = Smudger(Repo(getattr(repo, "path", repo)))
    try:
        out = io.BytesIO()
        data = repo.show(f"HEAD:{MODEL}") if data is None else data
        smudger.write(*smudger.prepare(data, MODEL), MODEL, out)
    finally:
        smudger.close()
        smudger.repo.store.close()
    return out.getvalue(), decoded


@pytest.mark.parametrize("numpy_rows", [layouts_module.NUMPY_ROWS, 1], ids=["dict", "numpy"])
def test_checkout_writes_raw_runs_from_intact_packs_and_verifies_the_rest(repo, monkeypatch, numpy_rows, tmp_path):
    """Raw rows found in each pack's index dict (small tables) or by numpy's binary search
    (large ones): the same bytes either way."""
    import shutil

    monkeypatch.setattr(layouts_module, "NUMPY_ROWS", numpy_rows)
    fresh = tmp_path / "fresh"
    shutil.copytree(repo.path, fresh, symlinks=True)  # an empty store, for the layout by oid
    _checkpoint(repo.file(MODEL))
    original = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    manifest = Manifest.parse(repo.show(f"HEAD:{MODEL}"))
    assert len(manifest.columns()[0]) == 2 and len(manifest.columns()[1]) == ROWS
    # Through git, then in this process: the raw tensors are never decoded one by one.
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == original
    written, decoded = _smudged(repo, monkeypatch)
    assert written == original and sorted(decoded) == ["block.100.big", "zz.head"]
    # A pack laid out by oid (as clean without runs writes one): many short stretches, same bytes.
    shuffled = _clean(fresh, original, False, monkeypatch)
    assert Manifest.parse(shuffled).packs() != manifest.packs()
    written, decoded = _smudged(fresh, monkeypatch, shuffled)
    assert written == original and sorted(decoded) == ["block.100.big", "zz.head"]
    # A pack recorded before markers held a checksum: every member is verified, same bytes.
    marks = sorted((repo.path / ".git" / "theta" / "packs").iterdir())
    assert marks and all(m.read_text().startswith("xxh3-128:") for m in marks)
    for mark in marks:
        mark.write_text("")
    written, decoded = _smudged(repo, monkeypatch)
    assert written == original and len(decoded) == ROWS + 2


def test_a_pack_changed_since_it_was_recorded_is_not_trusted(repo, monkeypatch):
    """Change one member's bytes and its pack's marker no longer matches: the column path steps
    aside and the member's sha256 stops the checkout."""
    _checkpoint(repo.file(MODEL))
    repo.commit("v1", MODEL)
    manifest = Manifest.parse(repo.show(f"HEAD:{MODEL}"))
    damage_object(repo.path, manifest.columns()[1].distinct[0].oid)
    with pytest.raises(GitThetaError, match="corrupt|does not match"):
        _smudged(repo, monkeypatch)


def test_locate_finds_members_and_never_trusts_a_wrong_index(tmp_path):
    members = {hashlib.sha256(b"m%d" % i).hexdigest(): b"m%d" % i for i in range(50)}
    data = b"".join(bytes(p) for p in packs.pack_bytes(members))
    path = tmp_path / "pack"
    path.write_bytes(data)
    with open(path, "rb") as handle:
        index = packs.PackIndex.read(handle, "p" * 64, len(data))
    wanted = [*list(members)[::7], hashlib.sha256(b"absent").hexdigest()]
    rows = np.frombuffer(bytes.fromhex("".join(wanted)), dtype=np.uint8).reshape(-1, 32)
    offsets, sizes, found = index.locate(rows)
    assert found.tolist() == [True] * (len(wanted) - 1) + [False]
    for oid, offset, size, ok in zip(wanted, offsets, sizes, found):
        if ok:
            assert data[int(offset) : int(offset + size)] == members[oid]
    # The same entries, their index out of order: a binary search may miss, never mismatch.
    head = len(packs.MAGIC) + 8
    entries = [data[head + 48 * i : head + 48 * (i + 1)] for i in range(len(members))]
    shuffled = data[:head] + b"".join(reversed(entries)) + data[head + 48 * len(members) :]
    path.write_bytes(shuffled)
    with open(path, "rb") as handle:
        index = packs.PackIndex.read(handle, "p" * 64, len(shuffled))
    offsets, sizes, found = index.locate(rows)
    for oid, offset, size, ok in zip(wanted, offsets, sizes, found):
        if ok:
            assert shuffled[int(offset) : int(offset + size)] == members[oid]
    assert struct.unpack_from("<Q", shuffled, len(packs.MAGIC))[0] == len(members)


# -- clean ----------------------------------------------------------------------------------------
def _header(entries, metadata=None, order=None):
    """A header as the safetensors library would write it for ``entries`` [(name, dtype, shape)]
    in this order (json.dumps, compact), padded to 8."""
    import json

    body = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        size = int(np.prod(shape, dtype=np.int64)) * {"F32": 4, "F16": 2, "I8": 1}[dtype]
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    return text + b" " * (-len(text) % 8)


def _headers():
    from git_theta.formats.safetensors_format import _canonical_order

    names = ["a", 'q"uote\\back', "é ü", "tab\tnl\n", "\u2028sep", "emoji😀", "\x01ctl", "__meta", "b"]
    entries = [(n, ["F32", "I8", "F16"][i % 3], (i % 3, 2)) for i, n in enumerate(names)]
    canonical = _canonical_order(entries)
    raw = _header(canonical, {"note": 'x"\\y'})
    return [
        ("canonical", raw),
        ("no metadata", _header(canonical)),
        ("not the library's order", _header(list(reversed(canonical)))),
        ("spaces after colons", raw.replace(b'"dtype":', b'"dtype": ')),
        ("duplicate name", _header([*canonical, ("zz", "F32", (1,))]).replace(b'"zz"', b'"b"')),
        ("metadata not strings", _header(canonical).replace(b"{", b'{"__metadata__":{"a":1},', 1)),
        ("duplicate metadata key", raw.replace(b'{"note":', b'{"note":"1","note":', 1)),
        ("gap", raw.replace(b'"data_offsets":[0,0]', b'"data_offsets":[0,4]', 1)),
        ("unknown dtype", raw.replace(b'"I8"', b'"Q9"', 1)),
        ("trailing junk", raw.rstrip(b" ") + b"x"),
    ]


@pytest.mark.parametrize("what,raw", _headers(), ids=[h[0] for h in _headers()])
def test_header_columns_read_what_parse_header_reads(what, raw):
    """The one-pass reading of a canonical header gives what the JSON parser gives, and steps
    aside (to the parser, which says what is wrong) for anything else."""
    from git_theta.errors import CheckpointError
    from git_theta.formats.safetensors_format import _canonical_header, build_header, header_columns, parse_header

    try:
        metadata, tensors = parse_header(raw, "m.safetensors")
    except CheckpointError as exc:
        expected = ("error", exc.message)
    else:
        described = [t[:3] for t in tensors]
        expected = ("ok", metadata, described, [e - b for *_, b, e in tensors])
    try:
        metadata, names, dtypes, shapes, sizes, canonical = header_columns(raw, "m.safetensors")
    except CheckpointError as exc:
        got = ("error", exc.message)
    else:
        got = ("ok", metadata, list(zip(names, dtypes, shapes)), sizes)
        assert canonical == (what in ("canonical", "no metadata"))
        assert canonical == (build_header(metadata, got[2]) == raw and what != "not the library's order")
    assert got == expected
    assert (_canonical_header(raw) is not None) == (what in ("canonical", "no metadata", "not the library's order"))


def test_a_file_that_ends_inside_a_run_names_the_tensor(tmp_path):
    from git_theta.errors import CheckpointError
    from git_theta.formats.safetensors_format import SafetensorsFormat
    from git_theta.updates.base import TensorRun

    entries = [(f"t{i:03d}", "F32", (4,)) for i in range(50)]
    raw = _header(entries)
    data = struct.pack("<Q", len(raw)) + raw + bytes(range(256)) * 3  # 768 of 800 bytes
    reader = SafetensorsFormat().split(io.BytesIO(data), "m.safetensors")
    with pytest.raises(CheckpointError, match=r"m.safetensors: file is truncated in tensor 't048' \(0 of 16 bytes\)"):
        list(reader.runs(1 << 10))
    whole = struct.pack("<Q", len(raw)) + raw + bytes(800)
    (run,) = SafetensorsFormat().split(io.BytesIO(whole), "m.safetensors").runs(1 << 10)
    assert isinstance(run, TensorRun) and run.names == [n for n, _, _ in entries] and run.bounds[-1] == 800
    singles = list(SafetensorsFormat().split(io.BytesIO(whole), "m.safetensors").runs(8))
    assert [t.name for t in singles] == run.names  # larger than ``small``: one by one


def _clean(repo_path, data, runs, monkeypatch):
    from git_theta.filter.clean import Cleaner
    from git_theta.formats import safetensors_format

    with monkeypatch.context() as patch:
        if not runs:
            patch.setattr(safetensors_format._Reader, "runs", lambda self, small: self.tensors())
        cleaner = Cleaner(Repo(repo_path))
        try:
            return cleaner.clean(io.BytesIO(data), MODEL)
        finally:
            cleaner.close()


def _without_packs(data):
    """Manifest text with pack ids left out (pack lines, and the prefixes naming them)."""
    import re

    lines = [line for line in data.decode().split("\n") if not line.startswith("pack ")]
    return re.sub(r"@[0-9a-f]{12,64}", "@", "\n".join(lines))


def test_clean_of_runs_writes_the_manifest_tensor_by_tensor_clean_writes(repo, monkeypatch, tmp_path):
    """First version, then a second with changed, renamed, duplicated and new small tensors:
    the run path and the one-by-one path store the same tensors the same way (only the packs'
    layout differs), the same file always gives the same manifest, and it checks out exactly."""
    rng = np.random.default_rng(5)
    v1 = {f"w.{i}": rng.standard_normal(8 + i % 3).astype(np.float32) for i in range(600)}
    v1["big"] = rng.standard_normal((128, 128)).astype(np.float32)
    v2 = dict(v1)
    v2["w.7"] = v2["w.7"] + 1
    v2["w.8"] = v2["w.8"].copy()
    v2["w.8"][0] = 3.0
    v2["copy.of.w9"] = v2["w.9"].copy()
    v2["fresh"] = np.arange(12, dtype=np.float16)
    for i, version in enumerate((v1, v2), start=1):
        save_safetensors(repo.file(MODEL), version)
        data = repo.file(MODEL).read_bytes()
        twins = []
        for runs in (True, False):
            other = tmp_path / f"v{i}-{runs}"
            if not other.exists():
                import shutil

                shutil.copytree(repo.path, other, symlinks=True)
            twins.append(_clean(other, data, runs, monkeypatch))
        # The same tensors and objects; only the packs differ, laid out in file order by runs.
        assert _without_packs(twins[0]) == _without_packs(twins[1])
        repo.commit(f"v{i}", MODEL)
        assert repo.show(f"HEAD:{MODEL}") == twins[0]  # the same file makes the same packs
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == data


def test_add_many_dedups_and_splits_packs_like_add(tmp_path):
    from git_theta.store.objects import ObjectStore

    datas = [bytes([i % 7]) * (100 + i % 7) for i in range(40)]
    oids = [hashlib.sha256(d).hexdigest() for d in datas]
    one = ObjectStore(tmp_path / "one", pack_size=700)
    many = ObjectStore(tmp_path / "many", pack_size=700)
    with one.packing():
        singles = [one.put_raw(d, o) for d, o in zip(datas, oids)]
    with many.packing():
        homes = many.put_raw_many(oids, datas)

    def grouped(packs):  # which members share a pack (the layouts differ, so the pack ids do)
        groups = {}
        for oid, pack in zip(oids, packs):
            groups.setdefault(pack.oid, set()).add(oid)
        return sorted(map(sorted, groups.values()))

    assert grouped(homes) == grouped([r.pack for r in singles])
    assert len({h.oid for h in homes}) == 2  # 7 distinct members, split as add splits them
    assert len(one.pack_oids()) == len(many.pack_oids()) == 2
    # A member already stored is found in its pack, not packed again.
    with many.packing():
        again = many.put_raw_many(oids[:3], datas[:3])
    assert [h.oid for h in again] == [h.oid for h in homes[:3]] and len(many.pack_oids()) == 2


def test_a_first_add_streams_and_leaves_a_whole_file_row_for_the_next_clean(repo, monkeypatch):
    """With no stat-cache row for the path, clean streams the file (no read-ahead) and takes its
    fingerprint on the way; the next clean of the same bytes is answered from that row, and of
    other bytes is not."""
    from git_theta.filter import clean as clean_module
    from git_theta.filter.clean import Cleaner
    from git_theta.formats import peekable

    _checkpoint(repo.file(MODEL))
    data = repo.file(MODEL).read_bytes()
    monkeypatch.setattr(peekable, "read_ahead", lambda *a, **k: pytest.fail("read ahead on a first add"))
    cleaner = Cleaner(Repo(repo.path))
    first = cleaner.clean(io.BytesIO(data), MODEL)
    monkeypatch.undo()
    assert cleaner.cache.has_stat("/whole-file/" + MODEL)
    monkeypatch.setattr(clean_module.Cleaner, "_clean_checkpoint", lambda *a, **k: pytest.fail("parsed again"))
    assert cleaner.clean(io.BytesIO(data), MODEL) == first
    monkeypatch.undo()
    other = bytearray(data)
    other[-1] ^= 1
    assert cleaner.clean(io.BytesIO(bytes(other)), MODEL) != first
    cleaner.close()


def test_entry_index_resolves_names_first_then_digests_without_entries(monkeypatch):
    """A later manifest counts only for names the earlier ones lack (a model's other files
    behind the file's own parent), by name and by digest; raw rows are found as rows."""
    from git_theta.filter.clean import EntryIndex

    own = Manifest.parse(_manifest().serialize())
    other = _manifest()
    moved = "layer.1.w"  # a raw tensor (row 0 shares its digest with a sparse entry)
    other.tensors = {
        moved: TensorEntry(
            moved, "F32", (4,), _digest(-99), "raw", (ObjectRef(_digest(-99), 16, ObjectRef("a" * 64, 1000)),)
        ),
        "only.elsewhere": TensorEntry("only.elsewhere", "F32", (4,), _digest(-98), "sparse", (ObjectRef("c" * 64, 7),)),
    }
    assert own.columns()[1] is not None
    by_name = EntryIndex([own, other], by_digest=False)
    by_digest = EntryIndex([own, other], by_digest=True, extra={"x": other.tensors["only.elsewhere"]})
    assert by_name.get(moved).digest != _digest(-99)  # the file's own parent wins
    assert _digest(-99) not in by_digest  # shadowed by name: its digest does not count
    assert by_name.get("only.elsewhere").update == "sparse" and _digest(-98) in by_digest
    own_table = own.columns()[1]
    assert own_table is not None  # nothing above made an entry per raw line

    def raw_rows(keys):  # (table, row) or None per key, from the answer by table
        answers = [None] * len(keys)
        for found_in, positions, rows in by_digest.raw_rows(keys):
            for i, row in zip(positions, rows):
                assert answers[i] is None  # each key in one table at most
                answers[i] = (found_in, row)
        return answers

    ((table, row),) = raw_rows([own_table.digests[own_table.names.index(moved)]])
    assert table is own_table and table.names[row] == moved and raw_rows([_digest(-98)]) == [None]
    # Many keys at once (a run of a re-add): each digest of the table is its first row holding
    # it, unless an entry of the same manifest holds it first; the others are no rows.
    keys = [*own_table.digests, _digest(-99), _digest(-98), _digest(-97), *own_table.digests[:3]]
    entry_digests = {entry.digest for entry in own.columns()[0].values()}

    def expected(key):
        if key in entry_digests or key not in own_table.digests:
            return None
        return (own_table, own_table.digests.index(key))

    answers = raw_rows(keys)
    assert answers == list(map(expected, keys)) and answers.count(None) >= 3
    assert answers[-1][0] is own_table and answers[len(own_table) + 1] is None


def test_a_small_tensor_is_stored_raw_when_no_delta_is_smaller(repo):
    """A changed small tensor takes the smallest encoding, its raw bytes included: a one-element
    change of a 320-byte tensor would be a 333-byte delta object (stored raw instead, no chain);
    of a 4 KiB tensor a delta pays. ``git theta add --update-type`` keeps what the user named."""
    small, wide = np.arange(80, dtype=np.float32), np.arange(1024, dtype=np.float32)
    save_safetensors(repo.file(MODEL), {"small": small, "wide": wide})
    repo.commit("v1", MODEL)
    small2, wide2 = small.copy(), wide.copy()
    small2[5] = wide2[5] = -1.0
    save_safetensors(repo.file(MODEL), {"small": small2, "wide": wide2})
    repo.commit("v2", MODEL)
    tensors = Manifest.parse(repo.show(f"HEAD:{MODEL}")).tensors
    assert tensors["small"].update == "raw" and tensors["small"].chain_depth == 0
    assert tensors["wide"].update != "raw" and tensors["wide"].chain_depth == 1
    assert tensors["wide"].objects[0].size < 4096
    small2[6] = -2.0
    save_safetensors(repo.file(MODEL), {"small": small2, "wide": wide2})
    expected = repo.file(MODEL).read_bytes()
    repo.theta("add", MODEL, "--update-type", "sparse")
    assert Manifest.parse(repo.show(f":{MODEL}")).tensors["small"].update == "sparse"
    repo.git("commit", "-qm", "v3")
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == expected


def _stored_as(repo, rev=":"):
    return {n: e.update for n, e in Manifest.parse(repo.show(f"{rev}{MODEL}")).tensors.items()}


@pytest.mark.parametrize("count", [3, ROWS], ids=["one-by-one", "runs"])
def test_a_changed_tensor_under_delta_min_bytes_is_stored_whole_without_trying(repo, count):
    """Under ``theta.deltaMinBytes`` (512) a changed tensor is stored as its bytes and no delta
    is tried (on the per-tensor path and for runs of small tensors alike); at the threshold it
    is, and a delta smaller than the tensor is kept. Set to 0, a small fp16 tensor with a few
    changed elements gets its (smaller) sparse delta; an update type the user names still
    applies under the threshold."""
    rng = np.random.default_rng(0)
    names = [f"t.{i:03d}" for i in range(count)]
    first = {n: rng.standard_normal(200).astype(np.float16) for n in names}  # 400 bytes each
    first["wide"] = rng.standard_normal(256).astype(np.float16)  # 512 bytes
    save_safetensors(repo.file(MODEL), first)
    repo.commit("v1", MODEL)
    changed = {n: v.copy() for n, v in first.items()}
    for v in changed.values():
        v[:3] += 1  # three elements: a sparse delta is far smaller than the tensor
    save_safetensors(repo.file(MODEL), changed)
    repo.git("add", MODEL)
    stored = _stored_as(repo)
    assert {stored[n] for n in names} == {"raw"} and stored["wide"] == "sparse"
    repo.git("commit", "-qm", "v2")
    for v in changed.values():
        v[3] += 1
    save_safetensors(repo.file(MODEL), changed)
    repo.git("config", "theta.deltaMinBytes", "0")
    repo.git("add", MODEL)
    stored = _stored_as(repo)  # "wide" is a keyframe again: its chain would pass 130% of its size
    assert {stored[n] for n in names} == {"sparse"}
    repo.git("reset", "-q")
    repo.git("config", "--unset", "theta.deltaMinBytes")
    expected = repo.file(MODEL).read_bytes()
    repo.theta("add", MODEL, "--update-type", "sparse")
    stored = _stored_as(repo)
    assert {stored[n] for n in names} == {"sparse"}
    repo.git("commit", "-qm", "v3")
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == expected


def test_a_row_a_parent_claims_is_reused_only_where_the_pack_holds_it(repo, monkeypatch):
    """A parent manifest that says a pack holds a tensor it does not hold (written by hand, or by
    an attacker) is a claim: the new version stores that tensor in a pack of its own, reuses the
    rows whose packs hold them, and checks out exactly."""
    rng = np.random.default_rng(9)
    names, first = _committed_rows(repo, rng, 100)
    second = dict(first)
    second[names[7]] = rng.standard_normal(100).astype(np.float32)  # 400 bytes: stored whole
    save_safetensors(repo.file(MODEL), second)
    expected = repo.file(MODEL).read_bytes()
    claimed = hashlib.sha256(second[names[7]].tobytes()).hexdigest()
    lines = repo.show(f"HEAD:{MODEL}").decode().split("\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(f"tensor {names[3]} "))
    parts = lines[at].split(" ")
    parts[4] = claimed  # "names[3] is in the pack, with the bytes the user is about to add"
    lines[at] = " ".join(parts)
    blob = repo.git("hash-object", "-w", "--stdin", input="\n".join(lines)).stdout.strip()
    repo.git("update-index", "--cacheinfo", f"100644,{blob},{MODEL}")
    repo.git("commit", "-qm", "a manifest that claims too much")
    repo.file(MODEL).write_bytes(expected)
    manifest = Manifest.parse(_clean(repo.path, expected, True, monkeypatch))
    entries = manifest.tensors
    stored = Manifest.parse(repo.show(f"HEAD:{MODEL}")).packs()
    assert entries[names[7]].objects[0].pack.oid not in {p.oid for p in stored}  # a new pack
    assert entries[names[8]].objects[0].pack.oid in {p.oid for p in stored}  # reused
    repo.git("add", MODEL)
    repo.git("commit", "-qm", "v2")
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == expected


@pytest.mark.parametrize("numpy_rows", [layouts_module.NUMPY_ROWS, 1], ids=["dict", "numpy"])
def test_a_re_added_table_names_each_pack_once(repo, monkeypatch, numpy_rows):
    """A version cleaned again (its changed tensors are in a pack here by then) makes a table
    that names each pack once, whichever ref stands for it: a table naming one pack thousands
    of times cost a locate per copy (a re-add of 200,000 tensors spent 1.3 s there). Its rows
    lie in two packs, interleaved: the layout the add records (rows located either way) writes
    the file back exactly."""
    from git_theta.manifest import RawTable

    monkeypatch.setattr(layouts_module, "NUMPY_ROWS", numpy_rows)
    ways = []  # how the recorded layout's rows were located
    for way in ("_located", "_located_numpy"):
        real_way = getattr(layouts_module, way)
        monkeypatch.setattr(layouts_module, way, lambda *a, w=way, f=real_way: ways.append(w) or f(*a))
    names, first = _committed_rows(repo, np.random.default_rng(11), 20)
    second = dict(first)
    for name in names[::10]:
        second[name] = second[name] + 1
    save_safetensors(repo.file(MODEL), second)
    data = repo.file(MODEL).read_bytes()
    repo.git("config", "theta.statCache", "false")
    made = []
    real = RawTable.of_rows.__func__
    monkeypatch.setattr(RawTable, "of_rows", classmethod(lambda cls, parts: made.append(real(cls, parts)) or made[-1]))
    once = _clean(repo.path, data, True, monkeypatch)
    again = _clean(repo.path, data, True, monkeypatch)  # the changed tensors are stored now
    assert once == again
    table = made[-1]
    assert len(table.distinct) == len({pack.oid for pack in table.distinct}) == 2
    assert {pack.oid for pack in table.packs} == {pack.oid for pack in table.distinct}
    numbers = table.numbers
    assert sum(map(operator.ne, numbers, numbers[1:])) > 2  # the packs' rows interleave
    from git_theta.filter.layouts import Layout
    from git_theta.filter.smudge import Smudger

    smudger = Smudger(Repo(repo.path))  # the layout this clean recorded, rows located as asked
    try:
        prepared = smudger.prepare(again, MODEL)
        out = io.BytesIO()
        smudger.write(*prepared, MODEL, out)
    finally:
        smudger.close()
    assert isinstance(prepared[0], Layout) and out.getvalue() == data
    assert set(ways) == {"_located_numpy" if numpy_rows == 1 else "_located"}
    # Committed as cleaned here (not by git add's own filter): the checkout replays the layout
    # these cleans recorded, its rows located as the test asked.
    blob = repo.git("hash-object", "-w", "--stdin", input=again.decode()).stdout.strip()
    repo.git("update-index", "--cacheinfo", f"100644,{blob},{MODEL}")
    repo.git("commit", "-qm", "v2")
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == data


def _committed_rows(repo, rng, size):
    """(names, tensors): ROWS small fp32 tensors of ``size`` elements, committed as v1."""
    names = [f"w.{i:03d}" for i in range(ROWS)]
    tensors = {n: rng.standard_normal(size).astype(np.float32) for n in names}
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v1", MODEL)
    return names, tensors
