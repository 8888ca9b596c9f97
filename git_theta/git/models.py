"""Which tracked checkpoint files form which model (DESIGN §13, docs/models.md).

git stores one manifest per file; a *model* is the layer above: the files of one folder that belong
together. The rules, applied per folder:

- every ``*.index.json`` (Hugging Face's ``model.safetensors.index.json``) makes one model of the
  files its ``weight_map`` names; two indexes in a folder are two models, never merged;
- shards named ``PREFIX-0000k-of-0000n.EXT`` that no index claims form one model per
  (PREFIX, n, EXT);
- ``adapter_model.*`` beside an ``adapter_config.json`` is a PEFT adapter model; the config's
  ``base_model_name_or_path`` names its base when that is a model tracked here;
- any other tracked file is a one-file model.

A model is named by its folder when it is the folder's only model (several files) or by its file path
(one file); a folder with several models names each by its index (``dir/model.safetensors``) or
prefix. A tensor is identified by its name within the model, whichever shard holds it.
"""

import json
import posixpath
import re
from dataclasses import dataclass, field

from git_theta.errors import ManifestError
from git_theta.git.repo import records

INDEX_SUFFIX = ".index.json"
ADAPTER_CONFIG = "adapter_config.json"
MAX_SIDECAR = 64 << 20  # an index json of a 1000-shard model is a few MB
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<k>\d{5})-of-(?P<n>\d{5})\.(?P<ext>[A-Za-z0-9]+)$")


class ModelError(ManifestError):
    """A model's files contradict each other (an index naming a missing shard, a tensor in two files)."""


@dataclass
class Model:
    """One model: its name, its checkpoint files (repository paths), its index json if any."""

    name: str
    files: list
    index: str | None = None
    adapter_config: str | None = None
    base: str | None = None  # for an adapter: the model it adapts, when tracked here
    weight_map: dict = field(default_factory=dict)  # tensor name -> file path (from the index)

    @property
    def folder(self):
        return posixpath.dirname(self.files[0]) if self.files else posixpath.dirname(self.name)


def is_sidecar(path):
    """True for the small json files that say how checkpoint files form a model."""
    base = posixpath.basename(path)
    return base.endswith(INDEX_SUFFIX) or base == ADAPTER_CONFIG


def parse_index(data, path):
    """The ``weight_map`` of an index json: {tensor name: shard file name}; ModelError if malformed
    or if a tensor is listed twice (json would silently keep the last)."""

    def pairs(items):
        seen = {}
        for key, value in items:
            if key in seen and key != "metadata":
                shards = sorted({str(seen[key]), str(value)})
                raise ModelError(
                    f"{path}: tensor {key!r} is listed in two shards ({shards[0]} and {shards[-1]})",
                    hint="fix the index json so each tensor names one shard (save the model again)",
                )
            seen[key] = value
        return seen

    try:
        doc = json.loads(data, object_pairs_hook=pairs)
    except ModelError:
        raise
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting
        raise ModelError(
            f"{path}: not valid json ({type(exc).__name__})", hint="fix or remove the index json"
        ) from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{path}: no 'weight_map' of tensor names to shard files", hint="fix or remove the index json")
    for name, shard in weight_map.items():
        if "/" in shard or shard in ("", ".", ".."):
            raise ModelError(f"{path}: tensor {name!r} names shard {shard!r} outside the folder")
    return weight_map


