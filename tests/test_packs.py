"""Packs: small objects stored as one object with an index (git_theta/store/packs.py), through the
store, manifests, real git, prune, fsck, a real Git LFS server and a crash while a pack is written."""

import hashlib
import io
import json
import struct
import subprocess
import threading

import numpy as np
import pytest
from lfs_server import free_port, lfs_server  # noqa: F401 - the fixture

from conftest import GitRepo, save_safetensors
from git_theta.errors import ManifestError, ObjectCorruptError
from git_theta.manifest import Manifest, ObjectRef, TensorEntry
from git_theta.store.objects import ObjectStore
from git_theta.store import packs

MODEL = "model.safetensors"


def _objects_dir(repo):
    return repo.path / ".git" / "theta" / "objects"


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name != "tmp")


# -- the pack format and the store ------------------------------------------------------------
def test_pack_round_trip_and_members_keep_their_ids(tmp_path):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    blobs = [bytes([i]) * (100 + i) for i in range(50)]
    with store.packing():
        refs = [store.put_bytes(b) for b in blobs]
        assert store.read(refs[3].oid) == blobs[3]  # readable before the pack is written
    assert {r.oid for r in refs} == {hashlib.sha256(b).hexdigest() for b in blobs}
    assert len({r.pack.oid for r in refs}) == 1  # one pack...
    assert len(_files(tmp_path / "objects")) == 1  # ...is the only file
    pack_ref = refs[0].home
    assert pack_ref.size == store.size(pack_ref.oid)
    store.verify(pack_ref.oid, pack_ref.size)
    fresh = ObjectStore(tmp_path / "objects")  # another process: finds members through the marker
    for ref, data in zip(refs, blobs):
        assert fresh.has(ref.oid) and fresh.size(ref.oid) == len(data)
        assert bytes(fresh.read(ref.oid, verify=True)) == data
        fresh.verify(ref.oid, len(data))
    assert fresh.pack_members(pack_ref.oid) == {r.oid: r.size for r in refs}
    fresh.close()


@pytest.mark.parametrize("numpy_from", [packs.NUMPY_MEMBERS, 1])
@pytest.mark.parametrize("alike", [False, True])
def test_pack_bytes_follow_the_documented_layout(numpy_from, alike, monkeypatch):
    """The pack written column by column is the layout of git_theta/store/packs.py, built here
    entry by entry with struct as an outsider would (the index sorted by oid, the data after it in
    the order the members were given), including members larger than a copy block; the index
    built with numpy (a pack of many members) is the same, ids sharing their first 8 bytes too;
    and it reads back (its largest member is not its last, so the quick bound does not hold)."""
    monkeypatch.setattr(packs, "NUMPY_MEMBERS", numpy_from)
    members = {}
    for i in range(300):
        data = bytes([i % 256]) * (1 + i * 7) if i != 5 else b"x" * (packs.BLOCK + 3)
        members[hashlib.sha256(data).hexdigest()] = data
    for tail in ("9" * 48, "1" * 48, "5" * 48) if alike else ():  # not real ids: alike in their first 8 bytes
        members["ab" * 8 + tail] = tail.encode()
    assert list(members) != sorted(members)  # the data's order is not the index's
    offset = len(packs.MAGIC) + 8 + 48 * len(members)
    placed = {}
    for oid, data in members.items():
        placed[oid] = offset
        offset += len(data)
    expected = [packs.MAGIC, struct.pack("<Q", len(members))]
    for oid in sorted(members):
        expected.append(struct.pack("<32sQQ", bytes.fromhex(oid), placed[oid], len(members[oid])))
    expected += list(members.values())
    written = b"".join(bytes(part) for part in packs.pack_bytes(members))
    assert written == b"".join(expected)
    assert b"".join(bytes(p) for p in packs.pack_bytes({})) == packs.MAGIC + struct.pack("<Q", 0)
    index = packs.PackIndex.read(io.BytesIO(written), "p" * 64, len(written))
    assert index.entries == {oid: (placed[oid], len(data)) for oid, data in members.items()}


