"""Our merge operators against mergekit's on the same tensors: largest absolute difference.

mergekit is not a dependency: pass an interpreter that has it (``--python``; e.g. the virtual
environment ``bench/merge.py --mergekit`` creates), or install ``mergekit==0.1.5`` into a venv of
your own. The inputs are small seeded float32 tensors (a base and two or three fine-tunes, plus
edge cases: colinear, antipodal, zero task vectors); each row runs one operator with one set of
parameters through ``mergekit.merge_methods.api.merge_tensors`` and through our plugin.
Random operators (DARE, DELLA) use different generators, so for them the table compares the
fraction of changed entries and the L1 norm of the merged task vector instead.

    python bench/merge_vs_mergekit.py --python /path/to/venv-with-mergekit/bin/python
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from git_theta import registry as plugins
from git_theta.merge.params import resolve

# (label, operator, params, inputs, uses base in mergekit)
CASES = [
    ("linear", "linear", {"weight": [0.7, 0.3]}, "ab", False),
    ("task_arithmetic", "task_arithmetic", {"weight": [1.0, 0.5], "lambda": 0.8}, "ab", True),
    ("task_arithmetic normalize", "task_arithmetic", {"normalize": True, "weight": [1.0, 3.0]}, "ab", True),
    ("ties d=1", "ties", {}, "ab", True),
    ("ties d=0.2", "ties", {"density": 0.2}, "ab", True),
    ("ties d=0.3 w=1,-0.5 3 models", "ties", {"density": 0.3, "weight": [1.0, -0.5, 0.7]}, "abc", True),
    ("ties d=0", "ties", {"density": 0.0}, "ab", True),
    ("breadcrumbs d=0.9 g=0.05", "breadcrumbs", {"density": 0.9, "gamma": 0.05}, "ab", True),
    ("breadcrumbs_ties d=0.8 g=0.1", "breadcrumbs_ties", {"density": 0.8, "gamma": 0.1}, "abc", True),
    ("breadcrumbs d=0.5 rescale", "breadcrumbs", {"density": 0.5, "rescale": True}, "ab", True),
    ("slerp t=0.3", "slerp", {"t": 0.3}, "ab", False),
    ("slerp colinear", "slerp", {"t": 0.3}, "a2a", False),
    ("slerp antipodal", "slerp", {"t": 0.3}, "a-a", False),
    ("nuslerp w=3,1", "nuslerp", {"weight": [3.0, 1.0]}, "ab", True),
    ("nuslerp rows", "nuslerp", {"nuslerp_flatten": False}, "ab", True),
    ("nuslerp columns", "nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "ab", True),
    ("nuslerp zero task vector", "nuslerp", {}, "ao", True),
    ("multislerp 3 models", "multislerp", {"weight": [1.0, 2.0, 0.5]}, "abc", True),
    ("karcher 3 models", "karcher", {}, "abc", False),
    ("model_stock 3 models", "model_stock", {}, "abc", True),
    ("model_stock filter_wise", "model_stock", {"filter_wise": True}, "ab", True),
    ("model_stock singular", "model_stock", {}, "a-a", True),
    ("sce topk=0.5", "sce", {"select_topk": 0.5}, "abc", True),
    ("sce", "sce", {}, "ab", True),
    ("ties d=0.3 equal magnitudes", "ties", {"density": 0.3}, "qq", True),
    ("ties d=0.5 equal magnitudes 3 models", "ties", {"density": 0.5, "weight": [1.0, 0.5, 2.0]}, "qqq", True),
    ("ram 3 models", "ram", {}, "sparse", True),
    ("ramplus_tl 3 models", "ramplus_tl", {"r": 0.5, "alpha": 0.4}, "sparse", True),
    ("nearswap t=0.5", "nearswap", {"t": 0.5}, "ab", "first"),
    ("arcee_fusion", "arcee_fusion", {}, "ab", "first"),
    ("passthrough scale=0.5", "passthrough", {"scale": [0.5]}, "a", False),
]
RANDOM = [
    ("dare_linear d=0.3", "dare_linear", {"density": 0.3}, "ab", True),
    ("dare_ties d=0.3", "dare_ties", {"density": 0.3}, "ab", True),
    ("della d=0.4 e=0.1", "della", {"density": 0.4, "epsilon": 0.1}, "ab", True),
    ("della_linear d=0.5", "della_linear", {"density": 0.5}, "ab", True),
]

COUNT = {"ab": 2, "abc": 3, "a2a": 2, "a-a": 2, "ao": 2, "qq": 2, "qqq": 3, "sparse": 3, "a": 1}

CHILD = r"""
import json, sys
import numpy as np, torch
from mergekit.merge_methods.api import merge_tensors
data = np.load(sys.argv[1])
cases = json.loads(open(sys.argv[2]).read())
out = {}
for i, (label, name, params, inputs, uses_base) in enumerate(cases):
    tensors = []
    while f"{i}_{len(tensors)}" in data:
        tensors.append(torch.from_numpy(data[f"{i}_{len(tensors)}"]))
    if uses_base is True:
        tensors = [torch.from_numpy(data[f"{i}_base"])] + tensors
    mk_params = {}
    for key, value in params.items():
        if isinstance(value, list):
            value = ([None] if uses_base is True else []) + value  # per input; the base gets none
            value = {k: v for k, v in enumerate(value) if v is not None}
        mk_params[key] = value
    if uses_base == "first":  # nearswap, arcee_fusion: the first input plays base_model
        res = merge_tensors(tensors, name, parameters=mk_params, base_index=0)
    elif name == "slerp":
        res = merge_tensors(tensors, name, parameters=mk_params, base_index=0)
    else:
        res = merge_tensors(tensors, name, parameters=mk_params, base_index=0 if uses_base else None)
    out[str(i)] = res.numpy()
