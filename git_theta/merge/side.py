"""Side data for merge operators: tensors from files stored next to the checkpoint on each side.

An operator that declares ``side_files = ("fisher.safetensors",)`` is called as
``merge(models, base, params, rng, side=...)`` where ``side`` maps each of those file names to a
list aligned with ``models``: the values (float32; float64 for F64) of the tensor **with the same
name** in that file, as the file is on that model's side, or None when the side has no such file
or tensor. The file is looked up in the checkpoint's own folder (``a/b/model.safetensors`` ->
``a/b/fisher.safetensors``). It may itself be tracked by git-theta (a manifest; its tensors are read
from the store) or be a plain checkpoint committed as is (any installed format reads it).

Where the sides come from: the porcelain (``git theta merge``) knows the commits it merges. git's
merge driver only gets three temporary files, so :meth:`SideData.for_driver` looks for the commit
of each side: ours is ``HEAD``; theirs is the ``GITHEAD_<commit>`` that ``git merge`` exports to
its merge machinery, else ``MERGE_HEAD``/``CHERRY_PICK_HEAD``/``REVERT_HEAD``/``REBASE_HEAD``,
else (cherry-pick and rebase write those only after merging) a recent commit of any branch or
``ORIG_HEAD`` that touched the checkpoint. A commit is used only if the checkpoint there is exactly
the manifest git handed the driver, so the wrong side files are never read (a criss-cross merge's
virtual base, which is no commit, gets None). The lookup runs only when an operator asks.
"""

import os
import posixpath

#: refs that name "theirs" while (or after) git runs the merge driver, in lookup order
THEIRS_REFS = ("MERGE_HEAD", "CHERRY_PICK_HEAD", "REVERT_HEAD", "REBASE_HEAD")
#: how many recent commits touching the checkpoint the driver searches for a side's commit
SEARCH_DEPTH = 200


class SideData:
    """Reads side-file tensors of each merge side (``revs[i]`` is the commit of side i, or None)."""

    def __init__(self, repo, revs):
        self.repo = repo
        self._revs = revs if callable(revs) else list(revs)
        self._files = {}  # (rev, path) -> Manifest, {name: TensorData} or None

    @property
    def revs(self):
        if callable(self._revs):
            self._revs = list(self._revs())
        return self._revs

    @classmethod
    def for_driver(cls, repo, path, manifests):
        """Side commits for git's merge driver merging ``manifests`` (ours, theirs) of ``path``."""
        return cls(repo, lambda: [_find_commit(repo, path, m, ours=i == 0) for i, m in enumerate(manifests)])

    def tensors(self, files, path, name, indices):
        """{file: [values or None for each side in ``indices``]} for tensor ``name`` of ``path``."""
        folder = posixpath.dirname(path)
        return {
            file: [
                self._values(self.revs[i] if i < len(self.revs) else None, posixpath.join(folder, file), name)
                for i in indices
            ]
            for file in files
        }

    def describe(self, index):
        """Which commit side ``index`` reads its side files from (for error messages)."""
        rev = self.revs[index] if index < len(self.revs) else None
        return rev or "no commit (the side is not a commit, e.g. a criss-cross virtual base)"

    def _values(self, rev, file_path, name):
        import numpy as np

        from git_theta.tensors.bits import to_float
        from git_theta.updates.chain import decode_tensor
        from git_theta.manifest import Manifest

        if rev is None:
            return None
        key = (rev, file_path)
        if key not in self._files:
            self._files[key] = self._load(rev, file_path)
        content = self._files[key]
        if content is None:
            return None
        if isinstance(content, Manifest):
            entry = content.tensors.get(name)
            if entry is None:
                return None
            data, dtype, shape = decode_tensor(self.repo.store, entry, file_path), entry.dtype, entry.shape
        else:
            tensor = content.get(name)
            if tensor is None:
                return None
            data, dtype, shape = tensor.data, tensor.dtype, tensor.shape
        return to_float(data, dtype, shape, np.float64 if dtype == "F64" else np.float32)

    def _load(self, rev, file_path):
        """The side file at ``rev``: its Manifest, {name: TensorData} for a plain checkpoint, or None."""
        import io

        from git_theta.formats.detect import SNIFF_BYTES, detect_format
        from git_theta.manifest import Manifest, is_manifest

        data = self.repo.read_blob(f"{rev}:{file_path}")
        if data is None:
            return None
        if is_manifest(data):
            return Manifest.parse(data, source=f"{rev}:{file_path}")
        fmt = detect_format(None, file_path, data[:SNIFF_BYTES])
        return {t.name: t for t in fmt.split(io.BytesIO(data), file_path).tensors()}


def _find_commit(repo, path, manifest, ours):
    """A commit whose ``path`` is exactly ``manifest``, or None."""
    wanted = manifest.serialize()
    if ours:
        candidates = ["HEAD"]
    else:
        # git merge exports GITHEAD_<commit>=<name> for each commit it merges (git's protocol with
        # its merge machinery, not a setting).
        candidates = [key[len("GITHEAD_") :] for key in sorted(os.environ) if key.startswith("GITHEAD_")]
        candidates += list(THEIRS_REFS)
    for rev in candidates:
        if repo.read_blob(f"{rev}:{path}") == wanted:
            return rev
    if ours:
        return None
    extra = ["ORIG_HEAD"] if repo.read_blob("ORIG_HEAD") is not None else []
    log = repo.git("log", f"-n{SEARCH_DEPTH}", "--format=%H", "--all", *extra, "--", path, check=False)
    for rev in log.decode().split():
        if repo.read_blob(f"{rev}:{path}") == wanted:
            return rev
    return None


def find_base_commit(repo, path, manifest, theirs_commit):
    """The commit git used as the merge base of ``path``, when it is exactly ``manifest`` there:
    in ``git merge`` (which exports ``GITHEAD_*``) the single merge base of HEAD and
    ``theirs_commit``; in a cherry-pick or rebase its parent. None otherwise: several merge bases
    mean a criss-cross merge's virtual base, which is no commit, and a revert's base is no parent."""
    wanted = manifest.serialize()
    if any(key.startswith("GITHEAD_") for key in os.environ):
        candidates = repo.git("merge-base", "--all", "HEAD", theirs_commit, check=False).decode().split()
        if len(candidates) != 1:
            return None
    else:
        candidates = repo.git("rev-parse", f"{theirs_commit}^@", check=False).decode().split()
    for rev in candidates:
        if repo.read_blob(f"{rev}:{path}") == wanted:
            return rev
    return None
