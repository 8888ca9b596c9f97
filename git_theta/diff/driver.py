"""The external diff command git runs for ``diff=theta`` files once ``git theta install --diff`` has
set ``diff.theta.command``.

git calls it with ``PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE`` (plus ``NEW-PATH
INFO`` for a rename), from the top of the work tree. A side with a real blob id is read from git by
that id (the file git hands over may be the smudged work-tree copy); a side with the null id is the
work-tree file itself and is cleaned in-process. A missing side is ``/dev/null``. The summary is the
one ``git theta diff`` prints; if the tensors cannot be loaded (objects not fetched yet), the names
and counts are printed with a warning and git carries on with the next file.
"""

import os

from git_theta.errors import GitThetaError, UsageError
from git_theta.git.scan import TrackedFile

NULL_HEX = "0" * 40


def _side(repo, cleaner, path, file, hex_id):
    """TrackedFile of one side (or None when it does not exist)."""
    from git_theta.git.snapshots import clean_file, manifest_of

    if file == "/dev/null" or hex_id == ".":
        return None
    if hex_id.strip("0"):
        manifest, problem = manifest_of(repo.read_blob(hex_id), f"{path} ({hex_id[:12]})")
        return TrackedFile(path, hex_id, manifest, problem)
    # The null id: the work-tree file itself (a checkpoint, or a manifest in skip-smudge mode).
    with open(file, "rb") as stream:
        head = stream.read(len("git-theta manifest"))
    if not head.startswith(b"git-theta manifest"):
        return clean_file(cleaner, file)
    with open(file, "rb") as stream:
        manifest, problem = manifest_of(stream.read(), path)
    return TrackedFile(path, None, manifest, problem)


def _use_color(repo):
    """Colour as git would: its pager is running (GIT_PAGER_IN_USE) and color.diff/color.ui allow."""
    import sys

    tty = sys.stdout.isatty() or os.environ.get("GIT_PAGER_IN_USE") == "true"
    out = repo.git("config", "--get-colorbool", "color.diff", "true" if tty else "false", check=False)
    return out.strip() == b"true"


def run(args, out):
    """Print the summary of one file's change to ``out``; return the exit code for git."""
    from git_theta.filter.clean import Cleaner
    from git_theta.diff.compare import Differ
    from git_theta.diff.text import Style, render
    from git_theta.git.repo import Repo

    if len(args) not in (7, 9):
        raise UsageError(
            f"the diff driver takes 7 or 9 arguments from git, got {len(args)}",
            hint="it is meant to be run by git: git config diff.theta.command 'git-theta diff-driver'",
        )
    path, old_file, old_hex, _old_mode, new_file, new_hex, _new_mode = args[:7]
    new_path = args[7] if len(args) == 9 else path
    repo = Repo(".")
    cleaner = Cleaner(repo)
    style = Style(_use_color(repo))
    try:
        old = _side(repo, cleaner, path, old_file, old_hex)
        new = _side(repo, cleaner, new_path, new_file, new_hex)
        header = f"diff --theta a/{path} b/{new_path}"
        out.write(style(header, "bold") + "\n")
        with Differ(repo) as differ:
            try:
                entry = differ.file(path, new_path, old, new)
                warning = None
            except GitThetaError as exc:
                differ.stat = True
                entry = differ.file(path, new_path, old, new)
                warning = exc.message + (f" ({exc.hint})" if exc.hint else "")
        if entry is None:
            out.write("  no tensor changes (the files differ only in how they are stored)\n")
        else:
            out.write(render({"files": [entry]}, style) + "\n")
        if warning:
            out.write(style(f"  warning: numbers unavailable: {warning}", "red") + "\n")
        out.flush()
        return 0
    finally:
        cleaner.close()
        repo.close()
