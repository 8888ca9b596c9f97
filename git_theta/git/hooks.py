"""Placing git-theta's hooks in a repository without clobbering the user's.

The scripts live in the top-level ``hooks/`` folder, packaged as ``git_theta/hooks`` (a link to it).

The hooks directory is git's (``git rev-parse --git-path hooks``, so ``core.hooksPath`` is honoured).
For each hook: absent -> ours is written; ours (any version) -> refreshed; somebody else's ->
``install`` moves it to ``<hook>.local``, which our script runs first with the same arguments and
input (chaining), and refuses with a hint when ``<hook>.local`` is taken too. The automatic install
(from the filter, so a fresh clone can push) never moves a user's hook: it only fills an empty slot.
"""

import os
import stat
import tempfile
from pathlib import Path

from git_theta.errors import UsageError

HOOKS = ("pre-push",)
MARKER = "git-theta pre-push hook"
SOURCE = Path(__file__).parent.parent / "hooks"


def _ours(path):
    try:
        return MARKER in path.read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return False


def _write(dest, content):
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-")
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dest)


def install_hooks(repo, chain=True):
    """Install the hooks; returns a list of ``(hook, what happened)``."""
    folder = repo.hooks_dir  # git's own (core.hooksPath honoured), asked by Repo
    folder.mkdir(parents=True, exist_ok=True)
    report = []
    for name in HOOKS:
        content = (SOURCE / name).read_text()
        dest = folder / name
        if dest.exists() or dest.is_symlink():
            if dest.is_file() and dest.read_text(errors="replace") == content:
                continue
            if not _ours(dest):
                local = folder / (name + ".local")
                if not chain:
                    report.append(
                        (name, f"left alone: {dest} is not git-theta's (run 'git theta install' to chain it)")
                    )
                    continue
                if local.exists() or local.is_symlink():
                    raise UsageError(
                        f"cannot install the {name} hook: {dest} and {local} both exist",
                        hint=f"merge them into {local}, delete {dest}, and run 'git theta install' again",
                    )
                os.replace(dest, local)
                if local.is_file():
                    local.chmod(local.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                report.append((name, f"your hook moved to {local}; it still runs first"))
        _write(dest, content)
        report.append((name, f"installed {dest}"))
    return report


def ensure_hooks(repo):
    """The quiet automatic install: fills empty hook slots, never raises."""
    try:
        if repo.work_tree is not None:
            install_hooks(repo, chain=False)
    except Exception:  # noqa: BLE001 - a hook we could not place must not fail a checkout
        pass


def uninstall_hooks(repo):
    """Remove our hooks; a chained ``<hook>.local`` goes back in place. Returns what happened."""
    folder = repo.hooks_dir
    report = []
    for name in HOOKS:
        dest = folder / name
        if not _ours(dest):
            continue
        dest.unlink()
        local = folder / (name + ".local")
        if local.exists():
            os.replace(local, dest)
            report.append((name, f"restored your hook {dest}"))
        else:
            report.append((name, f"removed {dest}"))
    return report
