"""Calibrate ``--operator auto``: generated task-vector cases, their signals, each operator's error.

Each case builds a base θ0 and two fine-tunes whose task vectors are made of known "skills" (the
changes that matter) plus optional "noise" (small redundant changes, the premise of TIES/DARE).
The ideal merge is θ0 + (the union of the skills, a shared skill counted once). For every case the
script prints the signals of git_theta.merge.signals, the relative error
‖merge − ideal‖ / ‖ideal − θ0‖ of each candidate operator (averaged over seeds), the operator
``choose`` picks and its error. A pick is "ok" when its error is within 15 % (or 0.05) of the best
candidate's.

    python bench/merge_auto_calibration.py            # 4096 entries, 5 seeds (a few seconds)
    python bench/merge_auto_calibration.py --size 1000000 --seeds 3
"""

import argparse

import numpy as np

from git_theta import registry as plugins
from git_theta.merge.params import resolve
from git_theta.merge.signals import choose, measure

CANDIDATES = [
    ("linear", {}),
    ("task_arithmetic", {}),
    ("ties", {}),
    ("ties", {"density": "0.05"}),
    ("ties", {"density": "0.1"}),
    ("ties", {"density": "0.15"}),
    ("ties", {"density": "0.2"}),
    ("ties", {"density": "0.3"}),
    ("ties", {"density": "0.5"}),
    ("dare_ties", {"density": "0.5"}),
    ("breadcrumbs_ties", {"density": "0.3", "gamma": "0.01"}),
    ("model_stock", {}),
    ("sce", {}),
]


def sparse(rng, n, density, scale=1.0, support=None):
    """A skill: ``density`` of the entries (or the given support) changed by N(0, scale²)."""
    out = np.zeros(n)
    idx = support if support is not None else rng.choice(n, int(density * n), replace=False)
    out[idx] = rng.normal(0, scale, size=len(idx))
    return out


def noise(rng, n, scale):
    return rng.normal(0, scale, size=n)


def case_identical(rng, n):
    s = sparse(rng, n, 1.0)
    return s + noise(rng, n, 0.05), s + noise(rng, n, 0.05), s


def case_identical_sparse(rng, n):
    s = sparse(rng, n, 0.1)
    return s + noise(rng, n, 0.02), s + noise(rng, n, 0.02), s


