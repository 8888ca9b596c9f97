"""End to end against a real Git LFS server (giftless): push, clone, pull, corruption, outage."""

import json

from lfs_server import free_port, in_blocks, lfs_server  # noqa: F401 - the fixture

from conftest import GitRepo, random_state_dict, save_safetensors
from git_theta.manifest import Manifest

MODEL = "model.safetensors"


def test_the_test_server_sends_bodies_in_blocks_unchanged():
    """The test server's framing (tests/lfs_server.py): a body iterated by lines goes out in
    blocks of at most the block size past the last piece, the same bytes, and the body closed."""
    closed = []

    class Body(list):
        def close(self):
            closed.append(True)

    lines = [bytes([i % 256]) * (i % 300 + 1) + b"\n" for i in range(5000)]
    seen = []
    app = in_blocks(lambda environ, start: (start("200 OK", []), Body(lines))[1], size=4096)
    blocks = list(app({}, lambda status, headers: seen.append(status)))
    assert b"".join(blocks) == b"".join(lines) and seen == ["200 OK"] and closed == [True]
    assert len(blocks) < len(lines) // 10 and all(len(b) < 4096 + 302 for b in blocks)


def _oids(manifest_bytes):
    return {r.oid for r in Manifest.parse(manifest_bytes).all_objects()}


def _store_oids(repo):
    root = repo.path / ".git" / "theta" / "objects"
    return {p.name for p in root.rglob("*") if p.is_file() and len(p.name) == 64}


def _publisher(repo, make_repo, lfs_url, name="bare.git"):
    """``repo`` with an .lfsconfig naming ``lfs_url``, a first checkpoint and a bare origin."""
    bare = make_repo(name, init=False)
    bare.git("init", "-q", "--bare")
    (repo.path / ".lfsconfig").write_text(f'[lfs]\n\turl = "{lfs_url}"\n')
    save_safetensors(repo.file(MODEL), random_state_dict(0))
    repo.commit("base", ".lfsconfig", MODEL)
    repo.git("remote", "add", "origin", str(bare.path))
    return bare


def _clone(repo, bare, name, env=None):
    """``git clone`` with a global git-theta install (the user's normal set-up)."""
    repo.theta("install")  # global: writes to the isolated HOME
    target = repo.path.parent / name
    GitRepo(repo.path.parent, env or repo.env).git("clone", "-q", str(bare.path), str(target))
    return GitRepo(target, repo.env)


def test_push_then_clone_is_byte_identical(repo, make_repo, lfs_server):  # noqa: F811
    bare = _publisher(repo, make_repo, lfs_server.url("clone"))
    push = repo.git("push", "-q", "origin", "main")
    assert "uploaded" in push.stderr
    manifest = repo.show(f"HEAD:{MODEL}")
    # the server's disk holds exactly the pushed objects ...
    assert set(lfs_server.objects("clone")) == _oids(manifest)
    # ... and its own batch API lists them as downloadable
    import requests

    refs = Manifest.parse(manifest).all_objects()
    answer = requests.post(
        lfs_server.url("clone") + "/objects/batch",
        json={"operation": "download", "objects": [{"oid": r.oid, "size": r.size} for r in refs]},
        headers={"Accept": "application/vnd.git-lfs+json", "Content-Type": "application/vnd.git-lfs+json"},
        timeout=30,
    ).json()
    assert {o["oid"] for o in answer["objects"] if "download" in o.get("actions", {})} == _oids(manifest)
    # the objects went to the LFS server, not into the bare repository
    assert not (bare.path / "theta" / "objects").exists()

    clone = _clone(repo, bare, "clone")
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes()
    assert clone.show(f"HEAD:{MODEL}") == manifest
    assert clone.status() == ""
    status = json.loads(clone.theta("status", "--remote-check", "--json").stdout)
    assert status["files"][0]["missing"] == 0 and status["files"][0]["not_pushed"] == 0


