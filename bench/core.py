"""Core benchmark: git-theta against Git LFS on a GPT-2-small-sized checkpoint.

Generates a 124M-parameter checkpoint (GPT-2 small's tensor names and shapes, trained-weight-like
values) in fp32 (~500 MB) and a bf16 copy, then, for git-theta and for plain Git LFS on the same
files, times ``git add`` + ``git commit`` of a first and a second version (a fine-tune step that
changed the last two blocks), ``git checkout`` of the older commit, and ``git status`` after
``touch``; reports the peak memory of the whole command (git and its filter) and the bytes stored.

    python bench/core.py            # full size (needs ~4 GB of disk, a few minutes)
    python bench/core.py --scale 0.1

Git LFS must be installed (``apt-get install git-lfs``); without it only git-theta is measured.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import du, isolated_env

HERE = Path(__file__).resolve().parent


def gpt2_shapes(scale=1.0):
    """GPT-2 small's parameters; ``scale`` shrinks the vocabulary and width for quick runs."""
    d = max(64, int(768 * scale) // 64 * 64)
    vocab = max(1000, int(50257 * scale))
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (1024, d)}
    for i in range(12):
        p = f"h.{i}."
        shapes.update(
            {
                p + "ln_1.weight": (d,),
                p + "ln_1.bias": (d,),
                p + "attn.c_attn.weight": (d, 3 * d),
                p + "attn.c_attn.bias": (3 * d,),
                p + "attn.c_proj.weight": (d, d),
                p + "attn.c_proj.bias": (d,),
                p + "ln_2.weight": (d,),
                p + "ln_2.bias": (d,),
                p + "mlp.c_fc.weight": (d, 4 * d),
                p + "mlp.c_fc.bias": (4 * d,),
                p + "mlp.c_proj.weight": (4 * d, d),
                p + "mlp.c_proj.bias": (d,),
            }
        )
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def make_state(shapes, seed):
    """Weight-like tensors: small Gaussian matrices, norms near one, biases near zero."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in shapes.items():
        if "ln_" in name and name.endswith("weight"):
            state[name] = (1 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return state


def fine_tune(state, seed):
    """A new version where the last two blocks moved."""
    rng = np.random.default_rng(seed)
    new = dict(state)
    for name, value in state.items():
        if name.startswith(("h.10.", "h.11.")):
            new[name] = (value + 1e-3 * rng.standard_normal(value.shape)).astype(np.float32)
    return new


def save(state, path, bf16=False):
    if bf16:
        import torch
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(v).bfloat16() for k, v in state.items()}, str(path))
    else:
        from safetensors.numpy import save_file

        save_file(state, str(path))


def measured(cmd, cwd, env):
    """Run ``cmd``; return (seconds, peak RSS in MiB of the command's largest process)."""
    probe = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter();"
        "rc = subprocess.run(sys.argv[1:]).returncode;"
        "dt = time.perf_counter() - t;"
        "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
        "sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    seconds, rss_kib = proc.stdout.split()[-2:]
    return float(seconds), int(rss_kib) / 1024


def run_tool(tool, work, files, env):
    """Measure one tool on the pre-generated files; return a dict of results."""
    repo = work / tool
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    if tool == "git-theta":
        git("theta", "install", "--local")
        git("theta", "track", "*.safetensors")
        store = repo / ".git" / "theta" / "objects"
    else:
        git("lfs", "install", "--local")
        git("lfs", "track", "*.safetensors")
        store = repo / ".git" / "lfs" / "objects"
    git("add", ".gitattributes")
    git("commit", "-qm", "attributes")
    results = {}
    for label, (v1, v2) in files.items():
        target = repo / f"{label}.safetensors"
        shutil.copyfile(v1, target)
        before = du(store) if store.exists() else 0
        t_add, m_add = measured(["git", "add", target.name], repo, env)
        t_commit, _ = measured(["git", "commit", "-qm", f"{label} v1"], repo, env)
        stored_v1 = du(store) - before
        shutil.copyfile(v2, target)
        before = du(store)
        t_add2, m_add2 = measured(["git", "add", target.name], repo, env)
        measured(["git", "commit", "-qm", f"{label} v2"], repo, env)
        stored_v2 = du(store) - before
        os.utime(target)
        t_status, _ = measured(["git", "status", "--porcelain"], repo, env)
        t_checkout, m_checkout = measured(["git", "checkout", "-q", "HEAD~1", "--", target.name], repo, env)
        if target.read_bytes() != Path(v1).read_bytes():
            raise SystemExit(f"{tool}: checkout of {label} v1 is not byte-identical")
        git("checkout", "-q", "HEAD", "--", target.name)
        raw = Path(v1).stat().st_size
        results[label] = {
            "add+commit v1 (s)": t_add + t_commit,
            "add v2 (s)": t_add2,
            "checkout v1 (s)": t_checkout,
            "status after touch (s)": t_status,
            "peak MiB (add/checkout)": f"{max(m_add, m_add2):.0f}/{m_checkout:.0f}",
            "stored v1 / raw": stored_v1 / raw,
            "stored v2 / raw": stored_v2 / raw,
        }
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the model (1.0 = GPT-2 small)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="theta-bench-"))
    try:
        env = isolated_env(work / "home")
        shapes = gpt2_shapes(args.scale)
        n_params = sum(int(np.prod(s)) for s in shapes.values())
        largest = max(int(np.prod(s)) for s in shapes.values()) * 4
        print(f"model: {n_params / 1e6:.1f}M parameters, largest tensor {largest / 2**20:.0f} MiB (fp32)")
        v1, v2 = make_state(shapes, 0), None
        v2 = fine_tune(v1, 1)
        files = {}
        for label, bf16 in (("fp32", False), ("bf16", True)):
            a, b = work / f"{label}-v1.safetensors", work / f"{label}-v2.safetensors"
            save(v1, a, bf16)
            save(v2, b, bf16)
            files[label] = (a, b)
            print(f"{label}: {a.stat().st_size / 2**20:.0f} MiB per version")
        tools = ["git-theta"] + (["git-lfs"] if shutil.which("git-lfs") else [])
        table = {tool: run_tool(tool, work, files, env) for tool in tools}
        metrics = list(next(iter(table["git-theta"].values())))
        header = ["metric"] + [f"{tool} {label}" for tool in tools for label in files]
        rows = [header]
        for metric in metrics:
            row = [metric]
            for tool in tools:
                for label in files:
                    value = table[tool][label][metric]
                    row.append(f"{value:.3f}" if isinstance(value, float) else str(value))
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        print()
        for row in rows:
            print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