def adapter_base(data, config_path, model_names):
    """The model an adapter config's ``base_model_name_or_path`` names among ``model_names``, or None."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    base = doc.get("base_model_name_or_path") if isinstance(doc, dict) else None
    if not isinstance(base, str) or not base:
        return None
    folder = posixpath.dirname(posixpath.dirname(config_path))
    base = base.rstrip("/")
    for candidate in (posixpath.normpath(posixpath.join(folder, base)), base):
        if candidate in model_names:
            return candidate
    return None


def group(files, sidecars, exists=None, strict=True):
    """The models formed by the tracked checkpoint paths ``files`` (sorted list of Model).

    ``sidecars`` maps index json and adapter config paths to their bytes. ``exists(path)`` says
    whether a path is in the version at all (for an index naming a shard the caller filtered
    out); with ``strict`` an index naming a file that does not exist is a ModelError naming both.
    """
    exists = exists or (lambda p: False)
    by_folder = {}
    for path in files:
        by_folder.setdefault(posixpath.dirname(path), []).append(path)
    for path in sidecars:
        by_folder.setdefault(posixpath.dirname(path), [])
    models = []
    for folder, paths in sorted(by_folder.items()):
        models.extend(_folder_models(folder, sorted(paths), sidecars, exists, strict))
    names = {m.name for m in models}
    for m in models:
        if m.adapter_config is not None:
            m.base = adapter_base(sidecars[m.adapter_config], m.adapter_config, names - {m.name})
    return sorted(models, key=lambda m: m.name)


def _folder_models(folder, paths, sidecars, exists, strict):
    join = (lambda name: posixpath.join(folder, name)) if folder else (lambda name: name)
    left = set(paths)
    found = []  # (model without a name yet, preferred own name)
    indexes = sorted(p for p in sidecars if posixpath.dirname(p) == folder and p.endswith(INDEX_SUFFIX))
    for index in indexes:
        weight_map = {n: join(s) for n, s in parse_index(sidecars[index], index).items()}
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if strict and shard not in paths and not exists(shard):
                raise ModelError(
                    f"{index} names shard {shard}, which is not a tracked file of this version",
                    hint="add the shard (git theta add), or save the model again so the index matches its files",
                )
        members = [s for s in shards if s in left]
        left -= set(members)
        if members:
            found.append((Model("", members, index=index, weight_map=weight_map), index[: -len(INDEX_SUFFIX)]))
    groups = {}
    for path in sorted(left):
        m = _SHARD.match(posixpath.basename(path))
        if m:
            groups.setdefault((m["prefix"], m["n"], m["ext"]), []).append(path)
    for (prefix, _n, _ext), members in sorted(groups.items()):
        if len(members) > 1:
            left -= set(members)
            found.append((Model("", members), join(prefix)))
    config = join(ADAPTER_CONFIG)
    if config in sidecars:
        adapters = sorted(p for p in left if posixpath.basename(p).startswith("adapter_model."))
        if len(adapters) == 1:
            left -= set(adapters)
            found.append((Model("", adapters, adapter_config=config), adapters[0]))
    for path in sorted(left):
        found.append((Model("", [path]), path))
    for model, own in found:
        # A folder's only model is called by the folder (a one-file model keeps its path).
        if len(found) == 1 and folder and (len(model.files) > 1 or model.index or model.adapter_config):
            model.name = folder
        else:
            model.name = own
    return [m for m, _ in found]


def tensors_of(model, manifests):
    """{tensor name: (file path, TensorEntry)} over the model's files; ModelError naming both files
    when a tensor name is in two of them. ``manifests`` maps path -> Manifest (or None)."""
    result = {}
    for path in model.files:
        manifest = manifests.get(path)
        if manifest is None:
            continue
        for name, entry in manifest.tensors.items():
            if name in result:
                first = result[name][0]
                raise ModelError(
                    f"{model.name}: tensor {name!r} is in two files, {first} and {path}",
                    hint="a model holds each tensor once: remove the stale shard, or save the model again",
                )
            result[name] = (path, entry)
    return result


def model_for_path(models, path):
    """The model ``path`` names: a model name, its index json, a folder holding exactly one model,
    or one of its files; None when it names none."""
    path = path.rstrip("/")
    for m in models:
        if path in (m.name, m.index):
            return m
    in_folder = [m for m in models if m.folder == path]
    if len(in_folder) == 1:
        return in_folder[0]
    for m in models:
        if path in m.files:
            return m
    return None


def sidecar_bytes(repo, spec):
    """Bytes of a sidecar json blob ``spec`` (``REV:PATH`` or ``:PATH``), bounded; None if missing."""
    data = repo.read_blob(spec)
    if data is not None and len(data) > MAX_SIDECAR:
        raise ModelError(f"{spec}: {len(data)} bytes is too large for an index json")
    return data


def sidecars_at(repo, rev, paths):
    """{path: bytes} of the sidecar jsons among ``paths`` as stored in ``rev`` (None: the index)."""
    prefix = ":" if rev is None else f"{rev}:"
    result = {}
    for path in paths:
        if is_sidecar(path):
            data = sidecar_bytes(repo, prefix + path)
            if data is not None:
                result[path] = data
    return result


def is_shard(path):
    """True for a file named like one shard of several (``model-00001-of-00008.safetensors``)."""
    return _SHARD.match(posixpath.basename(path)) is not None


def stem(path):
    """The model a file name belongs to, by name: ``model-00001-of-00008.safetensors``,
    ``model.safetensors`` and ``model.safetensors.index.json`` all give ``model``."""
    base = posixpath.basename(path)
    m = _SHARD.match(base)
    if m:
        return m["prefix"]
    if base.endswith(INDEX_SUFFIX):
        base = base[: -len(INDEX_SUFFIX)]
    return base.split(".", 1)[0]


def _folder_blobs(repo, folder, rev):
    """(path, blob oid) of the files directly in ``folder`` in ``rev`` (None: the index)."""
    spec = folder + "/" if folder else "."
    if rev is None:
        out = repo.git("ls-files", "-s", "-z", "--", spec)
    else:
        out = repo.git("ls-tree", "-z", rev, "--", spec, check=False)
    for parts, path in records(out):
        if posixpath.dirname(path) != folder:
            continue
        if rev is None and parts[2] == "0":
            yield path, parts[1]
        elif rev is not None and parts[1] == "blob":
            yield path, parts[2]


def model_at(repo, rev, path):
    """(Model, {path: blob oid}) of the model holding ``path`` in commit ``rev``, formed by the
    files and index jsons of ``path``'s folder with its :func:`stem`; (None, blobs) when ``rev``
    has no ``path``. Sidecars are read bounded; an index naming a missing shard is no error here."""
    folder, own = posixpath.dirname(path), stem(path)
    blobs = {p: oid for p, oid in _folder_blobs(repo, folder, rev) if stem(p) == own}
    if path not in blobs:
        return None, blobs
    sidecars = {p: sidecar_bytes(repo, oid) for p, oid in blobs.items() if is_sidecar(p)}
    files = sorted(p for p in blobs if not is_sidecar(p))
    models = group(files, {p: d for p, d in sidecars.items() if d is not None}, exists=blobs.__contains__, strict=False)
    return next(m for m in models if path in m.files), blobs


class ParentModels:
    """The tensors of a file's model in the parent version, for clean's delta bases (one per Cleaner).

    A file's model in the parent version is every tracked checkpoint in the same folder with the
    same :func:`stem` (so a re-shard, a shard renumbering and a single file turned into shards all
    find their tensors), in the index, then HEAD (HEAD first for ``git theta add``). Manifests are
    parsed once per blob; the listing is kept while the index file and HEAD do not change.
    """

    def __init__(self, repo):
        self.repo = repo
        self._manifests = {}  # blob oid -> Manifest or None
        self._listings = {}  # (folder, rev) -> [(path, oid)]
        self._state = None

    def _current_state(self):
        import os

        head = index = None
        try:
            with open(os.path.join(self.repo.git_dir, "HEAD"), "rb") as f:
                head = f.read()
            st = os.stat(os.path.join(self.repo.git_dir, "index"))
            index = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            pass
        return head, index

    def _manifest(self, oid, path):
        from git_theta.manifest import Manifest, is_manifest

        if oid not in self._manifests:
            data = self.repo.read_blob(oid)
            manifest = None
            if data and is_manifest(data):
                try:
                    manifest = Manifest.parse(data, source=path)
                except ManifestError:
                    manifest = None
            self._manifests[oid] = manifest
        return self._manifests[oid]

    def parsed(self, data, source):
        """``Manifest.parse(data)``, shared with this cache by git blob id: clean reads a file's
        parent version for itself and again for its model (200,000 lines parsed once, not twice)."""
        import hashlib

        from git_theta.manifest import Manifest

        hasher = hashlib.sha1(b"blob %d\0" % len(data))
        hasher.update(data)
        oid = hasher.hexdigest()
        manifest = self._manifests.get(oid)
        if manifest is None:
            manifest = self._manifests[oid] = Manifest.parse(data, source=source)
        return manifest

    def at(self, rev, folder, own_stem):
        """A Manifest of all the tensors of the files of ``folder`` with stem ``own_stem`` in
        commit ``rev`` (a model as it was then, whatever its layout); None when it has none."""
        from git_theta.manifest import Manifest

        key = (folder, rev)
        if key not in self._listings:
            self._listings[key] = list(_folder_blobs(self.repo, folder, rev))
        result = None
        for other, oid in self._listings[key]:
            if stem(other) == own_stem and not is_sidecar(other):
                manifest = self._manifest(oid, other)
                if manifest is not None:
                    result = result or Manifest(format=manifest.format)
                    result.tensors.update(manifest.tensors)
        return result

    def manifests(self, path, prefer_head=False):
        """The manifests of ``path``'s model in the parent version, other files included, in the
        order their tensors count (index, then HEAD): the first that holds a name wins. Parsed
        once per git blob; a manifest's raw lines stay columns."""
        if self.repo is None or self.repo.work_tree is None:
            return []
        state = self._current_state()
        if state != self._state:
            self._listings.clear()
            self._state = state
        folder, own = posixpath.dirname(path), stem(path)
        result = []
        for rev in ("HEAD", None) if prefer_head else (None, "HEAD"):
            key = (folder, rev)
            if key not in self._listings:
                try:
                    self._listings[key] = list(_folder_blobs(self.repo, folder, rev))
                except Exception:  # no HEAD yet, or not a work tree: no candidates
                    self._listings[key] = []
            for other, oid in self._listings[key]:
                if stem(other) != own or is_sidecar(other):
                    continue
                manifest = self._manifest(oid, other)
                if manifest is not None:
                    result.append(manifest)
        return result


