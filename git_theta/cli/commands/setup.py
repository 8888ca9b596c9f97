"""Setting git-theta up: install / uninstall (git config) and track / untrack (.gitattributes)."""

import click

from git_theta.git import attributes
from git_theta.git import install as installer
from git_theta.errors import UsageError
from git_theta.git.repo import Repo


def _scope(local):
    if local:
        Repo(".")  # fails with a clear error outside a repository
        return "local"
    return "global"


@click.command()
@click.option("--local", is_flag=True, help="Configure only the current repository.")
@click.option(
    "--diff",
    "diff_driver",
    is_flag=True,
    help="Also make 'git diff' print the git-theta summary for checkpoints (diff.theta.command).",
)
@click.option(
    "--portable",
    is_flag=True,
    help="Record the bare 'git-theta' command (found on PATH when git runs it) instead of this "
    "installation's absolute path: for a global config shared between machines.",
)
def install(local, diff_driver, portable):
    """Register the git-theta filter (and drivers) in git config.

    The commands are recorded with the absolute path of this installation's git-theta, so git finds
    it when its virtual environment is not active.
    """
    scope = _scope(local)
    changed = installer.install(scope, extras=("diff",) if diff_driver else (), portable=portable)
    where = "this repository" if scope == "local" else "your global git config"
    click.echo(f"git-theta installed in {where}" + ("" if changed else " (already up to date)"))
    _install_hooks()


def _install_hooks():
    """Inside a repository, place the hooks too (a global install outside one does it later:
    the filter fills empty hook slots of every repository it runs in)."""
    from git_theta.errors import NotInRepositoryError
    from git_theta.git.hooks import install_hooks

    try:
        repo = Repo(".")
    except NotInRepositoryError:
        return
    if repo.work_tree is None:
        return
    for _hook, what in install_hooks(repo):
        click.echo(f"hooks: {what}")


@click.command()
@click.option("--local", is_flag=True, help="Remove from the current repository's config only.")
def uninstall(local):
    """Remove the git config entries that 'git theta install' wrote."""
    scope = _scope(local)
    removed, kept = installer.uninstall(scope)
    if scope == "local":
        from git_theta.git.hooks import uninstall_hooks

        for _hook, what in uninstall_hooks(Repo(".")):
            click.echo(f"hooks: {what}")
    for key in kept:
        click.echo(f"hint: left {key} alone: it no longer holds the value git-theta wrote", err=True)
    click.echo(f"git-theta uninstalled ({len(removed)} entries removed)")


def _work_tree():
    repo = Repo(".")
    if repo.work_tree is None:
        raise UsageError("this command needs a work tree")
    return repo.work_tree


@click.command()
@click.argument("patterns", nargs=-1, required=True)
def track(patterns):
    """Track checkpoints matching PATTERNS (edits .gitattributes).

    Each pattern gets the line 'PATTERN filter=theta diff=theta merge=theta -text'; quote
    patterns so the shell does not expand them, and commit .gitattributes.

    \b
    Example: git theta track '*.safetensors' '*.pt' 'checkpoints/**/*.bin'
    """
    changed = attributes.track(_work_tree(), patterns)
    from git_theta.git.hooks import ensure_hooks

    ensure_hooks(Repo("."))
    for pattern in patterns:
        state = "Tracking" if pattern in changed else "Already tracking"
        click.echo(f'{state} "{pattern}"')


@click.command()
@click.argument("patterns", nargs=-1, required=True)
def untrack(patterns):
    """Stop tracking PATTERNS (files already committed stay manifests until re-added)."""
    changed = attributes.untrack(_work_tree(), patterns)
    for pattern in patterns:
        state = "Untracking" if pattern in changed else "Was not tracking"
        click.echo(f'{state} "{pattern}"')


COMMANDS = [install, uninstall, track, untrack]
