"""Remote benchmark: push and clone a checkpoint and a 5-version history through a local Git LFS
server (giftless), git-theta against Git LFS on the same files.

Version 1 is a random fp32 checkpoint; each later version changes a fraction (default 1%) of the
entries of every tensor. For each tool: ``git push`` of version 1 to a bare repository (objects to
the LFS server through the pre-push hook), ``git clone`` (objects fetched by the smudge filter), then
per later version ``git push`` from the first clone and ``git pull`` into the second. Reports seconds
and the bytes that crossed the wire (the growth of the server's storage for a push, of the cloning
repository's object store for a clone or pull).

    python bench/remote.py            # 40 MB checkpoint
    python bench/remote.py --full     # 500 MB checkpoint

Needs the test extra for the server (``pip install -e '.[lfs-server]'``); Git LFS is measured when
installed (``apt-get install git-lfs``).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import du, isolated_env

HERE = Path(__file__).resolve().parent
SERVER = HERE.parent / "tests" / "lfs_server.py"


def make_versions(total_mb, versions, fraction, seed=0):
    """Yield the versions (the same for a seed): 1024 x 1024 fp32 tensors (4 MiB each) and a small
    one; each later version changes ``fraction`` of every tensor's entries. One version in memory."""
    rng = np.random.default_rng(seed)
    count = max(1, int(total_mb * (1 << 20) // (4 << 20)))
    state = {f"layers.{i}.weight": (0.02 * rng.standard_normal((1024, 1024))).astype(np.float32) for i in range(count)}
    state["norm.weight"] = np.ones(1024, np.float32)
    yield state
    for _ in range(versions - 1):
        for value in state.values():  # in place: the previous version was saved already
            flat = value.reshape(-1)
            idx = rng.choice(flat.size, max(1, int(flat.size * fraction)), replace=False)
            flat[idx] += (1e-3 * rng.standard_normal(idx.size)).astype(np.float32)
        yield state


def start_server(storage):
    proc = subprocess.Popen([sys.executable, str(SERVER), str(storage)], stdout=subprocess.PIPE, cwd=storage)
    port = int(proc.stdout.readline())
    return proc, port


def timed(cmd, cwd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return time.perf_counter() - start


def run_tool(tool, work, versions, url, env, storage):
    """Push/clone/pull every version for one tool; returns (tool, step, seconds, bytes) rows."""
    from safetensors.numpy import save_file

    def git(cwd, *args):
        timed(["git", *args], cwd, env)

    bare, a, b = work / f"{tool}.git", work / f"{tool}-a", work / f"{tool}-b"
    git(work, "init", "-q", "--bare", str(bare))
    git(work, "init", "-q", str(a))
    if tool == "git-theta":
        git(a, "theta", "track", "*.safetensors")
        store = lambda repo: repo / ".git" / "theta" / "objects"  # noqa: E731
    else:
        git(a, "lfs", "track", "*.safetensors")
        store = lambda repo: repo / ".git" / "lfs" / "objects"  # noqa: E731
    (a / ".lfsconfig").write_text(f"[lfs]\n\turl = {url}\n")
    git(a, "remote", "add", "origin", str(bare))
    rows = []
    for number, state in enumerate(versions, start=1):
        save_file(state, str(a / "model.safetensors"))
        git(a, "add", ".")
        git(a, "commit", "-qm", f"v{number}")
        before = du(storage)
        seconds = timed(["git", "push", "-q", "origin", "main"], a, env)
        rows.append((tool, f"push v{number}", seconds, du(storage) - before))
        if number == 1:
            seconds = timed(["git", "clone", "-q", str(bare), str(b)], work, env)
            rows.append((tool, "clone v1", seconds, du(store(b))))
        else:
            before = du(store(b))
            seconds = timed(["git", "pull", "-q", "--ff-only"], b, env)
            rows.append((tool, f"pull v{number}", seconds, du(store(b)) - before))
        if (b / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes():
            raise SystemExit(f"{tool}: the clone's checkpoint differs after v{number}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=40, help="checkpoint size in MB (default 40)")
    parser.add_argument("--full", action="store_true", help="the 500 MB checkpoint of the issue")
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.01, help="fraction of entries changed per version")
    args = parser.parse_args()
    size = 500 if args.full else args.size_mb
    tools = ["git-theta"] + (["git-lfs"] if shutil.which("git-lfs") else [])
    with tempfile.TemporaryDirectory(prefix="theta-bench-remote-") as tmp:
        work = Path(tmp)
        env = isolated_env(work / "home")
        # global installs, run outside any repository so no repository's hooks are touched
        subprocess.run(["git", "theta", "install"], cwd=work, env=env, check=True, capture_output=True)
        if "git-lfs" in tools:
            subprocess.run(["git", "lfs", "install", "--skip-repo"], cwd=work, env=env, check=True, capture_output=True)
        storage = work / "server"
        storage.mkdir()
        server, port = start_server(storage)
        try:
            rows = []
            for tool in tools:
                url = f"http://127.0.0.1:{port}/team/{tool}.git/info/lfs"
                versions = make_versions(size, args.versions, args.fraction)
                rows += run_tool(tool, work, versions, url, env, storage)
        finally:
            server.terminate()
            server.wait()
    raw = sum(v.nbytes for v in next(make_versions(size, 1, 0)).values())
    print(
        f"checkpoint: {raw / 1e6:.0f} MB fp32, {args.versions} versions, {args.fraction:.1%} of entries changed per version"
    )
    print(f"{'tool':10} {'step':9} {'seconds':>8} {'MB moved':>9} {'vs git-lfs':>10}")
    lfs = {step: moved for tool, step, _, moved in rows if tool == "git-lfs"}
    for tool, step, seconds, moved in rows:
        ratio = f"{moved / lfs[step]:.3f}" if tool == "git-theta" and lfs.get(step) else ""
        print(f"{tool:10} {step:9} {seconds:8.2f} {moved / 1e6:9.2f} {ratio:>10}")


if __name__ == "__main__":
    main()
