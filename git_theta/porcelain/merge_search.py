"""``git theta merge --search`` and ``merge-files --search``: try candidate merges, keep the best.

The loop itself is :mod:`git_theta.merge.search`; here each candidate is built (with the porcelain's
N-way merge, or ``merge-files``), written out as a checkpoint for the user's evaluation command,
and the best one is committed as the merge (or renamed onto ``merge-files``' output). How it was
chosen is recorded with the commit: a line in its message and the whole table as JSON in git notes
under :data:`NOTES_REF`, which ``git theta log`` shows.
"""

import json
import os
import shutil
from dataclasses import dataclass, field

from ..errors import GitThetaError, UsageError
from ..merge.search import (
    BuildFailed,
    Search,
    SearchError,
    default_candidates,
    greedy_branches,
    note,
)

NOTES_REF = "refs/notes/theta"


@dataclass
class SearchOutcome:
    """The results of a search, the best one, the branch order chosen and the commit (or output)."""

    results: list
    best: object
    order: list = None
    commit: str = None
    output: str = None
    extra: dict = field(default_factory=dict)

    def to_json(self):
        return note(self.results, self.best, extra={"order": self.order, "commit": self.commit,
                                                    "output": self.output})


def _describe_conflicts(conflicts):
    path, outcome = conflicts[0]
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return f"{path}: {outcome.name}: {outcome.reason}{more}"


def write_tree(repo, tree_merge, folder, threads=1):
    """Write the files of a merged tree under ``folder`` as a checkout would (checkpoints written from
    the store by their format plugins, other regular files as git holds them)."""
    from .. import plugins
    from ..manifest import Manifest, is_manifest
    from ..merge.files import write_checkpoint

    root = os.path.realpath(folder)
    for path, value in sorted(tree_merge.entries.items()):
        if value is None:
            continue
        dest = os.path.realpath(os.path.join(root, path))
        if not dest.startswith(root + os.sep):
            continue  # git refuses such paths; never write outside the folder
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if value[0] == "manifest":
            manifest = value[1].manifest
        else:
            mode, oid = value
            if mode not in ("100644", "100755"):
                continue  # symlinks and submodules are not part of a model
            data = repo.read_blob(oid)
            if not is_manifest(data):
                with open(dest, "wb") as out:
                    out.write(data)
                continue
            manifest = Manifest.parse(data, source=path)
        fmt = plugins.get("format", manifest.format, needed_by=path)
        write_checkpoint(manifest, fmt, repo.store, dest, threads)


def _search_line(outcome, kind="search"):
    ok = sum(1 for r in outcome.results if r.status == "ok")
    best = outcome.best
    order = f"; branches in order: {', '.join(outcome.order)}" if outcome.order else ""
    return (f"git theta merge --{kind}: chose {best.candidate.recipe} (score {best.score:.4g}, best of {ok} "
            f"scored of {len(outcome.results)} candidates{order}; table: git notes --ref=theta show)")


def add_note(repo, commit, data):
    """Attach ``data`` (JSON) to ``commit`` under :data:`NOTES_REF` (replacing an older note)."""
    repo.git("notes", f"--ref={NOTES_REF}", "add", "-f", "-F", "-", commit,
             input=(json.dumps(data, indent=1) + "\n").encode())


