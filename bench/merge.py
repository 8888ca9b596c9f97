"""Benchmark: merge two fine-tunes of one checkpoint with ``ties`` (density 0.2) and ``dare_ties``.

Builds a Llama-shaped float32 checkpoint (``--layers``/``--hidden``; default ~110 MB, ``--full``
~520 MB), two dense fine-tunes of it (every tensor moved by small noise), commits the base and the
fine-tunes on two branches of a temporary repository, then times:

* ``git merge`` through the merge driver (the driver's own wall time and peak RSS measured with
  ``/usr/bin/time``; the whole ``git merge`` including the checkout of the merged file);
* ``git theta merge-files`` on the same three files (reads, merges and writes a checkpoint);
* mergekit 0.1.5 (``mergekit-yaml``, CPU) on the same files, when ``--mergekit`` is given: the
  benchmark installs mergekit into its own virtual environment (``--system-site-packages`` so the
  installed CPU torch is reused) after checking with ``pip install --dry-run`` that it would not
  replace torch. mergekit is not a dependency of git-theta.

Prints a table. Peak memory is the maximum resident set size of the measured process.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

OPERATORS = (("ties", {"density": "0.2"}), ("dare_ties", {"density": "0.2"}))


def llama_shapes(layers, hidden, intermediate, vocab):
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
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


def write_models(folder, shapes, config):
    """base/, ft1/, ft2/ Hugging Face-style folders (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = {n: (rng.standard_normal(s) * 0.02).astype(np.float32) for n, s in shapes.items()}
    for name in ("base", "ft1", "ft2"):
        target = folder / name
        target.mkdir()
        (target / "config.json").write_text(json.dumps(config))
        if name == "base":
            tensors = base
        else:
            r = np.random.default_rng(len(name) + int(name[-1]))
            tensors = {n: (t + r.standard_normal(t.shape).astype(np.float32) * 0.002) for n, t in base.items()}
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    return sum(int(np.prod(s)) * 4 for s in shapes.values())


def run(cmd, cwd, env, timed_file=None):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return wall


TIME_FORMAT = "%e %M %U %S"


def measured(prefix_file):
    """(wall seconds, peak RSS MiB, CPU seconds) written by /usr/bin/time -f TIME_FORMAT."""
    wall, rss_kb, user, system = Path(prefix_file).read_text().split()[-4:]
    return float(wall), int(rss_kb) / 1024, float(user) + float(system)


def bench_git(folder, env):
    repo = folder / "repo"
    repo.mkdir()
    git = lambda *a: run(["git", *a], repo, env)  # noqa: E731
    git("init", "-q")
    git("theta", "install", "--local")
    git("theta", "track", "*.safetensors")
    model = repo / "model.safetensors"
    shutil.copy(folder / "base" / "model.safetensors", model)
    add_base = run(["git", "add", "-A"], repo, env)
    git("commit", "-qm", "base")
    git("checkout", "-qb", "ft1")
    shutil.copy(folder / "ft1" / "model.safetensors", model)
    git("commit", "-qam", "ft1")
    git("checkout", "-q", "main")
    shutil.copy(folder / "ft2" / "model.safetensors", model)
    git("commit", "-qam", "ft2")
    yield ("git add (clean) of the base", "git-theta", add_base, None, None)
    timing = folder / "driver-time.txt"
    for operator, params in OPERATORS:
        driver = f"/usr/bin/time -f '{TIME_FORMAT}' -o {timing} git-theta merge-driver %O %A %B %L %P"
        args = ["-c", f"merge.theta.driver={driver}", "-c", f"theta.merge.operator={operator}"]
        args += [x for k, v in params.items() for x in ("-c", f"theta.merge.{k}={v}")]
        total = run(["git", *args, "merge", "-q", "--no-edit", "ft1"], repo, env)
        wall, rss, cpu = measured(timing)
        yield (f"{operator}: merge driver", "git-theta", wall, rss, cpu)
        yield (f"{operator}: whole git merge (+ checkout)", "git-theta", total, None, None)
        git("reset", "-q", "--hard", "HEAD~1")
    for operator, params in OPERATORS:
        out = folder / f"files-{operator}.safetensors"
        cmd = ["/usr/bin/time", "-f", TIME_FORMAT, "-o", str(timing), "git-theta", "merge-files", "--operator", operator]
        cmd += [x for k, v in params.items() for x in ("--param", f"{k}={v}")]
        cmd += ["--base", str(folder / "base" / "model.safetensors")]
        cmd += [str(folder / n / "model.safetensors") for n in ("ft2", "ft1")] + ["-o", str(out)]
        run(cmd, folder, env)
        wall, rss, cpu = measured(timing)
        yield (f"{operator}: merge-files", "git-theta", wall, rss, cpu)


def mergekit_python(cache):
    """An interpreter with mergekit 0.1.5 installed (without replacing torch), or None and why."""
    venv = cache / "mergekit-venv"
    python = venv / "bin" / "python"
    if not (venv / "bin" / "mergekit-yaml").exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        report = cache / "mergekit-report.json"
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--dry-run", "--report", str(report), "mergekit==0.1.5"],
            check=True,
        )
        names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
        if names & {"torch", "nvidia-cudnn-cu12", "triton"}:
            return None, "pip would replace torch (CUDA build): skipped"
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mergekit==0.1.5"], check=True)
    return venv / "bin" / "mergekit-yaml", None


