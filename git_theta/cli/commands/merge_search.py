"""The CLI side of ``merge --search`` / ``merge-files --search``: options, progress and the table."""

import json
import sys

import click

#: options shared by ``merge`` and ``merge-files`` (applied as decorators, last first)
SEARCH_OPTIONS = (
    click.option("--search", is_flag=True, help="Try candidate merges, score each with --eval, keep the best."),
    click.option(
        "--eval",
        "eval_cmd",
        metavar="CMD",
        help='With --search: shell command scoring {model} (last number printed, or JSON {"score": x}).',
    ),
    click.option(
        "--candidates",
        "candidates_file",
        type=click.Path(exists=True, dir_okay=False),
        help="With --search: 'OPERATOR [KEY=VALUE ...]' per line, or a JSON list (default: the built-in grid).",
    ),
    click.option(
        "-j",
        "--jobs",
        type=click.IntRange(1, 64),
        default=1,
        show_default=True,
        help="With --search: candidates evaluated at once.",
    ),
    click.option(
        "--time-budget",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help="With --search: stop starting candidates after this long.",
    ),
    click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        metavar="SECONDS",
        help="With --search: longest one evaluation may run.",
    ),
)


def _options(options):
    """A decorator applying click ``options`` in the order listed (as written above a command)."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


search_options = _options(SEARCH_OPTIONS)


def check(search, eval_cmd):
    """UsageError for --search without --eval and --eval without --search."""
    from git_theta.errors import UsageError

    if search and not eval_cmd:
        raise UsageError("--search needs --eval CMD", hint="e.g. --eval 'python eval.py {model}'")
    if eval_cmd and not search:
        raise UsageError("--eval goes with --search", hint="git theta merge --search --eval CMD BRANCH...")


def load_candidates(path):
    from git_theta.merge.search import parse_candidates

    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return parse_candidates(handle.read(), path)


def progress():
    """A per-candidate line on stderr, only on a terminal."""
    if not sys.stderr.isatty():
        return None

    def show(result):
        score = f"{result.score:.4g}" if result.score is not None else result.status
        click.echo(f"  {result.candidate.label}: {score} ({result.seconds:.1f}s)", err=True)

    return show


def render(outcome, as_json, what):
    """Print the table (or JSON) and what was done with the best candidate."""
    from git_theta.merge.search import table

    if as_json:
        click.echo(json.dumps(outcome.to_json(), indent=2))
        return
    for line in table(outcome.results, outcome.best):
        click.echo(line)
    if outcome.order:
        click.echo(
            f"branches merged, in order: {', '.join(outcome.order)} "
            "(the subsets tried by greedy forward selection are rows of the table)"
        )
    click.echo(f"best: {outcome.best.candidate.label} (score {outcome.best.score:.4g}); {what}")


PROBE_OPTIONS = (
    click.option(
        "--probe",
        metavar="CMD",
        help="With --operator auto: shell command printing activations of {model} on fixed probe inputs (adds functional signals).",
    ),
    click.option(
        "--hf-probe/--no-hf-probe",
        default=True,
        show_default=True,
        help="With --operator auto and no --probe: for Hugging Face folders, hidden states on generated inputs "
        "(needs transformers) add functional signals.",
    ),
)

probe_options = _options(PROBE_OPTIONS)


def explain(prediction, as_json=False):
    """--dry-run --operator auto: the features, every candidate's predicted score, the pick."""
    if as_json:
        click.echo(json.dumps({"auto": prediction.to_json()}, indent=2))
        return
    click.echo(f"auto ({prediction.predictor} predictor, fitted on bench/merge_eval.py; see docs/merge-search.md):")
    click.echo("  features: " + " ".join(f"{k}={v:.3g}" for k, v in prediction.features.items()))
    if prediction.functional:
        click.echo(f"  functional features (act_cosine, log_act_rel): {prediction.functional}")
    click.echo("  predicted normalized accuracy:")
    for recipe, score in prediction.scores:
        mark = "*" if recipe == prediction.scores[0][0] else " "
        click.echo(f"   {mark} {score:6.3f}  {recipe}")
    if prediction.branches:
        click.echo(f"  branches, in merge order (greedy on predicted pair scores): {', '.join(prediction.branches)}")
    for line in prediction.notes:
        click.echo(f"  {line}")
    click.echo(f"  pick: {prediction.recipe}")


def auto_merge(repo, branches, raw, base, dry_run, message, as_json, probe, hf_probe=True):
    """``merge --operator auto``: predict, explain or merge with the pick; False when auto has nothing
    to go on (no common base or no checkpoint changed on several sides): the per-tensor rule then.
    Otherwise True, or the TreeMerge when it conflicts."""
    from git_theta.porcelain import merge as porcelain
    from git_theta.merge.auto import picked
    from git_theta.git.notes import add_note
    from git_theta.porcelain.merge_search import auto_line, auto_merge as predict, auto_note
    from git_theta.cli.commands.merge import print_plan

    prediction = predict(repo, list(branches), base, probe, hf_probe)
    if prediction is None:
        return False
    chosen = prediction.branches
    with picked(prediction):
        if dry_run:
            if not as_json:
                explain(prediction, as_json)
            merged, _, _ = porcelain.plan_merge(repo, chosen, "auto", raw, base, dry_run=True)
            print_plan(merged.files, merged.conflicts, as_json, extra={"auto": prediction.to_json()})
            return True
        text = message or porcelain.default_message(chosen, prediction.operator, prediction.params, base)
        commit, merged = porcelain.run_merge(
            repo, chosen, "auto", raw, base, False, text.rstrip("\n") + "\n" + auto_line(prediction) + "\n"
        )
    if commit is None:
        return merged
    add_note(repo, commit, auto_note(prediction))
    click.echo(f"auto chose {prediction.recipe}" + (f" for {', '.join(chosen)}" if len(branches) > 1 else ""))
    operated = sum(f.count("operator") for f in merged.files)
    click.echo(
        f"Merge made by git theta merge ({len(chosen) + 1} parents, {operated} tensors by operators): {commit[:12]}"
    )
    return True
