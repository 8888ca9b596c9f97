"""The commands git itself runs: the long-running filter process and the single-shot filters."""

import sys

import click

from git_theta.cli.messages import report


@click.command("filter-process", hidden=True)
def filter_process():
    """Serve git's long-running filter protocol on stdin/stdout."""
    from git_theta.filter.process import run

    run(report)


@click.command(hidden=True)
@click.argument("path")
def clean(path):
    """Single-shot clean: checkpoint on stdin, manifest on stdout."""
    from git_theta.filter.clean import Cleaner
    from git_theta.git.repo import Repo

    repo = Repo(".")
    cleaner = Cleaner(repo)
    try:
        data = cleaner.clean(sys.stdin.buffer, path)
    finally:
        cleaner.close()
        repo.close()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@click.command(hidden=True)
@click.argument("path")
def smudge(path):
    """Single-shot smudge: manifest on stdin, checkpoint on stdout."""
    from git_theta.git.repo import Repo
    from git_theta.filter.smudge import Smudger

    repo = Repo(".")
    smudger = Smudger(repo)
    data = sys.stdin.buffer.read()
    try:
        prepared, missing = smudger.plan(data, path)
        if missing is not None:
            report(missing, path)  # the manifest stays; see Smudger.plan
        if prepared is None:
            sys.stdout.buffer.write(data)
        else:
            smudger.write(*prepared, path, sys.stdout.buffer)
    finally:
        smudger.close()
        repo.close()
    sys.stdout.buffer.flush()


COMMANDS = [filter_process, clean, smudge]
