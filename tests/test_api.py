"""git_theta.load / git_theta.diff: bit-identical tensors at any revision, without the work tree."""

import json
import subprocess
import sys

import numpy as np
import pytest

import git_theta
from git_theta.errors import ObjectMissingError, UsageError

torch = pytest.importorskip("torch")


def _versions():
    g = torch.Generator().manual_seed(7)
    v1 = {
        "layers.0.w": torch.randn(8, 4, generator=g),
        "layers.0.b": torch.randn(4, generator=g),
        "bf": torch.randn(6, 3, generator=g).to(torch.bfloat16),
        "steps": torch.arange(5, dtype=torch.int64),
        "f8": torch.randn(16, generator=g).to(torch.float8_e4m3fn),
    }
    v2 = {k: v.clone() for k, v in v1.items()}
    v2["layers.0.w"][1] += 1
    v2["bf"] = (v2["bf"].float() * 2).to(torch.bfloat16)
    return v1, v2


def _build(repo):
    from safetensors.torch import save_file

    v1, v2 = _versions()
    # Loose objects, one per tensor: test_load_errors_are_clear deletes one tensor's (packs: test_packs.py)
    repo.git("config", "theta.packThreshold", "0")
    save_file(v1, str(repo.file("model.safetensors")))
    repo.commit("v1")
    save_file(v2, str(repo.file("model.safetensors")))
    repo.commit("v2")


@pytest.fixture
def api_repo(cached_repo):
    return cached_repo("api", _build)


def bits(t):
    """Raw bytes of a torch tensor (bit-level comparison, NaN-safe)."""
    return (
        t.contiguous().view(torch.uint8).numpy().tobytes()
        if t.element_size() == 1
        else t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().tobytes()
    )


def test_load_old_revisions_bit_identical(api_repo):
    repo = api_repo
    v1, v2 = _versions()
    on_disk = repo.file("model.safetensors").read_bytes()
    for rev, expected in (("HEAD~1", v1), ("HEAD", v2), (None, v2)):
        got = git_theta.load("model.safetensors", rev=rev, repo=repo.path, framework="torch")
        assert sorted(got) == sorted(expected)
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
            assert bits(got[name]) == bits(tensor), name
    # numpy: native dtypes as themselves, bf16/fp8 as bit patterns, or float32 values with upcast.
    arrays = git_theta.load("model.safetensors", rev="HEAD~1", repo=repo.path)
    assert arrays["layers.0.w"].dtype == np.float32 and np.array_equal(arrays["layers.0.w"], v1["layers.0.w"].numpy())
    assert arrays["steps"].dtype == np.int64 and arrays["steps"].tolist() == [0, 1, 2, 3, 4]
    assert arrays["bf"].dtype == np.uint16 and arrays["bf"].tobytes() == bits(v1["bf"])
    assert arrays["f8"].dtype == np.uint8 and arrays["f8"].tobytes() == bits(v1["f8"])
    up = git_theta.load("model.safetensors", rev="HEAD~1", repo=repo.path, params=["bf", "f8"], upcast=True)
    assert np.array_equal(up["bf"], v1["bf"].float().numpy()) and np.array_equal(up["f8"], v1["f8"].float().numpy())
    some = git_theta.load("model.safetensors", rev="HEAD~1", repo=repo.path, params="layers.*")
    assert sorted(some) == ["layers.0.b", "layers.0.w"]
    # The work tree and the index were not touched.
    assert repo.file("model.safetensors").read_bytes() == on_disk
    assert repo.git("status", "--porcelain").stdout == ""


def test_load_errors_are_clear(api_repo):
    repo = api_repo
    with pytest.raises(UsageError, match="unknown revision 'v9'"):
        git_theta.load("model.safetensors", rev="v9", repo=repo.path)
    with pytest.raises(UsageError, match="other.safetensors: not in HEAD"):
        git_theta.load("other.safetensors", repo=repo.path)
    with pytest.raises(UsageError, match="no tensor matches 'nope'"):
        git_theta.load("model.safetensors", repo=repo.path, params=["nope"])
    manifest = repo.show("HEAD~1:model.safetensors").decode()
    line = next(x for x in manifest.splitlines() if x.startswith("tensor layers.0.b "))
    oid = line.split()[-1].split(":")[0]
    (repo.path / ".git" / "theta" / "objects" / oid[:2] / oid[2:4] / oid).unlink()
    with pytest.raises(ObjectMissingError) as info:
        git_theta.load("model.safetensors", rev="HEAD~1", repo=repo.path)
    assert "model.safetensors: tensor 'layers.0.b'" in str(info.value) and oid in str(info.value)
    assert "git theta fetch" in info.value.hint
    cli = repo.run(sys.executable, "-m", "git_theta", "diff", "HEAD~1", "HEAD", "--", "model.safetensors", check=False)
    # layers.0.b did not change, so the diff does not need it; the changed tensors load fine.
    assert cli.returncode == 0, cli.stderr


def test_diff_api_is_the_json_output(api_repo):
    repo = api_repo
    api = git_theta.diff("model.safetensors", "HEAD~1", "HEAD", repo=repo.path)
    cli = json.loads(repo.theta("diff", "HEAD~1", "HEAD", "--json", "--", "model.safetensors").stdout)
    assert json.loads(json.dumps(api)) == cli
    changed = {t["name"]: t["stats"] for t in api["files"][0]["tensors"]}
    assert sorted(changed) == ["bf", "layers.0.w"]
    v1, v2 = _versions()
    old, new = v1["bf"].double().numpy(), v2["bf"].double().numpy()
    assert changed["bf"]["relative_change"] == pytest.approx(np.linalg.norm(new - old) / np.linalg.norm(old))
    assert git_theta.diff(repo=repo.path, rev_a="HEAD", rev_b=git_theta.WORKTREE)["files"] == []


def test_import_is_cheap():
    code = (
        "import sys, git_theta; print(sorted(m for m in ('numpy', 'torch', 'zstandard', 'click') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
