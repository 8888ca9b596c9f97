"""Benchmark: a sharded Hugging Face model (issue 15): a fine-tune step saved in a new shard order.

Builds a Llama-shaped fp32 model (default ~500 MB: 4 MiB attention/MLP matrices and small norms),
saves it as 8 shards with ``model.safetensors.index.json`` (as ``save_pretrained`` does), commits
it, then applies a fine-tune step (every matrix of a quarter of the layers moved by 1e-4·N(0,1)) and
saves it again with the tensors **reordered across the 8 shards** (what transformers does when a
reloaded model is saved: most tensors land in another file). The same two versions are also
committed as one ``model.safetensors`` file, and as the same 8 shards with Git LFS. The three
repositories run in turn in every repeat, so they see the same machine load.

Reported, per setup (best of ``--repeat``): bytes the second version adds to the store, ``git add``
time of that version, and for the sharded git-theta repository ``git theta diff --stat HEAD~1 HEAD``
(whole command, target < 0.5 s). Targets: sharded ≤ 1.05 × single file.

Run: ``python bench/sharded.py [--mb 500] [--repeat 3]``. Prints ``uptime`` and a table.
"""

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from common import du, isolated_env

SHARDS = 8


def run(args, cwd, env):
    return subprocess.run(args, cwd=cwd, env=env, check=True, capture_output=True)


def model(mb, seed=0):
    """{name: array}: layers of 7 square-ish 1024x1024 fp32 matrices and two norms each."""
    rng = np.random.default_rng(seed)
    per_layer = 7 * (1 << 22)
    layers = max(1, mb * 1_000_000 // per_layer)
    t = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            t[p + m + ".weight"] = rng.standard_normal((1024, 1024), dtype=np.float32) * 0.02
        t[p + "input_layernorm.weight"] = np.ones(1024, dtype=np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(1024, dtype=np.float32)
    t["model.norm.weight"] = np.ones(1024, dtype=np.float32)
    return t


def save_sharded(folder, tensors, order):
    """8 shards of ``tensors`` taken in ``order`` (consecutive runs of similar size) + the index."""
    from safetensors.numpy import save_file

    for old in folder.glob("model-*.safetensors"):
        old.unlink()
    total = sum(tensors[n].nbytes for n in order)
    shards, current, size = [], [], 0
    for n in order:
        current.append(n)
        size += tensors[n].nbytes
        if size >= total * (len(shards) + 1) / SHARDS and len(shards) < SHARDS - 1:
            shards.append(current)
            current = []
    shards.append(current)
    weight_map = {}
    for k, members in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({m: tensors[m] for m in members}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({m: name for m in members})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return len(shards)


def setup(tmp, name, env, lfs=False):
    repo = tmp / name
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir()
    run(["git", "init", "-q"], repo, env)
    if lfs:
        run(["git", "lfs", "install", "--local"], repo, env)
        run(["git", "lfs", "track", "*.safetensors"], repo, env)
    else:
        run(["git", "theta", "install", "--local"], repo, env)
        run(["git", "theta", "track", "*.safetensors"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "track"], repo, env)
    return repo


def store_bytes(repo, lfs):
    return du(repo / ".git" / ("lfs" if lfs else "theta") / "objects")


def commit(repo, env, message):
    start = time.perf_counter()
    run(["git", "add", "-A"], repo, env)
    elapsed = time.perf_counter() - start
    run(["git", "commit", "-qm", message], repo, env)
    return elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=500, help="model size in MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-lfs", action="store_true", help="skip the Git LFS comparison")
    args = parser.parse_args()
    v1 = model(args.mb)
    rng = np.random.default_rng(1)
    v2 = dict(v1)
    tuned = [n for n in v1 if n.endswith("proj.weight") and int(n.split(".")[2]) % 4 == 0]
    for n in tuned:
        v2[n] = v1[n] + rng.standard_normal(v1[n].shape, dtype=np.float32) * np.float32(1e-4)
    order1 = list(v1)
    order2 = list(reversed(order1))  # a reloaded model saved again: tensors land in other files
    logical = sum(t.nbytes for t in v1.values())
    changed_bytes = sum(v1[n].nbytes for n in tuned)
    results = {k: {"added": [], "add_s": [], "stat_s": []} for k in ("single", "sharded", "lfs")}
    with tempfile.TemporaryDirectory(prefix="theta-bench-sharded-") as tmp:
        tmp = Path(tmp)
        env = isolated_env(tmp / "home")
        from safetensors.numpy import save_file

        for _ in range(args.repeat):
            for kind in ("single", "sharded", "lfs"):
                if kind == "lfs" and args.no_lfs:
                    continue
                lfs = kind == "lfs"
                repo = setup(tmp, kind, env, lfs=lfs)
                if kind == "single":
                    save_file(v1, str(repo / "model.safetensors"))
                else:
                    (repo / "model").mkdir()
                    save_sharded(repo / "model", v1, order1)
                commit(repo, env, "v1")
                before = store_bytes(repo, lfs)
                if kind == "single":
                    save_file(v2, str(repo / "model.safetensors"))
                else:
                    save_sharded(repo / "model", v2, order2)
                results[kind]["add_s"].append(commit(repo, env, "v2: fine-tune step, shards reordered"))
                results[kind]["added"].append(store_bytes(repo, lfs) - before)
                if kind == "sharded":
                    start = time.perf_counter()
                    out = run(["git", "theta", "diff", "--stat", "HEAD~1", "HEAD"], repo, env).stdout.decode()
                    results[kind]["stat_s"].append(time.perf_counter() - start)
                    moved = out
                shutil.rmtree(repo)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime: {load}")
    print(
        f"model: {logical / 1e6:.0f} MB fp32, {len(v1)} tensors, {SHARDS} shards; fine-tune step: "
        f"{len(tuned)} matrices ({changed_bytes / 1e6:.0f} MB) moved by 1e-4·N(0,1); v2 saved in reversed "
        f"shard order; best of {args.repeat}"
    )
    single = min(results["single"]["added"])
    rows = [("setup", "v2 adds (MB)", "x single file", "git add v2 (s)", "diff --stat (s)")]
    for kind, label in (
        ("single", "git-theta, one file"),
        ("sharded", "git-theta, 8 shards reordered"),
        ("lfs", "Git LFS, 8 shards reordered"),
    ):
        r = results[kind]
        if not r["added"]:
            continue
        added = min(r["added"])
        rows.append(
            (
                label,
                f"{added / 1e6:.1f}",
                f"{added / single:.3f}",
                f"{min(r['add_s']):.2f}",
                f"{min(r['stat_s']):.3f}" if r["stat_s"] else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    print("targets: 8 shards reordered <= 1.05x one file; git theta diff --stat < 0.5 s")
    print("git theta diff --stat said:\n" + moved.rstrip())


if __name__ == "__main__":
    main()