def test_full_packs_are_written_on_their_own_thread_readable_meanwhile_errors_surface(tmp_path, monkeypatch):
    """A pack that fills up is written while the next fills: its members stay readable until it
    is stored, flush waits for it, and a failure writing it comes out of the packing block."""
    store = ObjectStore(tmp_path / "objects", fsync=False)
    store.pack_size = 4096
    blobs = [bytes([i]) * 700 for i in range(40)]  # ~5 per pack: several packs
    with store.packing():
        refs = [store.put_bytes(b) for b in blobs]
        assert all(bytes(store.read(r.oid)) == b for r, b in zip(refs, blobs))  # written or not
        assert store.put_bytes(blobs[0]).oid == refs[0].oid  # dedup across packs in flight
    homes = {r.pack.oid for r in refs}
    assert len(homes) > 3 and all(store.has(oid) for oid in homes)
    fresh = ObjectStore(tmp_path / "objects")
    assert all(bytes(fresh.read(r.oid, verify=True)) == b for r, b in zip(refs, blobs))
    fresh.close()

    real = ObjectStore.put_chunks

    def full_disk(self, chunks, *args, **kwargs):
        if kwargs.get("pack") is False:
            raise OSError(28, "No space left on device")
        return real(self, chunks, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "put_chunks", full_disk)
    other = ObjectStore(tmp_path / "other", fsync=False)
    other.pack_size = 4096
    with pytest.raises(OSError, match="No space"):
        with other.packing():
            for i in range(40):
                other.put_bytes(bytes([i]) * 701)
    assert other._packer is None


def test_flush_writes_the_last_pack_while_the_one_before_is_still_written(tmp_path, monkeypatch):
    """The end of a clean: the last pack is written while the pack thread still writes the full
    one before it (not after it), and the last pack's members stay readable meanwhile."""
    store = ObjectStore(tmp_path / "objects", fsync=False)
    store.pack_size = 4096
    blobs = [bytes([i]) * 700 for i in range(7)]  # a full pack, then the last one
    last_started, read_meanwhile = threading.Event(), []
    real = ObjectStore.put_chunks

    def overlapping(self, chunks, *args, **kwargs):
        if kwargs.get("pack") is False:
            if threading.current_thread().name.startswith("theta-pack"):
                if not last_started.wait(10):
                    raise AssertionError("the last pack was not written while this one was")
            else:
                last_started.set()
                read_meanwhile.append(bytes(self.read(refs[-1].oid)))
        return real(self, chunks, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "put_chunks", overlapping)
    with store.packing():
        refs = [store.put_bytes(b) for b in blobs]
    assert read_meanwhile == [blobs[-1]]
    assert len({r.pack.oid for r in refs}) == 2
    assert all(bytes(store.read(r.oid, verify=True)) == b for r, b in zip(refs, blobs))


def test_big_objects_stay_loose_and_packs_respect_their_size(tmp_path):
    store = ObjectStore(tmp_path / "objects", fsync=False, pack_threshold=1000, pack_size=4000)
    with store.packing():
        big = store.put_bytes(b"x" * 1001)
        small = [store.put_bytes(bytes([i]) * 900) for i in range(10)]
    assert big.pack is None and store.path(big.oid).is_file()
    homes = {r.pack.oid for r in small}
    assert len(homes) > 1 and all(store.size(h) <= 4000 for h in homes)
    assert all(bytes(store.read(r.oid)) == bytes([i]) * 900 for i, r in enumerate(small))


def test_an_exception_discards_the_unwritten_pack(tmp_path):
    store = ObjectStore(tmp_path / "objects", fsync=False)
    with pytest.raises(RuntimeError):
        with store.packing():
            ref = store.put_bytes(b"lost")
            raise RuntimeError
    assert not store.has(ref.oid) and _files(tmp_path / "objects") == []


def _pack_with_index(entries, body=b"z" * 64):
    head = packs.MAGIC + struct.pack("<Q", len(entries))
    return head + b"".join(struct.pack("<32sQQ", oid, off, size) for oid, off, size in entries) + body


