"""GGUF round trips through real git: per-tensor objects, quantized blocks, byte-identical checkout."""

import io

import gguf
import numpy as np
import pytest
from gguf import quants
from hypothesis import given, settings, strategies as st

from git_theta.plugin_api import CheckpointError, Manifest, MemorySource, get_plugin, plugin_names, roundtrip
from git_theta_gguf.format import GgufFormat


def write_gguf(path, seed=0, name="tiny", alignment=None, scale=1.0):
    """A small llama-like GGUF: metadata of every kind, F32/F16 tensors and a Q8_0 one."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(128)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "world"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.5, -3.0])
    writer.add_string("tokenizer.chat_template", "{{ messages }}\n" * 40)  # long and multi-line
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_tensor("token_embd.weight", (rng.standard_normal((4, 64)) * scale).astype(np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(60, np.float32))  # 240 bytes: padded
    writer.add_tensor("blk.0.ffn_up.weight", rng.standard_normal((8, 64)).astype(np.float16))
    quantized = quants.quantize(rng.standard_normal((16, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.fixture
def gguf_repo(repo):
    repo.theta("track", "*.gguf")
    repo.commit("track gguf", ".gitattributes")
    return repo


def test_registered_through_the_entry_point():
    assert "gguf" in plugin_names("format")
    assert isinstance(get_plugin("format", "gguf"), GgufFormat)


def test_round_trip_through_git(gguf_repo):
    repo = gguf_repo
    first = write_gguf(repo.file("model.gguf"))
    repo.commit("v1", "model.gguf")

    old = Manifest.parse(repo.show("HEAD:model.gguf"))
    assert old.format == "gguf"
    assert set(old.tensors) == {
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "blk.0.ffn_up.weight",
        "blk.0.attn_q.weight",
    }
    q = old.tensors["blk.0.attn_q.weight"]
    assert (q.dtype, q.shape) == ("U8", (16, 68))  # 64 values = 2 Q8_0 blocks of 34 bytes per row
    assert old.tensors["blk.0.ffn_up.weight"].dtype == "F16"
    assert old.tensors["token_embd.weight"].shape == (4, 64)
    assert "blk.0.attn_q.weight Q8_0" in " ".join(old.fields.values())
    assert old.fields["meta.general.name"] == '"tiny"'
    assert "kv" in old.blobs

    second = write_gguf(repo.file("model.gguf"), name="tiny-ft", scale=2.0)
    repo.commit("v2", "model.gguf")
    new = Manifest.parse(repo.show("HEAD:model.gguf"))
    changed = {n for n in new.tensors if new.tensors[n].digest != old.tensors[n].digest}
    assert changed == {"token_embd.weight"}
    for name in new.tensors.keys() - changed:  # unchanged tensors cost no new objects
        assert new.tensors[name].objects == old.tensors[name].objects
    assert '+field meta.general.name "tiny-ft"' in repo.git("diff", "HEAD~1", "HEAD").stdout

    repo.file("model.gguf").unlink()
    repo.git("checkout", "HEAD~1", "--", "model.gguf")
    assert repo.file("model.gguf").read_bytes() == first
    repo.git("checkout", "HEAD", "--", "model.gguf")
    assert repo.file("model.gguf").read_bytes() == second
    assert repo.status() == ""
    reader = gguf.GGUFReader(str(repo.file("model.gguf")))
    assert reader.fields["general.name"].contents() == "tiny-ft"


def _round_trip(data):
    return roundtrip(GgufFormat(), data, "m.gguf")[2]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), alignment=st.sampled_from([None, 8, 64, 256]))
def test_split_join_is_byte_identical(tmp_path_factory, seed, alignment):
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    data = write_gguf(path, seed=seed, alignment=alignment)
    assert _round_trip(data) == data


def test_truncated_file_is_an_error(tmp_path):
    data = write_gguf(tmp_path / "m.gguf")
    with pytest.raises(CheckpointError, match="truncated"):
        _round_trip(data[:-100])


def test_nonzero_padding_is_refused(tmp_path):
    data = bytearray(write_gguf(tmp_path / "m.gguf"))
    norm = next(t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name == "blk.0.attn_norm.weight")
    data[norm.data_offset + norm.n_bytes] = 7  # the first padding byte after that tensor
    with pytest.raises(CheckpointError, match="non-zero bytes in the padding before"):
        _round_trip(bytes(data))
    with pytest.raises(CheckpointError, match="unexpected bytes after the last tensor"):
        _round_trip(write_gguf(tmp_path / "n.gguf") + b"\x07")


def test_a_tensor_that_changed_size_gets_the_canonical_layout(tmp_path):
    """A merge or edit that resizes a tensor: the recorded offsets no longer fit, join lays the
    data out as gguf.GGUFWriter does and the file still loads with every tensor in place."""
    data = write_gguf(tmp_path / "m.gguf")
    fmt = GgufFormat()
    reader = fmt.split(io.BytesIO(data), "m.gguf")
    tensors = {t.name: t for t in reader.tensors()}
    bigger = np.arange(6 * 64, dtype=np.float32).reshape(6, 64)
    tensors["token_embd.weight"] = type(tensors["token_embd.weight"])(
        "token_embd.weight", "F32", (6, 64), bigger.tobytes()
    )

    out = tmp_path / "out.gguf"
    with open(out, "wb") as f:
        fmt.join(dict(reader.fields), MemorySource(reader.blobs, tensors.values()), f, "m.gguf")
    loaded = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert np.array_equal(np.asarray(loaded["token_embd.weight"].data), bigger)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_up.weight", "blk.0.attn_norm.weight"):
        assert np.asarray(loaded[name].data).tobytes() == bytes(tensors[name].data)
    assert [t.data_offset % 32 for t in loaded.values()] == [0] * 4


def test_git_merge_of_two_fine_tunes(gguf_repo):
    """F32/F16 tensors changed on both branches go to the operator; quantized blocks are never
    averaged, a rule picks a side. The merged file is a valid GGUF and checks out the same."""
    repo = gguf_repo
    path = repo.file("model.gguf")
    write_gguf(path, seed=0)
    repo.commit("base", "model.gguf")
    repo.git("checkout", "-q", "-b", "theirs")
    write_gguf(path, seed=2)
    repo.commit("theirs", "model.gguf")
    theirs = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    repo.git("checkout", "-q", "main")
    write_gguf(path, seed=1)
    repo.commit("ours", "model.gguf")
    ours = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}

    repo.git("config", "theta.merge.operator", "linear")
    # Without this rule the U8 tensor would be a conflict (the driver averages float dtypes only).
    repo.git("config", "--add", "theta.merge.rule", "blk.0.attn_q.weight ours")
    repo.git("merge", "-q", "--no-edit", "theirs")
    assert repo.status() == ""
    merged = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    np.testing.assert_allclose(
        merged["token_embd.weight"], (ours["token_embd.weight"] + theirs["token_embd.weight"]) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        merged["blk.0.ffn_up.weight"].astype(np.float32),
        (ours["blk.0.ffn_up.weight"].astype(np.float32) + theirs["blk.0.ffn_up.weight"]) / 2,
        rtol=2e-3,
        atol=1e-3,
    )
    assert merged["blk.0.attn_q.weight"].tobytes() == ours["blk.0.attn_q.weight"].tobytes()
    assert Manifest.parse(repo.show("HEAD:model.gguf")).format == "gguf"
    written = path.read_bytes()
    path.unlink()
    repo.git("checkout", "--", "model.gguf")  # a fresh smudge of the merge result: the same bytes
    assert path.read_bytes() == written
