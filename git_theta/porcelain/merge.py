"""``git theta merge``: merge one or more branches with a chosen operator.

One branch (and neither ``--base``, ``--every-tensor`` nor ``--dry-run``) is an ordinary ``git merge``
whose merge driver gets the operator and parameters through ``git -c theta.merge.*=...``, so the
result, conflicts, ``--abort`` and ``--continue`` are git's own. Otherwise the merge is computed
here in one step: every path of the base, HEAD and the branches is merged N-way (checkpoints tensor
by tensor, each operator seeing all N task vectors at once, other files only when at most one
side changed them), the result is written as a tree with plumbing and committed with HEAD and
every branch as parents, then HEAD is fast-forwarded to that commit (which checks the files out
through the smudge filter). Nothing is written when any path conflicts, or with ``--dry-run``.
"""

import os
import subprocess
import tempfile
from dataclasses import dataclass, field

from git_theta.errors import UsageError
from git_theta.git.repo import records
from git_theta.git.scan import theta_paths
from git_theta.manifest import Manifest, is_manifest
from git_theta.merge.config import load_config
from git_theta.merge.engine import Outcome, check_config, engine_options, merge_manifests
from git_theta.merge.side import SideData


def git_merge_args(branch, operator=None, params=None, message=None):
    """The ``git -c ... merge`` command line for a one-branch merge through the driver."""
    args = []
    if operator:
        args += ["-c", f"theta.merge.operator={operator}"]
    for key, value in (params or {}).items():
        # git config keys cannot hold '_': the driver reads '-' back as '_'
        args += ["-c", f"theta.merge.{key.replace('_', '-')}={value}"]
    args += ["merge", "--no-edit"]
    if message:
        args += ["-m", message]
    return args + [branch]


@dataclass
class TreeMerge:
    """The N-way merge of whole trees: per path the merged (mode, oid) and per checkpoint the details."""

    entries: dict = field(default_factory=dict)  # path -> (mode, oid) or None (deleted)
    files: list = field(default_factory=list)  # FileMerge per checkpoint merged tensor by tensor
    conflicts: list = field(default_factory=list)  # (path, Outcome)
    notes: list = field(default_factory=list)  # one-line notes for the user (ignored settings)


def _tree(repo, rev):
    """{path: (mode, oid)} of every blob in ``rev`` (empty for None)."""
    if rev is None:
        return {}
    entries = {}
    for (mode, kind, oid), path in records(repo.git("ls-tree", "-r", "-z", "--full-tree", rev)):
        if kind in ("blob", "commit"):
            entries[path] = (mode, oid)
    return entries


def resolve_commit(repo, rev):
    """The commit id ``rev`` names; UsageError when it names none."""
    out = repo.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False).decode().strip()
    if not out:
        raise UsageError(f"not a commit: {rev!r}", hint="name a branch, tag or commit")
    return out


def _manifest(repo, oid, path):
    if oid is None:
        return None
    data = repo.read_blob(oid[1])
    if data is None or not is_manifest(data):
        return None
    return Manifest.parse(data, source=path)


