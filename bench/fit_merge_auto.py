"""Fit ``--operator auto``'s predictor on ``bench/merge_eval.py``'s merges and report it on held-out task sets.

For every candidate recipe of the ``--search`` grid, a ridge regression predicts the merge's mean
normalized accuracy from standardized similarity features (the structural ones, and a second
predictor that also uses the functional ones). ``auto`` picks the recipe with the highest prediction.

Held-out evaluation: leave one *task set* out (a task pair, or triple, with both of its fine-tune
variants, so no model of the held-out merge was seen in fitting). Printed per merge size: how often
the pick is within 1 point of the best candidate, and its mean normalized accuracy against always
ties (density 0.5), always task_arithmetic (lambda 1 and 0.5), the best fixed recipe in hindsight
and the oracle. The predictor fitted on all rows is written to ``git_theta/merge/auto_model.json``.

    python bench/fit_merge_auto.py bench/results/merge_eval.json [--write]
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from git_theta.merge.auto import FUNCTIONAL, MODEL_FILE, SCHEMA, STRUCTURAL  # noqa: E402

RIDGE = 3.0
BASELINES = ("ties density=0.5", "task_arithmetic lambda=1.0", "task_arithmetic lambda=0.5")
TWO_ONLY = ("slerp", "nuslerp")


def merges(rows):
    """{(family, tasks, variant): {"features", "n", "scores": {recipe: normalized}}}."""
    out = {}
    for r in rows:
        key = (r["family"], tuple(r["tasks"]), r["variant"])
        m = out.setdefault(key, {"features": r["features"], "n": r["n_models"], "scores": {}, "cands": {}})
        m["scores"][r["candidate"]] = r["normalized"] if r["normalized"] is not None else 0.0
        m["cands"][r["candidate"]] = (r["operator"], r["params"])
    return out


def fit(train, features, recipes):
    """Standardization and per-recipe ridge coefficients from ``train`` merges."""
    X = np.array([[m["features"][f] if f != "n_models" else m["n"] for f in features] for m in train], float)
    mean, scale = X.mean(0), X.std(0)
    scale[scale == 0] = 1.0
    Z = (X - mean) / scale
    low, high = X.min(0), X.max(0)
    coefs = {}
    for recipe in recipes:
        idx = [i for i, m in enumerate(train) if recipe in m["scores"]]
        if not idx:
            continue
        z, y = Z[idx], np.array([train[i]["scores"][recipe] for i in idx])
        A = np.hstack([np.ones((len(idx), 1)), z])
        reg = RIDGE * np.eye(A.shape[1])
        reg[0, 0] = 0  # the intercept is not shrunk
        w = np.linalg.solve(A.T @ A + reg, A.T @ y)
        coefs[recipe] = (float(w[0]), [float(v) for v in w[1:]])
    return mean, scale, coefs, low, high


def predict(model, m):
    mean, scale, coefs, low, high = model["fit"]
    x = np.array([m["features"][f] if f != "n_models" else m["n"] for f in model["features"]], float)
    z = (np.clip(x, low, high) - mean) / scale  # as git_theta.merge.auto.predict does
    preds = {r: b + float(np.dot(w, z)) for r, (b, w) in coefs.items() if r in m["scores"]}
    return max(preds, key=preds.get)


def outcome(key, merge, pick):
    """One held-out merge's result: the pick, its score, the best score, every score."""
    return {
        "key": key,
        "n": merge["n"],
        "pick": pick,
        "picked": merge["scores"][pick],
        "best": max(merge["scores"].values()),
        "scores": merge["scores"],
    }


def evaluate(all_merges, features, strict=False):
    """Leave-one-task-set-out: per merge the pick, its score, the best score and the baselines.

    ``strict``: fit only on merges that share no task (so no fine-tuned model) with the held-out one.
    """
    keys = list(all_merges)
    groups = sorted({(k[0], k[1]) for k in keys})
    recipes = list(dict.fromkeys(r for m in all_merges.values() for r in m["scores"]))
    out = []
    for g in groups:
        if strict:
            train = [all_merges[k] for k in keys if k[0] != g[0] or not set(k[1]) & set(g[1])]
        else:
            train = [all_merges[k] for k in keys if (k[0], k[1]) != g]
        model = {"features": features, "fit": fit(train, features, recipes)}
        for k in keys:
            if (k[0], k[1]) == g:
                m = all_merges[k]
                out.append(outcome(k, m, predict(model, m)))
    return out