np.savez(sys.argv[3], **out)
"""


def inputs_for(spec, rng, shape=(24, 16)):
    base = rng.normal(size=shape).astype(np.float32)
    a = base + rng.normal(size=shape).astype(np.float32)
    b = base + rng.normal(size=shape).astype(np.float32)
    c = base + rng.normal(size=shape).astype(np.float32)
    if spec == "a2a":  # slerp works on the tensors themselves
        return base, [a, np.float32(2) * a]
    if spec == "a-a":
        return base, [a, -a]
    if spec == "ao":
        return base, [a, base.copy()]
    if spec in ("qq", "qqq"):  # task vectors on a coarse grid: many equal magnitudes at the k-th
        steps = [base + np.round(rng.normal(size=shape) * 2).astype(np.float32) / 4 for _ in spec]
        return base, steps
    if spec == "sparse":  # each fine-tune changes a third of the entries; some overlap
        return base, [base + rng.normal(size=shape).astype(np.float32) * (rng.random(shape) < 0.33) for _ in range(3)]
    if spec == "a":
        return base, [a]
    return base, {"ab": [a, b], "abc": [a, b, c]}[spec]


def ours(name, params, models, base, seed=0):
    op = plugins.get("merge", name)
    raw = {k: (",".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in params.items()}
    resolved = resolve(op, raw, len(models))
    rng = np.random.default_rng(seed) if op.random else None
    return op.merge(models, base if op.needs_base else None, resolved, rng)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="an interpreter with mergekit installed")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cases = []
    for label, name, params, spec, uses_base in CASES + RANDOM:
        if "weight" in plugins.get("merge", name).params and "weight" not in params:
            params = {**params, "weight": [1.0] * COUNT[spec]}  # mergekit requires it
        cases.append((label, name, params, spec, uses_base))
    arrays, prepared = {}, []
    for i, (label, name, params, spec, uses_base) in enumerate(cases):
        base, models = inputs_for(spec, rng)
        if spec == "a-a" and name == "model_stock":
            models = [base + (models[0] - base), base - (models[0] - base)]  # opposite task vectors
        arrays[f"{i}_base"] = base
        for j, m in enumerate(models):
            arrays[f"{i}_{j}"] = m
        prepared.append((base, models))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.savez(tmp / "in.npz", **arrays)
        (tmp / "cases.json").write_text(json.dumps([list(c) for c in cases]))
        proc = subprocess.run(
            [args.python, "-c", CHILD, str(tmp / "in.npz"), str(tmp / "cases.json"), str(tmp / "out.npz")],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(f"mergekit run failed (is mergekit installed for {args.python}?):\n{proc.stderr[-2000:]}")
        theirs = dict(np.load(tmp / "out.npz"))
    print("| case | max abs diff | max abs value |")
    print("|---|---|---|")
    for i, (label, name, params, spec, uses_base) in enumerate(cases[: len(CASES)]):
        base, models = prepared[i]
        mine = ours(name, params, models, base)
        mk = theirs[str(i)]
        print(f"| {label} | {np.abs(mine - mk).max():.2e} | {np.abs(mk).max():.2f} |")
    print("\nrandom operators (different generators: statistics of the merged task vector)\n")
    print("| case | changed entries: ours / mergekit | L1 of merged δ: ours / mergekit |")
    print("|---|---|---|")
    for k, (label, name, params, spec, uses_base) in enumerate(cases[len(CASES) :]):
        i = len(CASES) + k
        base, models = prepared[i]
        mine = ours(name, params, models, base) - base
        mk = theirs[str(i)] - base
        print(
            f"| {label} | {np.mean(np.abs(mine) > 1e-6):.3f} / {np.mean(np.abs(mk) > 1e-6):.3f} "
            f"| {np.abs(mine).sum():.1f} / {np.abs(mk).sum():.1f} |"
        )


if __name__ == "__main__":
    main()