def merge_trees(repo, base, sides, labels, config, every_tensor=False, dry_run=False):
    """Merge the trees of ``base`` and ``sides`` (commits, HEAD first) path by path."""
    from git_theta.config import settings_for

    settings = settings_for(repo)
    trees = [_tree(repo, rev) for rev in sides]
    base_tree = _tree(repo, base)
    paths = sorted(set(base_tree).union(*trees))
    tracked = theta_paths(repo, paths)
    result = TreeMerge()
    # Models re-sharded on a side are merged whole, by tensor name, into one layout (merge/models.py).
    from git_theta.merge.models import plan_models

    plans = plan_models(
        repo,
        base_tree,
        trees,
        labels,
        config,
        tracked,
        dict(
            every_tensor=every_tensor,
            dry_run=dry_run,
            with_signals=dry_run,
            side_data=SideData(repo, sides),
            **engine_options(settings),
        ),
    )
    for plan in plans:
        result.files.append(plan.merge)
        result.conflicts += [(plan.name, o) for o in plan.merge.conflicts]
        result.entries.update(plan.entries)
    covered = set().union(*(plan.covered for plan in plans))
    for path in paths:
        if path in covered:
            continue
        old = base_tree.get(path)
        versions = [t.get(path) for t in trees]
        changed = [i for i, v in enumerate(versions) if v != old]
        distinct = {versions[i] for i in changed}
        # a checkpoint changed on several sides is merged tensor by tensor; sides without the file
        # take part only when the base lacks it too (added on several branches), as empty manifests
        tensor_level = all(v is not None for v in versions) or old is None
        if path in tracked and tensor_level and (len(distinct) > 1 or every_tensor):
            manifests = [_manifest(repo, v, path) for v in versions]
            if all(m is not None for m, v in zip(manifests, versions) if v is not None):
                fmt = next(m.format for m in manifests if m is not None)
                manifests = [m if m is not None else Manifest(format=fmt) for m in manifests]
                merged = merge_manifests(
                    path,
                    _manifest(repo, old, path),
                    manifests,
                    labels,
                    config,
                    repo.store,
                    every_tensor=every_tensor,
                    dry_run=dry_run,
                    with_signals=dry_run,
                    side_data=SideData(repo, sides),
                    **engine_options(settings),
                )
                result.files.append(merged)
                result.conflicts += [(path, o) for o in merged.conflicts]
                result.entries[path] = ("manifest", merged)
                continue
        if not changed:
            result.entries[path] = old
        elif len(distinct) == 1:
            result.entries[path] = versions[changed[0]]
        else:
            who = ", ".join(labels[i] for i in changed)
            result.conflicts.append((path, Outcome("file", "conflict", f"changed differently in {who}")))
    return result


def _require_clean(repo):
    if repo.git("rev-parse", "-q", "--verify", "MERGE_HEAD", check=False).strip():
        raise UsageError("a merge is in progress", hint="finish it (git commit) or abort it (git merge --abort)")
    dirty = repo.git("status", "--porcelain", "--untracked-files=no").decode().strip()
    if dirty:
        raise UsageError(
            "your local changes would be overwritten by the merge",
            hint="commit or stash them first (git stash)",
        )


def merge_commit(repo, tree_merge, parents, message):
    """Write the merged tree and a commit with ``parents``; fast-forward HEAD to it."""
    updates = []
    for path, value in sorted(tree_merge.entries.items()):
        if value is None:
            continue
        if value[0] == "manifest":
            oid = repo.git("hash-object", "-w", "--no-filters", "--stdin", input=value[1].manifest.serialize())
            value = ("100644", oid.decode().strip())
        updates.append(f"{value[0]} {value[1]}\t{path}")
    fd, index = tempfile.mkstemp(prefix="theta-merge-index-", dir=repo.git_dir)
    os.close(fd)
    os.unlink(index)
    env = {**os.environ, "GIT_INDEX_FILE": index}
    try:
        from git_theta.git.repo import run_git

        run_git(["read-tree", "--empty"], cwd=repo.cwd, env=env)
        records = b"".join(u.encode("utf-8", "surrogateescape") + b"\0" for u in updates)
        run_git(["update-index", "-z", "--index-info"], cwd=repo.cwd, env=env, input=records)
        tree = run_git(["write-tree"], cwd=repo.cwd, env=env).decode().strip()
    finally:
        if os.path.exists(index):
            os.unlink(index)
    args = ["commit-tree", tree]
    for parent in parents:
        args += ["-p", parent]
    commit = repo.git(*args, "-F", "-", input=message.encode()).decode().strip()
    repo.git("merge", "--ff-only", "-q", commit)
    return commit


def default_message(branches, operator, params, base):
    names = ", ".join(f"'{b}'" for b in branches)
    text = f"Merge branch{'es' if len(branches) > 1 else ''} {names}"
    if operator:
        text += f" with {operator}"
    detail = [f"{k}={v}" for k, v in sorted((params or {}).items())]
    body = "\n\ngit theta merge: " + " ".join([f"operator={operator or 'configured'}", *detail])
    if base:
        body += f" base={base}"
    return text + body + "\n"


def merge_sides(repo, branches, base=None):
    """(HEAD's commit, the branches' commits, the merge base or None) of a merge of ``branches``."""
    head = resolve_commit(repo, "HEAD")
    commits = [resolve_commit(repo, b) for b in branches]
    if base is not None:
        return head, commits, resolve_commit(repo, base)
    out = repo.git("merge-base", "--octopus", head, *commits, check=False).decode().split()
    return head, commits, (out[0] if out else None)


