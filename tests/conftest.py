"""Shared fixtures: an isolated environment for real git, temporary repositories, small checkpoints.

Every end-to-end test runs git with its own HOME, no system config, no terminal prompts and no
inherited GIT_DIR, and with the interpreter under test first on PATH so ``git-theta`` is the code
being tested (DESIGN §10).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

GIT_THETA = shutil.which("git-theta", path=os.path.dirname(sys.executable)) or shutil.which("git-theta")

#: fixtures that drive real git: a test using any of them (directly or through another fixture)
#: is an end-to-end test. ``python -m pytest -m "not e2e"`` is the fast unit loop.
E2E_FIXTURES = {"git_env"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses the real-git fixtures ``e2e`` (see CONTRIBUTING.md)."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def git_env(tmp_path):
    """Environment variables for an isolated git (fresh HOME with user.name/email set)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "THETA", "GIT_THETA"))}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
        GIT_AUTHOR_NAME="Test",
        GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="Test",
        GIT_COMMITTER_EMAIL="test@example.invalid",
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
    )
    (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n[advice]\n\tdetachedHead = false\n")
    return env


class GitRepo:
    """A temporary git repository driven through real git commands."""

    def __init__(self, path, env):
        self.path = Path(path)
        self.env = env

    def run(self, *args, check=True, input=None, cwd=None):
        """Run a command in the repository; return CompletedProcess (text output)."""
        proc = subprocess.run(
            list(args),
            cwd=cwd or self.path,
            env=self.env,
            input=input,
            capture_output=True,
            text=isinstance(input, str) or input is None,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, args))} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def git(self, *args, **kwargs):
        return self.run("git", *args, **kwargs)

    def theta(self, *args, **kwargs):
        return self.run("git", "theta", *args, **kwargs)

    def show(self, spec):
        """Raw bytes git stores for ``spec`` (e.g. HEAD:model.safetensors)."""
        return subprocess.run(
            ["git", "cat-file", "-p", spec], cwd=self.path, env=self.env, capture_output=True, check=True
        ).stdout

    def status(self):
        return self.git("status", "--porcelain").stdout

    def commit(self, message, *paths):
        self.git("add", *(paths or ["-A"]))
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD").stdout.strip()

    def file(self, name):
        return self.path / name


@pytest.fixture
def repo(tmp_path, git_env):
    """A fresh repository with git-theta installed locally and *.safetensors/*.pt/*.npz tracked."""
    path = tmp_path / "repo"
    path.mkdir()
    r = GitRepo(path, git_env)
    r.git("init", "-q")
    r.theta("install", "--local")
    r.theta("track", "*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.npz")
    r.commit("track checkpoints", ".gitattributes")
    return r


@pytest.fixture
def make_repo(tmp_path, git_env):
    """Factory for more repositories (clones, remotes) in the same isolated environment."""

    def make(name, init=True):
        path = tmp_path / name
        path.mkdir()
        r = GitRepo(path, git_env)
        if init:
            r.git("init", "-q")
            r.theta("install", "--local")
        return r

    return make


def random_state_dict(seed=0, shapes=None, dtype="float32"):
    """A small dict of numpy arrays, deterministic for a seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = shapes or {
        "embed.weight": (64, 16),
        "layer.0.weight": (16, 16),
        "layer.0.bias": (16,),
        "head.weight": (8, 16),
    }
    return {name: (rng.standard_normal(shape) * 0.02).astype(dtype) for name, shape in shapes.items()}


def damage_object(repo_path, oid, at=-3):
    """Flip a bit of stored object ``oid`` (a pack, say) in the repository at ``repo_path``."""
    path = Path(repo_path) / ".git" / "theta" / "objects" / oid[:2] / oid[2:4] / oid
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def save_safetensors(path, tensors, metadata=None):
    """Write numpy arrays as safetensors with the safetensors library (byte-canonical output)."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def cached_repo(tmp_path_factory, tmp_path, git_env):
    """Factory: ``cached_repo(name, build)`` gives this test its own copy of a repository that
    ``build(GitRepo)`` filled once per test process (starts from the ``repo`` fixture's set-up).

    Saves the git and git-theta start-ups of building the same history in every test; each test
    still works on a private copy.
    """

    def make(name, build):
        template = tmp_path_factory.getbasetemp() / f"template-{name}"
        if not template.exists():
            building = tmp_path_factory.mktemp(f"building-{name}")
            r = GitRepo(building, git_env)
            r.git("init", "-q")
            r.theta("install", "--local")
            r.theta("track", "*.safetensors", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.npz")
            r.commit("track checkpoints", ".gitattributes")
            build(r)
            building.rename(template)
        path = tmp_path / name
        shutil.copytree(template, path, symlinks=True)
        return GitRepo(path, git_env)  # stat data in the index is stale: git re-checks content

    return make
