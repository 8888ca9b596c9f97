"""``git theta merge --search`` and ``merge-files --search``: try candidate merges, keep the best.

The loop itself is :mod:`git_theta.merge.search`; here each candidate is built (with the porcelain's
N-way merge, or ``merge-files``), written out as a checkpoint for the user's evaluation command,
and the best one is committed as the merge (or renamed onto ``merge-files``' output). How it was
chosen is recorded with the commit: a line in its message and the whole table as JSON in git notes
under ``refs/notes/theta`` (:mod:`git_theta.git.notes`), which ``git theta log`` shows.
"""

import math
import os
import shutil
from dataclasses import dataclass, field

from git_theta.errors import GitThetaError, UsageError
from git_theta.git.notes import add_note
from git_theta.merge.search import (
    BuildFailed,
    Search,
    SearchError,
    default_candidates,
    greedy_branches,
    note,
)


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
        return note(self.results, self.best, extra={"order": self.order, "commit": self.commit, "output": self.output})


def _nothing_scored(results, shown=4):
    """The SearchError when no candidate got a score, naming what happened to the first few."""
    what = "; ".join(
        f"{r.candidate.label}: {r.status}" + (f" ({r.detail})" if r.detail else "") for r in results[:shown]
    )
    more = f"; and {len(results) - shown} more" if len(results) > shown else ""
    return SearchError(
        f"no candidate merge was scored: {what}{more}",
        hint="run the --eval command by hand on a merged checkpoint (git theta merge-files)",
    )


def _describe_conflicts(conflicts):
    path, outcome = conflicts[0]
    more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
    return f"{path}: {outcome.name}: {outcome.reason}{more}"


def write_tree(repo, tree_merge, folder, threads=1):
    """Write the files of a merged tree under ``folder`` as a checkout would (checkpoints written from
    the store by their format plugins, other regular files as git holds them)."""
    from git_theta import registry as plugins
    from git_theta.manifest import Manifest, is_manifest
    from git_theta.porcelain.merge_files import write_checkpoint

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
    return (
        f"git theta merge --{kind}: chose {best.candidate.recipe} (score {best.score:.4g}, best of {ok} "
        f"scored of {len(outcome.results)} candidates{order}; table: git notes --ref=theta show)"
    )


def search_merge(
    repo,
    branches,
    command,
    candidates=None,
    jobs=1,
    budget=None,
    timeout=None,
    base=None,
    every_tensor=False,
    dry_run=False,
    message=None,
    progress=None,
):
    """Search candidate merges of HEAD and ``branches``; commit the best unless ``dry_run``.

    With two or more branches, the best recipe is then tried on subsets of the branches, chosen
    greedily (see :func:`.search.greedy_branches`), so the merge may leave out a branch that lowers
    the score. Returns a :class:`SearchOutcome`.
    """
    from git_theta.porcelain import merge as porcelain
    from git_theta.config import settings_for

    if not dry_run:
        porcelain._require_clean(repo)
    threads = settings_for(repo).threads()
    cands = candidates or default_candidates(len(branches) + 1)

    def build(candidate, folder):
        names = list(candidate.branches or branches)
        try:
            merged, _, parents = porcelain.plan_merge(
                repo, names, candidate.operator, candidate.param_dict, base, every_tensor
            )
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
        raise _nothing_scored(outcome.results)
    chosen = list(outcome.best.candidate.branches or branches)
    outcome.order = chosen if len(branches) >= 2 else None
    if dry_run:
        return outcome
    merged, parents, names = outcome.best.built
    text = message or porcelain.default_message(
        names, outcome.best.candidate.operator, outcome.best.candidate.param_dict, base
    )
    outcome.commit = porcelain.merge_commit(
        repo, merged, parents, text.rstrip("\n") + "\n" + _search_line(outcome) + "\n"
    )
    add_note(repo, outcome.commit, outcome.to_json())
    return outcome


def search_files(
    inputs,
    output,
    command,
    candidates=None,
    jobs=1,
    budget=None,
    timeout=None,
    base=None,
    every_tensor=False,
    dry_run=False,
    progress=None,
):
    """``merge-files --search``: the best candidate merge of checkpoint files ``inputs`` goes to ``output``."""
    from git_theta.porcelain.merge_files import merge_files

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
            raise _nothing_scored(outcome.results)
        if not dry_run:
            shutil.move(outcome.best.built, output)
            outcome.output = str(output)
    return outcome


