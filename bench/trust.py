"""Trust benchmark: first (verifying) and repeat (trusted) checkout of a GPT-2-size checkpoint
against Git LFS, in the same run (issue 13, docs/security.md).

A pair (object chain -> tensor digest) this clone has not verified is decoded and hashed with
sha256 before a byte is written; once verified, the object's xxh3 checksum suffices. This script
commits a GPT-2-small-shaped fp32 checkpoint (``bench/core.py``'s shapes and values, 475 MiB) and
a full fine-tune step of it (a delta on the keyframe) with git-theta and with Git LFS, then checks
out each version repeatedly, the three runs taking turns in every round so they see the same
machine:

- ``theta first``: the trust ledger emptied just before the checkout (as in a fresh clone);
- ``theta repeat``: the ledger as the previous checkout left it (every pair trusted);
- ``git-lfs``: Git LFS checking out the same file.

Each checkout is checked byte-identical. Wall and CPU seconds (git, the filter and children) are
the median over ``--repeats`` rounds; the load average is printed with the table.

    python bench/trust.py                 # GPT-2 small, 5 rounds (~4 GB of disk, a few minutes)
    python bench/trust.py --scale 0.25 --repeats 3
"""

import argparse
import collections
import os
import shutil
import sqlite3
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import isolated_env
from core import gpt2_shapes, make_state, save
from updates import cpu_measured, fine_tune

import numpy as np

MODES = ("theta first", "theta repeat", "git-lfs")


def forget_trust(repo):
    """Empty the trust ledger, as a fresh clone starts (the rest of the cache stays)."""
    db = sqlite3.connect(repo / ".git" / "theta" / "cache.sqlite3")
    with db:
        db.execute("DELETE FROM trusted")
    db.close()


def build(work, kind, files, env, config=()):
    """A repository with every file of ``files`` committed in turn, with git-theta or Git LFS
    (``config``: git config pairs set before the first commit)."""
    repo = work / (kind + "".join(f"-{value}" for _, value in config))
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git(kind, "install", "--local")
    git(kind, "track", "*.safetensors")
    for name, value in config:
        git("config", name, value)
    for i, path in enumerate(files):
        shutil.copyfile(path, repo / "model.safetensors")
        git("add", "-A")
        git("commit", "-qm", f"v{i}")
    return repo


def stored_as(repo, rev, env):
    """How git-theta stored the file at ``rev``: tensors per update type, e.g. 'int-delta 148'."""
    manifest = subprocess.run(
        ["git", "show", f"{rev}:model.safetensors"], cwd=repo, env=env, check=True, capture_output=True, text=True
    ).stdout
    kinds = collections.Counter(line.split()[5] for line in manifest.splitlines() if line.startswith("tensor "))
    return ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="model size (1.0 = GPT-2 small)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median and the best are shown")
    args = parser.parse_args()
    if not shutil.which("git-lfs"):
        raise SystemExit("Git LFS is needed for the comparison: apt-get install git-lfs")
    with tempfile.TemporaryDirectory(prefix="theta-bench-trust-") as tmp:
        work = Path(tmp)
        env = isolated_env(work / "home")
        v0 = make_state(gpt2_shapes(args.scale), 0)
        v1 = {k: np.asarray(v, np.float32) for k, v in fine_tune(v0, np.random.default_rng(1)).items()}
        files = [work / "v0.safetensors", work / "v1.safetensors"]
        for state, path in zip((v0, v1), files):
            save(state, path)
        size = files[0].stat().st_size
        print(f"checkpoint: {size / 2**20:.0f} MiB fp32, {len(v0)} tensors; {args.repeats} rounds")
        # The default keyframe policy keeps a full fine-tune step as int-deltas on the keyframe;
        # with theta.maxChainPercent 110 (every version reads at most 1.1x the raw size,
        # docs/storage.md) the same step is stored as keyframes: both are measured.
        repos = {
            "theta": build(work, "theta", files, env),
            "theta-110": build(work, "theta", files, env, [("theta.maxChainPercent", "110")]),
            "lfs": build(work, "lfs", files, env),
        }
        cases = {
            "keyframe (v0)": ("theta", "HEAD", "HEAD~1", files[0]),
            "fine-tune (v1)": ("theta", "HEAD~1", "HEAD", files[1]),
            "fine-tune, 110 (v1)": ("theta-110", "HEAD~1", "HEAD", files[1]),
        }
        for case, (kind, _, rev, _) in cases.items():
            print(f"{case}: stored as {stored_as(repos[kind], rev, env)}")
        times = {(case, mode): [] for case in cases for mode in MODES}
        for _ in range(args.repeats):
            for case, (kind, other, rev, expected) in cases.items():
                for mode in MODES:
                    repo = repos["lfs" if mode == "git-lfs" else kind]
                    subprocess.run(
                        ["git", "checkout", "-q", other, "--", "model.safetensors"], cwd=repo, env=env, check=True
                    )
                    if mode == "theta first":
                        forget_trust(repo)
                    os.sync()  # the previous write-back must not land in this measurement
                    cmd = ["git", "checkout", "-q", rev, "--", "model.safetensors"]
                    times[case, mode].append(cpu_measured(cmd, repo, env))
                    if (repo / "model.safetensors").read_bytes() != expected.read_bytes():
                        raise SystemExit(f"{mode}: checkout of {case} is not byte-identical")
        load = os.getloadavg()
        print(f"load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores)\n")
        print(
            f"{'checkout of':22} {'mode':13} {'wall s':>7} {'best s':>7} {'cpu s':>6} "
            f"{'wall / LFS':>11} {'best / LFS':>11} {'cpu / LFS':>10}"
        )
        for case in cases:
            lfs = [statistics.median(t[k] for t in times[case, "git-lfs"]) for k in (0, 1)]
            lfs_best = min(t[0] for t in times[case, "git-lfs"])
            for mode in MODES:
                wall, cpu = (statistics.median(t[k] for t in times[case, mode]) for k in (0, 1))
                best = min(t[0] for t in times[case, mode])
                print(
                    f"{case:22} {mode:13} {wall:7.2f} {best:7.2f} {cpu:6.2f} "
                    f"{wall / lfs[0]:11.2f} {best / lfs_best:11.2f} {cpu / lfs[1]:10.2f}"
                )
        print("\ntarget: the verifying ('theta first') checkout within 1.3x of Git LFS (wall)")
        print(
            "wall and cpu are medians; best is the fastest round. On a virtual machine git's own write of\n"
            "the file (the same for both tools) varies about 2x between rounds, so best/LFS is the steadier ratio."
        )


if __name__ == "__main__":
    main()
