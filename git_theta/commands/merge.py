"""Model merging: the merge driver git runs, ``git theta merge`` and ``git theta merge-files``."""

import sys

import click

from ..errors import GitThetaError
from ..messages import report

MAX_LISTED = 20


def conflict_hint():
    from .. import plugins

    names = ", ".join(plugins.names("merge")) or "none installed"
    return (
        "configure an operator and merge again (git merge --abort first): "
        "'git config theta.merge.operator ties', per tensor 'git config --add theta.merge.rule \"lm_head.* ours\"', "
        "or 'git theta merge --operator NAME BRANCH'; or keep one side: 'git checkout --ours|--theirs -- PATH'. "
        f"Operators: {names}"
    )


def print_conflicts(result, stream):
    conflicts = result.conflicts
    print(f"git-theta: {result.path}: {len(conflicts)} conflict(s), ours kept:", file=stream)
    for outcome in conflicts[:MAX_LISTED]:
        print(f"  {outcome.name}: {outcome.reason}", file=stream)
    if len(conflicts) > MAX_LISTED:
        print(f"  ... and {len(conflicts) - MAX_LISTED} more", file=stream)


def summary(result):
    merged = {}
    for outcome in result.outcomes:
        if outcome.action in ("operator", "pick"):
            merged[outcome.operator] = merged.get(outcome.operator, 0) + 1
    parts = [f"{n} by {op}" for op, n in sorted(merged.items())]
    parts.append(f"{result.count('take')} by the structural rules")
    return f"git-theta: {result.path}: merged " + ", ".join(parts)


@click.command("merge-driver", hidden=True)
@click.argument("base")
@click.argument("ours")
@click.argument("theirs")
@click.argument("marker_size", required=False, default="7")
@click.argument("pathname", required=False, default="")
def merge_driver(base, ours, theirs, marker_size, pathname):
    """git's merge driver: merge the manifests BASE, OURS, THEIRS; the result replaces OURS."""
    from ..merge import driver
    from ..repo import Repo

    pathname = pathname or ours
    repo = Repo(".")
    try:
        result = driver.run(repo, base, ours, theirs, pathname)
    except GitThetaError as exc:
        report(exc, pathname)
        print(f"hint: {pathname} was left as ours, as a conflict", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - git must see a conflict, never a half-written result
        report(exc, pathname)
        sys.exit(2)
    finally:
        repo.close()
    if result.conflicts:
        print_conflicts(result, sys.stderr)
        print(f"hint: {conflict_hint()}", file=sys.stderr)
        sys.exit(1)
    print(summary(result), file=sys.stderr)


COMMANDS = [merge_driver]