def plan_merge(repo, branches, operator=None, params=None, base=None, every_tensor=False, dry_run=False, seed=None):
    """Compute the N-way merge of HEAD and ``branches``; returns (TreeMerge, base commit, parents)."""
    head, commits, base_commit = merge_sides(repo, branches, base)
    config = load_config(repo, [], operator, params, seed)
    sides = [head, *commits]
    labels = ["HEAD", *branches]
    if every_tensor and head == base_commit and _takes_base(config.operator):
        # HEAD is the base (a branch of fine-tunes merged onto it): the base is no input of an
        # operator on task vectors, as mergekit leaves base_model out of them; one branch then is
        # one task vector (dare_linear sparsifying a fine-tune)
        sides, labels = commits, list(branches)
    tree_paths = set(_tree(repo, head))
    for c in commits:
        tree_paths |= set(_tree(repo, c))
    for path in theta_paths(repo, sorted(tree_paths)):
        value = repo.attribute(path, "theta-merge")
        config.attributes[path] = None if value in ("unspecified", "set", "unset") else value
    notes = check_config(config, len(sides))  # before anything is merged
    merged = merge_trees(repo, base_commit, sides, labels, config, every_tensor, dry_run)
    merged.notes = notes
    return merged, base_commit, [head, *commits]


def _takes_base(name):
    from git_theta.merge.engine import get_operator

    op = get_operator(name) if name else None
    return op is not None and op.needs_base and not op.base_optional


def plan_recipe(repo, recipe_path, mapping=None, dry_run=False):
    """Plan a mergekit recipe whose models are git revisions; returns (TreeMerge, base, parents).

    ``mapping`` maps a recipe's model names to revisions (``NAME=REV`` on the command line); other
    names are revisions themselves. HEAD must be the recipe's base_model or one of its models.
    """
    from git_theta.merge.recipe import RecipeConfig, check, load_recipe, parts

    recipe = load_recipe(recipe_path)
    plan = parts(recipe)
    mapping = dict(mapping or {})
    unknown = sorted(set(mapping) - set(recipe.references()))
    if unknown:
        raise UsageError(
            f"{recipe_path}: no model named {', '.join(map(repr, unknown))} in the recipe",
            hint=f"its models: {', '.join(recipe.references())}",
        )
    commit = {ref: resolve_commit(repo, mapping.get(ref, ref)) for ref in recipe.references()}
    head = resolve_commit(repo, "HEAD")
    if recipe.slices is not None:
        return _plan_sliced(repo, recipe_path, recipe, plan, commit, head, mapping, dry_run)
    part = plan[0]
    sides = [commit[s.model] for s in part.inputs]
    if part.base is not None:
        base_commit = commit[part.base.model]
    else:
        out = repo.git("merge-base", "--octopus", *sides, check=False).decode().split()
        base_commit = out[0] if out else None
    if head not in sides and head != base_commit:
        raise UsageError(
            f"{recipe_path}: HEAD is neither the recipe's base_model nor one of its models",
            hint="check out the branch the result belongs on (usually the base model's) first",
        )
    config = RecipeConfig(recipe, plan)
    labels = [mapping.get(s.model, s.model) for s in part.inputs]
    notes = recipe.notes + check(recipe, plan) + check_config(config, len(sides))  # before anything is merged
    merged = merge_trees(repo, base_commit, sides, labels, config, every_tensor=True, dry_run=dry_run)
    merged.notes = notes
    parents = [head] + [c for c in dict.fromkeys(sides) if c != head]
    return merged, base_commit, parents