@pytest.mark.parametrize(
    "entries",
    [
        [(b"\1" * 32, 0, 4)],  # a member overlapping the index
        [(b"\1" * 32, 80, 1 << 40)],  # a member past the end
        # the furthest member ends at the end of the pack, one that starts before it past the end
        [(b"\1" * 32, packs.HEAD + 144, 60), (b"\2" * 32, packs.HEAD + 207, 1), (b"\3" * 32, packs.HEAD + 154, 60)],
    ],
)
def test_tampered_pack_index_is_rejected(tmp_path, entries):
    data = _pack_with_index(entries)
    path = tmp_path / "p"
    path.write_bytes(data)
    with open(path, "rb") as handle, pytest.raises(ObjectCorruptError):
        packs.PackIndex.read(handle, "p" * 64, len(data))


def test_huge_member_count_allocates_nothing(tmp_path):
    data = packs.MAGIC + struct.pack("<Q", 1 << 60)
    path = tmp_path / "p"
    path.write_bytes(data)
    with open(path, "rb") as handle, pytest.raises(ObjectCorruptError, match="corrupt index"):
        packs.PackIndex.read(handle, "p" * 64, len(data))


def test_a_received_pack_whose_index_lies_is_not_trusted(tmp_path):
    """A pack from elsewhere (its sha256 matches its own id) claims a member id its bytes do not
    hash to: the member is not found, so neither a read nor dedup can use the false claim."""
    claimed = hashlib.sha256(b"honest").hexdigest()
    start = len(packs.MAGIC) + 8 + 48
    data = _pack_with_index([(bytes.fromhex(claimed), start, 6)], body=b"lying!")
    store = ObjectStore(tmp_path / "objects", fsync=False)
    ref = ObjectRef(hashlib.sha256(data).hexdigest(), len(data))
    store.put_chunks([data], expect=ref)  # a download: verified against its id
    assert store.has(ref.oid) and not store.has(claimed)


# -- manifests ---------------------------------------------------------------------------------
def _entry(name, refs):
    return TensorEntry(name, "F32", (2,), "d" * 64, "dense", tuple(refs))


def test_manifest_v2_names_packs_by_id_prefix_and_v1_is_unchanged():
    pack = ObjectRef("b" * 64, 999)
    packed = ObjectRef("a" * 64, 10, pack)
    loose = ObjectRef("c" * 64, 20)
    m = Manifest("safetensors", tensors={"x": _entry("x", [packed]), "y": _entry("y", [loose, packed])})
    data = m.serialize()
    assert data.startswith(b"git-theta manifest v2\nformat safetensors\npack " + b"b" * 64 + b":999\n")
    assert b"a" * 64 + b":10@" + b"b" * 12 + b"\n" in data
    back = Manifest.parse(data)
    assert back.serialize() == data and back.tensors["y"].objects[1].pack.oid == "b" * 64
    assert back.all_objects() == [pack, loose]  # what travels: the pack and the loose object
    assert {r.oid for r in back.member_objects()} == {"a" * 64, "c" * 64}
    v1 = Manifest("safetensors", tensors={"y": _entry("y", [loose])}).serialize()
    assert v1.startswith(b"git-theta manifest v1\n") and Manifest.parse(v1).serialize() == v1
    # the digest index's text keeps the pack in full
    assert ObjectRef.parse(str(packed)).pack == pack


def test_skim_leaves_out_raw_lines_but_keeps_their_packs_and_every_other_line():
    """What the stat cache asks on each git status: the objects a manifest needs. Raw shorthand
    lines are skipped (their objects live in the pack lines' packs); other lines are parsed."""
    from git_theta.manifest import RAW, TensorEntry, skim

    pack, other = ObjectRef("b" * 64, 999), ObjectRef("e" * 64, 50)
    raw = {
        f"t{i}": TensorEntry(f"t{i}", "F32", (2,), d * 64, RAW, (ObjectRef(d * 64, 8, pack),))
        for i, d in enumerate("0123")
    }
    chained = _entry("z", [ObjectRef("c" * 64, 20), ObjectRef("a" * 64, 10, other)])
    data = Manifest("safetensors", tensors={**raw, "z": chained}).serialize()
    assert data.startswith(b"git-theta manifest v3\n") and data.count(b" raw @") == 4
    manifest, packs = skim(data)
    assert list(manifest.tensors) == ["z"] and manifest.tensors["z"] == chained
    assert sorted(p.oid for p in packs) == ["b" * 64, "e" * 64]
    full = Manifest.parse(data)
    assert {r.oid for r in full.all_objects()} == {r.oid for r in [*packs, *manifest.all_objects()]}
    plain = Manifest("safetensors", tensors={"z": chained}).serialize()  # no raw lines: parsed whole
    assert skim(plain)[0].tensors == {"z": chained}


