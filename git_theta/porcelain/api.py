"""The Python API behind ``git_theta.load`` and ``git_theta.diff`` (and ``git theta diff``).

Both read manifests through ``git cat-file --batch`` and tensors from the object store; neither
touches the work tree (except that a diff against the work tree cleans the modified files, as
``git status`` would).
"""

import fnmatch
import os
import posixpath

from git_theta.errors import ManifestError, UsageError
from git_theta.git.snapshots import EMPTY, INDEX, WORKTREE, has_head, manifest_of, repo_paths, resolve_commit, snapshot

_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}


def run_diff(repo, old, new, paths=None, stat=False, sort="name", by_file=False):
    """The diff dict between two sides (revisions, :data:`INDEX`, :data:`WORKTREE`) of ``repo``:
    by model (a sharded folder is one entry), or file by file with ``by_file``."""
    from git_theta.diff.compare import Differ

    def side(name):
        # Before the first commit HEAD is empty, as for git diff --cached.
        return EMPTY if name == "HEAD" and not has_head(repo) else name

    with Differ(repo, stat=stat, sort=sort, by_file=by_file) as differ:
        a = snapshot(repo, side(old), paths)
        b = snapshot(repo, side(new), paths)
        result = differ.diff(a, b)
    result["old"], result["new"] = old, new
    return result


def _open(repo):
    from git_theta.git.repo import Repo

    return Repo(repo) if isinstance(repo, (str, os.PathLike)) else repo


def diff(path=None, rev_a="HEAD", rev_b=WORKTREE, repo=".", stat=False, sort="name", by_file=False):
    """What ``git theta diff --json`` prints, as a dict (schema: README and docs/models.md)."""
    r = _open(repo)
    try:
        paths = None
        if path is not None:
            paths = repo_paths(r, [path] if isinstance(path, (str, os.PathLike)) else list(path), cwd=_cwd(repo))
        return run_diff(r, rev_a, rev_b, paths=paths, stat=stat, sort=sort, by_file=by_file)
    finally:
        if r is not repo:
            r.close()


def _cwd(repo):
    return os.fspath(repo) if isinstance(repo, (str, os.PathLike)) else None


def read_manifest(repo, path, rev):
    """The manifest of repository path ``path`` at ``rev`` (None: the index); typed errors."""
    spec = f":{path}" if rev in (None, INDEX) else f"{resolve_commit(repo, rev)}:{path}"
    where = "the index" if rev in (None, INDEX) else rev
    manifest, problem = manifest_of(repo.read_blob(spec), f"{path} at {where}")
    if manifest is None:
        if problem == "missing":
            raise UsageError(
                f"{path}: not in {where}",
                hint="list the tracked checkpoints there with 'git theta ls-files " + (rev or "") + "'",
            )
        raise ManifestError(f"{path} at {where}: {problem}", hint="only files stored by git-theta can be loaded")
    return manifest


def select(names, params):
    """The names matching ``params`` (exact names or fnmatch globs); UsageError for a pattern that
    matches nothing."""
    if params is None:
        return list(names)
    if isinstance(params, str):
        params = [params]
    chosen = []
    for pattern in params:
        hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UsageError(f"no tensor matches {pattern!r}", hint="list the names with git_theta.load(...).keys()")
        chosen.extend(h for h in hits if h not in chosen)
    return sorted(chosen)


