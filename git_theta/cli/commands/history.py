"""Seeing what changed: ``git theta diff``, ``git theta log`` and the ``git diff`` driver."""

import json
import os
import sys

import click

from git_theta.errors import UsageError


class _DashDashCommand(click.Command):
    """Keeps what follows ``--`` apart (paths), as git does; click would merge it with the revs."""

    def parse_args(self, ctx, args):
        if "--" in args:
            i = args.index("--")
            ctx.meta["theta_paths"] = args[i + 1 :]
            args = args[:i]
        return super().parse_args(ctx, args)


def _style(color):
    from git_theta.diff.text import Style

    if color == "always":
        return Style(True)
    if color == "never":
        return Style(False)
    return Style(sys.stdout.isatty())


def _split_revs_and_paths(repo, args, paths):
    """Revisions first, then paths (git's rule: an argument that is not a revision but exists is
    a path, and everything after it is too)."""
    from git_theta.git.snapshots import resolve_commit

    revs = []
    for i, arg in enumerate(args):
        if ".." in arg and not os.path.exists(arg):
            left, sep, right = arg.partition("...") if "..." in arg else arg.partition("..")
            left, right = left or "HEAD", right or "HEAD"
            if sep == "...":
                base = repo.git("merge-base", resolve_commit(repo, left), resolve_commit(repo, right))
                revs += [base.decode().strip(), right]
            else:
                revs += [left, right]
            continue
        try:
            resolve_commit(repo, arg)
        except UsageError:
            if os.path.exists(arg):
                return revs, list(args[i:]) + list(paths or [])
            raise UsageError(
                f"{arg!r}: unknown revision or path not in the work tree",
                hint="use '--' to separate paths from revisions: git theta diff [REV [REV]] -- PATH...",
            ) from None
        revs.append(arg)
    return revs, list(paths or [])


def sides(revs, cached):
    """(old, new) snapshot names for git diff's argument forms."""
    from git_theta.git.snapshots import INDEX, WORKTREE

    if len(revs) > 2:
        raise UsageError("at most two revisions", hint="git theta diff [REV [REV]] [--cached] [-- PATH...]")
    if len(revs) == 2:
        if cached:
            raise UsageError("--cached compares the index with one revision, not two")
        return revs[0], revs[1]
    if len(revs) == 1:
        return revs[0], INDEX if cached else WORKTREE
    return ("HEAD", INDEX) if cached else (INDEX, WORKTREE)


@click.command("diff", cls=_DashDashCommand)
@click.argument("revs", nargs=-1)
@click.option("--cached", "--staged", "cached", is_flag=True, help="Compare the index with HEAD (or REV).")
@click.option("--stat", is_flag=True, help="Names and counts only (no tensor is loaded).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema in the README).")
@click.option(
    "--sort",
    type=click.Choice(["name", "change"]),
    default="name",
    show_default=True,
    help="Order tensors and layers by name or by relative change (largest first).",
)
@click.option(
    "--plot", "plot_path", type=click.Path(dir_okay=False), help="Also draw the relative change per tensor to this PNG."
)
@click.option("--by-file", is_flag=True, help="One entry per checkpoint file, not per model (sharded folders).")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
def diff(revs, cached, stat, as_json, sort, plot_path, by_file, color):
    """Show what changed in tracked checkpoints, tensor by tensor.

    \b
    git theta diff               work tree vs index
    git theta diff --cached      index vs HEAD
    git theta diff REV           REV vs work tree (REV vs index with --cached)
    git theta diff REV1 REV2     REV1 vs REV2 (also REV1..REV2, REV1...REV2)

    Paths after '--' limit the diff to those files (directories and globs work too).
    """
    from git_theta.porcelain.api import run_diff
    from git_theta.git.repo import Repo
    from git_theta.git.snapshots import repo_paths

    ctx = click.get_current_context()
    repo = Repo(".")
    try:
        revs, paths = _split_revs_and_paths(repo, revs, ctx.meta.get("theta_paths"))
        paths = repo_paths(repo, paths)
        old, new = sides(revs, cached)
        if plot_path and stat:
            raise UsageError("--plot needs the numbers: drop --stat")
        result = run_diff(repo, old, new, paths=paths, stat=stat, sort=sort, by_file=by_file)
    finally:
        repo.close()
    if plot_path:
        from git_theta.diff.plot import plot_diff

        plot_diff(result, plot_path)
    _print_diff(result, as_json, stat, _style(color))
    if plot_path:
        click.echo(f"plot written to {plot_path}", err=True)


def _print_diff(result, as_json, stat, style):
    from git_theta.diff.text import render, render_stat

    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif stat:
        click.echo(render_stat(result, style), color=style.color)  # color=: click strips ANSI off a tty
    else:
        click.echo(render(result, style), color=style.color)


@click.command("diff-driver", hidden=True)
@click.argument("args", nargs=-1)
def diff_driver(args):
    """git's external diff: PATH OLD-FILE OLD-HEX OLD-MODE NEW-FILE NEW-HEX NEW-MODE [NEW-PATH INFO]."""
    from git_theta.diff.driver import run

    sys.exit(run(list(args), sys.stdout))


@click.command("log", cls=_DashDashCommand)
@click.argument("paths", nargs=-1)
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="NAME_OR_GLOB",
    help="Only commits that changed these tensors (fnmatch globs, e.g. 'model.layers.3.*').",
)
@click.option("-n", "--max-count", "max_count", type=int, help="Show at most N commits.")
@click.option("--rev", default="HEAD", show_default=True, help="Walk history from this revision.")
@click.option("--stat", is_flag=True, help="Names only: do not load tensors to size the changes.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema in the README).")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
def log(paths, params, max_count, rev, stat, as_json, color):
    """Commits that changed tracked checkpoints (or the tensors --param names), with the size of
    each change."""
    from git_theta.diff.history import history, render_log
    from git_theta.git.repo import Repo
    from git_theta.git.snapshots import repo_paths

    ctx = click.get_current_context()
    repo = Repo(".")
    try:
        paths = repo_paths(repo, list(paths) + list(ctx.meta.get("theta_paths", [])))
        result = history(repo, paths=paths, params=list(params), max_count=max_count, rev=rev, stat=stat)
    finally:
        repo.close()
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from git_theta.cli import humanize

        style = _style(color)
        click.echo(render_log(result, style, humanize.size), color=style.color)


COMMANDS = [diff, log, diff_driver]
