"""Looking at what is tracked: ls-files, du and plugins.

"stored" means one thing in every command: the bytes a version adds to the object store, the
objects it references that its parent version did not (see :mod:`git_theta.git.footprint`).
"""

import json

import click

from git_theta.cli import humanize


@click.command("ls-files")
@click.argument("rev", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-v", "--verbose", is_flag=True, help="Per tensor: update type, chain depth, stored bytes.")
@click.option("--by-file", is_flag=True, help="One line per file, not per model (sharded folders).")
def ls_files(rev, as_json, verbose, by_file):
    """List tracked checkpoints in REV (default: the index) with sizes, a sharded folder as one
    model (and a PEFT adapter as an adapter of its base).

    'logical' is the checkpoint's tensor bytes; 'stored' is the bytes of the objects this version
    added to the store (objects its parent commit, or HEAD for the index, did not reference);
    'chain' is every object a checkout of it needs (its deltas and their bases); 'local' counts
    the objects present here of those referenced.
    """
    if verbose:
        from git_theta.cli.commands.updates import ls_files_verbose

        ls_files_verbose(rev, as_json)
        return
    from git_theta.git.footprint import added_by
    from git_theta.git.scan import tracked_files
    from git_theta.git.repo import Repo

    repo = Repo(".")
    rows = []
    files = tracked_files(repo, rev)
    added = added_by(repo, rev, files)
    for tracked in files:
        m = tracked.manifest
        if m is None:
            rows.append({"path": tracked.path, "status": tracked.error or "not a manifest (not cleaned)"})
            continue
        objects = m.all_objects()
        local = sum(1 for r in objects if repo.store.has(r.oid))
        rows.append(
            {
                "path": tracked.path,
                "format": m.format,
                "tensors": len(m.tensors),
                "logical_bytes": m.logical_size(),
                "stored_bytes": added[tracked.path].bytes,
                "chain_bytes": sum(r.size for r in objects),
                "objects": len(objects),
                "objects_local": local,
            }
        )
    from git_theta.git.models import model_rows

    models = model_rows(repo, rev, files, rows)
    if as_json:
        click.echo(json.dumps({"rev": rev or ":index", "files": rows, "models": models}, indent=2))
        return
    if not rows:
        click.echo("no tracked checkpoints", err=True)
        return
    if not by_file:
        rows = [r for r in rows if r["path"] not in {p for m in models for p in m["files"]}]
        rows += [dict(m, path=m["model"] + _model_note(m)) for m in models]
        rows.sort(key=lambda r: r["path"])
    header = ("tensors", "logical", "stored", "chain", "local", "path")
    table = [header]
    for row in rows:
        if "tensors" not in row:
            table.append(("-", "-", "-", "-", "-", f"{row['path']}  ({row['status']})"))
            continue
        table.append(
            (
                str(row["tensors"]),
                humanize.size(row["logical_bytes"]),
                humanize.size(row["stored_bytes"]),
                humanize.size(row["chain_bytes"]),
                f"{row['objects_local']}/{row['objects']}",
                row["path"],
            )
        )
    _print_table(table)


def _print_table(table):
    """Right-aligned columns, the last (a path) left as is."""
    n = len(table[0]) - 1
    widths = [max(len(r[i]) for r in table) for i in range(n)]
    for r in table:
        click.echo("  ".join(r[i].rjust(widths[i]) for i in range(n)) + "  " + r[n])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def du(as_json):
    """Show how much the object store holds: in total, reachable, unreachable and per file.

    Reachable objects are needed by a manifest of some branch, tag, reflog entry, index or work
    tree; unreachable ones are what 'git theta prune' removes (once older than theta.pruneExpire).
    Per file: the local objects of every reachable version of that path (an object two files
    share counts in both). Sizes are the objects' sizes on disk.
    """
    from git_theta.git.footprint import disk_usage
    from git_theta.git.repo import Repo

    usage = disk_usage(Repo("."))
    if as_json:
        out = {k: usage[k].as_dict() for k in ("total", "reachable", "unreachable")}
        out["files"] = [dict(path=path, **u.as_dict()) for path, u in usage["files"].items()]
        click.echo(json.dumps(out, indent=2))
        return
    table = [("bytes", "objects", "")]
    for key in ("total", "reachable", "unreachable"):
        table.append((humanize.size(usage[key].bytes), str(usage[key].objects), key))
    for path, u in usage["files"].items():
        table.append((humanize.size(u.bytes), str(u.objects), f"  {path}"))
    _print_table(table)


def _model_note(model):
    n = len(model["files"])
    note = f"/  ({n} file{'s' if n != 1 else ''}"
    if model["adapter_of"]:
        note += f", adapter of {model['adapter_of']}"
    return note + ")"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins(as_json):
    """List installed plugins: formats, update types and merge operators, with their packages."""
    from git_theta import registry

    rows = registry.describe()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [("kind", "name", "package", "origin")]
    for row in rows:
        origin = "built-in" if row["builtin"] else row["location"]
        table.append((row["kind"], row["name"], f"{row['package']} {row['version']}", origin))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        click.echo("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])


COMMANDS = [ls_files, du, plugins]