def model_rows(repo, rev, tracked, file_rows):
    """``git theta ls-files`` rows of the models of several files (or an adapter) in ``rev``:
    name, files, index, adapter_of, and totals of the files' rows (objects counted once)."""
    from git_theta.git.scan import version_paths

    commit = None if rev is None else rev
    paths = version_paths(repo, commit)
    by_path = {r["path"]: r for r in file_rows}
    manifests = {t.path: t.manifest for t in tracked}
    models = group(sorted(by_path), sidecars_at(repo, commit, sorted(paths)), exists=paths.__contains__)
    rows = []
    for m in models:
        if len(m.files) == 1 and m.index is None and m.adapter_config is None:
            continue
        tensors_of(m, manifests)  # a tensor in two files is an error here too
        objects = {}
        for p in m.files:
            if manifests.get(p) is not None:
                objects.update((ref.oid, ref) for ref in manifests[p].all_objects())
        rows.append(
            {
                "model": m.name,
                "files": list(m.files),
                "index": m.index,
                "adapter_of": m.base,
                "tensors": sum(by_path[p].get("tensors", 0) for p in m.files),
                "logical_bytes": sum(by_path[p].get("logical_bytes", 0) for p in m.files),
                # bytes this version added (per-file figures never count an object twice); chain: all
                # a checkout of the model needs
                "stored_bytes": sum(by_path[p].get("stored_bytes", 0) for p in m.files),
                "chain_bytes": sum(r.size for r in objects.values()),
                "objects": len(objects),
                "objects_local": sum(1 for oid in objects if repo.store.has(oid)),
            }
        )
    return rows