def load(path, rev="HEAD", repo=".", params=None, framework="numpy", upcast=False):
    """{name: tensor} of checkpoint ``path`` at ``rev``, bit-identical, without touching the work tree.

    ``path`` may be a file, or a model of several files: its folder or its index json (all the
    shards' tensors by name; ``params`` selects across shards).

    ``framework="numpy"`` gives numpy arrays; bf16 and float8 tensors (no numpy dtype) come back as
    their raw bit patterns (uint16 / uint8) unless ``upcast=True`` (float32, exact). ``"torch"``
    gives torch tensors of the stored dtype (torch.bfloat16, torch.float8_e4m3fn, ...).
    """
    if framework not in ("numpy", "torch"):
        raise UsageError(f"unknown framework {framework!r}", hint="use 'numpy' or 'torch'")
    r = _open(repo)
    try:
        (rel,) = repo_paths(r, [path], cwd=_cwd(repo))
        model = _model_at(r, rel, rev)
        if model is None:
            manifest = read_manifest(r, rel, rev)
            names = select(list(manifest.tensors), params)
            return dict(_tensors(r, manifest, names, rel, framework, upcast))
        # A model of several files: every shard's tensors by name, read shard by shard.
        from git_theta.git.models import tensors_of

        manifests = {p: read_manifest(r, p, rev) for p in model.files}
        located = tensors_of(model, manifests)
        names = select(list(located), params)
        result = {}
        for shard in model.files:
            wanted = [n for n in names if located[n][0] == shard]
            if wanted:
                result.update(_tensors(r, manifests[shard], wanted, shard, framework, upcast))
        return {n: result[n] for n in names}
    finally:
        if r is not repo:
            r.close()


def _model_at(repo, path, rev):
    """The model of several files ``path`` names at ``rev`` (a folder or an index json), or None
    when it names a single file (or nothing: :func:`read_manifest` reports that)."""
    from git_theta.git.models import group, model_for_path, sidecars_at
    from git_theta.git.scan import tracked_files, version_paths

    commit = None if rev in (None, INDEX) else resolve_commit(repo, rev)
    paths = version_paths(repo, commit)
    path = "" if path == "." else path.rstrip("/")
    if path in paths:
        if not path.endswith(".json"):
            return None  # a file: the file itself, as before
        folder = posixpath.dirname(path)
    elif path == "" or any(p.startswith(path + "/") for p in paths):
        folder = path
    else:
        return None  # nothing there: read_manifest says so
    inside = [p for p in paths if posixpath.dirname(p) == folder]
    files = [t.path for t in tracked_files(repo, commit, paths=inside)]
    models = group(files, sidecars_at(repo, commit, inside), exists=paths.__contains__)
    model = model_for_path(models, path)
    if model is None:
        if not files:
            return None
        where = "the index" if commit is None else rev
        raise UsageError(
            f"{path}: names no single model at {where} (models there: {', '.join(m.name for m in models)})",
            hint="name one of those models, a file, or an index json",
        )
    return model


def _tensors(repo, manifest, names, path, framework, upcast):
    from concurrent.futures import ThreadPoolExecutor

    from git_theta.config import settings_for
    from git_theta.filter.smudge import StoreTensorSource

    settings = settings_for(repo)
    with ThreadPoolExecutor(settings.threads(), thread_name_prefix="theta-load") as pool:
        source = StoreTensorSource(
            manifest, repo.store, pool, path, settings.get_int("memoryBudget"), workers=settings.threads()
        )
        for name, data in source.iter_data(names):
            entry = manifest.tensors[name]
            yield name, _convert(data, entry.dtype, entry.shape, framework, upcast)


def _convert(data, dtype_name, shape, framework, upcast):
    """Raw bytes as a numpy array or torch tensor (no copy when the bytes are writable)."""
    import numpy as np

    from git_theta.dtypes import get_dtype

    if not isinstance(data, bytearray):
        data = bytearray(data)  # writable, so torch and numpy users may modify it
    dtype = get_dtype(dtype_name)
    if framework == "torch":
        import torch

        raw = torch.from_numpy(np.frombuffer(data, dtype=np.uint8))
        return raw.view(getattr(torch, _TORCH_DTYPES[dtype_name])).reshape(tuple(shape))
    if dtype.numpy_name is None:
        if upcast:
            from git_theta.tensors.bits import to_float

            return to_float(data, dtype_name, tuple(shape), precision=np.float32)
        return np.frombuffer(data, dtype=dtype.bits_name).reshape(tuple(shape))
    return np.frombuffer(data, dtype=dtype.numpy_name).reshape(tuple(shape))
