"""Merges across layouts: a sharded model re-sharded (or re-saved in another order) on a side.

git merges path by path, so after a re-shard it sees a shard deleted on one side and modified on
the other. ``git theta merge`` looks at the models instead (:mod:`git_theta.git.models`): for each
model whose layout (its files, or which file holds which tensor) differs between the merge base
and a side, every tensor is merged by name across the shards with the usual rules and operators
(:func:`.engine.merge_manifests` on the whole model), and the result gets one consistent layout:

- the layout of the side that changed it, when exactly one layout differs from the base's;
- the base's layout when several sides changed it differently (no side's choice wins silently);
- a tensor added on a side goes into its file in that layout if the layout has it, else into the
  layout's last file; the index json is the layout's, with its ``weight_map`` rewritten only when
  the merged tensors need it.
"""

import json
import posixpath
from dataclasses import dataclass, field

from git_theta.git.models import group, is_sidecar, parse_index, tensors_of
from git_theta.manifest import Manifest


@dataclass
class ModelPlan:
    """One model merged across layouts: which paths it covers and the tree entries it yields."""

    name: str
    covered: set = field(default_factory=set)  # every path of the model in any version
    entries: dict = field(default_factory=dict)  # path -> ("manifest", FileMerge) or (mode, oid)
    merge: object = None  # the FileMerge of the whole model
    layout_from: str = ""


def _version(repo, tree, tracked, read):
    """{model name: (Model, {path: Manifest})} of one version's tree."""
    sidecars = {p: read(tree[p][1]) for p in tree if is_sidecar(p)}
    files = sorted(p for p in tree if p in tracked)
    manifests = {p: read_manifest(read, tree[p][1], p) for p in files}
    models = group(files, {k: v for k, v in sidecars.items() if v is not None}, exists=tree.__contains__)
    return {m.name: (m, manifests) for m in models}, sidecars


def read_manifest(read, oid, path):
    from git_theta.manifest import is_manifest

    data = read(oid)
    return Manifest.parse(data, source=path) if data is not None and is_manifest(data) else None


def _layout(model, manifests):
    """What a re-shard changes: the files and which file holds each tensor."""
    return tuple(sorted((n, p) for n, (p, _) in tensors_of(model, manifests).items())), tuple(model.files)


def _relayouts(repo, base_tree, trees, tracked):
    """(name, base version, side versions, their sidecars, indices of the sides that changed the
    layout) of every model of several files whose layout differs between the base and a side."""
    read = repo.read_blob
    base_models, base_sidecars = _version(repo, base_tree, tracked, read)
    side_versions = [_version(repo, t, tracked, read) for t in trees]
    names = set(base_models).union(*(v[0] for v in side_versions))
    for name in sorted(names):
        base = base_models.get(name)
        sides = [v[0].get(name) for v in side_versions]
        if base is None or any(s is None for s in sides):
            continue  # added or deleted as a whole: the per-path rules apply
        if not all(len(v[0].files) > 1 or v[0].index for v in (base, *sides)):
            continue
        if not all(any(v[1].get(p) is not None for p in v[0].files) for v in (base, *sides)):
            continue  # no manifest on a side (committed untracked): the per-path rules report it
        base_layout = _layout(*base)
        layouts = [_layout(*s) for s in sides]
        changed = [i for i, lay in enumerate(layouts) if lay != base_layout]
        if changed:
            target = changed[0] if len({layouts[i] for i in changed}) == 1 else None
            yield name, base, sides, base_sidecars, [v[1] for v in side_versions], target


def relayout_names(repo, base_tree, trees, tracked):
    """Names of the models whose layout a side changed (they need :func:`plan_models`)."""
    return [item[0] for item in _relayouts(repo, base_tree, trees, tracked)]