def search_merge(repo, branches, command, candidates=None, jobs=1, budget=None, timeout=None, base=None,
                 every_tensor=False, dry_run=False, message=None, progress=None):
    """Search candidate merges of HEAD and ``branches``; commit the best unless ``dry_run``.

    With two or more branches, the best recipe is then tried on subsets of the branches, chosen
    greedily (see :func:`.search.greedy_branches`), so the merge may leave out a branch that lowers
    the score. Returns a :class:`SearchOutcome`.
    """
    from ..merge import porcelain
    from ..settings import settings_for

    if not dry_run:
        porcelain._require_clean(repo)
    threads = settings_for(repo).threads()
    cands = candidates or default_candidates(len(branches) + 1)

    def build(candidate, folder):
        names = list(candidate.branches or branches)
        try:
            merged, _, parents = porcelain.plan_merge(repo, names, candidate.operator, candidate.param_dict,
                                                      base, every_tensor)
        except GitThetaError as exc:
            raise BuildFailed(exc.message) from None
        if merged.conflicts:
            raise BuildFailed(_describe_conflicts(merged.conflicts))
        write_tree(repo, merged, folder, threads)
        return folder, (merged, parents, names)

    with Search(build, command, jobs, budget, timeout, progress) as search:
        search.run(cands)
        if len(branches) >= 2 and search.best is not None:
            greedy_branches(search, search.best.candidate, branches)
        outcome = SearchOutcome(search.results, search.best)
    if outcome.best is None:
        raise SearchError("no candidate merge was scored (every one failed, conflicted or ran out of time)",
                          hint="run the --eval command by hand on a checkpoint; see the table above")
    chosen = list(outcome.best.candidate.branches or branches)
    outcome.order = chosen if len(branches) >= 2 else None
    if dry_run:
        return outcome
    merged, parents, names = outcome.best.built
    text = message or porcelain.default_message(names, outcome.best.candidate.operator,
                                                outcome.best.candidate.param_dict, base)
    outcome.commit = porcelain.merge_commit(repo, merged, parents, text.rstrip("\n") + "\n" + _search_line(outcome) + "\n")
    add_note(repo, outcome.commit, outcome.to_json())
    return outcome


def search_files(inputs, output, command, candidates=None, jobs=1, budget=None, timeout=None, base=None,
                 every_tensor=False, dry_run=False, progress=None):
    """``merge-files --search``: the best candidate merge of checkpoint files ``inputs`` goes to ``output``."""
    from ..merge.files import merge_files

    if len(inputs) < 2:
        raise UsageError("merge-files --search needs at least two checkpoints", hint="list the files to merge")
    inputs = [str(p) for p in inputs]
    cands = candidates or default_candidates(len(inputs))
    suffix = os.path.splitext(str(output))[1]

    def build(candidate, folder):
        names = list(candidate.branches or inputs)
        path = os.path.join(folder, "model" + suffix)
        try:
            result = merge_files(names, path, candidate.operator, candidate.param_dict, base, every_tensor, threads=1)
        except GitThetaError as exc:
            raise BuildFailed(exc.message) from None
        if result.conflicts:
            raise BuildFailed(_describe_conflicts([(str(output), o) for o in result.conflicts]))
        keep = folder + suffix
        os.link(path, keep)  # outlives the candidate's folder while it is the best so far
        return path, keep

    with Search(build, command, jobs, budget, timeout, progress, discard=os.unlink) as search:
        search.run(cands)
        order = None
        if len(inputs) >= 3 and search.best is not None:
            order = greedy_branches(search, search.best.candidate, inputs, fixed=inputs[:1])
        outcome = SearchOutcome(search.results, search.best)
        if outcome.best is not None and order is not None:
            outcome.order = list(outcome.best.candidate.branches or inputs)
        if outcome.best is None:
            raise SearchError("no candidate merge was scored (every one failed, conflicted or ran out of time)",
                              hint="run the --eval command by hand on a checkpoint; see the table above")
        if not dry_run:
            shutil.move(outcome.best.built, output)
            outcome.output = str(output)
    return outcome


def read_note(repo, commit):
    """The search/auto record attached to ``commit`` (a dict), or None when it has none or it is not ours."""
    raw = repo.git("notes", f"--ref={NOTES_REF}", "show", commit, check=False)
    try:
        data = json.loads(raw.decode("utf-8", "replace")) if raw.strip() else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("schema") == 1 else None


def note_summary(data):
    """One line saying how a merge was chosen, from :func:`read_note`'s record."""
    chosen = data.get("chosen") or {}
    params = " ".join(f"{k}={v}" for k, v in sorted((chosen.get("params") or {}).items()))
    recipe = " ".join(filter(None, [str(chosen.get("operator", "?")), params]))
    rows = data.get("candidates") or []
    scored = sum(1 for r in rows if isinstance(r, dict) and r.get("status") == "ok")
    order = chosen.get("branches")
    where = f", branches {', '.join(map(str, order))}" if order else ""
    score = chosen.get("score", (data.get("chosen_score")))
    shown = f" score {score:.4g}," if isinstance(score, (int, float)) else ""
    return f"chosen by {data.get('chosen_by', '?')}: {recipe}{where} ({shown} {scored} of {len(rows)} candidates scored)".replace("( ", "(")
