"""Benchmark: mergekit recipes run by git-theta beside mergekit 0.1.5, and what a merge commit costs.

Builds a Llama-shaped float32 checkpoint (``--layers``/``--hidden``; default ~110 MB) and two
fine-tunes of it, **dense** (every entry moved by small noise) and **sparse** (5 % of the entries of
every tensor moved). For each kind and recipe (TIES density 0.2, a gradient SLERP, DARE-TIES):

* ``git theta merge-files --config RECIPE`` and ``mergekit-yaml RECIPE`` on the same files, run
  alternately ``--repeats`` times: wall and CPU seconds and peak RSS of the process
  (``/usr/bin/time``), and the largest absolute and relative difference of the outputs
  (DARE draws other random numbers: its row is a timing only);
* the bytes the merge commit adds to the repository when the same recipe merges branches
  (``git theta merge --config``), as a fraction of the checkpoint's raw size, beside what the
  fine-tune's own commit added.

mergekit is not a dependency: ``--mergekit`` uses the ``mergekit-yaml`` next to this interpreter, or
``--mergekit-yaml PATH``. Prints ``uptime`` with the table: the machine is shared, so CPU seconds are
the comparable column.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import du, isolated_env  # noqa: E402

RECIPES = {
    "ties d=0.2": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "ft1", "parameters": {"weight": 1.0, "density": 0.2}},
            {"model": "ft2", "parameters": {"weight": 1.0, "density": 0.2}},
        ],
    },
    "gradient slerp": {
        "merge_method": "slerp",
        "base_model": "ft1",
        "models": [{"model": "ft1"}, {"model": "ft2"}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
    },
    "dare_ties d=0.3": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {"model": "ft1", "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": "ft2", "parameters": {"weight": 1.0, "density": 0.3}},
        ],
    },
}
DETERMINISTIC = ("ties d=0.2", "gradient slerp")
TIME_FORMAT = "%e %M %U %S"


def llama_shapes(layers, hidden, intermediate, vocab):
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    return shapes


def write_models(folder, shapes, config, fraction):
    """base/, ft1/, ft2/ Hugging Face-style folders; the fine-tunes move ``fraction`` of the entries."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}
    for name in ("base", "ft1", "ft2"):
        target = folder / name
        target.mkdir(parents=True)
        (target / "config.json").write_text(json.dumps(config))
        if name == "base":
            tensors = base
        else:
            r = np.random.default_rng(int(name[-1]))
            tensors = {}
            for n, t in base.items():
                step = r.standard_normal(t.shape).astype(np.float32) * np.float32(0.002)
                if fraction < 1:
                    step *= r.random(t.shape) < fraction
                tensors[n] = t + step
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    return sum(int(np.prod(s)) * 4 for s in shapes.values())


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return proc


def timed(cmd, cwd, env, timing):
    """(wall s, CPU s, peak RSS MiB) of ``cmd`` measured by /usr/bin/time."""
    run(["/usr/bin/time", "-f", TIME_FORMAT, "-o", str(timing), *map(str, cmd)], cwd, env)
    wall, rss_kb, user, system = Path(timing).read_text().split()[-4:]
    return float(wall), float(user) + float(system), int(rss_kb) / 1024


def difference(ours_file, mergekit_dir):
    """(max |diff|, max |diff| / max |mergekit value| per tensor) between the two outputs."""
    from safetensors import safe_open

    worst, relative = 0.0, 0.0
    with safe_open(str(ours_file), "np") as ours:
        for shard in sorted(Path(mergekit_dir).glob("*.safetensors")):
            with safe_open(str(shard), "np") as theirs:
                for name in theirs.keys():
                    a, b = ours.get_tensor(name), theirs.get_tensor(name)
                    d = float(np.abs(a - b).max())
                    worst = max(worst, d)
                    relative = max(relative, d / max(float(np.abs(b).max()), 1e-30))
    return worst, relative


def write_recipe(path, recipe, names):
    """The recipe with model names replaced by ``names[name]`` (folders or branches)."""

    def ref(value):
        return names.get(value, value)

    data = json.loads(json.dumps(recipe))
    data["base_model"] = ref(data["base_model"])
    for model in data["models"]:
        model["model"] = ref(model["model"])
    data["dtype"] = "float32"
    path.write_text(json.dumps(data))  # YAML is a superset of JSON
    return path


