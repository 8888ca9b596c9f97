"""A full disk during ``git add`` is the user's to fix, not a bug (issue 13; docs/security.md).

Uses a real, small file system: a 1 MiB tmpfs mounted over the object store (or as TMPDIR, where
clean spools a ``.pt``). Mounting needs root; without it these tests skip and say so.
"""

import os
import subprocess

import numpy as np
import pytest

from conftest import save_safetensors


@pytest.fixture
def small_fs(tmp_path):
    """Mount 1 MiB tmpfs file systems on demand; unmounted at the end."""
    mounted = []

    def mount(path):
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        if os.path.ismount(path):
            subprocess.run(["umount", str(path)], check=True)


def _one_error(stderr, mount):
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "internal error" not in stderr and "bug report" not in stderr, stderr
    assert f"mounted at {mount}" in errors[0] and "nothing was changed" in errors[0], stderr
    assert any(line.startswith("hint:") and "run the command again" in line for line in stderr.splitlines())


def test_full_object_store_during_git_add(repo, small_fs):
    store = small_fs(repo.path / ".git" / "theta" / "objects")
    rng = np.random.default_rng(0)
    save_safetensors(repo.file("model.safetensors"), {"w": rng.standard_normal((512, 1024)).astype("float32")})
    result = repo.git("add", "model.safetensors", check=False)
    assert result.returncode != 0
    _one_error(result.stderr, store)
    assert repo.status() == "?? model.safetensors\n"  # nothing staged
    assert not list((repo.path / ".git" / "theta").glob("logs/*.log"))  # no crash log
    assert not any(p.is_file() for p in (store / "tmp").rglob("*"))  # the partial object is gone
    subprocess.run(["umount", str(store)], check=True)  # space again: the same command now works
    repo.git("add", "model.safetensors")
    assert repo.status() == "A  model.safetensors\n"


def test_full_tmpdir_when_cleaning_a_pt(repo, small_fs, tmp_path):
    torch = pytest.importorskip("torch")
    tmp = small_fs(tmp_path / "small-tmp")
    torch.save({"w": torch.zeros(512, 1024)}, repo.file("model.pt"))
    repo.env = dict(repo.env, TMPDIR=str(tmp))
    result = repo.git("add", "model.pt", check=False)
    assert result.returncode != 0
    _one_error(result.stderr, tmp)
    assert "TMPDIR" in result.stderr
    assert repo.status() == "?? model.pt\n"
    assert not list(tmp.iterdir())  # the spool file is gone
