"""Raw tensors as columns: a v3 manifest's raw shorthand lines parsed a column at a time
(git_theta/manifest.py ``_read_columns``), and checkout writing them as slices of intact packs
(git_theta/filter/smudge.py ``_raw_run``). Both must give exactly what the line-by-line paths
give, refuse what they refuse, and step aside whenever a pack cannot be vouched for."""

import hashlib
import io
import struct

import numpy as np
import pytest

from conftest import save_safetensors
from git_theta import manifest as manifest_module
from git_theta.errors import GitThetaError, ManifestError
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
        tensors[name] = TensorEntry(name, dtype, shape, _digest(i), "raw", (ObjectRef(_digest(i), size, first if i % 5 else second),))
    for i in range(5):
        name = f"layer.{i * 50}.z"
        tensors[name] = TensorEntry(name, "F32", (8,), _digest(-i), "sparse", (ObjectRef("c" * 64, 77), ObjectRef("d" * 64, 32, first)))
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
    tensors = {f"block.{i}.norm": rng.standard_normal(16).astype(np.float32 if i % 4 else np.float16) for i in range(ROWS)}
    tensors["block.100.big"] = rng.standard_normal((256, 300)).astype(np.float32)
    tensors["zz.head"] = rng.standard_normal((300, 256)).astype(np.float32)
    save_safetensors(path, tensors)


def _smudged(repo, monkeypatch):
    """The checkpoint smudged in this process, and the tensors decoded one by one meanwhile."""
    decoded = []
    original = smudge_module.StoreTensorSource._decode_many

    def counting(self, entries, joined=False):
        decoded.extend(e.name for e in entries)
        return original(self, entries, joined)

    monkeypatch.setattr(smudge_module.StoreTensorSource, "_decode_many", counting)
    smudger = Smudger(Repo(repo.path))
    try:
        out = io.BytesIO()
        data = repo.show(f"HEAD:{MODEL}")
        smudger.write(*smudger.prepare(data, MODEL), MODEL, out)
    finally:
        smudger.close()
        smudger.repo.store.close()
    return out.getvalue(), decoded


def test_checkout_writes_raw_runs_from_intact_packs_and_verifies_the_rest(repo, monkeypatch):
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
    pack = manifest.columns()[1].distinct[0].oid
    path = repo.path / ".git" / "theta" / "objects" / pack[:2] / pack[2:4] / pack
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.chmod(0o644)
    path.write_bytes(bytes(data))
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
