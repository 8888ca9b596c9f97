"""Keeping the object store healthy: ``git theta fsck``, ``git theta prune`` and ``git theta repack``."""

import json

import click

from git_theta.cli import humanize


@click.command()
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help="Check all refs with their history, reflogs, stash and every worktree (default: HEAD and the index).",
)
@click.option("--repair", is_flag=True, help="Fetch missing or corrupt objects again from the remote.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--threads", type=int, default=None, help="Worker threads (default: theta.threads).")
@click.option(
    "--forget-trust",
    is_flag=True,
    help="First forget every pair this clone trusts (docs/security.md), so every tensor is "
    "sha256-verified again; the check re-trusts what it verifies.",
)
@click.pass_context
def fsck(ctx, everything, repair, as_json, threads, forget_trust):
    """Verify that every referenced object is present, intact and decodes to its tensor."""
    from git_theta.porcelain.fsck import fsck as run_fsck
    from git_theta.porcelain.fsck import repair as run_repair
    from git_theta.git.repo import Repo
    from git_theta.config import settings_for

    repo = Repo(".")
    threads = threads or settings_for(repo).threads()
    scope = "all" if everything else "head"
    if forget_trust:
        repo.store.trust.forget()
    report = run_fsck(repo, scope, threads)
    repaired = []
    if repair and not report.ok:
        repaired = run_repair(repo, report)
        report = run_fsck(repo, scope, threads)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "scope": scope,
                    "manifests": report.manifests,
                    "objects": report.objects,
                    "tensors": report.tensors,
                    "bytes_checked": report.bytes_checked,
                    "repaired": repaired,
                    "problems": [p.as_dict() for p in report.problems],
                },
                indent=2,
            )
        )
    else:
        for problem in report.problems:
            click.echo(problem.line())
        if repaired:
            click.echo(f"fetched {len(repaired)} object(s) again", err=True)
        state = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"checked {report.manifests} manifest(s), {report.objects} object(s) "
            f"({humanize.size(report.bytes_checked)}), {report.tensors} tensor(s): {state}",
            err=True,
        )
        if not report.ok:
            click.echo("hint: run 'git theta fsck --repair' to fetch damaged objects again", err=True)
    if not report.ok:
        ctx.exit(1)


@click.command()
@click.option("-n", "--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option(
    "--keep-unpushed/--include-unpushed",
    default=True,
    help="Keep objects the remote is not known to have (default), or delete them too.",
)
@click.option("--all", "delete_all", is_flag=True, help="Same as --include-unpushed.")
@click.option(
    "--expire", default=None, help="Keep unreferenced objects younger than this (default: theta.pruneExpire, 1.hour)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def prune(dry_run, keep_unpushed, delete_all, expire, as_json):
    """Delete objects that no ref, reflog, stash, index or work tree references."""
    from git_theta.porcelain.prune import parse_expire
    from git_theta.porcelain.prune import prune as run_prune
    from git_theta.git.repo import Repo
    from git_theta.config import settings_for

    keep_unpushed = keep_unpushed and not delete_all
    repo = Repo(".")
    seconds = parse_expire(expire if expire is not None else settings_for(repo).get("pruneExpire"))
    result = run_prune(repo, seconds, include_unpushed=not keep_unpushed, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    if result.kept_all:
        click.echo(f"kept all {result.kept_reachable} object(s): {result.kept_all}", err=True)
        click.echo(
            "hint: fix or remove that worktree (git worktree repair / git worktree remove), "
            "then run 'git theta prune' again",
            err=True,
        )
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {result.deleted} object(s), {humanize.size(result.bytes_freed)}")
    click.echo(
        f"kept {result.kept_reachable} reachable, {result.kept_recent} recent, "
        f"{result.kept_unpushed} not known to be pushed"
        + (f", {result.restored} put back (in use meanwhile)" if result.restored else ""),
        err=True,
    )
    if result.kept_unpushed and keep_unpushed:
        click.echo(
            "hint: unreachable objects the remote may not have are kept; "
            "'git theta prune --include-unpushed' deletes them too",
            err=True,
        )


@click.command()
@click.option("-n", "--dry-run", is_flag=True, help="Only report what would be rewritten.")
@click.option(
    "--expire", default=None, help="Leave packs modified more recently than this (default: theta.pruneExpire)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def repack(dry_run, expire, as_json):
    """Rewrite packs holding tensors nothing references, keeping only the referenced ones."""
    from git_theta.porcelain.prune import parse_expire
    from git_theta.porcelain.repack import repack as run_repack
    from git_theta.git.repo import Repo
    from git_theta.config import settings_for

    repo = Repo(".")
    seconds = parse_expire(expire if expire is not None else settings_for(repo).get("pruneExpire"))
    result = run_repack(repo, seconds, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    verb = "would rewrite" if dry_run else "rewrote"
    click.echo(
        f"{verb} {result.packs_rewritten} pack(s): kept {result.members_kept} object(s), "
        f"dropped {result.members_dropped}, {humanize.size(result.bytes_freed)} freed"
    )
    if result.kept_unpushed:
        click.echo(
            f"kept {result.kept_unpushed} pack(s) whole: manifests name them and no remote is known to have them",
            err=True,
        )
        click.echo("hint: push first (git theta push), then repack", err=True)


COMMANDS = [fsck, prune, repack]