def _plan_sliced(repo, recipe_path, recipe, plan, commit, head, mapping, dry_run):
    """Plan a sliced (layer-stacking) recipe on revisions: each tracked checkpoint of HEAD is
    stacked from the same file in the slices' revisions (:func:`.recipe.sliced_manifests`); the
    tree's other files are HEAD's. A sharded model is refused: a shard holds only some layers, so
    a stack is made of whole models (merge-files on checked-out folders)."""
    from git_theta.git.models import INDEX_SUFFIX, is_shard
    from git_theta.config import settings_for
    from git_theta.merge.recipe import RecipeConfig, check, sliced_manifests

    if head not in commit.values():
        raise UsageError(
            f"{recipe_path}: HEAD is none of the recipe's models",
            hint="check out the branch the stacked model belongs on (one of the slices' models) first",
        )
    settings = settings_for(repo)
    trees = {ref: _tree(repo, rev) for ref, rev in commit.items()}
    head_tree = _tree(repo, head)
    tracked = theta_paths(repo, sorted(head_tree))
    folders = {os.path.dirname(p) for p in head_tree if p.endswith(INDEX_SUFFIX)}
    sharded = [p for p in tracked if is_shard(p) or os.path.dirname(p) in folders]
    if sharded:
        folder = os.path.dirname(sorted(sharded)[0]) or "."
        count = sum(1 for p in sharded if os.path.dirname(p) == os.path.dirname(sorted(sharded)[0]))
        raise UsageError(
            f"{recipe_path}: slices need whole models; {folder} is a model of {count} shards",
            hint="check the model folders out and run git theta merge-files --config RECIPE -o OUT/, then commit OUT",
        )
    labels = [mapping.get(s.model, s.model) for s in plan[0].inputs]
    result = TreeMerge()
    notes = recipe.notes + check(recipe, plan)
    for path, value in head_tree.items():
        if path not in tracked:
            result.entries[path] = value
            continue
        manifests = {}
        for ref, tree in trees.items():
            manifests[ref] = _manifest(repo, tree.get(path), path) if tree.get(path) else None
            if manifests[ref] is None:
                raise UsageError(
                    f"{recipe_path}: {path} is not a tracked checkpoint in {mapping.get(ref, ref)}",
                    hint="every model of the slices must hold the checkpoint HEAD holds",
                )
        fmt = manifests[plan[0].inputs[0].model].format
        sides, base, layout = sliced_manifests(recipe, plan, manifests, fmt)
        config = RecipeConfig(recipe, plan, layout)
        notes += [n for n in check_config(config, len(sides)) if n not in notes]
        merged = merge_manifests(
            path,
            base,
            sides,
            labels,
            config,
            repo.store,
            every_tensor=True,
            dry_run=dry_run,
            with_signals=dry_run,
            **engine_options(settings),
        )
        result.files.append(merged)
        result.conflicts += [(path, o) for o in merged.conflicts]
        result.entries[path] = ("manifest", merged)
    result.notes = notes
    base = plan[0].base
    parents = [head] + [c for c in dict.fromkeys(commit.values()) if c != head]
    return result, commit[base.model] if base is not None else None, parents


def run_recipe(repo, recipe_path, mapping=None, message=None):
    """Merge with a mergekit recipe whose models are revisions; returns (commit or None, TreeMerge)."""
    _require_clean(repo)
    merged, base_commit, parents = plan_recipe(repo, recipe_path, mapping)
    if merged.conflicts:
        return None, merged
    text = (
        message or f"Merge with recipe {os.path.basename(str(recipe_path))}\n\ngit theta merge --config {recipe_path}\n"
    )
    return merge_commit(repo, merged, parents, text), merged


def needs_model_merge(repo, branch):
    """True when a sharded model's layout differs between the merge base and HEAD or ``branch``:
    git's per-path merge cannot pair the shards, ``git theta merge`` merges the model whole."""
    from git_theta.merge.models import relayout_names

    head, commit = resolve_commit(repo, "HEAD"), resolve_commit(repo, branch)
    out = repo.git("merge-base", head, commit, check=False).decode().split()
    if not out:
        return False
    trees = [_tree(repo, head), _tree(repo, commit)]
    base_tree = _tree(repo, out[0])
    tracked = theta_paths(repo, sorted(set(base_tree).union(*trees)))
    return bool(relayout_names(repo, base_tree, trees, tracked))


def up_to_date(repo, branches):
    """True when every branch is already contained in HEAD (nothing to merge)."""
    for branch in branches:
        commit = resolve_commit(repo, branch)
        proc = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"], cwd=repo.cwd)
        if proc.returncode != 0:
            return False
    return True


def run_merge(repo, branches, operator=None, params=None, base=None, every_tensor=False, message=None, seed=None):
    """Merge with plumbing (octopus, --base, --every-tensor); returns (commit, TreeMerge)."""
    _require_clean(repo)
    merged, base_commit, parents = plan_merge(repo, branches, operator, params, base, every_tensor, seed=seed)
    if merged.conflicts:
        return None, merged
    commit = merge_commit(repo, merged, parents, message or default_message(branches, operator, params, base))
    return commit, merged
