"""Time and peak memory of every merge operator on one tensor (two fine-tunes and their base).

Each operator runs in its own process so its peak RSS is its own; the table gives CPU seconds,
wall seconds and the peak RSS above the inputs (in units of one tensor's size), the number that
bounds the merge driver's memory (it streams one tensor at a time).

    python bench/merge_operators.py                 # 2^22 float32 entries (16 MiB), 1024 x 4096
    python bench/merge_operators.py --rows 8192 --cols 8192   # 256 MiB, an LLM-sized matrix
"""

import argparse
import json
import subprocess
import sys

CASES = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("ties", {"density": "0.2"}),
    ("ties", {"density": "0.2", "consensus": "count"}),
    ("dare_linear", {"density": "0.5"}),
    ("dare_ties", {"density": "0.5"}),
    ("breadcrumbs", {"density": "0.9"}),
    ("breadcrumbs_ties", {"density": "0.9"}),
    ("della", {"density": "0.5"}),
    ("della_linear", {"density": "0.5"}),
    ("slerp", {}),
    ("nuslerp", {}),
    ("multislerp", {}),
    ("karcher", {}),
    ("model_stock", {}),
    ("sce", {"select_topk": "0.5"}),
]

CHILD = r"""
import json, resource, sys, time
import numpy as np
from git_theta import plugins
from git_theta.merge.params import resolve
rows, cols, name, raw = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
rng = np.random.default_rng(0)
base = rng.standard_normal((rows, cols), dtype=np.float32)
models = [base + rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.01) for _ in range(2)]
op = plugins.get("merge", name)
params = resolve(op, raw, 2)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cpu, wall = time.process_time(), time.perf_counter()
op.merge(models, base if op.needs_base else None, params, np.random.default_rng(1) if op.random else None)
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"cpu": cpu, "wall": wall, "extra": peak * 1024 / base.nbytes}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    args = parser.parse_args()
    mib = args.rows * args.cols * 4 / 2**20
    print(f"one float32 tensor {args.rows} x {args.cols} ({mib:.0f} MiB), two fine-tunes + base\n")
    print("| operator | params | CPU s | wall s | MiB/s (per input) | peak RSS above inputs (tensors) |")
    print("|---|---|---|---|---|---|")
    for name, raw in CASES:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.rows), str(args.cols), name, json.dumps(raw)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(proc.stdout)
        params = " ".join(f"{k}={v}" for k, v in raw.items())
        print(f"| {name} | {params} | {r['cpu']:.2f} | {r['wall']:.2f} | {mib / r['wall']:.0f} | {r['extra']:.1f} |")


if __name__ == "__main__":
    main()
