"""Model merging: the merge driver git runs, ``git theta merge`` and ``git theta merge-files``."""

import sys

import click

from git_theta.errors import GitThetaError, UsageError
from git_theta.cli.messages import report
from git_theta.cli.commands.merge_search import probe_options, search_options

MAX_LISTED = 20


class MergeConflictError(GitThetaError):
    """Some tensors or files could not be merged by any rule (exit 1, like git merge)."""


def conflict_hint():
    from git_theta import registry as plugins

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
    from git_theta.merge import driver
    from git_theta.git.repo import Repo

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
    for note in getattr(result, "notes", ()):
        print(f"git-theta: note: {note}", file=sys.stderr)
    if result.conflicts:
        print_conflicts(result, sys.stderr)
        print(f"hint: {conflict_hint()}", file=sys.stderr)
        sys.exit(1)
    print(summary(result), file=sys.stderr)


def _format_signals(signals):
    parts = []
    for key, value in signals.items():
        if isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


def _outcome_row(outcome):
    if outcome.action in ("operator", "pick"):
        what = f"{outcome.operator} ({outcome.origin})"
    else:
        what = outcome.action
    return what


def print_plan(files, conflicts, as_json, extra=None):
    """The --dry-run report: per checkpoint and tensor, the rule or operator and the signals
    (``extra``: more top-level keys of the JSON, e.g. auto's explanation)."""
    import json

    if as_json:
        rows = [
            {
                "path": f.path,
                "tensors": [
                    {
                        "name": o.name,
                        "action": o.action,
                        "reason": o.reason,
                        "operator": o.operator or None,
                        "origin": o.origin or None,
                        "params": o.params,
                        "signals": o.signals,
                    }
                    for o in f.outcomes
                ],
            }
            for f in files
        ]
        other = [{"path": p, "reason": o.reason} for p, o in conflicts if o.name == "file"]
        click.echo(json.dumps({**(extra or {}), "files": rows, "file_conflicts": other}, indent=2, default=str))
        return
    for f in files:
        click.echo(f"{f.path}:")
        width = max((len(o.name) for o in f.outcomes), default=0)
        for o in f.outcomes:
            line = f"  {o.name.ljust(width)}  {_outcome_row(o)}: {o.reason}"
            if o.signals:
                line += f"  [{_format_signals(o.signals)}]"
            click.echo(line)
    for path, o in conflicts:
        if o.name == "file":
            click.echo(f"{path}: conflict: {o.reason}")
    if not files and not conflicts:
        click.echo("no checkpoint needs a tensor-level merge (git would merge every file by itself)")


def _report_conflicts(conflicts):
    by_path = {}
    for path, outcome in conflicts:
        by_path.setdefault(path, []).append(outcome)
    for path, outcomes in by_path.items():
        click.echo(f"{path}: {len(outcomes)} conflict(s):", err=True)
        for o in outcomes[:MAX_LISTED]:
            click.echo(f"  {o.name}: {o.reason}", err=True)
        if len(outcomes) > MAX_LISTED:
            click.echo(f"  ... and {len(outcomes) - MAX_LISTED} more", err=True)


