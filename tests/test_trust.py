"""What a repository's author can and cannot make this clone check out (issue 13, DESIGN §12).

The spoofed and poisoned objects are built the way an outsider would, from the documented
formats only (``git_theta/store/container.py``: ``GTO1``, u32 header length, canonical JSON header,
payload; ``git_theta/tensors/planes.py`` and ``updates/dense.py``: one frame per byte plane, a frame being
a method byte and a u64 length; ``git_theta/updates/chain.py``: the header's ``check`` is ``xxh3-128d:``
over the tensor digest's 32 bytes and the tensor bytes; ``git_theta/store/objects.py``: an object
lives at ``theta/objects/ab/cd/<sha256>``), and are placed in the store as a fetch would leave them:
valid, correctly content-addressed objects. Everything else is real git.
"""

import hashlib
import io
import json
import resource
import sqlite3
import struct
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from conftest import save_safetensors
from git_theta.store.cache import Cache

GENUINE = {"w": np.arange(64, dtype=np.float32) / 64, "b": np.ones(8, dtype=np.float32)}
EVIL_W = np.full(64, 13.0, dtype=np.float32)  # what the attacker wants checked out instead


def outsider_object(header, payload):
    """A git-theta object built from the container format: magic, u32 header length, JSON, payload."""
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return b"GTO1" + struct.pack("<I", len(body)) + body + payload


def raw_planes(data, itemsize):
    """A dense payload for a tensor under 8 MiB: one raw frame (method 0, u64 length) per byte plane."""
    grid = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize)
    return b"".join(struct.pack("<BQ", 0, len(grid)) + grid[:, k].tobytes() for k in range(itemsize))


