"""The git merge driver: ``git-theta merge-driver %O %A %B %L %P``.

git calls it for every tracked checkpoint that changed on both sides of a merge, rebase, cherry-pick
or revert, with three temporary files holding the manifests of the merge base (``%O``), ours (``%A``,
also where the result goes) and theirs (``%B``). An empty ``%O`` (or one that is not a manifest)
means there is no common version: every tensor counts as added. In a criss-cross merge git first
merges the merge bases into a virtual base (``%L`` is then 9 instead of 7); the driver behaves the
same there: deterministic, never prompting. The result (conflicting tensors keep ours) is always
written to ``%A``; the caller exits 0 when everything merged, 1 otherwise.

For a file of a model of several files (shards), when the commits of the three sides are known
exactly and git keeps ours' layout, each tensor's base and theirs come by name from the whole model
on that side (:func:`.models.by_name_inputs`), so a tensor a side moved to another shard merges;
otherwise the file merges by itself and such a tensor is a conflict pointing to ``git theta merge``.
"""

from pathlib import Path

from git_theta.errors import ManifestError
from git_theta.manifest import Manifest, is_manifest
from git_theta.merge.config import load_config
from git_theta.merge.engine import FileMerge, Outcome, check_config, engine_options, merge_manifests
from git_theta.merge.side import SideData

LABELS = ("ours", "theirs")


def _manifest(path, what, pathname):
    """The manifest in file ``path``, or None when the file is empty or not a manifest."""
    data = Path(path).read_bytes()
    return Manifest.parse(data, source=f"{pathname} ({what})") if is_manifest(data) else None


def run(repo, base_file, ours_file, theirs_file, pathname):
    """Merge the three manifest files; write the result to ``ours_file``; return the FileMerge."""
    ours = _manifest(ours_file, "ours", pathname)
    theirs = _manifest(theirs_file, "theirs", pathname)
    if ours is None or theirs is None:
        side = "ours" if ours is None else "theirs"
        message = f"{side} is not a git-theta manifest (a checkpoint committed before it was tracked?)"
        # Leave %A alone: git then records a conflict with both versions in the index.
        return FileMerge(pathname, None, [Outcome("file", "conflict", message)])
    base = _manifest(base_file, "base", pathname)
    config = load_config(repo, [pathname])
    notes = check_config(config, len(LABELS))
    from git_theta.config import settings_for

    settings = settings_for(repo)
    side_data = SideData.for_driver(repo, pathname, [ours, theirs])
    by_name = _whole_model_inputs(repo, pathname, base, ours, theirs)
    base_in, theirs_in = by_name or (base, theirs)
    result = merge_manifests(
        pathname,
        base_in,
        [ours, theirs_in],
        list(LABELS),
        config,
        repo.store,
        side_data=side_data,
        **engine_options(settings),
    )
    if by_name is None:
        _flag_moved(repo, pathname, ours, theirs, result)
    Path(ours_file).write_bytes(result.manifest.serialize())
    result.notes = notes
    return result


def _whole_model_inputs(repo, pathname, base, ours, theirs):
    """(base, theirs) taken by name from the whole model on each side when ``pathname`` is a file
    of a model of several files and the commits of all three sides are known exactly (HEAD, and
    the commits whose ``pathname`` is what git handed over); None for the per-file merge."""
    from git_theta.git.models import model_at
    from git_theta.merge.models import by_name_inputs
    from git_theta.merge.side import _find_commit, find_base_commit

    if base is None:
        return None
    try:
        model, _ = model_at(repo, "HEAD", pathname)
        if model is None or (len(model.files) < 2 and model.index is None):
            return None  # a one-file model: the file is the model
        if _find_commit(repo, pathname, ours, ours=True) is None:
            return None
        theirs_commit = _find_commit(repo, pathname, theirs, ours=False)
        base_commit = theirs_commit and find_base_commit(repo, pathname, base, theirs_commit)
        if base_commit is None:
            return None
        return by_name_inputs(repo, pathname, base, ours, theirs, base_commit, theirs_commit)
    except ManifestError:
        # another file of the model or its index json is unreadable on a side: this file still
        # merges by itself (diff, ls-files and git theta merge report the bad file)
        return None


def _flag_moved(repo, pathname, ours, theirs, result):
    """Turn the outcome of a tensor that a side moved to another shard into a conflict (ours kept):
    only ``git theta merge`` sees both files (merge/models.py)."""
    from git_theta.merge.engine import Outcome
    from git_theta.merge.models import moved_elsewhere
    from git_theta.merge.side import _find_commit

    moved = moved_elsewhere(repo, pathname, ours, theirs, _find_commit(repo, pathname, theirs, ours=False))
    if not moved:
        return
    for i, outcome in enumerate(result.outcomes):
        if outcome.name in moved:
            result.outcomes[i] = Outcome(
                outcome.name,
                "conflict",
                f"moved to another shard on {moved[outcome.name]}: merge the whole model with "
                "'git merge --abort' then 'git theta merge BRANCH'",
            )
            if outcome.name in ours.tensors:
                result.manifest.tensors[outcome.name] = ours.tensors[outcome.name]
            else:
                result.manifest.tensors.pop(outcome.name, None)
