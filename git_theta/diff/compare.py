"""The diff engine: what changed between two snapshots, file by file and tensor by tensor.

Everything that can be told from the manifests (added, removed, renamed, dtype and shape changes,
which tensors differ at all) is decided by comparing digests, without loading a tensor. The numbers
of a changed tensor (see :mod:`git_theta.diff.stats`) need both versions: they are decoded from
the object store in worker threads, a few at a time within the memory budget, and the newer one is
decoded from the older one when its delta chain extends the older chain.

The result is a plain dict, the documented ``--json`` schema (README, "Diffs, history and
loading"); text, plots and the Python API all read that dict.
"""

import re
from collections import deque

from git_theta.dtypes import element_count, nbytes
from git_theta.config import settings_for

SCHEMA = 2  # 2: entries are models (kind, layout, shards_old/new); 'by' says model or file
_DIGITS = re.compile(r"(\d+)")


def natural_key(text):
    """Sort key that puts ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(text)]


def group_of(name):
    """The layer/block a tensor belongs to: the name up to its first numeric component
    (``model.layers.3.mlp.w1`` -> ``model.layers.3``), else without its last component
    (``model.embed.weight`` -> ``model.embed``), else the name itself."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else name


def _side(entry):
    if entry is None:
        return None
    return {"dtype": entry.dtype, "shape": list(entry.shape), "digest": entry.digest, "update": entry.update}


def _record(name, status, old, new):
    return {
        "name": name,
        "status": status,
        "group": group_of(name),
        "old": _side(old),
        "new": _side(new),
        "dtype_changed": bool(old and new and old.dtype != new.dtype),
        "shape_changed": bool(old and new and old.shape != new.shape),
        "stats": None,
    }


def tensor_changes(old_tensors, new_tensors):
    """Records for every tensor that differs (added, removed, renamed, changed), plus the pairs of
    entries whose numbers need the tensors loaded, and the names that are unchanged."""
    records, to_load, unchanged = [], [], []
    old_only = {n: e for n, e in old_tensors.items() if n not in new_tensors}
    new_only = {n: e for n, e in new_tensors.items() if n not in old_tensors}
    # A tensor that moved to a new name with the same bytes is a rename, not a remove + add.
    by_digest = {}
    for name, entry in sorted(old_only.items()):
        by_digest.setdefault((entry.digest, entry.dtype, entry.shape), []).append(name)
    for name, entry in sorted(new_only.items()):
        candidates = by_digest.get((entry.digest, entry.dtype, entry.shape))
        if candidates:
            # Equal bytes are common (norms initialised to ones): pair by name structure first.
            old_name = max(candidates, key=lambda c: _name_likeness(c, name))
            candidates.remove(old_name)
            record = _record(name, "renamed", old_only.pop(old_name), entry)
            record["old_name"] = old_name
            records.append(record)
            del new_only[name]
    for name, entry in old_only.items():
        records.append(_record(name, "removed", entry, None))
    for name, entry in new_only.items():
        records.append(_record(name, "added", None, entry))
    for name, new in new_tensors.items():
        old = old_tensors.get(name)
        if old is None:
            continue
        if old.same_content(new):
            unchanged.append(name)
            continue
        record = _record(name, "changed", old, new)
        records.append(record)
        if old.shape == new.shape:
            to_load.append((record, old, new))
    return records, to_load, unchanged


def _name_likeness(a, b):
    """How alike two tensor names are: shared trailing components, then shared leading ones."""
    pa, pb = a.split("."), b.split(".")
    tail = next((i for i, (x, y) in enumerate(zip(reversed(pa), reversed(pb))) if x != y), min(len(pa), len(pb)))
    head = next((i for i, (x, y) in enumerate(zip(pa, pb)) if x != y), min(len(pa), len(pb)))
    return (tail, head, len(pa) == len(pb))


def _summary(records, old_tensors, new_tensors, unchanged, accumulators):
    """Counts and aggregate numbers over a set of tensors (a file or a group)."""
    counts = {s: 0 for s in ("changed", "added", "removed", "renamed")}
    for r in records:
        counts[r["status"]] += 1
    total = None
    if accumulators is not None:  # not with --stat, which must not even import numpy
        from git_theta.diff.stats import Accumulator

        total = Accumulator()
        for acc in accumulators:
            total.merge(acc)
    # Elements of tensors compared element by element: unchanged ones count as 0 changed.
    compared = sum(element_count(old_tensors[n].shape) for n in unchanged) + (total.elements if total else 0)
    result = {
        "tensors_old": len(old_tensors),
        "tensors_new": len(new_tensors),
        "unchanged": len(unchanged),
        **counts,
        "dtype_changed": sum(r["dtype_changed"] for r in records),
        "shape_changed": sum(r["shape_changed"] for r in records),
        "bytes_old": sum(nbytes(e.dtype, e.shape) for e in old_tensors.values()),
        "bytes_new": sum(nbytes(e.dtype, e.shape) for e in new_tensors.values()),
        "delta_l2": None,
        "relative_change": None,
        "fraction_changed": None,
        "elements_changed": None,
        "elements_compared": compared,
    }
    if accumulators is not None:
        if accumulators:  # norms only over tensors that were compared element by element
            stats = total.result()
            result.update(delta_l2=stats["delta_l2"], relative_change=stats["relative_change"])
        result.update(
            fraction_changed=total.changed / compared if compared else None,
            elements_changed=total.changed,
        )
    return result