@pytest.mark.parametrize(
    "bad",
    [
        b"git-theta manifest v2\nformat safetensors\ntensor x F32 [2] "
        + b"d" * 64
        + b" dense "
        + b"a" * 64
        + b":1@"
        + b"b" * 12
        + b"\n",
        b"git-theta manifest v2\nformat safetensors\npack "
        + b"b" * 64
        + b":9\npack "
        + b"b" * 63
        + b"c:9\ntensor x F32 [2] "
        + b"d" * 64
        + b" dense "
        + b"a" * 64
        + b":1@"
        + b"b" * 12
        + b"\n",  # an ambiguous prefix
        b"git-theta manifest v1\nformat safetensors\npack " + b"b" * 64 + b":9\n",
        b"git-theta manifest v2\nformat safetensors\npack " + b"b" * 64 + b":9\npack " + b"a" * 64 + b":9\n",
    ],
)
def test_malformed_pack_references_are_refused(bad):
    with pytest.raises(ManifestError):
        Manifest.parse(bad)


# -- through real git --------------------------------------------------------------------------
def _many(n, seed=0, width=4):
    rng = np.random.default_rng(seed)
    return {f"experts.{i}.w": rng.standard_normal(width).astype(np.float32) for i in range(n)}


def test_twenty_thousand_tensors_round_trip_through_git_in_a_few_files(repo):
    tensors = _many(20000)
    save_safetensors(repo.file(MODEL), tensors)
    original = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    manifest = Manifest.parse(repo.show(f"HEAD:{MODEL}"))
    assert len(manifest.tensors) == 20000 and len(manifest.all_objects()) == 1
    assert len(_files(_objects_dir(repo))) == 1
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == original
    assert repo.status() == ""


@pytest.mark.parametrize(
    "config, mid_update, mid_packed",
    [
        ((), "dense", True),  # the defaults: a compressed keyframe inside the pack
        ((("theta.rawThreshold", "1m"),), "raw", True),  # its own bytes, in the pack
        ((("theta.packThreshold", "256k"),), "dense", False),  # a compressed keyframe on its own
    ],
)
def test_mid_size_tensors_are_encoded_and_packed_small_ones_stored_raw(repo, config, mid_update, mid_packed):
    """theta.packThreshold (2 MiB) decides which objects go into a pack, theta.rawThreshold
    (256 KiB) which tensors go in as their own bytes; each setting moves only its own line, a
    4 KiB tensor stays raw in the pack, and every variant checks out bit for bit."""
    for key, value in config:
        repo.git("config", key, value)
    rng = np.random.default_rng(3)
    tensors = {
        "mid.w": (0.02 * rng.standard_normal(128 << 10)).astype(np.float32),  # 512 KiB
        "small.w": rng.standard_normal(1024).astype(np.float32),  # 4 KiB
    }
    save_safetensors(repo.file(MODEL), tensors)
    original = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    manifest = Manifest.parse(repo.show(f"HEAD:{MODEL}"))
    mid, small = manifest.tensors["mid.w"], manifest.tensors["small.w"]
    assert small.update == "raw" and small.objects[0].pack is not None
    assert mid.update == mid_update and (mid.objects[0].pack is not None) == mid_packed
    if mid_update == "dense":
        assert mid.objects[0].size < 512 << 10  # compressed, not the raw bytes
    assert len(_files(_objects_dir(repo))) == (1 if mid_packed else 2)
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == original