# ------------------------------------------------------------------------------------------ auto
def _features_of(store, named_manifests, base_manifests, path_filter=None):
    """A FeatureAccumulator over every float tensor present, with one shape, in all models and the base.

    ``named_manifests``: per model {name: Manifest}; ``base_manifests``: {name: Manifest} (a name is a
    checkpoint file or a whole sharded model).
    """
    from git_theta.merge.auto import FeatureAccumulator
    from git_theta.merge.engine import Loader

    acc = FeatureAccumulator(len(named_manifests))
    for path, base in sorted(base_manifests.items()):
        sides = [m.get(path) for m in named_manifests]
        if base is None or any(s is None for s in sides):
            continue
        loader = Loader(store, path)
        for name, entry in sorted(base.tensors.items()):
            entries = [s.tensors.get(name) for s in sides]
            if any(e is None or tuple(e.shape) != tuple(entry.shape) or e.dtype != entry.dtype for e in entries):
                continue
            if entry.dtype not in ("F64", "F32", "F16", "BF16") or all(e.digest == entry.digest for e in entries):
                if entry.dtype in ("F64", "F32", "F16", "BF16"):
                    acc.add_unchanged(loader.values(entry))
                continue
            acc.add([loader.values(e) for e in entries], loader.values(entry).astype("float64"))
    return acc


def _probe(command, folders):
    """Activations the --probe command prints for each folder (numbers, whitespace/JSON list)."""
    import re

    from git_theta.merge.search import run_command_output

    out = []
    for folder in folders:
        text = run_command_output(command.replace("{model}", folder))
        values = [float(v) for v in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text)]
        if not values:
            raise UsageError(
                f"the --probe command printed no activations for {folder}",
                hint="print the activations as numbers (a JSON list is fine)",
            )
        out.append(values)
    return out


def _commit_manifests(repo, commit):
    """({model name: Manifest of its tensors by name}, {path: (mode, oid)}) of a commit: models, not
    files, so a model re-sharded on a side still pairs its tensors with the base's."""
    from git_theta.git.scan import theta_paths
    from git_theta.merge.models import model_manifests
    from git_theta.porcelain.merge import _tree

    tree = _tree(repo, commit)
    return model_manifests(repo, tree, set(theta_paths(repo, sorted(tree)))), tree


def predict_sets(acc, n_sides, functional=None):
    """auto's Prediction for all sides, with the branches chosen greedily for 3+ models."""
    from git_theta.merge.auto import choose_branches, predict

    def features(members):
        feats = acc.features(members)
        if feats is None:
            return None
        if functional is not None:
            from git_theta.merge.auto import functional_features

            feats.update(functional_features([functional[1][i] for i in members], functional[0]))
        return feats

    def score(members):
        feats = features(members)
        return predict(feats, len(members)).scores[0][1] if feats is not None else -math.inf

    kept = list(range(1, n_sides))
    notes = []
    if n_sides > 2:
        pairs = [score([0, i]) for i in range(1, n_sides)]
        chosen, dropped = choose_branches(pairs, n_sides - 1, lambda idx: score([0, *(i + 1 for i in idx)]))
        kept = [i + 1 for i in chosen]
        notes = [
            f"left out side {i + 1}: with it, (tasks kept) x (predicted score {s:.3f}) would fall" for i, s in dropped
        ]
    feats = features([0, *kept])
    if feats is None:
        return None
    prediction = predict(feats, len(kept) + 1)
    prediction.branches = kept
    prediction.notes = notes
    return prediction


def _hf_folders(trees):
    """Folders that are Hugging Face models (``config.json`` beside safetensors checkpoints) in
    every one of ``trees`` ({path: (mode, oid)}, the base's first) and changed on some side, sorted."""
    import posixpath

    def folders(tree):
        found = {posixpath.dirname(p) for p in tree if p.endswith(".safetensors")}
        return {f for f in found if posixpath.join(f, "config.json") in tree}

    def files(tree, folder):
        return {p: v for p, v in tree.items() if posixpath.dirname(p) == folder}

    common = folders(trees[0])
    for tree in trees[1:]:
        common &= folders(tree)
    return sorted(f for f in common if any(files(t, f) != files(trees[0], f) for t in trees[1:]))


def _hf_probe_trees(repo, trees):
    """(activations per tree, source) from the Hugging Face folders the trees share, each written
    out (that folder's files only) to a temporary folder and probed (:mod:`git_theta.merge.probes`);
    (None, why not) when there is no such folder or it cannot be probed."""
    import posixpath
    import tempfile

    from git_theta.merge.probes import ProbeUnavailable, hidden_states
    from git_theta.porcelain.merge import TreeMerge

    folders = _hf_folders(trees)
    if not folders:
        return None, "none (no --probe, and no Hugging Face model folder with config.json and safetensors)"
    with tempfile.TemporaryDirectory(prefix="theta-probe-") as tmp:
        models = []
        for i, tree in enumerate(trees):
            root = os.path.join(tmp, str(i))
            entries = {p: v for p, v in tree.items() if posixpath.dirname(p) in folders}
            write_tree(repo, TreeMerge(entries=entries), root)
            models.append([os.path.join(root, f) for f in folders])
        try:
            acts, source = hidden_states(models)
        except ProbeUnavailable as exc:
            return None, f"none: {exc.reason}; structural features only"
    return acts, f"{source}; folder{'s' if len(folders) > 1 else ''} {', '.join(f or '.' for f in folders)}"


