"""Scale benchmark (issue 16): many small tensors, many tiny tensors, one huge tensor and a long
sparse history, git-theta against Git LFS on the same files, measured alternately in one run.

For each case and repeat, each tool gets a fresh repository (the order alternates between repeats)
and is timed on ``git add``, ``git commit``, ``git checkout`` of the file after deleting it (checked
byte-identical), and ``git status`` after ``touch``; the table prints the median of the repeats,
git-theta's ratio to Git LFS, the peak RSS of the command's largest process (git or its filter) and
the files and bytes in each store. The machine's load (``uptime``) is printed with the table.

    python bench/scale.py                      # the issue's rows, scaled to run in ~10 minutes
    python bench/scale.py --tiny 200000 --huge-mib 1024 --repeats 3
    python bench/scale.py --only many,tiny --tiny 200000 --repeats 3   # issue 16 items 1-2

Git LFS must be installed (``apt-get install git-lfs``).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from common import du, isolated_env
from core import measured

TOOLS = ("git-theta", "git-lfs")


def save(tensors, path):
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def many_small(count, seed=0):
    """``count`` small fp32 matrices (8 x 128: 4 KiB each), named like MoE experts."""
    rng = np.random.default_rng(seed)
    return {
        f"model.layers.{i // 384}.mlp.experts.{i % 128}.w{i % 3}.weight": (0.02 * rng.standard_normal((8, 128))).astype(
            np.float32
        )
        for i in range(count)
    }


def tiny(count, seed=0):
    """``count`` tiny fp32 vectors (80 entries, 320 bytes each)."""
    rng = np.random.default_rng(seed)
    data = (0.02 * rng.standard_normal((count, 80))).astype(np.float32)
    return {f"state.{i}.exp_avg": data[i] for i in range(count)}


def huge(mib, seed=0):
    rng = np.random.default_rng(seed)
    return {"embed.weight": (0.02 * rng.standard_normal((mib * 1024, 256))).astype(np.float32)}


def sparse_history(versions, tensors=16, width=1 << 18, seed=0):
    """``versions`` states of ``tensors`` 1 MiB fp32 tensors, 1% of the entries changed per version."""
    rng = np.random.default_rng(seed)
    state = {f"layer.{i}.weight": (0.02 * rng.standard_normal(width)).astype(np.float32) for i in range(tensors)}
    out = [dict(state)]
    for _ in range(versions - 1):
        state = {k: v.copy() for k, v in state.items()}
        for v in state.values():
            at = rng.choice(width, width // 100, replace=False)
            v[at] += (1e-3 * rng.standard_normal(at.size)).astype(np.float32)
        out.append(state)
    return out


def new_repo(tool, path, env):
    path.mkdir(parents=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=path, env=env, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    kind = "theta" if tool == "git-theta" else "lfs"
    git(kind, "install", "--local")
    git(kind, "track", "*.safetensors")
    git("add", ".gitattributes")
    git("commit", "-qm", "attributes")
    store = path / ".git" / ("theta" if kind == "theta" else "lfs") / "objects"
    return git, store


def one_file(tool, work, source, env):
    """Add, commit, checkout and status of one file; returns {metric: value}."""
    git, store = new_repo(tool, work, env)
    target = work / "model.safetensors"
    shutil.copyfile(source, target)
    t_add, m_add = measured(["git", "add", target.name], work, env)
    t_commit, _ = measured(["git", "commit", "-qm", "v1"], work, env)
    target.unlink()
    t_checkout, m_checkout = measured(["git", "checkout", "--", target.name], work, env)
    if target.read_bytes() != Path(source).read_bytes():
        raise SystemExit(f"{tool}: checkout is not byte-identical")
    os.utime(target)
    t_status, _ = measured(["git", "status", "--porcelain"], work, env)
    files = sum(1 for p in store.rglob("*") if p.is_file())
    return {
        "add": t_add,
        "commit": t_commit,
        "checkout": t_checkout,
        "status": t_status,
        "peak MiB add": m_add,
        "peak MiB checkout": m_checkout,
        "store files": files,
        "store MB": du(store) / 1e6,
    }


def history(tool, work, sources, env):
    """Commit every version in turn; then check out the first and the last."""
    git, store = new_repo(tool, work, env)
    target = work / "model.safetensors"
    t_add = 0.0
    for n, source in enumerate(sources):
        shutil.copyfile(source, target)
        t, _ = measured(["git", "add", target.name], work, env)
        t_add += t
        git("commit", "-qm", f"v{n}")
    times = {}
    for label, rev, source in (
        ("checkout first", f"HEAD~{len(sources) - 1}", sources[0]),
        ("checkout last", "HEAD", sources[-1]),
    ):
        target.unlink()
        times[label], _ = measured(["git", "checkout", "-q", rev, "--", target.name], work, env)
        if target.read_bytes() != Path(source).read_bytes():
            raise SystemExit(f"{tool}: {label} is not byte-identical")
    raw = sum(Path(s).stat().st_size for s in sources)
    return {
        "add (all versions)": t_add,
        **times,
        "store / raw": du(store) / raw,
        "store files": sum(1 for p in store.rglob("*") if p.is_file()),
    }


def run_case(name, runner, arg, repeats, work, env):
    """{tool: {metric: median}} of ``repeats`` alternating runs."""
    samples = {tool: [] for tool in TOOLS}
    for rep in range(repeats):
        order = TOOLS if rep % 2 == 0 else TOOLS[::-1]
        for tool in order:
            place = work / f"{name}-{tool}-{rep}"
            samples[tool].append(runner(tool, place, arg, env))
            shutil.rmtree(place, ignore_errors=True)
    return {tool: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for tool, runs in samples.items()}


def print_table(title, result):
    print(f"\n{title}")
    metrics = list(result["git-theta"])
    rows = [["metric", "git-theta", "git-lfs", "ratio"]]
    for m in metrics:
        a, b = result["git-theta"][m], result["git-lfs"][m]
        fmt = (lambda v: f"{v:.0f}") if "files" in m or "MiB" in m else (lambda v: f"{v:.3f}")
        rows.append([m, fmt(a), fmt(b), f"{a / b:.2f}x" if b else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", type=int, default=20000, help="small tensors in the first case")
    parser.add_argument("--tiny", type=int, default=100000, help="tiny tensors in the second case (issue: 200000)")
    parser.add_argument("--huge-mib", type=int, default=256, help="size of the one huge tensor (issue: 1024)")
    parser.add_argument("--versions", type=int, default=12, help="versions of the sparse history (issue: 40)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated cases: many,tiny,huge,history")
    args = parser.parse_args()
    if not shutil.which("git-lfs"):
        raise SystemExit("git-lfs is not installed")
    work = Path(tempfile.mkdtemp(prefix="theta-scale-"))
    started = time.time()
    try:
        env = isolated_env(work / "home")
        cases = [c for c in ("many", "tiny", "huge", "history") if not args.only or c in args.only.split(",")]
        results = []
        for case in cases:
            if case == "history":
                sources = []
                for n, state in enumerate(sparse_history(args.versions)):
                    sources.append(work / f"hist-{n}.safetensors")
                    save(state, sources[-1])
                title = f"{args.versions} versions of 16 x 1 MiB fp32 tensors, 1% of entries changed per version"
                results.append((title, run_case(case, history, sources, max(1, args.repeats - 1), work, env)))
                continue
            state = {
                "many": lambda: many_small(args.many),
                "tiny": lambda: tiny(args.tiny),
                "huge": lambda: huge(args.huge_mib),
            }[case]()
            source = work / f"{case}.safetensors"
            save(state, source)
            del state
            size = source.stat().st_size / 1e6
            title = {
                "many": f"{args.many} small tensors ({size:.0f} MB)",
                "tiny": f"{args.tiny} tiny tensors ({size:.0f} MB)",
                "huge": f"one {args.huge_mib} MiB tensor ({size:.0f} MB)",
            }[case]
            repeats = args.repeats if case in ("many", "tiny") else max(1, args.repeats - 1)
            results.append((title, run_case(case, one_file, source, repeats, work, env)))
            source.unlink()
        for title, result in results:
            print_table(title, result)
        print(f"\nmedians of alternating runs; {time.time() - started:.0f} s in all")
        print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