def test_unchanged_tensors_cost_no_new_bytes_and_a_changed_one_goes_into_the_new_pack(repo):
    tensors = _many(300)
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v1", MODEL)
    first = Manifest.parse(repo.show(f"HEAD:{MODEL}"))
    tensors["experts.7.w"] = tensors["experts.7.w"] + 1
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v2", MODEL)
    second = Manifest.parse(repo.show(f"HEAD:{MODEL}"))
    old_pack = first.all_objects()[0]
    new_packs = [p for p in second.all_objects() if p != old_pack]
    assert old_pack in second.all_objects() and len(new_packs) == 1
    store = ObjectStore(_objects_dir(repo))
    # the new pack holds the changed tensor's object and the header blob, nothing else
    assert set(store.pack_members(new_packs[0].oid)) == {
        second.tensors["experts.7.w"].objects[0].oid,
        *(r.oid for r in second.blobs.values()),
    }
    for name, entry in second.tensors.items():
        if name != "experts.7.w":
            assert entry.objects == first.tensors[name].objects
    repo.git("checkout", "-q", "HEAD~1", "--", MODEL)
    save_safetensors(repo.path / "expected.safetensors", _many(300))
    assert repo.file(MODEL).read_bytes() == (repo.path / "expected.safetensors").read_bytes()
    assert store.size(old_pack.oid) == old_pack.size


def test_prune_keeps_a_pack_while_any_tensor_in_it_is_referenced(repo):
    repo.git("config", "theta.pruneExpire", "now")
    tensors = _many(50)
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v1", MODEL)
    old_pack = Manifest.parse(repo.show(f"HEAD:{MODEL}")).all_objects()[0]
    tensors["experts.0.w"] = tensors["experts.0.w"] * 2
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v2", MODEL)
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.git("reset", "-q", "--hard", "HEAD")
    # v1 is in history: both packs stay; v2 alone still uses 49 tensors of the old pack too
    repo.git("checkout", "-q", "--orphan", "fresh")
    repo.git("commit", "-q", "-m", "v2 only")
    repo.git("branch", "-D", "main")
    repo.git("reflog", "expire", "--expire=now", "--all")
    repo.theta("prune", "--include-unpushed")
    store = ObjectStore(_objects_dir(repo))
    assert store.has(old_pack.oid)  # v2 still references members of the v1 pack
    report = json.loads(repo.theta("fsck", "--all", "--json").stdout)
    assert report["ok"], report["problems"]
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    save_safetensors(repo.path / "expected.safetensors", tensors)
    assert repo.file(MODEL).read_bytes() == (repo.path / "expected.safetensors").read_bytes()


