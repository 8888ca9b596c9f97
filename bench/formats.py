"""Format benchmark: the same GPT-2-small-shaped weights as safetensors, torch (.pt) and npz.

For each format, times ``git add`` + ``git commit`` of a first version, ``git add`` of a second
(the last two blocks changed), ``git checkout`` of the first, and ``git status`` after ``touch``,
with the peak memory of the command (git and its filter) and the bytes stored. The torch file is a
training checkpoint: ``{"model": state_dict, "optimizer": {"state": ..., "param_groups": ...},
"step": n}`` with an Adam ``exp_avg`` for every weight, so it is twice the size of the others.
Checkout is checked bit for bit (safetensors byte-identical, npz and torch tensor-identical).

    python bench/formats.py              # scale 0.25 (~31M parameters, a minute or two)
    python bench/formats.py --scale 1    # GPT-2 small (124M parameters, ~500 MB per fp32 file)
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import du, fine_tune, gpt2_shapes, isolated_env, make_state, measured  # noqa: E402

SUFFIX = {"safetensors": ".safetensors", "torch": ".pt", "npz": ".npz"}


def save(fmt, state, path, step):
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(state, str(path))
    elif fmt == "npz":
        np.savez(path, **state)
    else:
        import torch

        tensors = {k: torch.from_numpy(v) for k, v in state.items()}
        optimizer = {
            "state": {
                i: {"step": torch.tensor(float(step)), "exp_avg": t * 0.1} for i, t in enumerate(tensors.values())
            },
            "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.999), "params": list(range(len(tensors)))}],
        }
        torch.save({"model": tensors, "optimizer": optimizer, "step": step}, path)


def same_checkpoint(fmt, a, b):
    """safetensors: byte-identical; npz: same arrays (zip timestamps differ); torch: same tensors."""
    if fmt == "safetensors":
        return Path(a).read_bytes() == Path(b).read_bytes()
    if fmt == "npz":
        with np.load(a) as x, np.load(b) as y:
            return x.files == y.files and all(
                x[k].dtype == y[k].dtype and x[k].tobytes() == y[k].tobytes() for k in x.files
            )
    import torch

    x, y = torch.load(a, weights_only=True, mmap=True), torch.load(b, weights_only=True, mmap=True)
    flat = lambda o: [(k, v.view(torch.uint8) if isinstance(v, torch.Tensor) else v) for k, v in o["model"].items()]  # noqa: E731
    return (
        all(k1 == k2 and torch.equal(v1, v2) for (k1, v1), (k2, v2) in zip(flat(x), flat(y))) and x["step"] == y["step"]
    )


def run(fmt, work, v1, v2, env):
    repo = work / fmt
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, env=env, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("theta", "install", "--local")
    git("theta", "track", "*" + SUFFIX[fmt])
    git("add", ".gitattributes")
    git("commit", "-qm", "attributes")
    store = repo / ".git" / "theta" / "objects"
    target = repo / ("model" + SUFFIX[fmt])
    shutil.copyfile(v1, target)
    t_add, m_add = measured(["git", "add", target.name], repo, env)
    t_commit, _ = measured(["git", "commit", "-qm", "v1"], repo, env)
    stored_v1 = du(store)
    shutil.copyfile(v2, target)
    t_add2, m_add2 = measured(["git", "add", target.name], repo, env)
    measured(["git", "commit", "-qm", "v2"], repo, env)
    stored_v2 = du(store) - stored_v1
    os.utime(target)
    t_status, _ = measured(["git", "status", "--porcelain"], repo, env)
    t_checkout, m_checkout = measured(["git", "checkout", "-q", "HEAD~1", "--", target.name], repo, env)
    if not same_checkpoint(fmt, v1, target):
        raise SystemExit(f"{fmt}: checkout of v1 does not match what was added")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, env=env, capture_output=True, text=True).stdout
    raw = Path(v1).stat().st_size
    return {
        "file MiB": raw / 2**20,
        "add+commit v1 (s)": t_add + t_commit,
        "add v2 (s)": t_add2,
        "checkout v1 (s)": t_checkout,
        "status after touch (s)": t_status,
        "peak MiB (add/checkout)": f"{max(m_add, m_add2):.0f}/{m_checkout:.0f}",
        "stored v1 / file": stored_v1 / raw,
        "stored v2 / file": stored_v2 / raw,
        "status clean": "yes" if status.strip() in ("", f"M  {target.name}") else "NO",
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.25, help="1.0 = GPT-2 small (124M parameters)")
    parser.add_argument("--formats", default="safetensors,torch,npz")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="theta-bench-formats-"))
    try:
        env = isolated_env(work / "home")
        shapes = gpt2_shapes(args.scale)
        state = make_state(shapes, 0)
        tuned = fine_tune(state, 1)
        n = sum(v.size for v in state.values())
        print(
            f"model: {n / 1e6:.1f}M parameters (fp32), largest tensor {max(v.nbytes for v in state.values()) / 2**20:.0f} MiB"
        )
        table = {}
        for fmt in args.formats.split(","):
            v1, v2 = work / f"v1{SUFFIX[fmt]}", work / f"v2{SUFFIX[fmt]}"
            save(fmt, state, v1, 1)
            save(fmt, tuned, v2, 2)
            table[fmt] = run(fmt, work, v1, v2, env)
        metrics = list(next(iter(table.values())))
        rows = [["metric", *table]]
        for metric in metrics:
            rows.append(
                [metric] + [f"{v:.3f}" if isinstance(v, float) else str(v) for v in (table[f][metric] for f in table)]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print()
        for row in rows:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
