"""Scale benchmark (issue 16): many small tensors, many tiny tensors, one huge tensor and a long
sparse history, git-theta against Git LFS on the same files, measured alternately in one run.

For each case and repeat, each tool gets a fresh repository (the order alternates between repeats)
and is timed on ``git add``, ``git commit``, ``git checkout`` of the file after deleting it (checked
byte-identical; git-theta writes a many-tensor file from the layout its add recorded), the same
checkout again, the same checkout cold (as in a fresh clone: git-theta with ``theta.layoutCache``
off parses the manifest), ``git status`` after ``touch``, and ``git add`` of a new version with
1% of the tensors changed; the table prints the median of the repeats,
git-theta's ratio to Git LFS, the peak RSS of the command's largest process (git or its filter) and
the files and bytes in each store. The machine's load (``uptime``) is printed with the table.

    python bench/scale.py                      # the issue's rows, scaled to run in ~10 minutes
    python bench/scale.py --tiny 200000 --huge-mib 1024 --repeats 3
    python bench/scale.py --only history,dense --versions 40   # histories, push and fresh clone
    python bench/scale.py --only many,tiny --tiny 200000 --repeats 3   # issue 16 items 1-2
    python bench/scale.py --only gpt2 --repeats 5     # issue 16 item 6: an ordinary model

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
from core import gpt2_shapes, make_state, measured

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


def dense_history(versions, tensors=16, width=1 << 18, seed=0):
    """``versions`` states of a dense fine-tune: every entry moves a little (~0.5%) per version."""
    rng = np.random.default_rng(seed)
    state = {f"layer.{i}.weight": (0.02 * rng.standard_normal(width)).astype(np.float32) for i in range(tensors)}
    out = [dict(state)]
    for _ in range(versions - 1):
        state = {k: v + (1e-4 * rng.standard_normal(width)).astype(np.float32) for k, v in state.items()}
        out.append(state)
    return out


def filter_measured(tool, cmd, cwd, env):
    """``measured`` of a git command, plus the peak RSS in MiB of its filter process alone (the
    filter runs under /usr/bin/time; 0 when that is not installed)."""
    if not os.path.exists("/usr/bin/time"):
        return (*measured(cmd, cwd, env), 0.0)
    kind, program = ("theta", "git-theta") if tool == "git-theta" else ("lfs", "git-lfs")
    out = Path(cwd) / ".git" / "filter-rss"
    wrapped = ["git", "-c", f"filter.{kind}.process=/usr/bin/time -f %M -o {out} {program} filter-process", *cmd[1:]]
    seconds, peak = measured(wrapped, cwd, env)
    text = out.read_text().split() if out.exists() else []
    return seconds, peak, int(text[-1]) / 1024 if text else 0.0


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
    t_add, m_add, f_add = filter_measured(tool, ["git", "add", target.name], work, env)
    t_commit, _ = measured(["git", "commit", "-qm", "v1"], work, env)
    target.unlink()
    t_checkout, m_checkout, f_checkout = filter_measured(tool, ["git", "checkout", "--", target.name], work, env)
    if target.read_bytes() != Path(source).read_bytes():
        raise SystemExit(f"{tool}: checkout is not byte-identical")
    # Again (a version checked out before: git-theta writes it from the layout it recorded).
    target.unlink()
    t_again, _ = measured(["git", "checkout", "--", target.name], work, env)
    if target.read_bytes() != Path(source).read_bytes():
        raise SystemExit(f"{tool}: checkout again is not byte-identical")
    # Cold: as a fresh clone's first checkout (git-theta parses the manifest, no layout used).
    target.unlink()
    cold = ["-c", "theta.layoutCache=false"] if tool == "git-theta" else []
    t_cold, _ = measured(["git", *cold, "checkout", "--", target.name], work, env)
    if target.read_bytes() != Path(source).read_bytes():
        raise SystemExit(f"{tool}: cold checkout is not byte-identical")
    os.utime(target)
    t_status, _ = measured(["git", "status", "--porcelain"], work, env)
    files = sum(1 for p in store.rglob("*") if p.is_file())
    change_one_percent(target)
    t_readd, _ = measured(["git", "add", target.name], work, env)
    return {
        "add": t_add,
        "commit": t_commit,
        "checkout": t_checkout,
        "checkout again": t_again,
        "checkout, cold": t_cold,
        "status": t_status,
        "re-add, 1% changed": t_readd,
        "peak MiB add": m_add,
        "peak MiB checkout": m_checkout,
        "filter MiB add": f_add,
        "filter MiB checkout": f_checkout,
        "store files": files,
        "store MB": du(store) / 1e6,
    }


def change_one_percent(path, seed=0):
    """Change one byte of 1% of the tensors of safetensors file ``path`` (at least one): a new
    version of a checkpoint of which most tensors did not move."""
    import json
    import struct

    data = bytearray(Path(path).read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    names = sorted(n for n in header if n != "__metadata__")
    rng = np.random.default_rng(seed)
    for i in rng.choice(len(names), max(1, len(names) // 100), replace=False):
        begin, end = header[names[i]]["data_offsets"]
        if end > begin:
            data[8 + length + begin] ^= 0x10
    Path(path).write_bytes(bytes(data))


def history(tool, work, sources, env, server=None):
    """Commit every version in turn; check out the first, a middle and the last version; with
    ``server`` (an LFS server's URL maker) push everything and time a fresh clone of HEAD."""
    git, store = new_repo(tool, work, env)
    target = work / "model.safetensors"
    t_add = 0.0
    growth = []  # store bytes added by each version
    for n, source in enumerate(sources):
        shutil.copyfile(source, target)
        before = du(store) if store.exists() else 0
        t, _ = measured(["git", "add", target.name], work, env)
        t_add += t
        git("commit", "-qm", f"v{n}")
        growth.append(du(store) - before)
    times = {}
    middle = len(sources) // 2
    for label, rev, source in (
        ("checkout first", f"HEAD~{len(sources) - 1}", sources[0]),
        ("checkout middle", f"HEAD~{len(sources) - 1 - middle}", sources[middle]),
        ("checkout last", "HEAD", sources[-1]),
    ):
        target.unlink()
        times[label], _ = measured(["git", "checkout", "-q", rev, "--", target.name], work, env)
        if target.read_bytes() != Path(source).read_bytes():
            raise SystemExit(f"{tool}: {label} is not byte-identical")
    git("checkout", "-q", "HEAD", "--", target.name)
    size = Path(sources[0]).stat().st_size
    raw = sum(Path(s).stat().st_size for s in sources)
    quarter = max(1, len(sources) // 4)
    result = {
        "add (all versions)": t_add,
        **times,
        "store / raw": du(store) / raw,
        "first quarter / raw": sum(growth[1 : 1 + quarter]) / (quarter * size),
        "last quarter / raw": sum(growth[-quarter:]) / (quarter * size),
        "store files": sum(1 for p in store.rglob("*") if p.is_file()),
    }
    if server is not None:
        result.update(clone_head(tool, work, sources[-1], env, server))
    return result


def clone_head(tool, work, head, env, server):
    """Push the repository at ``work`` (all versions) to a bare repository and the LFS server;
    then time ``git clone`` of it and count the bytes the clone fetched into its store."""
    bare = work.parent / f"{work.name}.git"
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], env=env, check=True, capture_output=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=work, env=env, check=True, capture_output=True)  # noqa: E731
    (work / ".lfsconfig").write_text(f"[lfs]\n\turl = {server(work.name)}\n")
    git("add", ".lfsconfig")
    git("commit", "-qm", "lfs url")
    git("remote", "add", "origin", str(bare))
    t_push, _ = measured(["git", "push", "-q", "origin", "main"], work, env)
    clone = work.parent / f"{work.name}-clone"
    t_clone, _ = measured(["git", "clone", "-q", str(bare), str(clone)], work.parent, env)
    if (clone / "model.safetensors").read_bytes() != Path(head).read_bytes():
        raise SystemExit(f"{tool}: the clone's checkpoint is not byte-identical")
    store = clone / ".git" / ("theta" if tool == "git-theta" else "lfs") / "objects"
    moved = du(store)
    shutil.rmtree(clone, ignore_errors=True)
    # One download at a time, set explicitly for both tools (git-theta's theta.transfers, Git LFS's
    # lfs.concurrenttransfers): on loopback there is no latency for parallel downloads to hide,
    # and the Python server and client then only contend for the two cores. (Unset, git-theta
    # makes 4 transfers at a time and Git LFS 8.)
    one = ["-c", "theta.transfers=1"] if tool == "git-theta" else ["-c", "lfs.concurrenttransfers=1"]
    t_one, _ = measured(["git", *one, "clone", "-q", str(bare), str(clone)], work.parent, env)
    if (clone / "model.safetensors").read_bytes() != Path(head).read_bytes():
        raise SystemExit(f"{tool}: the clone's checkpoint is not byte-identical")
    shutil.rmtree(clone, ignore_errors=True)
    shutil.rmtree(bare, ignore_errors=True)
    return {
        "push (all versions)": t_push,
        "fresh clone": t_clone,
        "fresh clone, 1 transfer": t_one,
        "clone MB fetched": moved / 1e6,
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
    result = {tool: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for tool, runs in samples.items()}
    for tool, runs in samples.items():  # the fastest round too: on a VM git's own writes vary ~2x
        for k in [k for k in ("add", "checkout", "checkout again", "checkout, cold") if k in runs[0]]:
            result[tool][f"{k} (best)"] = min(s[k] for s in runs)
    return result


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
    parser.add_argument("--only", default="", help="comma-separated cases: many,tiny,gpt2,huge,history,dense")
    parser.add_argument("--tensor-mib", type=int, default=1, help="histories: size of each of the 16 tensors")
    parser.add_argument("--no-clone", action="store_true", help="histories: skip the push and fresh clone")
    args = parser.parse_args()
    if not shutil.which("git-lfs"):
        raise SystemExit("git-lfs is not installed")
    work = Path(tempfile.mkdtemp(prefix="theta-scale-"))
    started = time.time()
    server = None
    try:
        env = isolated_env(work / "home")
        cases = [
            c
            for c in ("many", "tiny", "gpt2", "huge", "history", "dense")
            if not args.only or c in args.only.split(",")
        ]
        results = []
        for case in cases:
            if case in ("history", "dense"):
                url = None
                if not args.no_clone:
                    if server is None:
                        server = start_lfs_server(work, env)
                    url = lambda name: f"http://127.0.0.1:{server[1]}/team/{name}.git/info/lfs"  # noqa: E731
                sources = []
                width = args.tensor_mib << 18
                make = sparse_history if case == "history" else dense_history
                states = make(args.versions, width=width)
                for n, state in enumerate(states):
                    sources.append(work / f"{case}-{n}.safetensors")
                    save(state, sources[-1])
                del states
                title = f"{args.versions} versions of 16 x {args.tensor_mib} MiB fp32 tensors, " + (
                    "1% of entries changed per version" if case == "history" else "every entry moved (dense fine-tune)"
                )
                runner = lambda tool, place, arg, env: history(tool, place, arg, env, url)  # noqa: E731
                results.append((title, run_case(case, runner, sources, args.repeats, work, env)))
                continue
            state = {
                "many": lambda: many_small(args.many),
                "tiny": lambda: tiny(args.tiny),
                "huge": lambda: huge(args.huge_mib),
                "gpt2": lambda: make_state(gpt2_shapes(1.0), 0),
            }[case]()
            source = work / f"{case}.safetensors"
            save(state, source)
            del state
            size = source.stat().st_size / 1e6
            title = {
                "many": f"{args.many} small tensors ({size:.0f} MB)",
                "tiny": f"{args.tiny} tiny tensors ({size:.0f} MB)",
                "huge": f"one {args.huge_mib} MiB tensor ({size:.0f} MB)",
                "gpt2": f"GPT-2-small-shaped fp32 checkpoint, 148 tensors ({size:.0f} MB)",
            }[case]
            repeats = args.repeats if case in ("many", "tiny", "gpt2") else max(1, args.repeats - 1)
            results.append((title, run_case(case, one_file, source, repeats, work, env)))
            source.unlink()
        for title, result in results:
            print_table(title, result)
        print(f"\nmedians of alternating runs; {time.time() - started:.0f} s in all")
        print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    finally:
        if server is not None:
            server[0].terminate()
            server[0].wait()
        shutil.rmtree(work, ignore_errors=True)


def start_lfs_server(work, env):
    """The real Git LFS server of the tests (giftless), and global installs of both filters so a
    fresh clone smudges: (process, port)."""
    from remote import start_server

    for install in (["git", "theta", "install"], ["git", "lfs", "install", "--skip-repo"]):
        subprocess.run(install, cwd=work, env=env, check=True, capture_output=True)
    storage = work / "lfs-server"
    storage.mkdir()
    return start_server(storage)


if __name__ == "__main__":
    main()
