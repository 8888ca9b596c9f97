"""``git theta install`` / ``uninstall``: the git config entries that hook git-theta into git.

Install is idempotent and touches only its own keys; uninstall removes a key only when it still
holds the value install wrote, so a user's own edits are left alone.
"""

from .repo import run_git

# key -> value written by install. Driver entries are added here as the commands exist.
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


def _entries(extras=()):
    entries = dict(CONFIG)
    for name in extras:
        entries.update(OPTIONAL[name])
    return entries


def install(scope="global", cwd=None, extras=()):
    """Write the config entries (plus the ``OPTIONAL`` groups named in ``extras``); return the keys
    that changed."""
    changed = []
    for key, value in _entries(extras).items():
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
        if current == value:
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
