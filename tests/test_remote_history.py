"""Push completeness against a real Git LFS server (giftless): what a push uploads comes from what
the pushed commits reference, under every path and pattern they were tracked with, not from
today's attributes (issue 13; docs/security.md, "Nothing lost")."""

import json

from lfs_server import lfs_server  # noqa: F401 - the fixture

from conftest import GitRepo, random_state_dict, save_safetensors
from git_theta.manifest import Manifest

OLD = "model.safetensors"
NEW = "models/model.safetensors"


def _objects(repo, spec):
    return {r.oid for r in Manifest.parse(repo.show(spec)).all_objects()}


def test_push_after_pattern_change_and_move_uploads_old_versions(make_repo, lfs_server):  # noqa: F811
    pub = make_repo("pub")
    pub.theta("track", "*.safetensors")
    (pub.path / ".lfsconfig").write_text(f'[lfs]\n\turl = "{lfs_server.url("history")}"\n')
    pub.commit("track", ".gitattributes", ".lfsconfig")
    # two unrelated versions (other tensor names and shapes: no delta, so v2 cannot carry v1's objects)
    save_safetensors(pub.file(OLD), random_state_dict(0))
    pub.commit("v1", OLD)
    v1 = pub.file(OLD).read_bytes()
    save_safetensors(pub.file(OLD), random_state_dict(1, shapes={"w": (32, 8), "b": (8,)}))
    pub.commit("v2", OLD)
    # the model moves into models/, and only models/ stays tracked
    pub.file("models").mkdir()
    pub.git("mv", OLD, NEW)
    attributes = pub.file(".gitattributes").read_text().replace("*.safetensors", "models/**")
    pub.file(".gitattributes").write_text(attributes)
    pub.commit("move into models/", ".gitattributes", NEW)
    assert pub.git("check-attr", "filter", OLD).stdout.strip().endswith("unspecified")
    old_objects = _objects(pub, f"HEAD~2:{OLD}")
    assert old_objects.isdisjoint(_objects(pub, f"HEAD:{NEW}"))

    bare = make_repo("bare.git", init=False)
    bare.git("init", "-q", "--bare")
    pub.git("remote", "add", "origin", str(bare.path))
    status = json.loads(pub.theta("status", "--json").stdout)
    assert status["unpushed_commits"]["not_pushed"] >= len(old_objects)  # the old version counts
    assert "commits not on origin" in pub.theta("status").stdout

    pub.git("push", "-q", "-u", "origin", "main")
    assert old_objects <= set(lfs_server.objects("history"))
    assert json.loads(pub.theta("status", "--json").stdout)["unpushed_commits"]["not_pushed"] == 0

    pub.theta("install")  # global, as a user has it
    target = pub.path.parent / "clone"
    GitRepo(pub.path.parent, pub.env).git("clone", "-q", str(bare.path), str(target))
    clone = GitRepo(target, pub.env)
    clone.git("checkout", "-q", "HEAD~2")
    assert clone.file(OLD).read_bytes() == v1
    assert clone.status() == ""