@click.command("merge")
@click.argument("branches", nargs=-1)
@click.option(
    "--config",
    "recipe",
    type=click.Path(exists=True, dir_okay=False),
    metavar="RECIPE.yml",
    help="Merge with a mergekit recipe whose models are revisions; BRANCHES may map NAME=REV.",
)
@click.option("--operator", metavar="NAME|auto", help="Merge operator for tensors changed on several sides.")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="Operator parameter (repeatable); per-model values as comma lists, ours first.",
)
@click.option("--base", metavar="REV", help="Merge base (default: the common merge base of HEAD and BRANCHES).")
@click.option("--every-tensor", is_flag=True, help="Apply the operator to every tensor with all inputs (model soup).")
@click.option(
    "--dry-run", is_flag=True, help="Show per tensor the rule or operator and the similarity signals; write nothing."
)
@click.option("-m", "--message", help="Commit message of the merge commit.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run or --search: machine-readable output.")
@search_options
@probe_options
def merge(branches, recipe, operator, params, base, every_tensor, dry_run, message, as_json, probe, hf_probe, **search):
    """Merge BRANCHES into HEAD, merging models tensor by tensor.

    One branch is a plain 'git merge' through the merge driver with this operator; several
    branches make one octopus merge commit where the operator sees all task vectors at once.
    A tensor changed on one side only is taken from that side bit for bit; only tensors changed
    on several sides go to an operator. A sharded model re-sharded on a side is merged whole, by
    tensor name, into one layout. With --config, a mergekit recipe names the models as revisions
    (or NAME=REV arguments map them).

    \b
    Operators (mergekit's names and parameters): ours, theirs, base, linear,
    task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
    della, della_linear, sce, slerp, nuslerp, multislerp, karcher, model_stock,
    ram, ramplus_tl, nearswap, arcee_fusion, passthrough,
    plus those of installed plugins ('git theta plugins'); 'auto' picks one per
    tensor from the task vectors' similarity.

    Without --operator, the operator comes from a .thetamerge rule, the theta-merge attribute
    or 'git config theta.merge.operator'; when none names one, every tensor changed on several
    sides is a conflict: ours is kept for it, the rest is merged, and git records the conflict.

    \b
    Example: git theta merge --operator ties --param density=0.2 math code
    """
    import subprocess

    from git_theta.porcelain import merge as porcelain
    from git_theta.merge.config import load_config, parse_param_flags
    from git_theta.merge.engine import check_config
    from git_theta.git.repo import Repo

    from git_theta.cli.commands import merge_search

    merge_search.check(search["search"], search["eval_cmd"])
    if as_json and not (dry_run or search["search"]):
        raise UsageError("--json goes with --dry-run", hint="git theta merge --dry-run --json BRANCH...")
    if recipe:
        if operator or params or base or every_tensor or search["search"]:
            raise UsageError(
                "--config takes the operator, parameters and base from the recipe",
                hint="drop --operator, --param, --base, --every-tensor and --search, or drop --config",
            )
        return _merge_recipe(recipe, branches, dry_run, message, as_json)
    if not branches:
        raise UsageError(
            "git theta merge needs a BRANCH (or --config RECIPE.yml)", hint="git theta merge --operator ties BRANCH"
        )
    repo = Repo(".")
    if repo.work_tree is None:
        raise UsageError("git theta merge needs a work tree")
    raw = parse_param_flags(params)
    for branch in branches:
        porcelain.resolve_commit(repo, branch)  # a clear error before anything starts
    if search["search"]:
        if operator:
            raise UsageError(
                "--operator goes without --search (the search tries operators itself)",
                hint="list the recipes to try in --candidates FILE, one 'OPERATOR [KEY=VALUE ...]' a line",
            )
        return _search_merge(repo, branches, raw, base, every_tensor, dry_run, message, as_json, search)
    if operator == "auto" and not every_tensor and not porcelain.up_to_date(repo, branches):
        try:
            done = merge_search.auto_merge(repo, branches, raw, base, dry_run, message, as_json, probe, hf_probe)
        finally:
            repo.close()
        if done is True:
            return
        if done is not False:
            _report_conflicts(done.conflicts)
            raise MergeConflictError(
                "merge not done: the conflicts above have no rule (nothing was changed)", hint=conflict_hint()
            )
        repo = Repo(".")  # nothing for auto's predictor to go on: the per-tensor rule decides
    one_git_merge = len(branches) == 1 and not (base or every_tensor or dry_run)
    if one_git_merge and porcelain.needs_model_merge(repo, branches[0]):
        one_git_merge = False  # a side re-sharded a model: merged whole here, git cannot pair the shards
    if one_git_merge:
        _print_notes(check_config(load_config(repo, [], operator, raw), 2))  # fail before git starts merging
        from git_theta.config import settings_for

        if not (settings_for(repo).value("merge.theta.driver") or "").strip():
            raise UsageError(
                "the git-theta merge driver is not configured (merge.theta.driver)",
                hint="run 'git theta install' (or 'git theta install --local')",
            )
        repo.close()
        proc = subprocess.run(["git", *porcelain.git_merge_args(branches[0], operator, raw, message)])
        sys.exit(proc.returncode)
    if porcelain.up_to_date(repo, branches):
        repo.close()
        click.echo("Already up to date.")
        return
    try:
        if dry_run:
            merged, _, _ = porcelain.plan_merge(repo, branches, operator, raw, base, every_tensor, dry_run=True)
            _print_notes(merged.notes)
            print_plan(merged.files, merged.conflicts, as_json)
            return
        commit, merged = porcelain.run_merge(repo, branches, operator, raw, base, every_tensor, message)
    finally:
        repo.close()
    _finish(commit, merged, len(branches) + 1)


