"""``git theta install`` / ``uninstall``: the git config entries that hook git-theta into git.

Install is idempotent and touches only its own keys; uninstall removes a key only when it still
holds a value install writes, so a user's own edits are left alone.

The commands are recorded with the absolute path of the installed ``git-theta`` executable, so git
finds it when the virtual environment it lives in is not active (a bare ``git-theta`` then fails
every git command on a tracked file with "git-theta: not found"). ``portable=True`` (``install
--portable``) records the bare name instead, for a global config shared between machines.
"""

import os
import re
import shlex
import shutil
import sys

from git_theta.git.repo import run_git

COMMAND = "git-theta"

# key -> value written by install, with the bare command name (replaced by the executable's path
# unless portable). Driver entries are added here as the commands exist.
CONFIG = {
    "filter.theta.process": "git-theta filter-process",
    "filter.theta.clean": "git-theta clean %f",
    "filter.theta.smudge": "git-theta smudge %f",
    "filter.theta.required": "true",
    "merge.theta.name": "git-theta model merge driver",
    "merge.theta.driver": "git-theta merge-driver %O %A %B %L %P",
}

# Opt-in entries: ``git theta install --diff`` makes plain ``git diff`` print the git-theta summary
# for tracked checkpoints (an external diff command: git diff --stat, git log -p and git show keep
# showing manifest lines, and git diff --no-ext-diff shows them too).
OPTIONAL = {
    "diff": {"diff.theta.command": "git-theta diff-driver"},
}


def _scope_args(scope):
    return ["--local"] if scope == "local" else ["--global"]


def _get(key, scope, cwd):
    out = run_git(["config", *_scope_args(scope), "--get", key], cwd=cwd, check=False)
    return out.decode().strip() if out else None


def executable():
    """The absolute path of the ``git-theta`` executable of this installation: the console script
    next to the running interpreter (a venv's bin/), else the one on PATH, else the bare name."""
    beside = os.path.join(os.path.dirname(sys.executable), COMMAND)
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return os.path.abspath(beside)
    found = shutil.which(COMMAND)
    return os.path.abspath(found) if found else COMMAND


def _entries(extras=(), command=COMMAND):
    entries = dict(CONFIG)
    for name in extras:
        entries.update(OPTIONAL[name])
    # git runs these through the shell: a path with spaces must be quoted
    prefix = shlex.quote(command)
    return {
        key: prefix + value[len(COMMAND) :] if value.startswith(COMMAND + " ") else value
        for key, value in entries.items()
    }


#: a recorded command: the bare name or a path ending in /git-theta, optionally shell-quoted
_RECORDED = re.compile(r"^(?:'[^']*/)?(?:[^\s']*/)?git-theta'? ")


def _written_by_install(current, value):
    """True when ``current`` is ``value`` as some install wrote it (any recorded executable)."""
    if current == value:
        return True
    if not value.startswith(COMMAND + " "):
        return False
    match = _RECORDED.match(current)
    return bool(match) and current[match.end() :] == value[len(COMMAND) + 1 :]


def install(scope="global", cwd=None, extras=(), portable=False):
    """Write the config entries (plus the ``OPTIONAL`` groups named in ``extras``); return the keys
    that changed. The commands name this installation's executable by absolute path unless
    ``portable``."""
    changed = []
    for key, value in _entries(extras, COMMAND if portable else executable()).items():
        if _get(key, scope, cwd) != value:
            run_git(["config", *_scope_args(scope), key, value], cwd=cwd)
            changed.append(key)
    return changed


def uninstall(scope="global", cwd=None):
    """Remove the entries install wrote (and left unchanged); return (removed, kept) keys."""
    removed, kept = [], []
    everything = _entries(OPTIONAL)
    for key, value in everything.items():
        current = _get(key, scope, cwd)
        if current is None:
            continue
        if _written_by_install(current, value):
            run_git(["config", *_scope_args(scope), "--unset-all", key], cwd=cwd)
            removed.append(key)
        else:
            kept.append(key)
    for section in sorted({k.rsplit(".", 1)[0] for k in everything}):
        left = run_git(
            ["config", *_scope_args(scope), "--get-regexp", "^" + section.replace(".", r"\.") + r"\."],
            cwd=cwd,
            check=False,
        )
        if not left.strip():
            run_git(["config", *_scope_args(scope), "--remove-section", section], cwd=cwd, check=False)
    return removed, kept