def test_pull_of_new_version_fetches_only_new_objects(repo, make_repo, lfs_server):  # noqa: F811
    bare = _publisher(repo, make_repo, lfs_server.url("pull"))
    repo.git("push", "-q", "origin", "main")
    clone = _clone(repo, bare, "clone")
    old = repo.show(f"HEAD:{MODEL}")

    tensors = random_state_dict(0)
    tensors["layer.0.weight"][0, :3] += 1.0  # one tensor changes
    save_safetensors(repo.file(MODEL), tensors)
    repo.commit("step 2", MODEL)
    repo.git("push", "-q", "origin", "main")
    new = repo.show(f"HEAD:{MODEL}")

    before = _store_oids(clone)
    clone.git("pull", "-q", "--ff-only")
    fetched = _store_oids(clone) - before
    assert fetched == _oids(new) - _oids(old)
    assert 0 < len(fetched) < len(_oids(new))
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes()
    assert clone.status() == ""


def test_corrupt_object_on_server_is_rejected(repo, make_repo, lfs_server):  # noqa: F811
    bare = _publisher(repo, make_repo, lfs_server.url("corrupt"))
    repo.git("push", "-q", "origin", "main")
    oid, path = sorted(lfs_server.objects("corrupt").items())[0]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))

    env = dict(repo.env, GIT_THETA_SKIP_SMUDGE="1")
    clone = _clone(repo, bare, "clone", env=env)
    manifest = clone.file(MODEL).read_bytes()
    assert manifest == repo.show(f"HEAD:{MODEL}")  # skip-smudge left the manifest
    result = clone.theta("checkout", check=False)
    assert result.returncode != 0
    assert "corrupt" in result.stderr and oid in result.stderr
    assert oid not in _store_oids(clone)
    assert clone.file(MODEL).read_bytes() == manifest
    assert clone.status() == ""


def test_server_down_gives_clear_error_and_changes_nothing(repo, make_repo):
    url = f"http://127.0.0.1:{free_port()}/team/down.git/info/lfs"
    bare = _publisher(repo, make_repo, url)
    head = repo.git("rev-parse", "HEAD").stdout
    repo.env = dict(repo.env, GIT_THETA_RETRIES="1")
    result = repo.git("push", "origin", "main", check=False)
    assert result.returncode != 0
    assert "cannot reach the LFS server" in result.stderr and "connection refused" in result.stderr
    assert bare.git("rev-parse", "-q", "--verify", "refs/heads/main", check=False).returncode != 0
    assert repo.git("rev-parse", "HEAD").stdout == head and repo.status() == ""

    # fetching from it: the error names the server, the work tree keeps the manifest
    repo.git("push", "-q", "--no-verify", "origin", "main")  # the commits only
    env = dict(repo.env, GIT_THETA_SKIP_SMUDGE="1")
    clone = _clone(repo, bare, "clone", env=env)
    before = clone.file(MODEL).read_bytes()
    result = clone.theta("pull", check=False)
    assert result.returncode != 0 and "cannot reach the LFS server" in result.stderr
    assert clone.file(MODEL).read_bytes() == before and _store_oids(clone) == set()
    assert clone.status() == ""


def test_objects_over_the_host_limit_travel_in_parts(repo, make_repo, lfs_server):  # noqa: F811
    repo.git("config", "theta.maxObjectSize", "1024")
    bare = _publisher(repo, make_repo, lfs_server.url("parts"))
    repo.git("push", "-q", "origin", "main")
    manifest = repo.show(f"HEAD:{MODEL}")
    on_server = lfs_server.objects("parts")
    assert max(p.stat().st_size for p in on_server.values()) <= 1024
    assert _oids(manifest) < set(on_server)  # the manifest names chunk indexes; their parts went too

    clone = _clone(repo, bare, "clone")
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes()
    assert _store_oids(clone) == set(on_server) and clone.status() == ""
