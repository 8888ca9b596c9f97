"""``git theta log``: the commits that changed tracked checkpoints or chosen tensors, and by how much.

git walks the history (``git log -- PATHS``, so its path limiting and merge simplification apply);
each commit's manifests are compared with its parents' by digest. A non-merge commit changed a
tensor when the digest differs from its parent's. A merge is listed only for tensors that differ
from *every* parent (a tensor-level merge made something new); a tensor taken unchanged from one
side was changed by a commit on that side, which is listed on its own. Sizes are measured against
the first parent, with the numbers of :mod:`git_theta.diff.stats`.
"""

import fnmatch
import subprocess

from git_theta.diff.text import describe, number

SCHEMA = 1
_FORMAT = "%H%x1f%P%x1f%an%x1f%aI%x1f%s%x1e"


def _walk(repo, rev, paths):
    """Yield (commit, [parents], author, date, subject) lazily from ``git log``."""
    proc = subprocess.Popen(
        ["git", "log", f"--format={_FORMAT}", rev, "--", *paths],
        cwd=repo.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        buffer = b""
        while True:
            chunk = proc.stdout.read1(1 << 16) if hasattr(proc.stdout, "read1") else proc.stdout.read(1 << 16)
            if not chunk:
                break
            buffer += chunk
            *records, buffer = buffer.split(b"\x1e")
            for record in records:
                record = record.strip(b"\n")
                if record:
                    commit, parents, author, date, subject = record.decode("utf-8", "replace").split("\x1f")
                    yield commit, parents.split(), author, date, subject
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


def _manifest(repo, commit, path):
    from git_theta.git.snapshots import manifest_of

    manifest, _ = manifest_of(repo.read_blob(f"{commit}:{path}"), f"{path} at {commit[:12]}")
    return manifest


def _matching(tensors, params):
    if not params:
        return set(tensors)
    return {n for n in tensors if any(n == p or fnmatch.fnmatchcase(n, p) for p in params)}


def history(repo, paths=None, params=None, max_count=None, rev="HEAD", stat=False):
    """The log dict: ``{"schema", "rev", "paths", "params", "commits": [...]}``, newest first."""
    from git_theta.diff.compare import Differ
    from git_theta.git.footprint import added_by
    from git_theta.git.scan import tracked_files
    from git_theta.git.snapshots import resolve_commit

    from git_theta.git.snapshots import has_head

    empty = {"schema": SCHEMA, "rev": rev, "paths": paths or [], "params": params or [], "commits": []}
    if rev == "HEAD" and not has_head(repo):
        return empty  # no commits yet: an empty history, as git log would say
    start = resolve_commit(repo, rev)
    files = [t.path for t in tracked_files(repo, start)]
    if paths:
        from git_theta.git.snapshots import PathFilter

        match = PathFilter(paths)
        # Paths that no longer exist at REV are still followed when named exactly.
        files = sorted({f for f in files if match(f)} | {p for p in paths if p not in files and p != "."})
    commits = []
    if not files:
        return dict(empty, paths=files)
    units, walk_paths, at = _units(repo, start, files)
    with Differ(repo, stat=stat) as differ:
        for commit, parents, author, date, subject in _walk(repo, start, walk_paths):
            changed_files = []
            for path, model in units:
                new = at(commit, path, model)
                olds = [at(p, path, model) for p in parents] or [None]
                names = _changed_names(new, olds, params)
                if not names:
                    continue
                if len(parents) < 2:
                    # Summaries cover every tensor asked about, so "fraction changed" means the
                    # same as in git theta diff; a merge shows only what it made new.
                    names = _matching(_names(new) | _names(olds[0]), params)
                entry = differ.manifests(path, olds[0], new, names=names)
                entry["path"] = path
                entry["kind"] = "model" if model is not None else "file"
                changed_files.append(entry)
            if changed_files:
                # what the commit added to the store, per file (one meaning of "stored", see
                # git_theta.git.footprint): known from manifests, so --stat has it too
                added = added_by(repo, commit)
                for entry in changed_files:
                    entry["stored_bytes"] = added[entry["path"]].bytes if entry["path"] in added else 0
                choice = _merge_choice(repo, commit) if len(parents) > 1 else None
                commits.append(
                    {
                        **({"merge_choice": choice} if choice else {}),
                        "commit": commit,
                        "parents": parents,
                        "merge": len(parents) > 1,
                        "author": author,
                        "date": date,
                        "subject": subject,
                        "files": changed_files,
                    }
                )
                if max_count is not None and len(commits) >= max_count:
                    break
    return {"schema": SCHEMA, "rev": rev, "paths": files, "params": params or [], "commits": commits}


def _units(repo, start, files):
    """What the log follows: [(name, model)] where a model of several files (a sharded folder) is
    one unit read by tensor name across whatever shards it had at each commit (model is then
    (folder, stem)), else the file itself (model None); the paths for git log; a reader
    ``at(commit, name, model)`` of the unit's Manifest (None when absent)."""
    from git_theta.git.models import ParentModels, group, sidecars_at, stem
    from git_theta.git.scan import version_paths

    paths = version_paths(repo, start)
    models = group([f for f in files if f in paths], sidecars_at(repo, start, sorted(paths)), exists=paths.__contains__)
    units, walk = [], []
    grouped = set()
    for m in models:
        if len(m.files) > 1 or m.index is not None:
            units.append((m.name, (m.folder, stem(m.files[0]))))
            walk.append(m.folder or ".")
            grouped.update(m.files)
    units += [(f, None) for f in files if f not in grouped]
    walk += [f for f in files if f not in grouped]
    reader = ParentModels(repo)

    def at(commit, name, model):
        return _manifest(repo, commit, name) if model is None else reader.at(commit, *model)

    return sorted(units, key=lambda u: u[0]), sorted(set(walk)), at


def _merge_choice(repo, commit):
    """How ``git theta merge --search`` or ``auto`` chose this merge (its git note), or None."""
    from git_theta.git.notes import read_note

    return read_note(repo, commit)


def _names(manifest):
    return set(manifest.tensors) if manifest is not None else set()


def _changed_names(new, olds, params):
    """Names (matching ``params``) whose content differs from every parent's."""
    new_t = new.tensors if new is not None else {}
    names = set()
    candidates = set(new_t)
    for old in olds:
        candidates |= set(old.tensors) if old is not None else set()
    for name in _matching(candidates, params):
        entry = new_t.get(name)
        differs = True
        for old in olds:
            before = old.tensors.get(name) if old is not None else None
            if (entry is None and before is None) or (entry is not None and entry.same_content(before)):
                differs = False
                break
        if differs:
            names.add(name)
    return names


def render_log(result, style, size=lambda n: f"{n} B"):
    """Text of the log: one header per commit, a line per file, a line per tensor with --param.
    ``size`` formats a byte count (the command line passes its human-readable one)."""
    from git_theta.diff.text import table

    lines = []
    detail = bool(result["params"])
    for c in result["commits"]:
        if lines:
            lines.append("")
        merge = style(" (merge)", "cyan") if c["merge"] else ""
        lines.append(f"{style(c['commit'][:12], 'yellow')} {c['date'][:10]} {c['subject']}{merge}")
        if c.get("merge_choice"):
            from git_theta.git.notes import note_summary

            lines.append("    " + note_summary(c["merge_choice"]))
        rows = []
        for f in c["files"]:
            s = f["summary"]
            counts = ", ".join(f"{s[k]} {k}" for k in ("changed", "added", "removed", "renamed") if s[k])
            stored = f"stored {size(f['stored_bytes'])}" if "stored_bytes" in f else ""
            rows.append([f["path"], counts, _rel(s["relative_change"]), _pct(s), stored])
            if detail:
                for t in f["tensors"]:
                    st = t["stats"] or {}
                    what = t["status"]
                    if t["shape_changed"] or t["dtype_changed"]:
                        what += f" ({describe(t)})"
                    rows.append(["  " + t["name"], what, _rel(st.get("relative_change")), _pct_tensor(st), ""])
        lines.extend(table(rows, right=(2, 3, 4), style=style, indent="    "))
    if not result["commits"]:
        lines.append("no commits changed " + (", ".join(result["params"]) if result["params"] else "these files"))
    return "\n".join(lines)


def _rel(x):
    return f"rel.change {number(x)}" if x is not None else ""


def _pct(s):
    if s["fraction_changed"] is None or not s["elements_compared"]:
        return ""
    return f"{number(s['fraction_changed'], 'pct')} of elements"


def _pct_tensor(st):
    return f"{number(st['fraction_changed'], 'pct')} of elements" if st else ""