def compare(ours_file, mergekit_dir):
    """'max |diff| (differing entries / all)' between our merge-files output and mergekit's.

    TIES keeps the top-k magnitudes; where several entries tie at the k-th magnitude, which of them
    is kept is arbitrary in both tools (MERGE-OPERATORS.md §4.2), so a few entries at the threshold
    may differ; everything else must be identical.
    """
    from safetensors import safe_open

    worst, differing, total = 0.0, 0, 0
    with safe_open(str(ours_file), "np") as ours:
        for shard in sorted(Path(mergekit_dir).glob("*.safetensors")):
            with safe_open(str(shard), "np") as theirs:
                for name in theirs.keys():
                    diff = np.abs(ours.get_tensor(name) - theirs.get_tensor(name))
                    worst = max(worst, float(diff.max()))
                    differing += int(np.count_nonzero(diff))
                    total += diff.size
    return f"{worst:.3g} ({differing} of {total} entries differ)"


def bench_mergekit(folder, env, cache):
    tool, why = mergekit_python(cache)
    if tool is None:
        yield ("mergekit", why, None, None, None)
        return
    timing = folder / "mk-time.txt"
    for operator, params in OPERATORS:
        config = {
            "merge_method": operator,
            "base_model": str(folder / "base"),
            "models": [{"model": str(folder / n), "parameters": {"weight": 1.0, **{k: float(v) for k, v in params.items()}}}
                       for n in ("ft2", "ft1")],
            "dtype": "float32",
        }
        (folder / "mk.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
        out = folder / f"mk-{operator}"
        cmd = ["/usr/bin/time", "-f", TIME_FORMAT, "-o", str(timing), str(tool), str(folder / "mk.yml"), str(out),
               "--no-cuda", "--lazy-unpickle", "--no-copy-tokenizer", "--random-seed", "0"]
        mk_env = {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        run(cmd, folder, mk_env)
        wall, rss, cpu = measured(timing)
        yield (f"{operator}: mergekit-yaml", "mergekit 0.1.5", wall, rss, cpu)
        if operator == "ties":  # deterministic: the two tools must agree
            yield ("ties: max |git-theta - mergekit|", compare(folder / "files-ties.safetensors", out),
                   None, None, None)
        shutil.rmtree(out)


def show(row):
    what, tool, wall, rss, cpu = row
    if wall is None:
        print(f"{what:44} {tool}", flush=True)
        return
    rss_text = f"{rss:13.0f}" if rss is not None else f"{'-':>13}"
    cpu_text = f"{cpu:7.2f}" if cpu is not None else f"{'-':>7}"
    print(f"{what:44} {tool:16} {wall:8.2f} {cpu_text} {rss_text}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="~520 MB checkpoint (8 layers, hidden 1024)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mergekit", action="store_true", help="also time mergekit (installs it in a venv)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "git-theta-bench-cache"))
    args = parser.parse_args()
    layers = 8 if args.full else args.layers
    hidden = args.hidden
    intermediate = int(hidden * 2.75)
    vocab = 12000 if args.full else 4000
    shapes = llama_shapes(layers, hidden, intermediate, vocab)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64, "vocab_size": vocab, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "torch_dtype": "float32", "tie_word_embeddings": False,
    }
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="theta-bench-merge-") as tmp:
        folder = Path(tmp)
        home = folder / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
        env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x",
                   GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@x",
                   PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
        (home / ".gitconfig").write_text("[init]\n\tdefaultBranch = main\n")
        size = write_models(folder, shapes, config)
        largest = max(int(np.prod(s)) * 4 for s in shapes.values())
        print(f"checkpoint: {len(shapes)} float32 tensors, {size / 2**20:.0f} MiB "
              f"(largest tensor {largest / 2**20:.1f} MiB); fine-tunes move every entry\n")
        print(f"{'what':44} {'tool':16} {'wall s':>8} {'CPU s':>7} {'peak RSS MiB':>13}", flush=True)
        for row in bench_git(folder, env):
            show(row)
        if args.mergekit:
            for row in bench_mergekit(folder, env, cache):
                show(row)
    print("\nCPU s = user + system time of the measured process (robust when other jobs share the cores)")


if __name__ == "__main__":
    main()