def bench_files(folder, env, mergekit, repeats):
    """Rows (recipe, tool, wall, cpu, rss, diff) for merge-files and mergekit, alternately."""
    timing = folder / "time.txt"
    names = {n: str(folder / n) for n in ("base", "ft1", "ft2")}
    for label, recipe in RECIPES.items():
        path = write_recipe(folder / "recipe.yml", recipe, names)
        ours, mine = folder / "ours.safetensors", []
        theirs, other = folder / "mk-out", []
        for _ in range(repeats):
            mine.append(timed(["git-theta", "merge-files", "--config", path, "-o", ours], folder, env, timing))
            if mergekit:
                shutil.rmtree(theirs, ignore_errors=True)
                mk_env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
                other.append(
                    timed(
                        [
                            mergekit,
                            path,
                            theirs,
                            "--no-cuda",
                            "--lazy-unpickle",
                            "--no-copy-tokenizer",
                            "--random-seed",
                            "0",
                            "--quiet",
                        ],
                        folder,
                        mk_env,
                        timing,
                    )
                )
        diff = difference(ours, theirs) if mergekit and label in DETERMINISTIC else None
        yield label, "git-theta", best(mine), diff
        if mergekit:
            yield label, "mergekit 0.1.5", best(other), None
        shutil.rmtree(theirs, ignore_errors=True)


def best(runs):
    """The run with the least CPU time (the least disturbed by other jobs on the machine)."""
    return min(runs, key=lambda r: r[1])


def bench_commits(folder, env, raw):
    """Rows (what, bytes, fraction of raw) for a training commit and each recipe's merge commit."""
    repo = folder / "repo"
    repo.mkdir()

    def git(*args):
        return run(["git", *args], repo, env)

    git("init", "-q")
    git("theta", "install", "--local")
    git("theta", "track", "*.safetensors")
    model = repo / "model.safetensors"
    store = repo / ".git"
    shutil.copy(folder / "base" / "model.safetensors", model)
    git("add", "-A")
    git("commit", "-qm", "base")
    before = du(store)
    for branch in ("ft1", "ft2"):
        git("checkout", "-qb", branch, "main")
        shutil.copy(folder / branch / "model.safetensors", model)
        git("commit", "-qam", branch)
    yield "a fine-tune's own commit (mean of 2)", (du(store) - before) / 2
    for label, recipe in RECIPES.items():
        head = "main" if recipe["base_model"] == "base" else "ft1"
        git("checkout", "-q", "-B", "merged", head)
        path = write_recipe(folder / "branch-recipe.yml", recipe, {"base": "main"})
        before = du(store)
        git("theta", "merge", "--config", str(path))
        yield f"merge commit: {label}", du(store) - before


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool, alternately (the least CPU kept)")
    parser.add_argument("--mergekit", action="store_true", help="also run mergekit-yaml (installed beside this Python)")
    parser.add_argument("--mergekit-yaml", help="path of a mergekit-yaml to run (implies --mergekit)")
    parser.add_argument("--kinds", default="dense,sparse", help="fine-tunes to run: dense, sparse or both")
    args = parser.parse_args()
    mergekit = args.mergekit_yaml or (
        shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable)) if args.mergekit else None
    )
    if args.mergekit and not mergekit:
        sys.exit(
            "mergekit-yaml not found beside this interpreter: pip install mergekit==0.1.5 -c <torch pin>, "
            "or give --mergekit-yaml PATH"
        )
    hidden, layers = args.hidden, args.layers
    intermediate = int(hidden * 2.75)
    shapes = llama_shapes(layers, hidden, intermediate, args.vocab)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": args.vocab,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
    }
    results, commits = [], []
    with tempfile.TemporaryDirectory(prefix="theta-bench-merge-") as tmp:
        env = isolated_env(Path(tmp) / "home")
        for kind in args.kinds.split(","):
            folder = Path(tmp) / kind
            raw = write_models(folder, shapes, config, 1.0 if kind == "dense" else 0.05)
            for label, tool, (wall, cpu, rss), diff in bench_files(folder, env, mergekit, args.repeats):
                results.append((kind, label, tool, wall, cpu, rss, diff))
                print(".", end="", file=sys.stderr, flush=True)
            for what, size in bench_commits(folder, env, raw):
                commits.append((kind, what, size, size / raw))
            shutil.rmtree(folder)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(
        f"\ncheckpoint: {len(shapes)} float32 tensors, {raw / 2**20:.0f} MiB; dense fine-tunes move every entry, "
        f"sparse ones 5 % of each tensor's entries; best of {args.repeats} runs by CPU time"
    )
    print(f"uptime: {load}\n")
    print("| fine-tunes | recipe | tool | wall s | CPU s | peak RSS MiB | max abs diff | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, label, tool, wall, cpu, rss, diff in results:
        d = f"{diff[0]:.2g} | {diff[1]:.2g}" if diff is not None else "- | -"
        print(f"| {kind} | {label} | {tool} | {wall:.1f} | {cpu:.1f} | {rss:.0f} | {d} |")
    print("\n| fine-tunes | what | bytes added | fraction of raw |")
    print("|---|---|---|---|")
    for kind, what, size, fraction in commits:
        print(f"| {kind} | {what} | {size / 2**20:.1f} MiB | {fraction:.3f} |")
    print("\nCPU s = user + system time of the measured process (robust when other jobs share the cores)")


if __name__ == "__main__":
    main()