def test_fsck_reports_a_damaged_pack_with_the_tensors_it_breaks(repo):
    save_safetensors(repo.file(MODEL), _many(20))
    repo.commit("v1", MODEL)
    pack = Manifest.parse(repo.show(f"HEAD:{MODEL}")).all_objects()[0]
    path = ObjectStore(_objects_dir(repo)).path(pack.oid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    proc = repo.theta("fsck", "--json", check=False)
    report = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert [(p["kind"], p["oid"]) for p in report["problems"]] == [("corrupt", pack.oid)]
    assert report["problems"][0]["other_uses"] >= 19  # every tensor in it


def test_crash_while_writing_a_pack_leaves_the_repository_sound(repo):
    save_safetensors(repo.file(MODEL), _many(40))
    repo.commit("v0", MODEL)
    for n in (1, 2):  # after the pack's temp file is written; after its rename
        save_safetensors(repo.file(MODEL), _many(40, seed=n))
        before = repo.show(f":{MODEL}")
        env = dict(repo.env, GIT_THETA_TEST_KILL_AT=str(n), GIT_THETA_THREADS="1")
        proc = subprocess.run(["git", "add", MODEL], cwd=repo.path, env=env, capture_output=True)
        assert proc.returncode != 0, f"kill point {n} was not reached"
        assert repo.show(f":{MODEL}") == before
        for path in _files(_objects_dir(repo)):  # nothing torn under a real name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name
        repo.git("add", MODEL)
        repo.git("commit", "-q", "-m", f"v{n}")
        assert json.loads(repo.theta("fsck", "--json").stdout)["ok"]
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    save_safetensors(repo.path / "expected.safetensors", _many(40, seed=2))
    assert repo.file(MODEL).read_bytes() == (repo.path / "expected.safetensors").read_bytes()


def test_packs_travel_through_a_real_lfs_server(repo, make_repo, lfs_server):  # noqa: F811
    bare = make_repo("bare.git", init=False)
    bare.git("init", "-q", "--bare")
    (repo.path / ".lfsconfig").write_text(f'[lfs]\n\turl = "{lfs_server.url("packs")}"\n')
    tensors = _many(200)
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v1", ".lfsconfig", MODEL)
    tensors["experts.3.w"] = tensors["experts.3.w"] - 1
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v2", MODEL)
    repo.git("remote", "add", "origin", str(bare.path))
    repo.git("push", "-q", "origin", "main")
    wanted = {r.oid for rev in ("HEAD", "HEAD~1") for r in Manifest.parse(repo.show(f"{rev}:{MODEL}")).all_objects()}
    assert set(lfs_server.objects("packs")) == wanted and len(wanted) == 2  # two packs, no members

    repo.theta("install")
    target = repo.path.parent / "clone"
    GitRepo(repo.path.parent, repo.env).git("clone", "-q", str(bare.path), str(target))
    clone = GitRepo(target, repo.env)
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes()
    assert clone.status() == ""
    assert json.loads(clone.theta("fsck", "--json").stdout)["ok"]
    clone.git("checkout", "-q", "HEAD~1", "--", MODEL)  # the older version decodes from the clone's packs
    save_safetensors(clone.path / "expected.safetensors", _many(200))
    assert clone.file(MODEL).read_bytes() == (clone.path / "expected.safetensors").read_bytes()


# -- repack ------------------------------------------------------------------------------------
def _v1_dropped(repo, tensors, changed):
    """Commit v1, then v2 with ``changed`` tensors changed, then drop v1 from history: v2 still
    uses the other tensors of v1's pack, whose changed members are dead. Returns (v1 pack, v2)."""
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v1", MODEL)
    old_pack = Manifest.parse(repo.show(f"HEAD:{MODEL}")).all_objects()[0]
    for name in changed:
        tensors[name] = tensors[name] + 1
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("v2", MODEL)
    return old_pack, repo.git("rev-parse", "HEAD").stdout.strip()


def _drop_history(repo):
    """Keep only v2 (as after a rebase and force push): v1 is reachable from nothing."""
    repo.git("checkout", "-q", "--orphan", "fresh")
    repo.git("commit", "-q", "-m", "v2 only")
    repo.git("branch", "-D", "main")
    repo.git("update-ref", "-d", "refs/remotes/origin/main")
    repo.git("reflog", "expire", "--expire=now", "--all")


def test_repack_rewrites_a_pushed_pack_keeping_live_tensors_and_the_remote_valid(
    repo,
    make_repo,
    lfs_server,  # noqa: F811
):
    bare = make_repo("bare.git", init=False)
    bare.git("init", "-q", "--bare")
    (repo.path / ".lfsconfig").write_text(f'[lfs]\n\turl = "{lfs_server.url("repack")}"\n')
    repo.git("add", ".lfsconfig")
    tensors = _many(200)
    changed = [f"experts.{i}.w" for i in range(0, 200, 2)]
    old_pack, _ = _v1_dropped(repo, tensors, changed)
    v1_blob = repo.git("rev-parse", f"HEAD~1:{MODEL}").stdout.strip()
    repo.git("remote", "add", "origin", str(bare.path))
    repo.git("push", "-q", "origin", "main")  # both packs are on the server now
    _drop_history(repo)
    store = ObjectStore(_objects_dir(repo))
    before = store.size(old_pack.oid)

    result = json.loads(repo.theta("repack", "--expire", "now", "--json").stdout)
    assert (result["packs_rewritten"], result["members_kept"], result["members_dropped"]) == (1, 100, 100), result
    assert 0 < result["bytes_freed"] < before
    [new_pack] = result["new_packs"]
    fresh = ObjectStore(_objects_dir(repo))
    assert not fresh.has(old_pack.oid) and set(fresh.pack_members(new_pack)) <= {
        r.oid for r in Manifest.parse(repo.show(f"HEAD:{MODEL}")).member_objects()
    }
    # every tool still finds what it needs: checkout, status, fsck, prune (keeps the new pack),
    # and fetch does not download the replaced pack again
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    save_safetensors(repo.path / "expected.safetensors", tensors)
    assert repo.file(MODEL).read_bytes() == (repo.path / "expected.safetensors").read_bytes()
    assert repo.status().strip() == "?? expected.safetensors"
    assert json.loads(repo.theta("fsck", "--all", "--json").stdout)["ok"]
    repo.theta("prune", "--include-unpushed", "--expire", "now")
    repo.theta("fetch")
    files = {p.name for p in _files(_objects_dir(repo))}
    assert new_pack in files and old_pack.oid not in files
    assert json.loads(repo.theta("repack", "--expire", "now", "--json").stdout)["packs_rewritten"] == 0
    # the remote is still valid: a clone gets the old pack from the server...
    repo.theta("install")
    target = repo.path.parent / "clone"
    GitRepo(repo.path.parent, repo.env).git("clone", "-q", str(bare.path), str(target))
    clone = GitRepo(target, repo.env)
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes()
    # ...and a dead tensor needed again (v1, from the remote) fetches the replaced pack back
    repo.file("v1.safetensors").write_bytes(repo.git("cat-file", "-p", v1_blob).stdout.encode())
    repo.git("add", "v1.safetensors")
    repo.file("v1.safetensors").unlink()
    repo.git("checkout", "--", "v1.safetensors")
    save_safetensors(repo.path / "expected.safetensors", _many(200))
    assert repo.file("v1.safetensors").read_bytes() == (repo.path / "expected.safetensors").read_bytes()


def test_repack_keeps_a_pack_the_remote_may_lack(repo):
    _v1_dropped(repo, _many(40), ["experts.1.w"])
    _drop_history(repo)
    result = json.loads(repo.theta("repack", "--expire", "now", "--json").stdout)
    assert result["packs_rewritten"] == 0 and result["kept_unpushed"] == 1


def test_crash_during_repack_leaves_every_tensor_readable(repo):
    tensors = _many(60)
    old_pack, _ = _v1_dropped(repo, tensors, ["experts.3.w", "experts.4.w"])
    _drop_history(repo)
    # pretend a remote holds the old pack, so repack may replace it
    record = repo.path / ".git" / "theta" / "remotes" / "origin" / "pushed"
    record.parent.mkdir(parents=True)
    record.write_text(old_pack.oid + "\n")
    save_safetensors(repo.path / "expected.safetensors", tensors)
    expected = (repo.path / "expected.safetensors").read_bytes()
    for n in (1, 2, 3):  # new pack's temp file written; renamed; replacement recorded
        env = dict(repo.env, GIT_THETA_TEST_KILL_AT=str(n))
        proc = subprocess.run(["git", "theta", "repack", "--expire", "now"], cwd=repo.path, env=env)
        assert proc.returncode != 0, f"kill point {n} was not reached"
        assert json.loads(repo.theta("fsck", "--all", "--json").stdout)["ok"]
        repo.file(MODEL).unlink()
        repo.git("checkout", "--", MODEL)
        assert repo.file(MODEL).read_bytes() == expected
    result = json.loads(repo.theta("repack", "--expire", "now", "--json").stdout)
    assert result["packs_rewritten"] == 1 and result["members_dropped"] == 2
    assert json.loads(repo.theta("fsck", "--all", "--json").stdout)["ok"]
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == expected


# -- raw small tensors and manifest v3 -----------------------------------------------------------
def test_raw_tensor_lines_name_only_their_pack_and_old_forms_still_read():
    pack = ObjectRef("b" * 64, 999)
    raw = TensorEntry("x", "F32", (2, 3), "d" * 64, "raw", (ObjectRef("d" * 64, 24, pack),))
    data = Manifest("safetensors", tensors={"x": raw}).serialize()
    line = b"tensor x F32 [2,3] " + b"d" * 64 + b" raw @" + b"b" * 12 + b"\n"
    assert data.startswith(b"git-theta manifest v3\n") and data.endswith(line)
    back = Manifest.parse(data)
    assert back.tensors["x"] == raw and back.tensors["x"].objects[0].pack == pack and back.serialize() == data
    # the same tensor written in full (as v2 writes every packed object) reads to the same entry
    full = data.replace(b"manifest v3", b"manifest v2").replace(b"@" + b"b" * 12, b"d" * 64 + b":24@" + b"b" * 12)
    assert Manifest.parse(full).tensors["x"] == raw
    # a raw tensor whose size does not match its shape is written in full, never as shorthand
    odd = TensorEntry("x", "F32", (2, 3), "d" * 64, "raw", (ObjectRef("d" * 64, 7, pack),))
    assert b"d" * 64 + b":7@" in Manifest("safetensors", tensors={"x": odd}).serialize()


@pytest.mark.parametrize(
    "line",
    [
        b"tensor x F32 [2] " + b"d" * 64 + b" raw @" + b"c" * 12,  # no such pack line
        b"tensor x F32 [2] " + b"d" * 64 + b" raw @" + b"b" * 11,  # prefix too short
        b"tensor x F32 [2] " + b"d" * 64 + b" raw @../../" + b"b" * 12,
        b"tensor x Q99 [2] " + b"d" * 64 + b" raw @" + b"b" * 12,  # size unknown
    ],
)
def test_malformed_raw_references_are_refused(line):
    head = b"git-theta manifest v3\nformat safetensors\npack " + b"b" * 64 + b":9\n"
    with pytest.raises(ManifestError):
        Manifest.parse(head + line + b"\n")
    with pytest.raises(ManifestError):  # the shorthand means nothing before v3
        Manifest.parse(head.replace(b"v3", b"v2") + line.replace(b"Q99", b"F32") + b"\n")


def test_a_v2_manifest_of_raw_tensors_checks_out_through_git(repo):
    """Manifests written before the shorthand (every reference in full) still check out."""
    tensors = _many(50)
    save_safetensors(repo.file(MODEL), tensors)
    original = repo.file(MODEL).read_bytes()
    repo.commit("v1", MODEL)
    manifest = Manifest.parse(repo.show(f"HEAD:{MODEL}"))
    assert {e.update for e in manifest.tensors.values()} == {"raw"}
    text = repo.show(f"HEAD:{MODEL}").decode().replace("manifest v3", "manifest v2")
    for entry in manifest.tensors.values():
        ref = entry.objects[0]
        short = f" raw @{ref.pack.oid[:12]}\n"
        text = text.replace(f"{entry.digest}{short}", f"{entry.digest} raw {ref.oid}:{ref.size}@{ref.pack.oid[:12]}\n")
    assert "raw @" not in text
    blob = repo.git("hash-object", "-w", "--stdin", input=text).stdout.strip()
    repo.git("update-index", "--cacheinfo", f"100644,{blob},{MODEL}")
    repo.git("commit", "-q", "-m", "v2 form")
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == original
    assert json.loads(repo.theta("fsck", "--json").stdout)["ok"]


def test_a_raw_member_with_other_bytes_is_never_checked_out(repo):
    """A pack member whose bytes changed on disk fails its sha256 at checkout (no ledger)."""
    save_safetensors(repo.file(MODEL), _many(20))
    repo.commit("v1", MODEL)
    pack = Manifest.parse(repo.show(f"HEAD:{MODEL}")).all_objects()[0]
    path = ObjectStore(_objects_dir(repo)).path(pack.oid)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # the last member's last byte
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    repo.file(MODEL).unlink()
    proc = repo.git("checkout", "--", MODEL, check=False)
    assert proc.returncode != 0 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr
    assert not repo.file(MODEL).exists() or repo.file(MODEL).read_bytes().startswith(b"git-theta manifest")
