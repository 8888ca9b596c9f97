"""Benchmark: ``git theta diff`` between two versions of a checkpoint.

Builds a temporary repository with a float32 safetensors checkpoint (default 100 MB; ``--full``:
500 MB, the size issue #4 names), commits it, changes a fraction of the tensors a little (a
fine-tune step) and commits again. Then it times, best of ``--repeat`` runs:

- ``git theta diff --stat HEAD~1 HEAD`` (the whole command, start-up included; target < 0.5 s);
- ``git theta diff HEAD~1 HEAD`` (full numbers, whole command);
- the same numeric diff in-process (``git_theta.diff``), without the interpreter start-up;
- reading the changed tensors once: decoding the old and the new version of each changed tensor
  (``codec.decode_tensor``), one thread, no arithmetic, the floor the numeric diff is compared with.

Run: ``python bench/diff.py [--full] [--changed 0.1] [--repeat 3]``. Prints a table.
"""

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from common import isolated_env


def run(args, cwd, env):
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)


def best(fn, repeat):
    """Best wall time of ``repeat`` runs (the machine may be shared: the minimum is the signal)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def own_cpu(fn, repeat):
    """Best CPU time of this process (all its threads) over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def child_cpu(fn, repeat):
    """Best CPU time (user + sys) of child processes over ``repeat`` runs: load-independent."""
    import resource

    times = []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        fn()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="500 MB checkpoint (default 100 MB)")
    parser.add_argument("--mb", type=int, help="checkpoint size in MB (overrides --full)")
    parser.add_argument("--changed", type=float, default=0.1, help="fraction of tensors changed")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size_mb = args.mb or (500 if args.full else 100)
    tensor_elements = 1 << 20  # 4 MiB fp32 tensors, like a mid-sized linear layer
    count = max(1, size_mb * 1_000_000 // (4 * tensor_elements))
    rng = np.random.default_rng(0)

    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory(prefix="theta-bench-diff-") as tmp:
        tmp = Path(tmp)
        env = isolated_env(tmp)
        repo = tmp / "repo"
        repo.mkdir()
        run(["git", "init", "-q"], repo, env)
        run(["git", "theta", "install", "--local"], repo, env)
        run(["git", "theta", "track", "*.safetensors"], repo, env)
        tensors = {
            f"model.layers.{i // 4}.{('q', 'k', 'v', 'o')[i % 4]}_proj.weight": (
                rng.standard_normal(tensor_elements, dtype=np.float32) * 0.02
            ).reshape(1024, 1024)
            for i in range(count)
        }
        path = repo / "model.safetensors"
        save_file(tensors, str(path))
        run(["git", "add", "-A"], repo, env)
        run(["git", "commit", "-qm", "v1"], repo, env)
        changed = sorted(tensors)[:: max(1, round(1 / args.changed))] if args.changed > 0 else []
        for name in changed:
            tensors[name] = tensors[name] + rng.standard_normal((1024, 1024), dtype=np.float32) * 1e-4
        save_file(tensors, str(path))
        start = time.perf_counter()
        run(["git", "add", "-A"], repo, env)
        add_time = time.perf_counter() - start
        run(["git", "commit", "-qm", "v2"], repo, env)
        logical = path.stat().st_size

        stat_cmd = lambda: run(["git", "theta", "diff", "--stat", "HEAD~1", "HEAD"], repo, env)  # noqa: E731
        full_cmd = lambda: run(["git", "theta", "diff", "HEAD~1", "HEAD"], repo, env)  # noqa: E731
        stat_time, stat_cpu = best(stat_cmd, args.repeat), child_cpu(stat_cmd, args.repeat)
        full_time, full_cpu = best(full_cmd, args.repeat), child_cpu(full_cmd, args.repeat)

        os.environ.update({k: env[k] for k in ("HOME", "GIT_CONFIG_NOSYSTEM")})
        import git_theta
        from git_theta.updates.chain import decode_tensor
        from git_theta.manifest import Manifest
        from git_theta.git.repo import Repo

        inproc_time = best(lambda: git_theta.diff("model.safetensors", "HEAD~1", "HEAD", repo=repo), args.repeat)
        r = Repo(repo)
        old = Manifest.parse(r.read_blob("HEAD~1:model.safetensors")).tensors
        new = Manifest.parse(r.read_blob("HEAD:model.safetensors")).tensors
        names = [n for n in new if not new[n].same_content(old.get(n))]

        def read_once():
            for n in names:
                decode_tensor(r.store, old[n], "model.safetensors")
                decode_tensor(r.store, new[n], "model.safetensors")

        read_time, read_cpu = best(read_once, args.repeat), own_cpu(read_once, args.repeat)
        from git_theta.diff.compare import Differ

        old_m = Manifest.parse(r.read_blob("HEAD~1:model.safetensors"))
        new_m = Manifest.parse(r.read_blob("HEAD:model.safetensors"))

        def numbers_only():
            with Differ(r) as differ:
                differ.manifests("model.safetensors", old_m, new_m)

        numeric_time, numeric_cpu = best(numbers_only, args.repeat), own_cpu(numbers_only, args.repeat)
        changed_bytes = sum(new[n].shape[0] * new[n].shape[1] * 4 for n in names)
        r.close()

    rows = [
        ("checkpoint", f"{logical / 1e6:.0f} MB, {count} tensors, {len(names)} changed ({changed_bytes / 1e6:.0f} MB)"),
        ("git add (v2, for reference)", f"{add_time:.2f} s"),
        ("git theta diff --stat (command)", f"{stat_time:.3f} s wall, {stat_cpu:.3f} s CPU  (target < 0.5 s)"),
        ("git theta diff (command, numbers)", f"{full_time:.3f} s wall, {full_cpu:.3f} s CPU"),
        ("git_theta.diff (in-process, with git calls)", f"{inproc_time:.3f} s"),
        ("numbers only: decode + stats of changed tensors", f"{numeric_time:.3f} s wall, {numeric_cpu:.3f} s CPU"),
        ("read changed tensors once (old+new, 1 thread)", f"{read_time:.3f} s wall, {read_cpu:.3f} s CPU"),
        (
            "numbers only / read once",
            f"{numeric_time / read_time:.2f}x wall, {numeric_cpu / read_cpu:.2f}x CPU"
            if read_time and read_cpu
            else "-",
        ),
    ]
    width = max(len(a) for a, _ in rows)
    print(f"{'measurement'.ljust(width)}  result")
    print(f"{'-' * width}  {'-' * 40}")
    for a, b in rows:
        print(f"{a.ljust(width)}  {b}")


if __name__ == "__main__":
    main()
