"""Commands about how versions are stored: ``git theta add`` with a forced or user-supplied update.

``git theta add`` cannot call the clean filter itself (git runs it), so it passes its choice to the
``git add`` it runs through the environment: ``GIT_THETA_ADD_REQUEST`` holds JSON keyed by the
repository-relative path (update type, absolute adapter path, base ``REV:PATH``). The variable only
exists for that one ``git add`` and its filter process, so nothing is left behind if it fails, and
the settings layer reads it like any other ``GIT_THETA_*`` setting.
"""

import json
import os
import subprocess

import click

from git_theta.errors import GitThetaError, UsageError


@click.command("add", context_settings={"ignore_unknown_options": False})
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option(
    "--update-type", metavar="NAME", help="Store changed tensors with this update type (see 'git theta plugins')."
)
@click.option(
    "--update-path",
    "--update-data",
    "update_path",
    metavar="FILE",
    type=click.Path(exists=True),
    help="An adapter describing the change: PEFT lora_A/lora_B (scaling from adapter_config.json; "
    "a PEFT adapter folder works too), or <param>/R|C, <param>/data|indices|indptr|shape, <param>/ia3. "
    "With a sharded model each target is applied to whichever shard holds it.",
)
@click.option(
    "--base", metavar="REV:PATH", help="The version to store the change against (default: HEAD's, else the index's)."
)
def add(paths, update_type, update_path, base):
    """Stage checkpoints like 'git add', choosing how their changes are stored.

    A folder stands for the tracked checkpoints in it (a sharded model: all its shards)."""
    from git_theta import registry as plugins
    from git_theta.git.scan import theta_paths
    from git_theta.git.repo import Repo

    repo = Repo(".")
    if repo.work_tree is None:
        raise UsageError("git theta add needs a work tree")
    relative = _expand_folders(repo, [repo.relative(p) for p in paths])
    untracked = sorted(set(relative) - theta_paths(repo, relative))
    if untracked:
        raise UsageError(
            f"{untracked[0]} is not tracked by git-theta",
            hint=f"track it first: git theta track '{untracked[0]}'",
        )
    if update_type is not None:
        plugins.get("update", update_type, needed_by="--update-type")
    targets = {}
    if update_path is not None:
        from git_theta.filter.adapters import load_adapter

        update_path = _adapter_file(update_path)
        adapter = load_adapter(update_path, update_type)  # report a bad adapter before git runs
        targets = _targets_by_file(repo, adapter, relative)
        update_path = os.path.abspath(update_path)
    if base is not None:
        if ":" not in base:
            raise UsageError(f"--base {base}: expected REV:PATH, e.g. HEAD~1:model.safetensors")
        data = repo.read_blob(base)
        if data is None:
            raise UsageError(f"--base {base} does not exist")
    request = {p: {"update_type": update_type, "update_path": update_path, "base": base} for p in relative}
    if update_path is not None:
        for p in relative:
            request[p]["targets"] = targets.get(p, [])
    env = dict(os.environ, GIT_THETA_ADD_REQUEST=json.dumps(request, sort_keys=True))
    in_index = {
        line
        for line in repo.git("ls-files", "-z", "--", *relative).decode("utf-8", "surrogateescape").split("\0")
        if line
    }
    gone = {p for p in in_index if not os.path.lexists(os.path.join(repo.work_tree, p))}  # a re-shard's old files
    # --renormalize makes git run clean even when the file looks unchanged to the index.
    for group, extra in ((sorted(in_index - gone), ["--renormalize"]), (sorted(set(relative) - in_index | gone), [])):
        if group:
            proc = subprocess.run(["git", "add", *extra, "--", *group], cwd=repo.work_tree, env=env)
            if proc.returncode != 0:
                raise GitThetaError(f"git add failed for {', '.join(group)} (see the error above)")


COMMANDS = [add]


def _expand_folders(repo, relative):
    """Repository paths with each folder replaced by the tracked checkpoints in it (its model's
    shards, staged or new), in order, each once."""
    from git_theta.git.scan import theta_paths

    result = []
    for path in relative:
        if not os.path.isdir(os.path.join(repo.work_tree, path)):
            result.append(path)
            continue
        out = repo.git("ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", path or ".")
        inside = sorted({p for p in out.decode("utf-8", "surrogateescape").split("\0") if p})
        found = sorted(theta_paths(repo, inside))
        if not found:
            raise UsageError(
                f"{path or '.'}: no checkpoint tracked by git-theta in this folder",
                hint="track the files first: git theta track 'PATTERN'",
            )
        result.extend(found)
    return list(dict.fromkeys(result))


def _adapter_file(path):
    """The adapter weights file of ``path``: itself, or a PEFT folder's adapter_model.*."""
    if not os.path.isdir(path):
        return path
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise UsageError(
        f"{path}: a folder without adapter_model.safetensors (or .bin)",
        hint="name the adapter file itself with --update-path",
    )