def _finish(commit, merged, parents):
    """Report a porcelain merge: its notes, then the commit or the conflicts (exit 1)."""
    _print_notes(merged.notes)
    if commit is None:
        _report_conflicts(merged.conflicts)
        raise MergeConflictError(
            "merge not done: the conflicts above have no rule (nothing was changed)",
            hint=conflict_hint(),
        )
    operated = sum(f.count("operator") for f in merged.files)
    click.echo(f"Merge made by git theta merge ({parents} parents, {operated} tensors by operators): {commit[:12]}")


def _merge_recipe(recipe, branches, dry_run, message, as_json):
    """``git theta merge --config RECIPE [NAME=REV | REV]...``."""
    from git_theta.porcelain import merge as porcelain
    from git_theta.git.repo import Repo

    mapping = {}
    for item in branches:
        name, sep, rev = item.partition("=")
        mapping[name] = rev if sep else name
    repo = Repo(".")
    if repo.work_tree is None:
        raise UsageError("git theta merge needs a work tree")
    try:
        if dry_run:
            merged, _, _ = porcelain.plan_recipe(repo, recipe, mapping, dry_run=True)
            _print_notes(merged.notes)
            print_plan(merged.files, merged.conflicts, as_json)
            return
        commit, merged = porcelain.run_recipe(repo, recipe, mapping, message)
        parents = len(repo.git("rev-list", "--parents", "-n1", commit).split()) - 1 if commit else 0
    finally:
        repo.close()
    _finish(commit, merged, parents)


def _search_merge(repo, branches, raw, base, every_tensor, dry_run, message, as_json, search):
    from git_theta.porcelain.merge_search import search_merge
    from git_theta.cli.commands import merge_search

    if raw:
        raise UsageError("--param goes with --operator, not --search", hint="list parameters in --candidates FILE")
    try:
        outcome = search_merge(
            repo,
            list(branches),
            search["eval_cmd"],
            merge_search.load_candidates(search["candidates_file"]),
            search["jobs"],
            search["time_budget"],
            search["timeout"],
            base,
            every_tensor,
            dry_run,
            message,
            merge_search.progress(),
        )
    finally:
        repo.close()
    done = "nothing written (--dry-run)" if dry_run else f"merge committed: {outcome.commit[:12]}"
    merge_search.render(outcome, as_json, done)


