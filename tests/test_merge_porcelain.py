"""``git theta merge`` (one branch, octopus, --every-tensor, --dry-run) and ``git theta merge-files``."""

import json

import numpy as np
import pytest
from conftest import save_safetensors
from safetensors.numpy import load_file

from git_theta.manifest import Manifest

MODEL = "model.safetensors"


def model(seed):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((16, 16)).astype(np.float32),
        "b": rng.standard_normal(16).astype(np.float32),
        "step": np.array([1], np.int64),
    }


def moved(t, seed, scale=0.1):
    return (t + scale * np.random.default_rng(seed).standard_normal(t.shape)).astype(t.dtype)


def ties_reference(base, models, density):
    """TIES-merging per tensor as MERGE-OPERATORS.md §4.2 defines it (weights 1, λ 1)."""
    trimmed = []
    for m in models:
        delta = m - base
        k = max(1, int(np.floor(density * delta.size)))
        keep = np.zeros(delta.size, bool)
        keep[np.argsort(-np.abs(delta).ravel(), kind="stable")[:k]] = True
        trimmed.append(np.where(keep.reshape(delta.shape), delta, np.float32(0)))
    stacked = np.stack(trimmed)
    elected = np.where(stacked.sum(axis=0) >= 0, np.float32(1), np.float32(-1))
    agree = np.sign(stacked) == elected
    mixed = np.where(agree, stacked, np.float32(0)).sum(axis=0)
    divisor = agree.sum(axis=0).astype(np.float32)
    divisor[divisor == 0] = 1
    return base + mixed / divisor


@pytest.fixture
def history(repo):
    """main: base; b1, b2, b3 fine-tune 'w'; b1 also changes 'b' and adds notes.txt; b1 and b2 add
    adapter.safetensors with different values."""
    base = model(0)
    save_safetensors(repo.file(MODEL), base)
    repo.commit("base")
    versions = {}
    for i, branch in enumerate(("b1", "b2", "b3"), start=1):
        repo.git("checkout", "-q", "-b", branch, "main")
        version = dict(base, w=moved(base["w"], i))
        if branch == "b1":
            version["b"] = moved(base["b"], 10)
            repo.file("notes.txt").write_text("trained on task 1\n")
        if branch in ("b1", "b2"):  # a checkpoint added on two branches, differently
            save_safetensors(repo.file("adapter.safetensors"), {"adapter.weight": np.full(4, i, np.float32)})
        save_safetensors(repo.file(MODEL), version)
        repo.commit(branch)
        versions[branch] = version
    repo.git("checkout", "-q", "main")
    return base, versions


def checked_out(repo):
    """The merged checkpoint, after checking what git stores and that a fresh checkout matches."""
    assert Manifest.parse(repo.show(f"HEAD:{MODEL}")).tensors
    assert repo.status() == ""
    data = repo.file(MODEL).read_bytes()
    repo.file(MODEL).unlink()
    repo.git("checkout", "--", MODEL)
    assert repo.file(MODEL).read_bytes() == data
    return load_file(str(repo.file(MODEL)))


def test_octopus_ties_combines_all_task_vectors_in_one_commit(repo, history):
    base, versions = history
    repo.git("config", "theta.merge.rule", "adapter.* linear")  # added on two sides: no base for ties
    proc = repo.theta("merge", "--operator", "ties", "--param", "density=0.5", "b1", "b2", "b3")
    assert "4 parents" in proc.stdout
    parents = repo.git("rev-list", "--parents", "-n1", "HEAD").stdout.split()[1:]
    expected_parents = [repo.git("rev-parse", r).stdout.strip() for r in ("HEAD~1", "b1", "b2", "b3")]
    assert parents == expected_parents
    assert "ties" in repo.git("log", "-1", "--format=%B").stdout
    out = checked_out(repo)
    expected = ties_reference(base["w"], [versions[b]["w"] for b in ("b1", "b2", "b3")], 0.5)
    np.testing.assert_allclose(out["w"], expected, rtol=0, atol=1e-6)
    assert out["b"].tobytes() == versions["b1"]["b"].tobytes()  # changed on one branch only
    assert repo.file("notes.txt").read_text() == "trained on task 1\n"  # other files merge too
    adapter = load_file(str(repo.file("adapter.safetensors")))["adapter.weight"]
    np.testing.assert_array_equal(adapter, np.full(4, 1.5, np.float32))  # linear over b1 and b2
    # merging again is a no-op, as with git merge
    assert repo.theta("merge", "b1", "b2").stdout.strip() == "Already up to date."


