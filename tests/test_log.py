"""git theta log: the commits that changed a tensor or a group, with sizes, across a merge."""

import re
import json

import numpy as np
import pytest
from conftest import save_safetensors

NAMES = ["a.weight", "b.weight", "m.weight", "n.weight", "y.weight", "z.weight"]


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((8, 4)).astype(np.float32) for n in NAMES}


def _states():
    """The checkpoint at each commit of the history built below."""
    c1 = _state()
    c2 = dict(c1, **{"z.weight": c1["z.weight"] * 1.1})  # side branch
    a3 = c1["a.weight"].copy()
    a3[0, 0] += 1.0
    c3 = dict(c1, **{"a.weight": a3})  # main
    merged = dict(c1, **{"a.weight": a3, "z.weight": c2["z.weight"], "m.weight": c1["m.weight"] + 0.5})
    c4 = dict(merged, **{"a.weight": a3 * 2})
    return {"c1": c1, "c2": c2, "c3": c3, "merge": merged, "c4": c4}


def _build(repo):
    s = _states()
    path = repo.file("model.safetensors")
    save_safetensors(path, s["c1"])
    repo.commit("c1")
    repo.git("checkout", "-q", "-b", "side")
    save_safetensors(path, s["c2"])
    repo.commit("c2")
    repo.git("checkout", "-q", "main")
    save_safetensors(path, s["c3"])
    repo.commit("c3")
    # The merge takes a.weight from main, z.weight from side, and makes a new m.weight itself.
    repo.git("merge", "-q", "--no-commit", "side")
    save_safetensors(path, s["merge"])
    repo.git("add", "model.safetensors")
    repo.git("commit", "-q", "-m", "merge side")
    save_safetensors(path, s["c4"])
    repo.commit("c4")


@pytest.fixture
def history_repo(cached_repo):
    return cached_repo("history", _build)


def log(repo, *args):
    return json.loads(repo.theta("log", "--json", *args).stdout)


def rel(old, new):
    return np.linalg.norm(new.astype(np.float64) - old) / np.linalg.norm(old.astype(np.float64))


def test_log_follows_merges_per_tensor(history_repo):
    """One test (one history built per process): JSON across the merge, then text and errors."""
    repo, s = history_repo, _states()
    everything = log(repo)
    assert everything["schema"] == 1
    assert [c["subject"] for c in everything["commits"]] == ["c4", "merge side", "c3", "c2", "c1"]
    merge = everything["commits"][1]
    assert merge["merge"] and len(merge["parents"]) == 2
    # The merge shows only what it made new: m.weight (a and z came from the parents unchanged).
    assert [t["name"] for t in merge["files"][0]["tensors"]] == ["m.weight"]

    a = log(repo, "model.safetensors", "--param", "a.weight")["commits"]
    assert [c["subject"] for c in a] == ["c4", "c3", "c1"]
    (c4_tensor,) = a[0]["files"][0]["tensors"]
    assert c4_tensor["stats"]["relative_change"] == pytest.approx(rel(s["c3"]["a.weight"], s["c4"]["a.weight"]))
    assert a[1]["files"][0]["tensors"][0]["stats"]["fraction_changed"] == pytest.approx(1 / 32)
    assert a[2]["files"][0]["tensors"][0]["status"] == "added"

    z = log(repo, "--param", "z.*")["commits"]
    assert [c["subject"] for c in z] == ["c2", "c1"]
    assert z[0]["files"][0]["summary"]["relative_change"] == pytest.approx(
        rel(s["c1"]["z.weight"], s["c2"]["z.weight"])
    )
    m = log(repo, "--param", "m.weight", "-n", "1")["commits"]
    assert [c["subject"] for c in m] == ["merge side"]
    assert m[0]["files"][0]["tensors"][0]["stats"]["relative_change"] == pytest.approx(
        rel(s["c3"]["m.weight"], s["merge"]["m.weight"])
    )

    # Text: one header per commit, a row per tensor asked about; errors are error:/hint: lines.
    text = repo.theta("log", "--param", "a.weight", "-n", "2").stdout
    lines = text.splitlines()
    assert "c4" in lines[0] and "\x1b[" not in text
    assert any(line.strip().startswith("a.weight") and "rel.change" in line for line in lines)
    assert not re.search(r"\bc1\b", text)  # -n 2 (word match: a commit hash may contain "c1")
    assert "no commits changed nothing.*" in repo.theta("log", "--param", "nothing.*").stdout
    bad = repo.theta("log", "--rev", "no-such-branch", check=False)
    assert bad.returncode == 2 and "unknown revision 'no-such-branch'" in bad.stderr and "hint:" in bad.stderr