def forged_dense(data, claimed_digest, dtype="F32"):
    """A dense object decoding to ``data`` whose checksum is recomputed to match ``claimed_digest``:
    exactly what the object's header would say if ``data`` were the tensor with that digest."""
    check = xxhash.xxh3_128(bytes.fromhex(claimed_digest))
    check.update(data)
    header = {"update": "dense", "dtype": dtype, "shape": [len(data) // 4], "check": "xxh3-128d:" + check.hexdigest()}
    return outsider_object(header, raw_planes(data, 4))


def plant(repo, obj):
    """Put an object into the repository's store as a fetch would; return its ``oid:size``."""
    oid = hashlib.sha256(obj).hexdigest()
    path = repo.path / ".git" / "theta" / "objects" / oid[:2] / oid[2:4] / oid
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(obj)
    return f"{oid}:{len(obj)}"


def sha(array):
    return hashlib.sha256(array.tobytes()).hexdigest()


def manifest_with(repo, spec, name, ref, digest=None, shape=None):
    """The manifest text at ``spec`` with tensor ``name`` pointed at ``ref`` (same digest unless given)."""
    lines = repo.show(spec).decode().splitlines()
    for i, line in enumerate(lines):
        parts = line.split(" ")
        if parts[:2] == ["tensor", name]:
            parts[3] = parts[3] if shape is None else shape
            parts[4] = parts[4] if digest is None else digest
            lines[i] = " ".join(parts[:6] + ([ref] if isinstance(ref, str) else list(ref)))
    return "\n".join(lines) + "\n"


def commit_manifest(repo, path, text, message):
    """Commit a manifest as the author of the repository would (clean passes a manifest through)."""
    repo.file(path).write_text(text)
    repo.git("add", path)
    repo.git("commit", "-q", "-m", message)


def fresh_clone_state(repo):
    """Forget this clone's local caches, as in a fresh clone that fetched the same objects."""
    (repo.path / ".git" / "theta" / "cache.sqlite3").unlink(missing_ok=True)


def read_tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def test_forged_checksum_is_refused_by_every_decode_path(repo):
    """A manifest keeping w's genuine digest, pointing at an object that decodes to other bytes with
    its xxh3 checksum recomputed: checkout (git and git theta), the API's load and merge/diff inputs
    refuse it; nothing of the attacker's bytes reaches the work tree; fsck names it."""
    save_safetensors(repo.file("model.safetensors"), GENUINE)
    repo.commit("genuine", "model.safetensors")
    ref = plant(repo, forged_dense(EVIL_W.tobytes(), sha(GENUINE["w"])))
    commit_manifest(repo, "model.safetensors", manifest_with(repo, "HEAD:model.safetensors", "w", ref), "forged")
    fresh_clone_state(repo)
    repo.file("model.safetensors").unlink()

    checkout = repo.git("checkout", "--", "model.safetensors", check=False)
    assert checkout.returncode != 0
    assert "'w'" in checkout.stderr and "tensor digest" in checkout.stderr, checkout.stderr
    assert ref[:12] in checkout.stderr  # names the forged object
    written = repo.file("model.safetensors")
    assert not written.exists() or read_tensors(written)["w"].tobytes() != EVIL_W.tobytes()

    repo.file("model.safetensors").unlink(missing_ok=True)
    theta = repo.theta("checkout", "model.safetensors", check=False)
    assert theta.returncode != 0 and "'w'" in theta.stderr, theta.stderr
    written = repo.file("model.safetensors")
    assert not written.exists() or read_tensors(written)["w"].tobytes() != EVIL_W.tobytes()

    load = repo.run(
        sys.executable, "-c", "import git_theta.porcelain.api as a; a.load('model.safetensors')", check=False
    )
    assert load.returncode != 0 and "ObjectCorruptError" in load.stderr, load.stderr

    fsck = repo.theta("fsck", "--json", check=False)
    problems = json.loads(fsck.stdout)["problems"]
    assert [(p["kind"], p["tensor"]) for p in problems] == [("bad-tensor", "w")]
    # Still untrusted after all those refusals: a second checkout verifies (and refuses) again.
    assert repo.git("checkout", "--", "model.safetensors", check=False).returncode != 0


def test_a_forged_keyframe_streamed_to_git_is_discarded_with_the_file(repo):
    """A keyframe at or above ``theta.streamThreshold`` goes to git a piece at a time as it
    decodes and is checked after its last byte: the forged one's bytes reach git, the check
    fails, the file ends with status=error, and git writes none of it; the pair stays untrusted.
    The same object under the threshold is refused before a byte (the test above)."""
    save_safetensors(repo.file("model.safetensors"), GENUINE)
    repo.commit("genuine", "model.safetensors")
    ref = plant(repo, forged_dense(EVIL_W.tobytes(), sha(GENUINE["w"])))
    commit_manifest(repo, "model.safetensors", manifest_with(repo, "HEAD:model.safetensors", "w", ref), "forged")
    repo.git("config", "theta.streamThreshold", "64")  # w's 256 bytes stream
    for state in ("fresh clone", "again"):
        if state == "fresh clone":
            fresh_clone_state(repo)
        repo.file("model.safetensors").unlink(missing_ok=True)
        checkout = repo.git("checkout", "--", "model.safetensors", check=False)
        assert checkout.returncode != 0, state
        assert "'w'" in checkout.stderr and "tensor digest" in checkout.stderr, checkout.stderr
        assert ref[:12] in checkout.stderr
        written = repo.file("model.safetensors")
        assert not written.exists() or EVIL_W.tobytes() not in written.read_bytes(), state
    # What the filter process did, in process: streaming, the forged bytes went out before the
    # check failed (so git above had them, and dropped them); without, not a byte of them.
    from git_theta import config
    from git_theta.errors import ObjectCorruptError
    from git_theta.filter.smudge import Smudger
    from git_theta.git.repo import Repo

    config.forget()
    smudger = Smudger(Repo(repo.path))
    try:
        data = repo.show("HEAD:model.safetensors")
        for streaming in (True, False):
            out = io.BytesIO()
            with pytest.raises(ObjectCorruptError, match="tensor digest"):
                smudger.write(*smudger.prepare(data, "model.safetensors"), "model.safetensors", out, streaming)
            assert (EVIL_W.tobytes() in out.getvalue()) is streaming
    finally:
        smudger.close()
        smudger.repo.store.close()


def test_forged_checksum_in_a_diff_or_merge_input_is_refused(repo):
    """Both sides changed w; theirs claims a genuine digest (of 3w) for an object decoding to the
    attacker's bytes: the numeric diff and the merge operator's input refuse it; the work tree
    keeps ours."""
    save_safetensors(repo.file("model.safetensors"), GENUINE)
    repo.commit("genuine", "model.safetensors")
    repo.git("checkout", "-q", "-b", "theirs")
    save_safetensors(repo.file("model.safetensors"), dict(GENUINE, w=GENUINE["w"] * 3))
    repo.commit("theirs", "model.safetensors")
    ref = plant(repo, forged_dense(EVIL_W.tobytes(), sha(GENUINE["w"] * 3)))
    commit_manifest(repo, "model.safetensors", manifest_with(repo, "HEAD:model.safetensors", "w", ref), "forged")
    repo.git("checkout", "-q", "-f", "main")
    ours = GENUINE["w"] * 2
    save_safetensors(repo.file("model.safetensors"), dict(GENUINE, w=ours))
    repo.commit("ours changes w", "model.safetensors")
    fresh_clone_state(repo)
    diff = repo.theta("diff", "main", "theirs", check=False)  # a numeric diff decodes both sides
    assert diff.returncode != 0 and "tensor digest" in diff.stderr, diff.stdout + diff.stderr
    merge = repo.theta("merge", "--operator", "linear", "theirs", check=False)
    assert merge.returncode != 0, merge.stdout + merge.stderr
    assert "tensor digest" in merge.stderr, merge.stderr
    assert read_tensors(repo.file("model.safetensors"))["w"].tobytes() == ours.tobytes()


def test_poisoned_dedup_cannot_capture_the_victims_own_add(repo, make_repo):
    """A decoy naming a public tensor's digest with the attacker's object: the victim's own later
    'git add' of the genuine tensor must store the genuine bytes, whether the decoy was checked out
    (digest index) or is the parent version of the same path (clean's parent lookup)."""
    evil = plant(repo, forged_dense(EVIL_W.tobytes(), sha(GENUINE["w"])))
    save_safetensors(repo.file("decoy.safetensors"), {"x": np.zeros(4, dtype=np.float32)})
    repo.commit("decoy shape", "decoy.safetensors")
    digest = sha(GENUINE["w"])
    decoy = manifest_with(repo, "HEAD:decoy.safetensors", "x", evil, digest=digest, shape="[64]")
    commit_manifest(repo, "decoy.safetensors", decoy.replace("tensor x ", "tensor w "), "decoy")
    # The same poison as the parent version of the path the victim will add the genuine file at.
    commit_manifest(repo, "model.safetensors", decoy.replace("tensor x ", "tensor w "), "poisoned parent")
    fresh_clone_state(repo)
    for path in ("decoy.safetensors", "model.safetensors"):
        repo.file(path).unlink()
        repo.git("checkout", "--", path, check=False)  # the victim checks the decoys out

    save_safetensors(repo.file("model.safetensors"), {"w": GENUINE["w"]})
    save_safetensors(repo.file("copy.safetensors"), {"w": GENUINE["w"]})
    repo.git("add", "model.safetensors", "copy.safetensors")
    assert repo.git("diff", "--cached", "--quiet", check=False).returncode == 1  # not "nothing to commit"
    repo.git("commit", "-q", "-m", "genuine")
    for path in ("model.safetensors", "copy.safetensors"):
        assert evil not in repo.show(f"HEAD:{path}").decode()

    # A fresh clone of the victim's repository (its own store, no caches) gets the genuine weights.
    clone = make_repo("clone", init=False)
    clone.git("clone", "-q", "--no-checkout", str(repo.path), ".")
    clone.theta("install", "--local")
    (clone.path / ".git" / "theta").mkdir(exist_ok=True)
    for store in ("objects", "packs"):  # loose objects and packs of small ones: what a fetch brings
        source = repo.path / ".git" / "theta" / store
        if source.exists():
            subprocess.run(["cp", "-r", str(source), str(clone.path / ".git" / "theta" / store)], check=True)
    clone.git("checkout", "-q", "main", "--", ".gitattributes")
    clone.git("checkout", "-q", "main", "--", "model.safetensors", "copy.safetensors")
    for path in ("model.safetensors", "copy.safetensors"):
        assert read_tensors(clone.file(path))["w"].tobytes() == GENUINE["w"].tobytes()


def test_fsck_names_every_manifest_using_a_bad_pair(repo):
    """One forged pair used by three manifests (two paths, two commits): three problems."""
    save_safetensors(repo.file("a.safetensors"), GENUINE)
    repo.commit("genuine", "a.safetensors")
    forged = manifest_with(
        repo, "HEAD:a.safetensors", "w", plant(repo, forged_dense(EVIL_W.tobytes(), sha(GENUINE["w"])))
    )
    commit_manifest(repo, "a.safetensors", forged, "forged a")
    commit_manifest(repo, "b.safetensors", forged.replace("tensor w ", "tensor w2 "), "forged b")
    commit_manifest(repo, "c.safetensors", forged.replace("tensor b ", "tensor b3 "), "forged c")
    report = json.loads(repo.theta("fsck", "--all", "--json", check=False).stdout)
    found = sorted((p["path"], p["tensor"]) for p in report["problems"] if p["kind"] == "bad-tensor")
    assert found == [("a.safetensors", "w"), ("b.safetensors", "w2"), ("c.safetensors", "w")], report
    assert all(len(p["message"]) < 400 for p in report["problems"])


def test_trust_is_recorded_locally_and_only_for_verified_pairs(repo):
    """Checkout records the pairs it verified in the cache's ledger, never the forged one; the
    ledger is local state (nothing in the repository or its objects carries it)."""
    from git_theta.manifest import Manifest
    from git_theta.store.trust import pair_key

    # Packed small tensors are stored raw (their object id is their digest: no ledger needed);
    # loose ones are dense objects whose pairs the ledger records.
    repo.git("config", "theta.packThreshold", "0")
    save_safetensors(repo.file("model.safetensors"), GENUINE)
    repo.commit("genuine", "model.safetensors")
    genuine = Manifest.parse(repo.show("HEAD:model.safetensors"))
    ref = plant(repo, forged_dense(EVIL_W.tobytes(), sha(GENUINE["w"])))
    commit_manifest(repo, "model.safetensors", manifest_with(repo, "HEAD:model.safetensors", "w", ref), "forged")
    forged = Manifest.parse(repo.show("HEAD:model.safetensors"))
    fresh_clone_state(repo)

    def ledger():
        db = sqlite3.connect(repo.path / ".git" / "theta" / "cache.sqlite3")
        try:
            return {row[0] for row in db.execute("SELECT pair FROM trusted")}
        finally:
            db.close()

    repo.file("model.safetensors").unlink()
    repo.git("checkout", "-q", "HEAD~1", "--", "model.safetensors")  # the genuine version
    assert {pair_key(e) for e in genuine.tensors.values()} <= ledger()
    repo.git("checkout", "HEAD", "--", "model.safetensors", check=False)
    assert pair_key(forged.tensors["w"]) not in ledger()
    assert pair_key(forged.tensors["b"]) in ledger()  # the same pair as the genuine 'b'
    # fsck --forget-trust starts from an empty ledger and trusts again only what it verifies:
    # HEAD (the forged version) and the index (the genuine version, staged by the checkout).
    with sqlite3.connect(repo.path / ".git" / "theta" / "cache.sqlite3") as db:
        db.execute("INSERT INTO trusted VALUES (?)", (b"x" * 32,))
    assert repo.theta("fsck", "--forget-trust", check=False).returncode == 1
    assert ledger() == {pair_key(e) for e in genuine.tensors.values()}


def test_object_claiming_a_huge_tensor_fails_before_allocating(repo):
    """139 bytes claiming a 4 GiB tensor (manifest and header agree): checkout and fsck refuse it
    from the frame headers, under an address-space limit far below what the header claims."""
    elements = 1 << 30
    header = {"update": "dense", "dtype": "F32", "shape": [elements]}
    obj = outsider_object(header, struct.pack("<BQ", 0, 4) * 4 + b"\0" * 16)  # 4 frames, 4 bytes each
    assert len(obj) < 160
    ref = plant(repo, obj)
    digest = "0" * 64
    text = f"git-theta manifest v1\nformat safetensors\ntensor w F32 [{elements}] {digest} dense {ref}\n"
    commit_manifest(repo, "huge.safetensors", text, "huge")
    repo.file("huge.safetensors").unlink()

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    for command in (["git", "checkout", "--", "huge.safetensors"], ["git", "theta", "fsck"]):
        proc = subprocess.run(command, cwd=repo.path, env=repo.env, capture_output=True, text=True, preexec_fn=limited)
        assert proc.returncode != 0
        assert "cannot hold" in proc.stderr or "cannot hold" in proc.stdout, proc.stderr + proc.stdout
        assert "too large to decode" not in proc.stderr + proc.stdout  # never got to allocating


def test_chain_repeating_one_delta_is_refused_at_once_with_a_short_line(repo):
    """A manifest whose chain repeats one real delta 100,000 times: refused before decoding (the
    configured depth plus the margin), in one short error line naming file, tensor, object, count.
    With the bound raised, a long chain that does not decode still fails in a short line."""
    wide = np.arange(1024, dtype=np.float32) / 1024  # 4 KiB: a one-element delta pays
    save_safetensors(repo.file("model.safetensors"), dict(GENUINE, w=wide))
    repo.commit("v1", "model.safetensors")
    changed = wide.copy()
    changed[3] = 7.0
    save_safetensors(repo.file("model.safetensors"), dict(GENUINE, w=changed))
    repo.commit("v2: a sparse delta", "model.safetensors")
    line = next(t for t in repo.show("HEAD:model.safetensors").decode().splitlines() if t.startswith("tensor w "))
    delta, keyframe = line.split(" ")[6:8]

    def check_out(repeats):
        text = manifest_with(repo, "HEAD~0:model.safetensors", "w", [delta] * repeats + [keyframe])
        commit_manifest(repo, "model.safetensors", text, f"chain of {repeats} deltas")
        repo.file("model.safetensors").unlink()
        proc = repo.git("checkout", "--", "model.safetensors", check=False)
        assert proc.returncode != 0
        assert max(len(t) for t in proc.stderr.splitlines()) < 400, proc.stderr[:2000]
        (error,) = [t for t in proc.stderr.splitlines() if t.startswith("error:")]
        assert "model.safetensors" in error and "'w'" in error and delta[:12] in error
        return error

    assert "100001 objects" in check_out(100_000)
    fsck = json.loads(repo.theta("fsck", "--json", check=False).stdout)
    assert [len(p["message"]) < 400 and "100001 objects" in p["message"] for p in fsck["problems"]] == [True]
    # The configured bound moves the limit: a repository with deep chains can raise it.
    repo.git("checkout", "-q", "HEAD~1", "--", "model.safetensors")
    repo.git("config", "theta.maxChainDepth", "1200")
    assert "longer than" not in check_out(1000)


def test_ledger_prefetch_answers_a_file_in_one_query_and_never_trusts_more(tmp_path):
    """A checkout looks up every pair of a file at once; a pair found untrusted stays untrusted
    until it is recorded (verified), and a recorded one is trusted."""
    from git_theta.store.trust import TrustLedger

    cache = _CountingCache(tmp_path / "cache.sqlite3")
    entry = _ledger_entry
    TrustLedger(cache).record([entry(0), entry(1)])  # verified by an earlier process
    ledger = TrustLedger(cache)
    ledger.prefetch([entry(i) for i in range(4)])
    assert [ledger.trusted(entry(i)) for i in range(4)] == [True, True, False, False]
    assert cache.lookups == 0
    ledger.record([entry(2)])  # this process verified it
    assert ledger.trusted(entry(2)) and not ledger.trusted(entry(3))
    assert TrustLedger(cache).trusted(entry(2)) and not TrustLedger(cache).trusted(entry(3))


def test_pairs_recorded_in_a_batch_are_written_together_when_it_ends(tmp_path):
    """A clean or checkout records its pairs in one write when it ends (nested blocks: when the
    outer one does); this process trusts them at once, another process once they are written,
    and a batch that fails still writes what it verified."""
    from git_theta.store.trust import TrustLedger, batched

    cache = _CountingCache(tmp_path / "cache.sqlite3")
    entry = _ledger_entry
    ledger = TrustLedger(cache)
    with ledger.batch():
        with batched(ledger):
            for i in range(50):
                ledger.record([entry(i)])
        assert ledger.trusted(entry(7)) and cache.writes == 0
        assert not TrustLedger(cache).trusted(entry(7))  # not written yet
    assert cache.writes == 1 and TrustLedger(cache).trusted(entry(49))
    with pytest.raises(RuntimeError):
        with ledger.batch():
            ledger.record([entry(60)])
            raise RuntimeError("the checkout failed after verifying one tensor")
    assert cache.writes == 2 and TrustLedger(cache).trusted(entry(60))
    ledger.record([entry(61)])  # outside a batch: at once
    assert cache.writes == 3 and TrustLedger(cache).trusted(entry(61))
    with batched(None):  # a store without a ledger
        pass


def _ledger_entry(i):
    """A made-up entry whose pair is ``i``'s own."""
    from git_theta.manifest import ObjectRef, TensorEntry

    return TensorEntry(f"t{i}", "F32", (1,), f"{i:064x}", "dense", (ObjectRef(f"{i + 100:064x}", 10),))


class _CountingCache(Cache):
    """A cache that counts single-pair lookups and ledger writes."""

    def __init__(self, path):
        super().__init__(path)
        self.lookups = self.writes = 0

    def is_trusted(self, key):
        self.lookups += 1
        return super().is_trusted(key)

    def put_trusted(self, keys):
        self.writes += 1
        return super().put_trusted(keys)