def test_dry_run_shows_rules_and_signals_and_writes_nothing(repo, history):
    head = repo.git("rev-parse", "HEAD").stdout
    objects = sorted(p.name for p in (repo.path / ".git" / "theta" / "objects").rglob("*") if p.is_file())
    proc = repo.theta("merge", "--dry-run", "--json", "--operator", "auto", "b1", "b2")
    files = {f["path"]: f for f in json.loads(proc.stdout)["files"]}
    report = {t["name"]: t for t in files[MODEL]["tensors"]}
    adapter = files["adapter.safetensors"]["tensors"][0]
    assert adapter["action"] == "operator" and adapter["reason"] == "added in b1, b2 with different values"
    assert adapter["origin"] == "auto -> linear (no base) (--operator)"
    assert report["b"]["action"] == "take" and report["b"]["reason"] == "changed only in b1"
    w = report["w"]
    assert w["action"] == "operator" and w["origin"].startswith("auto -> ")
    assert set(w["signals"]) >= {"cosine", "sign_agreement", "norm_ratio", "topk_overlap"}
    assert -1 <= w["signals"]["cosine"] <= 1
    text = repo.theta("merge", "--dry-run", "--operator", "ties", "b1", "b2").stdout
    assert "ties (--operator): changed in b1, b2  [cosine=" in text
    # --base replaces the merge base: against b1, HEAD and b2 both "changed" b back to the original
    text = repo.theta("merge", "--dry-run", "--base", "b1", "b2").stdout
    assert "b     take: same change in HEAD, b2" in text and "conflict: changed in HEAD, b2" in text
    assert repo.git("rev-parse", "HEAD").stdout == head
    assert repo.status() == ""
    after = sorted(p.name for p in (repo.path / ".git" / "theta" / "objects").rglob("*") if p.is_file())
    assert after == objects


def test_single_branch_is_git_merge_with_the_operator(repo, history):
    base, versions = history
    repo.git("checkout", "-q", "b2")
    repo.theta("merge", "--operator", "task_arithmetic", "--param", "weight=1,0.5", "b3")
    out = checked_out(repo)
    w0, w2, w3 = base["w"], versions["b2"]["w"], versions["b3"]["w"]
    expected = w0 + ((w2 - w0) * np.float32(1) + (w3 - w0) * np.float32(0.5))
    np.testing.assert_allclose(out["w"], expected, rtol=0, atol=1e-6)
    assert repo.git("log", "-1", "--format=%s").stdout.strip() == "Merge branch 'b3' into b2"
    assert repo.git("config", "--get", "theta.merge.operator", check=False).stdout == ""  # nothing persisted


def test_every_tensor_is_a_model_soup(repo, history):
    base, versions = history
    repo.theta("merge", "--every-tensor", "--operator", "linear", "b1")
    out = checked_out(repo)
    for name in ("w", "b"):  # 'b' changed on b1 only, and is still averaged
        np.testing.assert_allclose(out[name], (base[name] + versions["b1"][name]) / 2, rtol=1e-6)
    assert out["step"].tobytes() == base["step"].tobytes()  # identical everywhere: copied
    assert len(repo.git("rev-list", "--parents", "-n1", "HEAD").stdout.split()) == 3


def test_conflicts_and_bad_input_leave_everything_untouched(repo, history):
    repo.git("checkout", "-q", "b2")
    repo.file("notes.txt").write_text("something else\n")
    repo.commit("notes on b2")
    repo.git("checkout", "-q", "main")
    head = repo.git("rev-parse", "HEAD").stdout
    proc = repo.theta("merge", "--operator", "ties", "b1", "b2", check=False)
    assert proc.returncode == 1
    assert "notes.txt" in proc.stderr and "changed differently in b1, b2" in proc.stderr
    proc = repo.theta("merge", "b1", "b3", check=False)  # no operator configured
    assert proc.returncode == 1 and "w: changed in b1, b3; no merge operator is configured" in proc.stderr
    proc = repo.theta("merge", "--operator", "tie", "b1", "b3", check=False)
    assert proc.returncode == 2 and "unknown merge operator 'tie'" in proc.stderr and "ties" in proc.stderr
    proc = repo.theta("merge", "--operator", "della", "--param", "density=0.1", "b1", "b3", check=False)
    assert proc.returncode == 2 and "epsilon" in proc.stderr
    proc = repo.theta("merge", "--operator", "ties", "nope", check=False)
    assert proc.returncode == 2 and "not a commit: 'nope'" in proc.stderr
    assert repo.git("rev-parse", "HEAD").stdout == head
    assert repo.status() == ""


def test_merge_files_outside_history(tmp_path, git_env, repo):
    base = model(0)
    a = dict(base, w=moved(base["w"], 1), b=moved(base["b"], 2))
    b = dict(base, w=moved(base["w"], 3))
    for name, tensors in (("base", base), ("a", a), ("b", b)):
        save_safetensors(tmp_path / f"{name}.safetensors", tensors, metadata={"format": "pt"})
    out = tmp_path / "out.safetensors"
    args = [
        "--base",
        str(tmp_path / "base.safetensors"),
        str(tmp_path / "a.safetensors"),
        str(tmp_path / "b.safetensors"),
    ]
    repo.theta("merge-files", "--operator", "task_arithmetic", *args, "-o", str(out), cwd=tmp_path)
    merged = load_file(str(out))
    np.testing.assert_array_equal(merged["w"], base["w"] + ((a["w"] - base["w"]) + (b["w"] - base["w"])))
    assert merged["b"].tobytes() == a["b"].tobytes()
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        assert f.metadata() == {"format": "pt"}
    out.unlink()
    proc = repo.theta("merge-files", "--operator", "ties", *args[2:], "-o", str(out), cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "ties needs a base" in proc.stderr and not out.exists()
    repo.theta("merge-files", "--operator", "linear", *args[2:], "-o", str(out), cwd=tmp_path)
    np.testing.assert_allclose(load_file(str(out))["w"], (a["w"] + b["w"]) / 2, rtol=1e-6)
