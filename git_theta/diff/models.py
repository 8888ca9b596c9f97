"""The diff at the model level: a sharded folder (or an adapter) compared as one model.

Both sides' tracked files are grouped into models (:mod:`git_theta.git.models`); a model of several
files, an index json or an adapter is compared tensor by tensor *by name across its shards*, so a
tensor that only moved to another shard is unchanged, and a re-shard is reported as a layout change
(``re-sharded 8 -> 5 files, 0 tensors changed``). One-file models keep the file-level diff (and its
file rename detection) unchanged. Models are paired by name, then by folder and stem (a single
``model.safetensors`` saved again as shards).
"""

import posixpath

from git_theta.git.models import group, stem, tensors_of
from git_theta.manifest import Manifest
from git_theta.git.snapshots import Snapshot


def _models(snap):
    manifests = {p: t.manifest for p, t in snap.files.items()}
    models = group(sorted(snap.files), snap.sidecars, exists=snap.paths.__contains__)
    return {m.name: m for m in models}, manifests


def _grouped(model):
    return len(model.files) > 1 or model.index is not None or model.adapter_config is not None


def _key(model):
    return (model.folder, stem(model.files[0]) if model.files else model.name)


def _pairs(old_models, new_models):
    """(old Model or None, new Model or None) for every model that is a real model on either side."""
    pairs = []
    old_left = {n: m for n, m in old_models.items() if n not in new_models}
    new_left = {n: m for n, m in new_models.items() if n not in old_models}
    for name in sorted(set(old_models) & set(new_models)):
        pairs.append((old_models[name], new_models[name]))
    by_key = {}
    for m in old_left.values():
        by_key.setdefault(_key(m), []).append(m)
    for name, m in sorted(new_left.items()):
        candidates = by_key.get(_key(m))
        if candidates and (_grouped(m) or _grouped(candidates[0])):
            old = candidates.pop(0)
            del old_left[old.name]
            pairs.append((old, m))
        else:
            pairs.append((None, m))
    pairs.extend((m, None) for m in old_left.values())
    return [(o, n) for o, n in pairs if (o is not None and _grouped(o)) or (n is not None and _grouped(n))]


def _combined(model, manifests):
    """A Manifest holding the whole model's tensors, and {tensor name: file path}."""
    if model is None:
        return None, {}
    located = tensors_of(model, manifests)
    first = next((manifests[p] for p in model.files if manifests.get(p) is not None), None)
    combined = Manifest(
        format=first.format if first else "?",
        fields=dict(first.fields) if first else {},
        tensors={n: e for n, (_, e) in located.items()},
    )
    return combined, {n: p for n, (p, _) in located.items()}


def layout(old_model, new_model, old_where, new_where):
    """The layout change between two versions of a model, or None when the files are the same and
    no tensor moved: ``{"files_old", "files_new", "moved", "resharded"}``."""
    old_files = [posixpath.basename(p) for p in old_model.files] if old_model else []
    new_files = [posixpath.basename(p) for p in new_model.files] if new_model else []
    moved = sum(
        1
        for n in set(old_where) & set(new_where)
        if posixpath.basename(old_where[n]) != posixpath.basename(new_where[n])
    )
    resharded = bool(old_model and new_model and (sorted(old_files) != sorted(new_files) or moved))
    return {"files_old": len(old_files), "files_new": len(new_files), "moved": moved, "resharded": resharded}


def diff_models(differ, old, new):
    """The diff entries of the models of several files in snapshots ``old`` and ``new``, and the
    two snapshots reduced to the files those models do not cover (left to the file-level diff)."""
    old_models, old_manifests = _models(old)
    new_models, new_manifests = _models(new)
    entries = []
    covered_old, covered_new = set(), set()
    for om, nm in _pairs(old_models, new_models):
        covered_old.update(om.files if om else [])
        covered_new.update(nm.files if nm else [])
        if (
            om
            and nm
            and om.files == nm.files
            and all(old.files[p].blob is not None and old.files[p].blob == new.files[p].blob for p in om.files)
            and old.sidecars.get(om.index) == new.sidecars.get(nm.index)
        ):
            continue  # same files, same blobs: nothing to compare
        old_m, old_where = _combined(om, old_manifests)
        new_m, new_where = _combined(nm, new_manifests)
        name = (nm or om).name
        entry = differ.manifests(name, old_m, new_m)
        change = layout(om, nm, old_where, new_where)
        if om and nm and not entry["tensors"] and not entry["fields_changed"] and not change["resharded"]:
            continue
        status = "modified" if om and nm else ("added" if om is None else "removed")
        problems = [
            f"{p}: {t.error or 'not a manifest (not cleaned)'}"
            for snap, m in ((old, om), (new, nm))
            if m
            for p in m.files
            for t in [snap.files[p]]
            if t.manifest is None
        ]
        entry.update(
            path=name,
            old_path=om.name if om else name,
            status=status,
            kind="model",
            layout=change,
            shards_old=list(om.files) if om else [],
            shards_new=list(nm.files) if nm else [],
            index=(nm or om).index,
            adapter_of=(nm or om).base,
        )
        if problems:
            entry["problems"] = problems
        entries.append(entry)
    rest_old = Snapshot(old.label, {p: t for p, t in old.files.items() if p not in covered_old})
    rest_new = Snapshot(new.label, {p: t for p, t in new.files.items() if p not in covered_new})
    return entries, rest_old, rest_new