def plan_models(repo, base_tree, trees, labels, config, tracked, merge_kwargs):
    """ModelPlans for the models whose layout differs between the base and a side (else [])."""
    from git_theta.merge.engine import merge_manifests

    plans = []
    for name, base, sides, base_sidecars, side_sidecars, target in _relayouts(repo, base_tree, trees, tracked):
        if target is not None:
            layout, sidecars, origin = sides[target], side_sidecars[target], labels[target]
        else:
            layout, sidecars, origin = base, base_sidecars, "the merge base (several sides re-sharded)"
        combined = [_combined(*v) for v in (base, *sides)]
        merged = merge_manifests(name, combined[0], combined[1:], labels, config, repo.store, **merge_kwargs)
        plan = ModelPlan(name, merge=merged, layout_from=origin)
        for version in (base, *sides):
            plan.covered.update(version[0].files)
            if version[0].index:
                plan.covered.add(version[0].index)
        _distribute(repo, plan, layout, sidecars, merged)
        plans.append(plan)
    return plans


def model_manifests(repo, tree, tracked):
    """{model name: Manifest of all its tensors, by name} of one version's tree ({path: (mode, oid)}),
    a sharded model's shards joined whatever its layout (so two versions pair tensors by name)."""
    models, _ = _version(repo, tree, tracked, repo.read_blob)
    return {
        name: _combined(model, manifests)
        for name, (model, manifests) in models.items()
        if any(manifests.get(p) is not None for p in model.files)
    }


def _combined(model, manifests):
    located = tensors_of(model, manifests)
    first = next(m for p in model.files if (m := manifests.get(p)) is not None)
    return Manifest(format=first.format, tensors={n: e for n, (_, e) in sorted(located.items())})


class _Result:
    """A merged file as the porcelain writes it (it serialises ``.manifest``)."""

    def __init__(self, manifest):
        self.manifest = manifest


def _distribute(repo, plan, target, sidecars, merged):
    """Split the merged model over the target layout's files; write the index json to match."""
    model, manifests = target
    where = {n: p for n, (p, _) in tensors_of(model, manifests).items()}
    last = model.files[-1]
    per_file = {p: {} for p in model.files}
    for name, entry in merged.manifest.tensors.items():
        per_file[where.get(name, last)][name] = entry
    for path, tensors in per_file.items():
        layout_m = manifests[path]
        blobs = dict(layout_m.blobs)
        same = tensors.keys() == layout_m.tensors.keys() and all(
            (e.dtype, e.shape) == (layout_m.tensors[n].dtype, layout_m.tensors[n].shape) for n, e in tensors.items()
        )
        if not same:
            blobs.pop("header", None)  # the stored header describes other tensors: write a canonical one
        plan.entries[path] = ("manifest", _Result(Manifest(layout_m.format, dict(layout_m.fields), blobs, tensors)))
    if model.index is None:
        return
    raw = sidecars[model.index]
    weight_map = {n: posixpath.basename(p) for p, ts in per_file.items() for n in ts}
    if parse_index(raw, model.index) == weight_map:
        oid = repo.git("hash-object", "-w", "--no-filters", "--stdin", input=raw).decode().strip()
    else:
        doc = json.loads(raw)
        doc["weight_map"] = dict(sorted(weight_map.items()))
        if isinstance(doc.get("metadata"), dict) and "total_size" in doc["metadata"]:
            doc["metadata"]["total_size"] = merged.manifest.logical_size()
        data = (json.dumps(doc, indent=2) + "\n").encode()
        oid = repo.git("hash-object", "-w", "--no-filters", "--stdin", input=data).decode().strip()
    plan.entries[model.index] = ("100644", oid)


def moved_elsewhere(repo, pathname, ours, theirs, theirs_commit):
    """For git's merge driver on one shard: {tensor name: side label} for the tensors of this file
    (on any side) that a side holds in *another* file of the model. git hands the driver one path,
    and the other file's version of such a tensor is merged (or not) on its own, so no per-path
    result can be right: the driver reports them as conflicts and points to ``git theta merge``,
    which merges the model whole."""
    from git_theta.git.models import ParentModels, is_shard, stem

    if not is_shard(pathname):
        return {}
    reader = ParentModels(repo)
    folder, own = posixpath.dirname(pathname), stem(pathname)
    names = set(ours.tensors) | set(theirs.tensors)
    moved = {}
    for label, here, commit in (("ours", ours, "HEAD"), ("theirs", theirs, theirs_commit)):
        if commit is None:
            continue
        model = reader.at(commit, folder, own)
        if model is None:
            continue
        for name in names:
            if name not in here.tensors and name in model.tensors:
                moved.setdefault(name, label)
    return moved