def _functional(acts, source):
    """predict_sets' ``functional`` argument from activations of the base then each side."""
    return ((acts[0], acts[1:]) if acts is not None else None), source


def auto_merge(repo, branches, base=None, probe=None, hf_probe=True):
    """auto's choice for merging HEAD and ``branches``: a Prediction whose ``branches`` are the branch
    names kept, in merge order (None when no checkpoint changed on several sides).

    Functional features come from ``probe`` (a --probe command) or, with ``hf_probe``, from the
    hidden states of the Hugging Face folders base and sides share; the Prediction's
    ``functional`` says which, or why there are none."""
    from git_theta.porcelain.merge import TreeMerge, merge_sides

    head, commits, base_commit = merge_sides(repo, branches, base)
    if base_commit is None:
        return None
    base_manifests, base_tree = _commit_manifests(repo, base_commit)
    sides = [_commit_manifests(repo, c) for c in [head, *commits]]
    acc = _features_of(repo.store, [m for m, _ in sides], base_manifests)
    trees = [base_tree, *(t for _, t in sides)]
    functional, source = None, "none (no --probe; Hugging Face probes off)"
    if probe:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="theta-probe-") as tmp:
            folders = []
            for i, tree in enumerate(trees):
                folder = os.path.join(tmp, str(i))
                os.makedirs(folder)
                write_tree(repo, TreeMerge(entries=tree), folder)
                folders.append(folder)
            functional, source = _functional(_probe(probe, folders), f"--probe {probe}")
    elif hf_probe:
        functional, source = _functional(*_hf_probe_trees(repo, trees))
    prediction = predict_sets(acc, len(branches) + 1, functional)
    if prediction is not None:
        prediction.branches = [branches[i - 1] for i in prediction.branches]
        prediction.functional = source
    return prediction


def auto_files(inputs, base, probe=None, hf_probe=True):
    """auto's choice for ``merge-files`` (inputs in order, the first one like HEAD; each a checkpoint
    file or a model folder); None without a base (no task vectors to compare: the per-tensor rule
    then merges with ``linear``). Functional features as for :func:`auto_merge`, the Hugging Face
    probe running on the input folders themselves."""
    import tempfile
    from pathlib import Path

    from git_theta.merge.probes import ProbeUnavailable, hf_folder_of, hidden_states
    from git_theta.porcelain.merge_files import StreamedStore, load_model
    from git_theta.store.objects import ObjectStore

    if base is None:
        return None
    with tempfile.TemporaryDirectory(prefix="theta-auto-") as tmp:
        # the inputs' tensors are read where they are in their files (only cast ones are stored)
        store = StreamedStore(ObjectStore(Path(tmp) / "objects", fsync=False))
        sides = [{"model": load_model(store, p).manifest} for p in inputs]
        acc = _features_of(store, sides, {"model": load_model(store, base).manifest})
    functional, source = None, "none (no --probe; Hugging Face probes off)"
    if probe:
        functional, source = _functional(_probe(probe, [str(base), *map(str, inputs)]), f"--probe {probe}")
    elif hf_probe:
        folders = [hf_folder_of(p) for p in [base, *inputs]]
        if any(f is None for f in folders):
            source = "none (no --probe, and not every input is a Hugging Face folder with config.json and safetensors)"
        else:
            try:
                acts, source = hidden_states([[f] for f in folders])
                functional, source = _functional(acts, source)
            except ProbeUnavailable as exc:
                source = f"none: {exc.reason}; structural features only"
    prediction = predict_sets(acc, len(inputs), functional)
    if prediction is not None:
        prediction.branches = [str(inputs[0]), *(str(inputs[i]) for i in prediction.branches)]
        prediction.functional = source
    return prediction


def auto_line(prediction):
    """The commit message line of a merge chosen by auto."""
    best = prediction.scores[0][1]
    order = f"; branches in order: {', '.join(prediction.branches)}" if prediction.branches else ""
    return (
        f"git theta merge --operator auto: chose {prediction.recipe} (predicted normalized accuracy "
        f"{best:.3f}, {prediction.predictor} predictor{order}; details: git notes --ref=theta show)"
    )


def auto_note(prediction):
    return {
        "schema": 1,
        "chosen_by": "auto",
        "chosen": {
            "operator": prediction.operator,
            "params": prediction.params,
            "branches": prediction.branches,
            "score": prediction.scores[0][1],
        },
        "candidates": [{"recipe": r, "status": "predicted", "score": s} for r, s in prediction.scores],
        "auto": prediction.to_json(),
    }