def case_disjoint_sparse(rng, n):
    perm = rng.permutation(n)
    a, b = sparse(rng, n, 0, support=perm[: n // 10]), sparse(rng, n, 0, support=perm[n // 10 : n // 5])
    return a, b, a + b


def case_disjoint_sparse_noisy(rng, n, sigma=0.05):
    perm = rng.permutation(n)
    a, b = sparse(rng, n, 0, support=perm[: n // 10]), sparse(rng, n, 0, support=perm[n // 10 : n // 5])
    return a + noise(rng, n, sigma), b + noise(rng, n, sigma), a + b


def case_overlap_sparse_noisy(rng, n, density=0.2, sigma=0.05):
    a, b = sparse(rng, n, density), sparse(rng, n, density)
    return a + noise(rng, n, sigma), b + noise(rng, n, sigma), a + b


def case_overlap_sparse_noisy_10(rng, n):
    return case_overlap_sparse_noisy(rng, n, 0.1)


def case_overlap_sparse_noisier(rng, n):
    return case_overlap_sparse_noisy(rng, n, 0.2, 0.15)


def case_overlap_sparse_noisy_dense(rng, n):
    return case_overlap_sparse_noisy(rng, n, 0.4)


def case_conflicting(rng, n):
    """Both sides change the same 20 % of entries, in independent directions, over noise."""
    support = rng.choice(n, n // 5, replace=False)
    a, b = sparse(rng, n, 0, support=support), sparse(rng, n, 0, support=support)
    return a + noise(rng, n, 0.05), b + noise(rng, n, 0.05), a + b


def case_dense_independent(rng, n):
    a, b = sparse(rng, n, 1.0), sparse(rng, n, 1.0)
    return a, b, a + b


def case_shared_plus_unique(rng, n):
    c = sparse(rng, n, 1.0)
    ua, ub = sparse(rng, n, 0.1, 2.0), sparse(rng, n, 0.1, 2.0)
    return c + ua, c + ub, c + ua + ub


def case_shared_sparse_plus_unique(rng, n):
    c = sparse(rng, n, 0.1)
    ua, ub = sparse(rng, n, 0.1), sparse(rng, n, 0.1)
    return c + ua + noise(rng, n, 0.02), c + ub + noise(rng, n, 0.02), c + ua + ub


def case_small_other_side(rng, n):
    a, b = sparse(rng, n, 1.0), sparse(rng, n, 1.0, 0.1)
    return a, b, a + b


CASES = [
    ("identical dense + noise", case_identical),
    ("identical sparse + noise", case_identical_sparse),
    ("disjoint sparse", case_disjoint_sparse),
    ("disjoint sparse + noise", case_disjoint_sparse_noisy),
    ("overlap sparse 10% + noise", case_overlap_sparse_noisy_10),
    ("overlap sparse 20% + noise", case_overlap_sparse_noisy),
    ("overlap sparse 20% + 3x noise", case_overlap_sparse_noisier),
    ("overlap sparse 40% + noise", case_overlap_sparse_noisy_dense),
    ("same support, independent signs", case_conflicting),
    ("dense independent", case_dense_independent),
    ("shared dense + unique sparse", case_shared_plus_unique),
    ("shared sparse + unique + noise", case_shared_sparse_plus_unique),
    ("dense, other side 10x smaller", case_small_other_side),
]


def label(name, raw):
    return name + "".join(f" {k}={v}" for k, v in sorted(raw.items()))


def merge(name, raw, models, base, seed):
    operator = plugins.get("merge", name)
    params = resolve(operator, raw, len(models))
    rng = np.random.default_rng(seed) if operator.random else None
    return operator.merge(models, base if operator.needs_base else None, params, rng)


def evaluate(case, size, seeds):
    errors = {label(*c): [] for c in CANDIDATES}
    picked, signals = [], []
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        base = rng.normal(size=size).astype(np.float32)
        da, db, ideal_delta = case(rng, size)
        models = [(base + da).astype(np.float32), (base + db).astype(np.float32)]
        ideal = base.astype(np.float64) + ideal_delta
        scale = np.linalg.norm(ideal_delta)
        for name, raw in CANDIDATES:
            out = merge(name, raw, models, base, seed)
            errors[label(name, raw)].append(np.linalg.norm(out - ideal) / scale)
        sig = measure(models, base)
        signals.append(sig)
        name, raw = choose(sig)
        out = merge(name, raw, models, base, seed)
        picked.append((label(name, raw), np.linalg.norm(out - ideal) / scale))
    mean_sig = {k: float(np.mean([s[k] for s in signals])) for k in signals[0]}
    return {k: float(np.mean(v)) for k, v in errors.items()}, picked, mean_sig


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="entries per tensor")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    keys = ["cosine", "sign_agreement", "norm_ratio", "topk_overlap", "support_overlap", "density"]
    short = ["cos", "sign", "norm", "topk", "supp", "dens"]
    print(f"size {args.size}, {args.seeds} seeds; error = ‖merge − ideal‖ / ‖ideal − base‖ (mean)\n")
    print("| case | " + " | ".join(short) + " | best (error) | auto pick (error) | ok |")
    print("|---|" + "---|" * (len(short) + 3))
    all_ok = True
    full = []
    for title, case in CASES:
        errors, picked, sig = evaluate(case, args.size, args.seeds)
        best = min(errors, key=errors.get)
        picks = sorted({p for p, _ in picked})
        pick_err = float(np.mean([e for _, e in picked]))
        ok = pick_err <= max(1.15 * errors[best], errors[best] + 0.05)
        all_ok &= ok
        cells = " | ".join(f"{sig[k]:.2f}" for k in keys)
        print(
            f"| {title} | {cells} | {best} ({errors[best]:.3f}) | {', '.join(picks)} ({pick_err:.3f}) | {'yes' if ok else 'NO'} |"
        )
        full.append((title, errors))
    print("\nerror of every candidate:\n")
    print("| case | " + " | ".join(label(*c) for c in CANDIDATES) + " |")
    print("|---|" + "---|" * len(CANDIDATES))
    for title, errors in full:
        print(f"| {title} | " + " | ".join(f"{errors[label(*c)]:.3f}" for c in CANDIDATES) + " |")
    print("\nauto picks within 15 % (or 0.05) of the best on every case:", "yes" if all_ok else "NO")
    return 0 if all_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
