"""Hugging Face layouts: sharded safetensors with an index json, and PEFT adapter folders."""

import json

import numpy as np

from conftest import random_state_dict, save_safetensors
from format_helpers import object_files

SHAPES = {
    "embed.weight": (64, 16),
    "layer.0.weight": (16, 16),
    "layer.0.bias": (16,),
    "layer.1.weight": (16, 16),
    "head.weight": (8, 16),
}


def write_shards(repo, tensors, shards):
    """Write ``model-0000k-of-0000n.safetensors`` files and the index json; return the file names."""
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    weight_map = {}
    for file_name, members in zip(names, shards):
        save_safetensors(repo.file(file_name), {m: tensors[m] for m in members})
        weight_map.update({m: file_name for m in members})
    index = {
        "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    repo.file("model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def test_sharded_checkpoint_and_a_tensor_moving_shards(repo):
    repo.git("config", "theta.packThreshold", "0")  # loose objects, one per tensor (packs: test_packs.py)
    tensors = random_state_dict(seed=3, shapes=SHAPES)
    first = write_shards(
        repo, tensors, [["embed.weight", "layer.0.weight"], ["layer.0.bias", "layer.1.weight", "head.weight"]]
    )
    repo.commit("sharded v1")
    for name in first:
        assert repo.show(f"HEAD:{name}").startswith(
            (
                b"git-theta manifest v1\nformat safetensors\n",
                b"git-theta manifest v2\nformat safetensors\n",
                b"git-theta manifest v3\nformat safetensors\n",
            )
        )
    assert json.loads(repo.show("HEAD:model.safetensors.index.json"))["weight_map"]["head.weight"] == first[1]
    v1_bytes = {name: repo.file(name).read_bytes() for name in first}
    objects = set(object_files(repo))
    assert len(objects) == len(SHAPES)

    # Re-shard into three files: every tensor moves or stays, none is stored again.
    for name in first:
        repo.file(name).unlink()
    second = write_shards(
        repo, tensors, [["embed.weight"], ["layer.0.weight", "layer.0.bias"], ["layer.1.weight", "head.weight"]]
    )
    repo.commit("resharded")
    assert set(object_files(repo)) == objects
    assert "layer.0.weight" in repo.show(f"HEAD:{second[1]}").decode()

    repo.git("checkout", "-q", "HEAD~1")
    for name, data in v1_bytes.items():
        assert repo.file(name).read_bytes() == data
    assert not repo.file(second[2]).exists()
    assert repo.status() == ""


def test_peft_adapter_folder(repo):
    rng = np.random.default_rng(5)
    folder = repo.file("adapter")
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config) + "\n")
    adapter = {
        f"base_model.model.layers.0.self_attn.{m}.lora_{ab}.weight": rng.standard_normal(shape).astype(np.float32)
        for m in ("q_proj", "v_proj")
        for ab, shape in (("A", (4, 32)), ("B", (32, 4)))
    }
    save_safetensors(folder / "adapter_model.safetensors", adapter, metadata={"format": "pt"})
    repo.commit("adapter v1")
    v1 = (folder / "adapter_model.safetensors").read_bytes()
    stored = repo.show("HEAD:adapter/adapter_model.safetensors").decode()
    assert 'field metadata {"format":"pt"}' in stored and stored.count("\ntensor ") == 4

    trained = dict(adapter)
    name = "base_model.model.layers.0.self_attn.q_proj.lora_B.weight"
    trained[name] = trained[name] + 1
    save_safetensors(folder / "adapter_model.safetensors", trained, metadata={"format": "pt"})
    before = set(object_files(repo))
    repo.commit("adapter v2")
    assert len(set(object_files(repo)) - before) == 1

    repo.git("checkout", "HEAD~1", "--", "adapter")
    assert (folder / "adapter_model.safetensors").read_bytes() == v1
    assert repo.status() == "M  adapter/adapter_model.safetensors\n"
