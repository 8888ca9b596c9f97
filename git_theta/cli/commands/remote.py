"""Sharing models: push, fetch, pull, checkout, status, and the pre-push hook's entry point."""

import json
import sys

import click

from git_theta.cli import humanize


def _repo():
    from git_theta.git.repo import Repo

    return Repo(".")


def _say(as_json, text):
    if not as_json:
        click.echo(text, err=True)


def _stats_row(stats, endpoint):
    return {"remote": endpoint.remote, "endpoint": endpoint.describe(), "objects": stats.objects, "bytes": stats.bytes}


def _refs_for(repo, revs, include):
    from git_theta.git.scan import manifests_at, objects_of

    manifests = manifests_at(repo, revs)
    return manifests, objects_of(manifests, include)


@click.command()
@click.argument("remote", required=False)
@click.argument("revs", nargs=-1)
@click.option("--include", "-I", multiple=True, metavar="GLOB", help="Only tensors whose names match (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
def fetch(remote, revs, include, as_json):
    """Download the objects of the checkpoints in REVS (default HEAD) from REMOTE."""
    from git_theta.remote.endpoint import resolve
    from git_theta.remote.transfer import Transfer

    repo = _repo()
    _manifests, refs = _refs_for(repo, list(revs) or ["HEAD"], include)
    endpoint = resolve(repo, remote, "download")
    with Transfer(repo, endpoint) as transfer:
        stats = transfer.download(refs)
    row = _stats_row(stats, endpoint)
    if as_json:
        click.echo(json.dumps({**row, "oids": sorted(stats.oids)}))
    else:
        _say(False, f"fetched {stats.objects} object(s), {humanize.size(stats.bytes)} from {endpoint.describe()}")


def _checkout(repo, paths, include, force, remote, as_json):
    """Fetch what the selected files need, then write them; returns (written, partial, stats)."""
    from git_theta.errors import UsageError
    from git_theta.remote.endpoint import resolve
    from git_theta.remote.transfer import Transfer
    from git_theta.git.scan import objects_of, tracked_files
    from git_theta.filter.smudge import Smudger
    from git_theta import registry as plugins
    from git_theta.porcelain import checkout as worktree

    if repo.work_tree is None:
        raise UsageError("this command needs a work tree")
    selected = []
    for tracked in tracked_files(repo, None):
        if tracked.manifest is None:
            continue
        if paths and not any(tracked.path == p or tracked.path.startswith(p.rstrip("/") + "/") for p in paths):
            continue
        if force or worktree.needs_writing(repo, tracked.path):
            selected.append((tracked.path, tracked.manifest))
    store = repo.store
    refs = store.missing(objects_of(selected, include))
    stats = None
    if refs:
        endpoint = resolve(repo, remote, "download")
        with Transfer(repo, endpoint) as transfer:
            stats = transfer.download(refs)
    smudger = Smudger(repo)
    written, partial = [], []
    try:
        for path, manifest in selected:
            if store.missing(manifest.all_objects()):
                partial.append(path)  # --include left some tensors remote: the manifest stays
                continue
            fmt = plugins.get("format", manifest.format, needed_by=path)
            worktree.write_file(repo, smudger, path, manifest, fmt)
            written.append(path)
    finally:
        smudger.close()
        if written:
            worktree.refresh_index(repo, written)
    return written, partial, stats


def _report_checkout(written, partial, stats, as_json):
    if as_json:
        click.echo(
            json.dumps(
                {
                    "written": written,
                    "partial": partial,
                    "fetched_objects": stats.objects if stats else 0,
                    "fetched_bytes": stats.bytes if stats else 0,
                    "oids": sorted(stats.oids) if stats else [],
                }
            )
        )
        return
    if stats is not None:
        click.echo(f"fetched {stats.objects} object(s), {humanize.size(stats.bytes)}", err=True)
    for path in written:
        click.echo(f"wrote {path}", err=True)
    for path in partial:
        click.echo(f"kept the manifest of {path}: only the --include tensors were fetched", err=True)


@click.command()
@click.argument("paths", nargs=-1)
@click.option("--remote", default=None, help="Remote to fetch missing objects from (default: the usual one).")
@click.option("--include", "-I", multiple=True, metavar="GLOB", help="Only fetch tensors whose names match.")
@click.option("--force", is_flag=True, help="Also overwrite files that hold a checkpoint already.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
def checkout(paths, remote, include, force, as_json):
    """Write tracked checkpoints (PATHS, default all) into the work tree from their manifests.

    Writes files that are missing or still hold their manifest (skip-smudge), fetching missing
    objects first; then refreshes the index so git status stays clean.
    """
    repo = _repo()
    _report_checkout(*_checkout(repo, list(paths), include, force, remote, as_json), as_json)


@click.command()
@click.argument("remote", required=False)
@click.option("--include", "-I", multiple=True, metavar="GLOB", help="Only fetch tensors whose names match.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
def pull(remote, include, as_json):
    """Fetch the objects of the checked-out checkpoints and write the work-tree files."""
    repo = _repo()
    _report_checkout(*_checkout(repo, [], include, False, remote, as_json), as_json)


@click.command()
@click.argument("remote", required=False)
@click.argument("revs", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
def push(remote, revs, as_json):
    """Upload the objects of every checkpoint reachable from REVS (default HEAD) to REMOTE.

    Objects this clone already knows the remote holds are skipped; the server's batch answer says
    which of the others it lacks.
    """
    from git_theta.remote.endpoint import resolve
    from git_theta.remote.transfer import PushedRecord, Transfer
    from git_theta.git.scan import manifests_in_range, objects_of

    repo = _repo()
    endpoint = resolve(repo, remote, "upload")
    commits = [repo.git("rev-parse", "--verify", rev + "^{commit}").decode().strip() for rev in (revs or ["HEAD"])]
    known = PushedRecord(repo, endpoint).load()
    refs = [r for r in objects_of(manifests_in_range(repo, commits)) if r.oid not in known]
    with Transfer(repo, endpoint) as transfer:
        stats = transfer.upload(refs)
    if as_json:
        click.echo(json.dumps({**_stats_row(stats, endpoint), "oids": sorted(stats.oids)}))
    else:
        _say(False, f"uploaded {stats.objects} object(s), {humanize.size(stats.bytes)} to {endpoint.describe()}")


@click.command("pre-push", hidden=True)
@click.argument("remote")
@click.argument("url", required=False)
def pre_push(remote, url):
    """The pre-push hook: upload the objects of the pushed commits (ref lines on stdin)."""
    from git_theta.remote.endpoint import resolve
    from git_theta.remote.transfer import Transfer
    from git_theta.git.scan import manifests_in_range, objects_of

    repo = _repo()
    include, exclude = [], []
    zero = "0" * 40
    for line in sys.stdin.read().splitlines():
        parts = line.split()
        if len(parts) != 4:
            continue
        _local_ref, local_sha, _remote_ref, remote_sha = parts
        if set(local_sha) == {"0"}:
            continue  # a deletion sends nothing
        include.append(local_sha)
        if (
            remote_sha != zero
            and repo.git("rev-parse", "-q", "--verify", remote_sha + "^{commit}", check=False).strip()
        ):
            exclude.append(remote_sha)  # the remote's old tip, when we have it: its objects are there
    if not include:
        return
    refs = objects_of(manifests_in_range(repo, include, exclude, exclude_remote=remote))
    if not refs:
        return
    endpoint = resolve(repo, remote, "upload")
    with Transfer(repo, endpoint) as transfer:
        stats = transfer.upload(refs)
    if stats.objects:
        click.echo(
            f"git-theta: uploaded {stats.objects} object(s), {humanize.size(stats.bytes)} to {endpoint.describe()}",
            err=True,
        )


@click.command()
@click.argument("remote", required=False)
@click.option("--remote-check", "ask", is_flag=True, help="Ask the server which objects it holds.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(remote, ask, as_json):
    """Objects of the checked-out checkpoints: local, missing locally, not yet pushed."""
    from git_theta.errors import UsageError
    from git_theta.git.scan import tracked_files
    from git_theta.remote.endpoint import resolve
    from git_theta.remote.transfer import PushedRecord, Transfer

    repo = _repo()
    files = [t for t in tracked_files(repo, None) if t.manifest is not None]
    try:
        endpoint = resolve(repo, remote, "upload")
    except UsageError:
        endpoint = None
    pushed = PushedRecord(repo, endpoint).load() if endpoint else set()
    # Old versions in commits the remote lacks need their objects there too, whatever their path
    # and whether today's patterns still track it (what a push uploads: git_theta.git.scan).
    history = _unpushed_history(repo, endpoint) if endpoint else []
    if ask and endpoint is not None and (files or history):
        with Transfer(repo, endpoint) as transfer:
            pushed = transfer.present([r for t in files for r in t.manifest.all_objects()] + history)
    rows = []
    for tracked in files:
        objects = tracked.manifest.all_objects()
        local = [r for r in objects if repo.store.has(r.oid)]
        rows.append(
            {
                "path": tracked.path,
                "objects": len(objects),
                "local": len(local),
                "missing": len(objects) - len(local),
                "missing_bytes": sum(r.size for r in objects if not repo.store.has(r.oid)),
                "not_pushed": sum(1 for r in objects if r.oid not in pushed) if endpoint else None,
                "not_pushed_bytes": sum(r.size for r in objects if r.oid not in pushed) if endpoint else None,
            }
        )
    where = (
        {"remote": endpoint.remote, "endpoint": endpoint.describe(), "source": endpoint.source} if endpoint else None
    )
    late = [r for r in history if r.oid not in pushed]
    unpushed = {"objects": len(history), "not_pushed": len(late), "not_pushed_bytes": sum(r.size for r in late)}
    if as_json:
        click.echo(
            json.dumps(
                {"remote": where, "checked_with_server": bool(ask), "files": rows, "unpushed_commits": unpushed},
                indent=2,
            )
        )
        return
    if where:
        how = "asked the server" if ask else "as recorded by this clone"
        click.echo(f"remote {where['remote']}: {where['endpoint']} (from {where['source']}; pushed: {how})")
    else:
        click.echo("no remote configured")
    for row in rows:
        pushed_text = (
            ""
            if row["not_pushed"] is None
            else f", {row['not_pushed']} not pushed ({humanize.size(row['not_pushed_bytes'])})"
        )
        click.echo(
            f"{row['path']}: {row['objects']} objects, {row['local']} local, "
            f"{row['missing']} missing ({humanize.size(row['missing_bytes'])}){pushed_text}"
        )
    if late:
        click.echo(
            f"commits not on {where['remote']}: {len(late)} object(s) not pushed "
            f"({humanize.size(unpushed['not_pushed_bytes'])}), old versions included; 'git push' uploads them"
        )


def _unpushed_history(repo, endpoint):
    """The objects of every checkpoint version in HEAD's commits that ``endpoint.remote``'s
    remote-tracking refs do not contain (all of HEAD's history before a first push)."""
    from git_theta.git.scan import manifests_in_range, objects_of
    from git_theta.git.snapshots import has_head

    if not has_head(repo):
        return []
    return objects_of(manifests_in_range(repo, ["HEAD"], exclude_remote=endpoint.remote))


COMMANDS = [push, fetch, pull, checkout, status, pre_push]