@click.command("merge-files")
@click.argument("files", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--config",
    "recipe",
    type=click.Path(exists=True, dir_okay=False),
    metavar="RECIPE.yml",
    help="Run a mergekit recipe (models are local files or folders); no FILES then.",
)
@click.option("--operator", metavar="NAME", help="Merge operator (required without --config or --search).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="Operator parameter (repeatable).")
@click.option("--base", type=click.Path(exists=True), help="The common base checkpoint (a file or model folder).")
@click.option("--every-tensor", is_flag=True, help="Apply the operator to every tensor with all inputs.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),
    help="Where to write the merged checkpoint: a file, or a model folder (shards + index json).",
)
@click.option("--dry-run", is_flag=True, help="With --search: the table only, OUTPUT is not written.")
@click.option("--json", "as_json", is_flag=True, help="With --search: machine-readable output.")
@search_options
@probe_options
def merge_files(
    files, recipe, operator, params, base, every_tensor, output, dry_run, as_json, probe, hf_probe, **search
):
    """Merge checkpoint FILES or model folders (outside git history) into OUTPUT, or run a mergekit recipe."""
    from git_theta.merge.config import parse_param_flags
    from git_theta.porcelain.merge_files import merge_files as run
    from git_theta.porcelain.merge_files import merge_recipe
    from git_theta.cli.commands import merge_search

    merge_search.check(search["search"], search["eval_cmd"])
    if recipe:
        if files or operator or params or base or every_tensor or search["search"]:
            raise UsageError(
                "--config takes the models, operator and parameters from the recipe",
                hint="drop FILES, --operator, --param, --base, --every-tensor and --search, or drop --config",
            )
        result = merge_recipe(recipe, output)
        operator = f"the recipe's {_recipe_method(result)}"
        _print_notes(getattr(result, "notes", ()))
        return _files_done(result, output, operator)
    if not files:
        raise UsageError("merge-files needs the checkpoint files to merge", hint="list them before -o OUT")
    if search["search"]:
        from git_theta.porcelain.merge_search import search_files

        outcome = search_files(
            list(files),
            output,
            search["eval_cmd"],
            merge_search.load_candidates(search["candidates_file"]),
            search["jobs"],
            search["time_budget"],
            search["timeout"],
            base,
            every_tensor,
            dry_run,
            merge_search.progress(),
        )
        merge_search.render(outcome, as_json, "nothing written (--dry-run)" if dry_run else f"wrote {output}")
        return
    if operator is None:
        raise UsageError(
            "merge-files needs --operator NAME (or --config RECIPE.yml, or --search --eval CMD)",
            hint="for example: git theta merge-files --operator ties --base base.safetensors "
            "a.safetensors b.safetensors -o out.safetensors",
        )
    if operator == "auto" and not every_tensor:
        from git_theta.porcelain.merge_search import auto_files

        prediction = auto_files(list(files), base, probe, hf_probe)
        if prediction is not None:
            if dry_run:
                merge_search.explain(prediction, as_json)
                return
            from git_theta.merge.auto import picked

            click.echo(
                f"auto chose {prediction.recipe}" + (f" for {', '.join(prediction.branches)}" if len(files) > 2 else "")
            )
            with picked(prediction):
                result = run(prediction.branches, output, "auto", parse_param_flags(params), base)
            return _files_done(result, output, "auto")
    if dry_run or as_json:
        raise UsageError(
            "--dry-run and --json go with --search or --operator auto here",
            hint="git theta merge-files --search --eval CMD ...",
        )
    result = run(list(files), output, operator, parse_param_flags(params), base, every_tensor)
    _print_notes(getattr(result, "notes", ()))
    _files_done(result, output, operator)


def _files_done(result, output, operator):
    if result.conflicts:
        _report_conflicts([(output, o) for o in result.conflicts])
        raise MergeConflictError(
            f"{output} not written: the tensors above cannot be merged with {operator}",
            hint="give --base (operators on task vectors need one) or pick an operator that takes no base (linear)",
        )
    click.echo(
        f"wrote {output}: {result.count('operator')} tensors merged with {operator}, {result.count('take')} copied"
    )


def _recipe_method(result):
    return next((o.operator for o in result.outcomes if o.operator), "method")


def _print_notes(notes):
    for note in notes:
        click.echo(f"note: {note}", err=True)


COMMANDS = [merge_driver, merge, merge_files]