class Differ:
    """Compares manifests; loads the changed tensors (unless ``stat``) with a bounded prefetch."""

    def __init__(self, repo, stat=False, sort="name", settings=None, by_file=False):
        self.repo = repo
        self.by_file = by_file
        self.stat = stat
        self.sort = sort
        self.settings = settings or settings_for(repo)
        self._pool = None

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- whole snapshots ----------------------------------------------------------------------
    def diff(self, old, new):
        """The diff dict (schema :data:`SCHEMA`) between two :class:`~git_theta.git.snapshots.Snapshot`."""
        files = []
        if not self.by_file:
            from git_theta.diff.models import diff_models

            files, old, new = diff_models(self, old, new)
        old_paths, new_paths = set(old.files), set(new.files)
        for path in sorted(old_paths & new_paths):
            a, b = old.files[path], new.files[path]
            if a.blob is not None and a.blob == b.blob:
                continue
            entry = self.file(path, path, a, b)
            if entry is not None:
                files.append(entry)
        removed = sorted(old_paths - new_paths)
        added = sorted(new_paths - old_paths)
        for old_path, new_path in _renames(old, new, removed, added):
            removed.remove(old_path)
            added.remove(new_path)
            files.append(self.file(old_path, new_path, old.files[old_path], new.files[new_path]))
        for path in removed:
            files.append(self.file(path, path, old.files[path], None))
        for path in added:
            files.append(self.file(path, path, None, new.files[path]))
        files.sort(key=lambda f: natural_key(f["path"]))
        by = "file" if self.by_file else "model"
        return {"schema": SCHEMA, "old": old.label, "new": new.label, "stat": self.stat, "by": by, "files": files}

    # -- one file -----------------------------------------------------------------------------
    def file(self, old_path, new_path, old, new):
        """The diff entry of one file (TrackedFile or None on each side); None if nothing differs."""
        old_m = old.manifest if old is not None else None
        new_m = new.manifest if new is not None else None
        if old is not None and new is not None:
            status = "modified" if old_path == new_path else "renamed"
        else:
            status = "added" if old is None else "removed"
        problems = [
            f"{side}: {t.error or 'not a manifest (not cleaned)'}"
            for side, t in (("old", old), ("new", new))
            if t is not None and t.manifest is None
        ]
        entry = self.manifests(new_path, old_m, new_m)
        if status == "modified" and not entry["tensors"] and not problems and not entry["fields_changed"]:
            return None
        entry.update(path=new_path, old_path=old_path, status=status, kind="file")
        if problems:
            entry["problems"] = problems
        return {k: entry[k] for k in FILE_KEYS if k in entry}

    def manifests(self, path, old_m, new_m, names=None):
        """Diff entry fields (format, summary, groups, tensors) between two manifests (or None).

        ``names``, when given, limits the comparison to those tensor names.
        """
        old_t = old_m.tensors if old_m is not None else {}
        new_t = new_m.tensors if new_m is not None else {}
        if names is not None:
            old_t = {n: e for n, e in old_t.items() if n in names}
            new_t = {n: e for n, e in new_t.items() if n in names}
        records, to_load, unchanged = tensor_changes(old_t, new_t)
        accumulators = None if self.stat else self._load(path, to_load)
        members = {}  # group -> [records, old tensors, new tensors, unchanged names, accumulators]

        def group(name):
            return members.setdefault(group_of(name), [[], {}, {}, [], [] if accumulators is not None else None])

        for r in records:
            g = group(r["name"])
            g[0].append(r)
            if accumulators is not None and id(r) in accumulators:
                g[4].append(accumulators[id(r)])
        for n, e in old_t.items():
            group(n)[1][n] = e
        for n, e in new_t.items():
            group(n)[2][n] = e
        for n in unchanged:
            group(n)[3].append(n)
        group_rows = []
        for name, (recs, old_g, new_g, same, accs) in members.items():
            if recs:
                group_rows.append({"name": name, **_summary(recs, old_g, new_g, same, accs)})
        summary = _summary(
            records, old_t, new_t, unchanged, None if accumulators is None else list(accumulators.values())
        )
        fmt = (new_m or old_m).format if (new_m or old_m) else None
        return {
            "format": fmt,
            "fields_changed": _fields_changed(old_m, new_m),
            "summary": summary,
            "groups": self._sorted(group_rows, lambda g: g["relative_change"]),
            "tensors": self._sorted(records, lambda r: (r["stats"] or {}).get("relative_change")),
        }

    def _sorted(self, rows, change):
        by_name = sorted(rows, key=lambda r: natural_key(r["name"]))
        if self.sort != "change":
            return by_name
        # Biggest relative change first; rows without a number (added, removed...) after, by name.
        return sorted(by_name, key=lambda r: (change(r) is None, -(change(r) or 0.0)))

    # -- loading ------------------------------------------------------------------------------
    def _executor(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor  # not needed (nor imported) by --stat

            self._pool = ThreadPoolExecutor(self.settings.threads(), thread_name_prefix="theta-diff")
        return self._pool

    def _load(self, path, to_load):
        """Decode each (record, old, new), fill ``record['stats']``; return {id(record): Accumulator}."""
        budget = self.settings.get_int("memoryBudget")
        pool = self._executor()
        pending, in_flight, result = deque(), 0, {}
        items = deque(to_load)
        try:
            while items or pending:
                while items and (not pending or in_flight < budget):
                    record, old, new = items.popleft()
                    size = nbytes(old.dtype, old.shape) + nbytes(new.dtype, new.shape)
                    pending.append((record, size, pool.submit(self._measure, path, old, new)))
                    in_flight += size
                record, size, future = pending.popleft()
                acc = future.result()
                in_flight -= size
                record["stats"] = acc.result()
                result[id(record)] = acc
        finally:
            for _, _, future in pending:
                future.cancel()
        return result

    def _measure(self, path, old, new):
        from git_theta.updates.chain import decode_tensor
        from git_theta.diff.stats import accumulate

        store = self.repo.store
        old_data = decode_tensor(store, old, path)
        if new.update == "sparse" and new.dtype == old.dtype and tuple(new.objects[1:]) == tuple(old.objects):
            acc = self._from_sparse_delta(path, old_data, new)
            if acc is not None:
                return acc
        new_data = decode_tensor(store, new, path, known=(old, old_data))
        return accumulate(old_data, old.dtype, new_data, new.dtype, old.shape)

    def _from_sparse_delta(self, path, old_data, new):
        """The numbers straight from a ``sparse`` delta on the old tensor (only the changed elements
        are touched), or None to fall back to decoding. The delta object's hash is verified, since
        the new tensor is never rebuilt to check its digest."""
        from git_theta.store import container as object_codec
        from git_theta.tensors.bits import as_bits
        from git_theta.updates.chain import decode_tensor
        from git_theta.errors import ObjectCorruptError
        from git_theta.diff.stats import sparse_accumulate
        from git_theta.updates.sparse import decode_sparse

        ref = new.objects[0]
        try:
            raw = self.repo.store.read(ref.oid, verify=True)
            header, payload = object_codec.unpack(raw, ref.oid)
            if header.get("update") != "sparse" or len(old_data) != nbytes(new.dtype, new.shape):
                return None
            positions, xor = decode_sparse(header, payload, as_bits(old_data, new.dtype), ref.oid)
        except ObjectCorruptError:
            # Let the full decode report it, with the chain and the damaged object named.
            decode_tensor(self.repo.store, new, path)
            raise
        return sparse_accumulate(old_data, new.dtype, positions, xor)


FILE_KEYS = (
    "path",
    "old_path",
    "status",
    "kind",
    "format",
    "problems",
    "fields_changed",
    "summary",
    "groups",
    "tensors",
)


def _fields_changed(a, b):
    """File-level keys (``field``/``blob`` lines, e.g. safetensors metadata) that differ."""
    if a is None or b is None:
        return []
    keys = set(a.fields) | set(b.fields) | set(a.blobs) | set(b.blobs)
    changed = [k for k in keys if a.fields.get(k) != b.fields.get(k) or a.blobs.get(k) != b.blobs.get(k)]
    if a.format != b.format:
        changed.append("format")
    return sorted(changed)


def _renames(old, new, removed, added):
    """(old path, new path) pairs of files that moved: at least half their tensor digests shared."""
    pairs = []
    candidates = []
    for o in removed:
        om = old.files[o].manifest
        if om is None:
            continue
        od = {e.digest for e in om.tensors.values()}
        for a in added:
            am = new.files[a].manifest
            if am is None:
                continue
            ad = {e.digest for e in am.tensors.values()}
            union = od | ad
            score = len(od & ad) / len(union) if union else 1.0
            if score >= 0.5:
                candidates.append((-score, o, a))
    used_old, used_new = set(), set()
    for _, o, a in sorted(candidates):
        if o not in used_old and a not in used_new:
            pairs.append((o, a))
            used_old.add(o)
            used_new.add(a)
    return pairs
