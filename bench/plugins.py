"""Plugin formats benchmark: GGUF (F16 + Q8_0) and ONNX checkpoints through real git.

Builds a llama-like GGUF (F16 matrices quantized to Q8_0 for half the blocks, F32 norms, a tokenizer
vocabulary in the metadata) and an ONNX MLP with float32 initializers, then times ``git add`` +
``git commit`` of a first version and of a second one (a fine-tune that changed a quarter of the
tensors), and ``git checkout`` of the first version; checks the checked-out bytes are identical and
reports the stored bytes (new objects) per version against the file size.

    python bench/plugins.py               # ~100 MB per file, a minute or two
    python bench/plugins.py --scale 10    # ~1 GB per file

Needs the plugin packages: pip install -e plugins/git-theta-gguf -e plugins/git-theta-onnx
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def git(repo, *args, env):
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


def store_bytes(repo):
    objects = Path(repo) / ".git" / "theta" / "objects"
    return sum(f.stat().st_size for f in objects.rglob("*") if f.is_file())


def write_gguf(path, layers, width, seed, changed=()):
    import gguf
    from gguf import quants

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("bench")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(32000)])
    for layer in range(layers):
        r = np.random.default_rng(1000 + layer + (10_000 * seed if layer in changed else 0))
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(width, np.float32))
        writer.add_tensor(f"blk.{layer}.attn_q.weight", (r.standard_normal((width, width)) * 0.02).astype(np.float16))
        q = quants.quantize(
            (r.standard_normal((width, width)) * 0.02).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
        )
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_onnx(path, layers, width, seed, changed=()):
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, x = [], [], "x"
    for layer in range(layers):
        r = np.random.default_rng(2000 + layer + (10_000 * seed if layer in changed else 0))
        w = numpy_helper.from_array((r.standard_normal((width, width)) * 0.02).astype(np.float32), f"l{layer}.w")
        b = numpy_helper.from_array(np.zeros(width, np.float32), f"l{layer}.b")
        inits += [w, b]
        nodes += [
            helper.make_node("MatMul", [x, w.name], [f"m{layer}"]),
            helper.make_node("Add", [f"m{layer}", b.name], [f"y{layer}"]),
        ]
        x = f"y{layer}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])],
        inits,
    )
    Path(path).write_bytes(helper.make_model(graph).SerializeToString())


def run(kind, writer, scale, tmp, env):
    repo = tmp / kind
    repo.mkdir()
    git(repo, "init", "-q", env=env)
    git(repo, "theta", "install", "--local", env=env)
    git(repo, "theta", "track", f"*.{kind}", env=env)
    git(repo, "add", ".gitattributes", env=env)
    git(repo, "commit", "-qm", "track", env=env)
    layers, width = int(32 * scale) or 1, 1024
    path = repo / f"model.{kind}"
    rows = []
    for version in (1, 2):
        writer(path, layers, width, seed=version, changed=range(0, layers, 4) if version == 2 else ())
        size = path.stat().st_size
        before = store_bytes(repo)
        start = time.perf_counter()
        git(repo, "add", path.name, env=env)
        git(repo, "commit", "-qm", f"v{version}", env=env)
        elapsed = time.perf_counter() - start
        rows.append((kind, f"add+commit v{version}", size, elapsed, store_bytes(repo) - before))
    second = path.read_bytes()
    writer(path, layers, width, seed=1)
    first = path.read_bytes()
    path.write_bytes(second)
    start = time.perf_counter()
    git(repo, "checkout", "-q", "HEAD~1", "--", path.name, env=env)
    elapsed = time.perf_counter() - start
    assert path.read_bytes() == first, "checkout is not byte-identical"
    rows.append((kind, "checkout v1", len(first), elapsed, 0))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1: ~100 MB files; 10: ~1 GB")
    args = parser.parse_args()
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="b",
        GIT_AUTHOR_EMAIL="b@b",
        GIT_COMMITTER_NAME="b",
        GIT_COMMITTER_EMAIL="b@b",
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = run("gguf", write_gguf, args.scale, Path(tmp), env) + run("onnx", write_onnx, args.scale, Path(tmp), env)
    print(
        f"{'format':6}  {'step':16}  {'file MB':>8}  {'seconds':>8}  {'MB/s':>7}  {'new stored MB':>13}  {'stored/file':>11}"
    )
    for kind, step, size, seconds, stored in rows:
        print(
            f"{kind:6}  {step:16}  {size / 1e6:8.1f}  {seconds:8.2f}  {size / 1e6 / seconds:7.0f}  "
            f"{stored / 1e6:13.1f}  {stored / size:11.2f}"
        )
    print("checkouts byte-identical: yes")


if __name__ == "__main__":
    main()