def score_predictor(all_merges, data, features, family=None):
    """The picks of a fitted predictor file (``data``, e.g. the shipped one) on ``all_merges``, as
    :func:`evaluate` returns them, through ``git_theta.merge.auto.predict`` (what auto runs).
    ``features`` says which features it is given (the structural ones: its structural predictor)."""
    from git_theta.merge.auto import predict as auto_predict

    out = []
    for k, m in all_merges.items():
        if family is not None and k[0] != family:
            continue
        given = {f: m["features"][f] for f in features if f != "n_models"}
        ranked = [r for r, _ in auto_predict(given, m["n"], data).scores if r in m["scores"]]
        out.append(outcome(k, m, ranked[0]))
    return out


def report(results, title):
    lines = [title]
    recipes = list(dict.fromkeys(r for x in results for r in x["scores"]))
    for label, sel in (("pairs", lambda x: x["n"] == 2), ("3+ models", lambda x: x["n"] >= 3), ("all", lambda x: True)):
        rs = [x for x in results if sel(x)]
        if not rs:
            continue
        within = np.mean([x["picked"] >= x["best"] - 0.01 for x in rs])
        fixed = {
            r: np.mean([x["scores"].get(r, 0.0) for x in rs]) for r in recipes if all(r in x["scores"] for x in rs)
        }
        best_fixed = max(fixed, key=fixed.get)
        cells = [f"auto {np.mean([x['picked'] for x in rs]):.3f}"]
        cells += [f"always {b} {fixed[b]:.3f}" for b in BASELINES if b in fixed]
        cells += [
            f"best fixed in hindsight ({best_fixed}) {fixed[best_fixed]:.3f}",
            f"oracle {np.mean([x['best'] for x in rs]):.3f}",
        ]
        lines.append(
            f"  {label} ({len(rs)} merges): auto within 1 point of the best in {within:.0%}; "
            "mean normalized accuracy: " + ", ".join(cells)
        )
    return lines


def to_json(model_fit, features, all_merges):
    mean, scale, coefs, low, high = model_fit
    cands = {}
    for m in all_merges.values():
        cands.update(m["cands"])
    return {
        "features": list(features),
        "mean": [float(v) for v in mean],
        "scale": [float(v) for v in scale],
        "low": [float(v) for v in low],
        "high": [float(v) for v in high],
        "candidates": [
            {
                "operator": cands[r][0],
                "params": cands[r][1],
                "intercept": b,
                "coef": w,
                **({"max_models": 2} if cands[r][0] in TWO_ONLY else {}),
            }
            for r, (b, w) in coefs.items()
        ],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="JSON written by bench/merge_eval.py")
    parser.add_argument("--write", action="store_true", help=f"write the predictor to {MODEL_FILE}")
    parser.add_argument(
        "--score-shipped",
        metavar="FAMILY",
        help="also score the predictor now in auto_model.json on FAMILY's merges (fair only when they are new to it)",
    )
    args = parser.parse_args()
    rows, metas = [], []
    for path in args.results:
        data = json.loads(Path(path).read_text())
        rows += data["rows"]
        metas.append(data["meta"])
    all_merges = merges(rows)
    structural = [*STRUCTURAL, "n_models"]
    functional = [*structural, *FUNCTIONAL]
    held = {}
    for name, feats in (("structural", structural), ("functional", functional)):
        results = evaluate(all_merges, feats)
        held[name] = results
        for line in report(results, f"held-out (leave one task set out), {name} features:"):
            print(line)
        strict = evaluate(all_merges, feats, strict=True)
        for line in report(
            strict, f"held-out, stricter (fitted only on merges sharing no task with it), {name} features:"
        ):
            print(line)
        for family in sorted({k[0] for k in all_merges}) if len({k[0] for k in all_merges}) > 1 else ():
            for split, res in (("task set", results), ("stricter", strict)):
                for line in report([x for x in res if x["key"][0] == family], f"  {family} only, {split}, {name}:"):
                    print(line)
    if args.score_shipped:
        from git_theta.merge.auto import load_predictor

        shipped = load_predictor()
        for name, feats in (("structural", structural), ("functional", functional)):
            for line in report(
                score_predictor(all_merges, shipped, feats, args.score_shipped),
                f"the shipped predictor ({name}) on {args.score_shipped}'s merges:",
            ):
                print(line)
    if args.write:
        recipes = list(dict.fromkeys(r for m in all_merges.values() for r in m["scores"]))
        train = list(all_merges.values())
        data = {
            "schema": SCHEMA,
            "about": "fitted by bench/fit_merge_auto.py on bench/merge_eval.py; predicts mean normalized accuracy",
            "fitted_on": {"merges": len(train), "runs": metas},
            "held_out": {name: report(res, name) for name, res in held.items()},
            "models": {
                name: to_json(fit(train, feats, recipes), feats, all_merges)
                for name, feats in (("structural", structural), ("functional", functional))
            },
        }
        MODEL_FILE.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {MODEL_FILE}")


if __name__ == "__main__":
    main()
