"""Which writes of a checkpoint are atomic (issue 13; docs/security.md, "Nothing lost").

``git theta checkout`` writes a temp file beside the target and renames it over the target: a
SIGKILL at any point leaves the old file whole or the new one whole. ``git checkout`` writes the
file itself, from the filter's output, under its real name: killing *git* mid-write leaves a
truncated file (git's behaviour, measured by hand and described in the docs, not tested here: it
needs a kill timed against git's write).
"""

import subprocess

import pytest

from conftest import random_state_dict, save_safetensors

TENSORS = 4  # random_state_dict() has 4 tensors: one crash point each while smudge writes


@pytest.mark.parametrize("n", range(1, TENSORS + 1))
def test_git_theta_checkout_killed_midway_leaves_a_whole_file(repo, n):
    versions = {}
    for seed in (1, 2):
        save_safetensors(repo.file("model.safetensors"), random_state_dict(seed))
        versions[seed] = repo.file("model.safetensors").read_bytes()
        repo.commit(f"v{seed}", "model.safetensors")
    repo.git("reset", "-q", "HEAD~1")  # the index names v1; the work tree still holds v2
    env = dict(repo.env, GIT_THETA_TEST_KILL_AT=str(n), GIT_THETA_THREADS="1")
    proc = subprocess.run(["git", "theta", "checkout", "--force", "model.safetensors"],
                          cwd=repo.path, env=env, capture_output=True)
    assert proc.returncode != 0 and b"signal 9" in proc.stderr, proc.stderr  # killed writing tensor n
    assert repo.file("model.safetensors").read_bytes() == versions[2]  # the old file, whole
    leftovers = [p.name for p in repo.path.iterdir() if ".theta-" in p.name]
    assert all(name.startswith(".model.safetensors.theta-") for name in leftovers)  # the documented name
    for name in leftovers:
        (repo.path / name).unlink()
    repo.theta("checkout", "--force", "model.safetensors")  # running it again succeeds
    assert repo.file("model.safetensors").read_bytes() == versions[1]
    assert repo.status() == ""