def by_name_inputs(repo, pathname, base, ours, theirs, base_commit, theirs_commit):
    """For git's merge driver on ``pathname``, a file of a model of several files: the (base,
    theirs) manifests to merge against ``ours`` (the file's manifest in HEAD), each tensor taken
    **by name** from the whole model at ``base_commit`` and ``theirs_commit`` (wherever it lives
    there), so a tensor moved to another shard on a side still merges. Ours' layout is kept: the file holds the tensors
    ours holds in it, plus those of ``pathname`` on a side that ours has in no file (added or
    deleted, by the usual rules).

    None when the per-file merge must stay: a one-file model, or a layout plain git cannot keep
    consistent because it takes another path of the model from theirs as is (theirs changed an
    index json, added or deleted a file, or moved tensors into or out of a file ours left alone),
    or loses a change (theirs changed a tensor that ours holds in a file only ours changed).
    """
    from git_theta.errors import ManifestError
    from git_theta.git.models import ModelError, model_at

    read = repo.read_blob
    versions = [model_at(repo, rev, pathname) for rev in (base_commit, "HEAD", theirs_commit)]
    if any(model is None for model, _ in versions):
        return None
    model = versions[1][0]
    if len(model.files) < 2 and model.index is None:
        return None
    (_, base_blobs), (_, ours_blobs), (_, theirs_blobs) = versions
    for path in sorted(set(base_blobs) | set(ours_blobs) | set(theirs_blobs)):
        b, o, t = base_blobs.get(path), ours_blobs.get(path), theirs_blobs.get(path)
        if path == pathname or t in (b, o):
            continue  # git keeps ours' version (or it is the file being merged)
        if is_sidecar(path) or t is None or o is None:
            return None  # theirs changed an index json, deleted or added a file: another layout
        if o != b:
            continue  # both changed it: git runs this driver on it too, which merges it by name
        theirs_file, ours_file = read_manifest(read, t, path), read_manifest(read, o, path)
        if theirs_file is None or ours_file is None or set(theirs_file.tensors) != set(ours_file.tensors):
            return None  # git takes theirs' version of this file as is, with theirs' layout
    try:
        located = [tensors_of(m, {p: read_manifest(read, blobs[p], p) for p in m.files}) for m, blobs in versions]
    except (ModelError, ManifestError):
        return None
    base_whole, ours_whole, theirs_whole = ({n: e for n, (_, e) in loc.items()} for loc in located)
    for name, (home, _) in located[1].items():
        b = base_blobs.get(home)
        if (
            home != pathname
            and theirs_blobs.get(home) == b != ours_blobs.get(home)
            and (_value(theirs_whole.get(name)) != _value(base_whole.get(name)))
        ):
            # theirs changed a tensor that ours keeps in a file git takes from ours as is: the
            # change would be lost
            return None
    keep = set(ours.tensors) | {n for n in set(base.tensors) | set(theirs.tensors) if n not in ours_whole}
    inputs = []
    for own, whole in ((base, base_whole), (theirs, theirs_whole)):
        tensors = {n: whole[n] for n in sorted(keep) if n in whole}
        blobs = dict(own.blobs)
        if set(tensors) != set(own.tensors) and own is theirs:
            # theirs' stored header describes theirs' layout of the file, not the one kept
            blobs.pop("header", None)
            if "header" in base.blobs:
                blobs["header"] = base.blobs["header"]
        inputs.append(Manifest(own.format, dict(own.fields), blobs, tensors))
    return tuple(inputs)


def _value(entry):
    """What a tensor is, for "did this side change it": dtype, shape and digest (None: absent)."""
    return None if entry is None else (entry.dtype, entry.shape, entry.digest)
