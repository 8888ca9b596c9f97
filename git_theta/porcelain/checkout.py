"""Writing checkpoints into the work tree directly (``git theta checkout`` / ``pull``).

git buffers a whole smudged file in memory; for huge checkpoints the smudge is skipped
(``theta.skipSmudge``) and these commands write the files instead: into a temp file in the same
directory, then renamed over the path, so a reader never sees half a file and a symlink at the path
is replaced, never written through. A path whose directories leave the work tree through a symlink
is refused. The index is refreshed afterwards so ``git status`` stays clean.
"""

import os
import tempfile
from pathlib import Path

from git_theta.errors import UsageError
from git_theta.manifest import is_manifest


def needs_writing(repo, path):
    """True when the work-tree file is absent or still holds a manifest (smudge was skipped)."""
    target = repo.work_tree / path
    if target.is_symlink() or not target.exists():
        return True
    try:
        with open(target, "rb") as handle:
            return is_manifest(handle.read(64))
    except OSError:
        return True


def _check_parents(repo, path):
    root = repo.work_tree
    current = root
    for part in Path(path).parts[:-1]:
        current = current / part
        if current.is_symlink():
            raise UsageError(
                f"{path}: not written, its directory {current.relative_to(root)} is a symbolic link",
                hint="replace the link with a real directory, then run git theta checkout again",
            )


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def remove_stale_temps(target):
    """Delete temp files a killed run left beside ``target``.

    A temp file's name carries its writer's pid (``.<name>.theta-<pid>-*``); one whose writer is no
    longer running is a leftover. A live pid (another checkout of the same path, or a reused pid)
    keeps its file: deleting a file being written would be worse than leaving a stale one.
    """
    prefix = f".{target.name}.theta-"
    try:
        siblings = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in siblings:
        if not entry.name.startswith(prefix) or not entry.is_file(follow_symlinks=False):
            continue
        pid = entry.name[len(prefix) :].partition("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def write_file(repo, smudger, path, manifest, fmt):
    """Write the checkpoint of ``manifest`` at ``path`` (temp file + rename)."""
    _check_parents(repo, path)
    target = repo.work_tree / path
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.theta-{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as out:
            smudger.write(manifest, fmt, path, out)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def refresh_index(repo, paths):
    """Re-add the rewritten ``paths`` so the index has their new stat data.

    ``update-index --refresh`` is not enough: the index still records the manifest's size, and git
    treats a size change as a modification without looking at the content. Re-adding runs clean,
    which gives back the very manifest the index holds, so nothing is staged that was not.
    """
    if paths:
        repo.git("update-index", "-q", "-z", "--stdin", input="\0".join(paths).encode() + b"\0")
