"""Directory remotes (a bare repository's own store, a shared directory), skip-smudge with
``git theta checkout``, partial pulls, and the pre-push hook living beside a user's own."""

import json

from conftest import GitRepo, random_state_dict, save_safetensors
from git_theta.manifest import Manifest

MODEL = "model.safetensors"


def _oids(manifest_bytes, prefix=""):
    manifest = Manifest.parse(manifest_bytes)
    refs = [r for name, e in manifest.tensors.items() if name.startswith(prefix) for r in e.objects]
    return {r.home.oid for r in refs} | {r.home.oid for r in manifest.blobs.values()}  # packs travel


def _store_oids(root):
    return {p.name for p in root.rglob("*") if p.is_file() and len(p.name) == 64} if root.exists() else set()


def _bare_origin(repo, make_repo):
    save_safetensors(repo.file(MODEL), random_state_dict(1))
    repo.commit("base", MODEL)
    bare = make_repo("bare.git", init=False)
    bare.git("init", "-q", "--bare")
    repo.git("remote", "add", "origin", str(bare.path))
    return bare


def _clone(repo, bare, name, **env):
    repo.theta("install")  # global install in the isolated HOME
    target = repo.path.parent / name
    GitRepo(repo.path.parent, dict(repo.env, **env)).git("clone", "-q", str(bare.path), str(target))
    return GitRepo(target, repo.env)


def test_push_to_bare_repository_uses_its_store(repo, make_repo):
    bare = _bare_origin(repo, make_repo)
    repo.git("push", "-q", "origin", "main")
    manifest = repo.show(f"HEAD:{MODEL}")
    assert _store_oids(bare.path / "theta" / "objects") == _oids(manifest)

    clone = _clone(repo, bare, "clone")
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes()
    assert clone.show(f"HEAD:{MODEL}") == manifest and clone.status() == ""
    # the clone got the hook from its filter run, so its own pushes carry objects too
    assert "git-theta pre-push hook" in (clone.path / ".git" / "hooks" / "pre-push").read_text()
    # what the clone downloaded from origin is on origin: nothing counts as "not pushed"
    (row,) = json.loads(clone.theta("status", "--json").stdout)["files"]
    assert row["objects"] == len(_oids(manifest)) and row["not_pushed"] == 0 and row["not_pushed_bytes"] == 0


def test_shared_directory_remote_push_and_fetch(repo, make_repo, tmp_path):
    bare = _bare_origin(repo, make_repo)
    shared = tmp_path / "mnt" / "models"
    repo.git("config", "theta.remote.shared.url", str(shared))
    pushed = json.loads(repo.theta("push", "shared", "--json").stdout)
    manifest = repo.show(f"HEAD:{MODEL}")
    assert set(pushed["oids"]) == _store_oids(shared) == _oids(manifest)
    again = json.loads(repo.theta("push", "shared", "--json").stdout)
    assert again["objects"] == 0  # already there: nothing moves

    repo.git("push", "-q", "--no-verify", "origin", "main")  # commits only: the objects stay in shared/
    clone = _clone(repo, bare, "clone", GIT_THETA_SKIP_SMUDGE="1")
    clone.git("config", "theta.remote.shared.url", str(shared))
    fetched = json.loads(clone.theta("fetch", "shared", "--json").stdout)
    assert set(fetched["oids"]) == _oids(manifest)
    clone.theta("checkout")
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes() and clone.status() == ""


def test_skip_smudge_then_partial_pull_then_checkout(repo, make_repo):
    # per-tensor granularity needs loose objects: a pull of some tensors fetches whole packs
    repo.git("config", "theta.packThreshold", "0")
    bare = _bare_origin(repo, make_repo)
    repo.git("push", "-q", "origin", "main")
    clone = _clone(repo, bare, "clone", GIT_THETA_SKIP_SMUDGE="1")
    manifest = repo.show(f"HEAD:{MODEL}")
    assert clone.file(MODEL).read_bytes() == manifest and clone.status() == ""
    store = clone.path / ".git" / "theta" / "objects"
    assert _store_oids(store) == set()

    partial = json.loads(clone.theta("pull", "--include", "layer.0.*", "--json").stdout)
    assert _store_oids(store) == _oids(manifest, "layer.0.") != _oids(manifest)
    assert partial["partial"] == [MODEL] and partial["written"] == []
    assert clone.file(MODEL).read_bytes() == manifest and clone.status() == ""

    done = json.loads(clone.theta("checkout", MODEL, "--json").stdout)
    assert done["written"] == [MODEL]
    assert set(done["oids"]) == _oids(manifest) - _oids(manifest, "layer.0.")
    assert clone.file(MODEL).read_bytes() == repo.file(MODEL).read_bytes()
    assert clone.status() == ""
    assert not clone.file(MODEL).is_symlink()


def test_pre_push_hook_chains_a_users_hook(repo, make_repo):
    hooks = repo.path / ".git" / "hooks"
    (hooks / "pre-push").unlink()
    mine = '#!/bin/sh\ncat > "$(dirname "$0")/../user-hook-ran"\n'
    (hooks / "pre-push").write_text(mine)
    (hooks / "pre-push").chmod(0o755)
    out = repo.theta("install", "--local").stdout
    assert "pre-push.local" in out
    assert (hooks / "pre-push.local").read_text() == mine

    bare = _bare_origin(repo, make_repo)
    repo.git("push", "-q", "origin", "main")
    assert "refs/heads/main" in (repo.path / ".git" / "user-hook-ran").read_text()
    assert _store_oids(bare.path / "theta" / "objects") == _oids(repo.show(f"HEAD:{MODEL}"))

    # a third hook cannot be placed without losing one: refuse with a hint
    (hooks / "pre-push").write_text("#!/bin/sh\nexit 0\n")
    refused = repo.theta("install", "--local", check=False)
    assert refused.returncode != 0 and "hint:" in refused.stderr
    assert (hooks / "pre-push").read_text() == "#!/bin/sh\nexit 0\n"
