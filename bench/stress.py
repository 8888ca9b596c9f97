"""Stress test: 100 versions of checkpoints on several branches, merged, pruned, fscked, re-checked.

Each branch owns one checkpoint file (so plain git merges them without a merge driver) and commits
its share of the versions, cycling through the kinds of change training produces: a sparse update
(1% of entries), a full fine-tune step (every entry), a low-rank (LoRA-like) update of the matrices,
and a change to a single tensor. A throwaway branch adds versions that are then dropped, so prune has
something to delete. Then every version of every file is checked out again and compared byte for
byte with what was committed. Prints a table of times and sizes.

    python bench/stress.py                    # 100 versions of a ~4 MiB checkpoint, 4 branches
    python bench/stress.py --size-mb 64       # bigger checkpoints
    python bench/stress.py --versions 20 --branches 2 --keep   # quick look, keep the repository
"""

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import du, isolated_env


def git(repo, *args, env=None, capture=True):
    proc = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=capture)
    if proc.returncode != 0:
        sys.exit(f"git {' '.join(args)} failed:\n{proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode().strip() if capture else ""


def initial_state(rng, size_mb):
    """A transformer-ish state dict of about ``size_mb`` MiB of float32 (square matrices + biases)."""
    dim = 256
    layers = max(1, int(size_mb * (1 << 20) / (4 * dim * dim)))
    state = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = (rng.standard_normal((dim, dim)) * 0.02).astype(np.float32)
        state[f"layers.{i}.bias"] = np.zeros(dim, np.float32)
    state["norm.weight"] = np.ones(dim, np.float32)
    return state


def step(state, kind, rng):
    """Apply one kind of change in place."""
    if kind == "sparse":  # 1% of the entries of every matrix
        for name, arr in state.items():
            if arr.ndim == 2:
                flat = arr.reshape(-1)
                idx = rng.choice(flat.size, flat.size // 100, replace=False)
                flat[idx] += rng.standard_normal(idx.size).astype(np.float32) * 1e-3
    elif kind == "dense":  # an Adam-like step on everything
        for arr in state.values():
            arr += (rng.standard_normal(arr.shape) * 1e-4).astype(np.float32)
    elif kind == "low-rank":  # a rank-8 update merged into each matrix
        for arr in state.values():
            if arr.ndim == 2:
                a = rng.standard_normal((arr.shape[0], 8)).astype(np.float32) * 1e-2
                b = rng.standard_normal((8, arr.shape[1])).astype(np.float32) * 1e-2
                arr += a @ b
    else:  # one tensor changes, the rest are reused as is
        name = sorted(state)[int(rng.integers(len(state)))]
        state[name] = state[name] + np.float32(1e-3)


KINDS = ("sparse", "dense", "low-rank", "one-tensor")


def save(path, state):
    from safetensors.numpy import save_file

    save_file(state, str(path))
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), len(data)


def mib(n):
    return f"{n / (1 << 20):,.1f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=100)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--size-mb", type=float, default=4.0, help="checkpoint size (MiB)")
    parser.add_argument("--keep", action="store_true", help="keep the repository and print its path")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="theta-stress-"))
    home = tmp / "home"
    home.mkdir()
    env = isolated_env(home)
    repo = tmp / "repo"
    repo.mkdir()
    rng = np.random.default_rng(0)
    rows = []

    def timed(label, fn):
        start = time.perf_counter()
        result = fn()
        rows.append((label, time.perf_counter() - start))
        return result

    git(repo, "init", "-q", "-b", "main", env=env)
    git(repo, "theta", "install", "--local", env=env)
    git(repo, "theta", "track", "*.safetensors", env=env)
    files = [f"model_{b}.safetensors" for b in range(args.branches)]
    states = {f: initial_state(np.random.default_rng(i), args.size_mb) for i, f in enumerate(files)}
    expected = {}  # (commit, file) -> sha256 of the checkpoint bytes
    logical = 0
    for f in files:
        digest, size = save(repo / f, states[f])
        logical += size
    git(repo, "add", "-A", env=env)
    git(repo, "commit", "-q", "-m", "base", env=env)
    base = git(repo, "rev-parse", "HEAD", env=env)
    for f in files:
        expected[(base, f)] = hashlib.sha256((repo / f).read_bytes()).hexdigest()
    for b in range(args.branches):
        git(repo, "branch", f"branch{b}", base, env=env)

    def commit_versions():
        nonlocal logical
        current = "main"
        for v in range(args.versions):
            b = v % args.branches
            if current != f"branch{b}":
                git(repo, "checkout", "-q", f"branch{b}", env=env)
                current = f"branch{b}"
            f = files[b]
            step(states[f], KINDS[(v // args.branches) % len(KINDS)], rng)
            digest, size = save(repo / f, states[f])
            logical += size
            git(repo, "add", f, env=env)
            git(repo, "commit", "-q", "-m", f"v{v} {KINDS[(v // args.branches) % len(KINDS)]}", env=env)
            expected[(git(repo, "rev-parse", "HEAD", env=env), f)] = digest

    timed(f"commit {args.versions} versions on {args.branches} branches", commit_versions)

    def merge():
        git(repo, "checkout", "-q", "main", env=env)
        for b in range(args.branches):
            git(repo, "merge", "-q", "--no-edit", f"branch{b}", env=env)
        head = git(repo, "rev-parse", "HEAD", env=env)
        for b, f in enumerate(files):
            expected[(head, f)] = expected[(git(repo, "rev-parse", f"branch{b}", env=env), f)]

    timed(f"merge {args.branches} branches into main", merge)

    # versions that are dropped again: prune's work
    git(repo, "checkout", "-q", "-b", "scratch", env=env)
    scratch_state = {k: v.copy() for k, v in states[files[0]].items()}
    for v in range(3):
        step(scratch_state, "dense", rng)
        save(repo / files[0], scratch_state)
        git(repo, "commit", "-q", "-am", f"scratch {v}", env=env)
    git(repo, "checkout", "-q", "-f", "main", env=env)
    git(repo, "branch", "-D", "scratch", env=env)
    git(repo, "reflog", "expire", "--expire=now", "--all", env=env)
    orig_head = repo / ".git" / "ORIG_HEAD"
    if orig_head.exists():
        orig_head.unlink()

    store = repo / ".git" / "theta" / "objects"
    store_before = du(store)
    out = timed(
        "git theta prune --expire=now --include-unpushed",
        lambda: git(repo, "theta", "prune", "--expire=now", "--include-unpushed", env=env),
    )
    store_after = du(store)
    timed("git theta fsck --all", lambda: git(repo, "theta", "fsck", "--all", env=env))

    def check_out_everything():
        bad = 0
        for (commit, f), digest in sorted(expected.items()):
            git(repo, "checkout", "-q", commit, "--", f, env=env)
            if hashlib.sha256((repo / f).read_bytes()).hexdigest() != digest:
                bad += 1
                print(f"MISMATCH {commit[:12]} {f}", file=sys.stderr)
        git(repo, "checkout", "-q", "-f", "main", env=env)
        return bad

    bad = timed(f"check out {len(expected)} file versions again", check_out_everything)
    clean = git(repo, "status", "--porcelain", env=env) == ""

    print(f"\nstress: {args.versions} versions x ~{args.size_mb:g} MiB checkpoints, {args.branches} branches\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'seconds':>8}")
    for label, seconds in rows:
        print(f"{label:<{width}}  {seconds:>8.2f}")
    print()
    print(f"{'logical bytes committed':<{width}}  {mib(logical):>12}")
    print(f"{'object store before prune':<{width}}  {mib(store_before):>12}")
    print(
        f"{'object store after prune':<{width}}  {mib(store_after):>12}  ({store_after / max(logical, 1):.3f} of logical)"
    )
    print(f"{'git objects (manifests)':<{width}}  {mib(du(repo / '.git' / 'objects')):>12}")
    print(f"{'prune':<{width}}  {out.splitlines()[0] if out else ''}")
    print(
        f"{'byte-identical checkouts':<{width}}  {len(expected) - bad}/{len(expected)}"
        + ("" if clean else "  (status not clean!)")
    )
    if args.keep:
        print(f"\nrepository kept at {repo}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if bad or not clean else 0)


if __name__ == "__main__":
    main()