def _targets_by_file(repo, adapter, relative):
    """{path: [adapter target]}: which of the files holds each of the adapter's targets (a sharded
    model holds each in one shard). UpdateError naming a target no file holds."""
    from git_theta.errors import UpdateError

    holders = {}
    relative = [p for p in relative if os.path.isfile(os.path.join(repo.work_tree, p))]  # not deletions
    for path in relative:
        names = _tensor_names(os.path.join(repo.work_tree, path), path)
        for key in adapter.targets_in(names):
            holders.setdefault(key, []).append(path)
    for key, supplied in sorted(adapter.updates.items()):
        if key not in holders:
            where = relative[0] if len(relative) == 1 else f"the {len(relative)} files given"
            raise UpdateError(
                f"update {supplied.key!r} in {adapter.source}: target tensor {key!r} matches no tensor of {where}",
                hint="check that the adapter belongs to this model (a sharded model: name its folder "
                "or all its shards)",
            )
    return {p: sorted(k for k, held in holders.items() if p in held) for p in relative}


def _tensor_names(full_path, path):
    """The tensor names of the checkpoint file ``full_path``: from the header alone for
    safetensors, else by reading the file through its format."""
    from git_theta.formats.detect import detect_format

    with open(full_path, "rb") as stream:
        head = stream.read(4096)
        stream.seek(0)
        fmt = detect_format(None, path, head)
        if fmt.name == "safetensors":
            from git_theta.formats.safetensors_format import header_names

            return header_names(stream, path)
        return [t.name for t in fmt.split(stream, path).tensors()]


def tensor_rows(manifest, added):
    """Per tensor of ``manifest``: name, update type, chain depth, logical bytes, stored bytes
    (its own object when this version added it: see :mod:`git_theta.git.footprint`; ``added`` is
    the set of oids the version added, each counted at its first tensor) and chain bytes."""
    from git_theta.dtypes import nbytes

    counted = set()
    rows = []
    for _, e in sorted(manifest.tensors.items()):
        own = e.objects[0]
        # a packed object is new when its pack is (what the version added is counted in packs)
        new = own.home.oid in added and own.oid not in counted
        counted.add(own.oid)
        rows.append(
            {
                "name": e.name,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "update": e.update,
                "depth": e.chain_depth,
                "logical_bytes": nbytes(e.dtype, e.shape),
                "stored_bytes": own.size if new else 0,
                "chain_bytes": sum(r.size for r in e.objects),
            }
        )
    return rows


def file_summary(path, rows, stored=None):
    """Totals of :func:`tensor_rows` for one file; ``stored`` the bytes the version added for it
    (side objects included), else the tensors' sum."""
    by_update = {}
    for row in rows:
        by_update[row["update"]] = by_update.get(row["update"], 0) + 1
    return {
        "path": path,
        "tensors": len(rows),
        "logical_bytes": sum(r["logical_bytes"] for r in rows),
        "stored_bytes": sum(r["stored_bytes"] for r in rows) if stored is None else stored,
        "max_depth": max((r["depth"] for r in rows), default=0),
        "updates": dict(sorted(by_update.items())),
    }


def ls_files_verbose(rev, as_json):
    """``git theta ls-files -v``: a line per tensor and a summary line per file."""
    from git_theta.cli import humanize
    from git_theta.git.footprint import added_by
    from git_theta.git.scan import tracked_files
    from git_theta.git.repo import Repo

    repo = Repo(".")
    files = []
    tracked_list = tracked_files(repo, rev)
    added = added_by(repo, rev, tracked_list)
    for tracked in tracked_list:
        if tracked.manifest is None:
            files.append({"path": tracked.path, "status": tracked.error or "not a manifest (not cleaned)"})
            continue
        rows = tensor_rows(tracked.manifest, added[tracked.path].oids)
        files.append(dict(file_summary(tracked.path, rows, added[tracked.path].bytes), tensor_list=rows))
    if as_json:
        click.echo(json.dumps({"rev": rev or ":index", "files": files}, indent=2))
        return
    if files:
        click.echo(f"{'update':9} {'depth':>5} {'stored':>9} {'raw':>9}  tensor")
    for f in files:
        if "status" in f:
            click.echo(f"{f['path']}: {f['status']}")
            continue
        for r in f["tensor_list"]:
            click.echo(
                f"{r['update']:9} {r['depth']:>5} {humanize.size(r['stored_bytes']):>9} "
                f"{humanize.size(r['logical_bytes']):>9}  {r['name']}"
            )
        kinds = ", ".join(f"{n} {k}" for k, n in f["updates"].items())
        ratio = f["stored_bytes"] / f["logical_bytes"] if f["logical_bytes"] else 0.0
        click.echo(
            f"{f['path']}: {f['tensors']} tensors ({kinds}), logical {humanize.size(f['logical_bytes'])}, "
            f"stored {humanize.size(f['stored_bytes'])} ({ratio:.3f}), max chain depth {f['max_depth']}"
        )
