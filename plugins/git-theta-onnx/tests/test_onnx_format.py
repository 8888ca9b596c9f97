"""ONNX round trips through real git: initializers as tensors, the graph as a blob, identical bytes."""

import io

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper, numpy_helper

from git_theta.plugin_api import CheckpointError, Manifest, MemorySource, get_plugin, roundtrip
from git_theta_onnx.format import OnnxFormat, decode_varint, encode_varint


def make_model(seed=0, hidden=8, bias_scale=1.0, producer="test"):
    """A two-layer MLP: float32 and float16 raw_data initializers, an int64 one, a typed-field one."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((hidden, 4)).astype(np.float32), "fc1.weight"),
        numpy_helper.from_array((rng.standard_normal(4) * bias_scale).astype(np.float32), "fc1.bias"),
        numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float16), "fc2.weight"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "shape"),
        helper.make_tensor("scale", TensorProto.FLOAT, [2], [0.5, 2.0]),  # float_data, not raw_data
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h"]),
        helper.make_node("Add", ["h", "fc1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Cast", ["h2"], ["h3"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["h3", "fc2.weight"], ["y16"]),
        helper.make_node("Cast", ["y16"], ["y32"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["y32", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    model = helper.make_model(graph, producer_name=producer, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def split_join(data):
    reader, tensors, rebuilt = roundtrip(OnnxFormat(), data, "m.onnx")
    return reader, {t.name: t for t in tensors}, rebuilt


def test_registered_through_the_entry_point():
    assert isinstance(get_plugin("format", "onnx"), OnnxFormat)


def test_round_trip_through_git(repo):
    repo.theta("track", "*.onnx")
    first = make_model()
    repo.file("model.onnx").write_bytes(first)
    repo.commit("v1", ".gitattributes", "model.onnx")

    old = Manifest.parse(repo.show("HEAD:model.onnx"))
    assert old.format == "onnx"
    # raw_data initializers are tensors; the float_data one stays in the graph blob.
    assert set(old.tensors) == {"fc1.weight", "fc1.bias", "fc2.weight", "shape"}
    assert (old.tensors["fc2.weight"].dtype, old.tensors["fc2.weight"].shape) == ("F16", (4, 2))
    assert old.tensors["shape"].dtype == "I64"
    assert "graph" in old.blobs

    second = make_model(bias_scale=3.0)
    repo.file("model.onnx").write_bytes(second)
    repo.commit("v2", "model.onnx")
    new = Manifest.parse(repo.show("HEAD:model.onnx"))
    assert {n for n in new.tensors if new.tensors[n].digest != old.tensors[n].digest} == {"fc1.bias"}
    assert new.tensors["fc1.weight"].objects == old.tensors["fc1.weight"].objects
    assert new.blobs["graph"] == old.blobs["graph"]  # the graph did not change: no new object

    repo.file("model.onnx").unlink()
    repo.git("checkout", "HEAD~1", "--", "model.onnx")
    assert repo.file("model.onnx").read_bytes() == first
    repo.git("checkout", "HEAD", "--", "model.onnx")
    assert repo.file("model.onnx").read_bytes() == second
    assert repo.status() == ""
    model = onnx.load(str(repo.file("model.onnx")))
    onnx.checker.check_model(model)
    bias = next(i for i in model.graph.initializer if i.name == "fc1.bias")
    assert np.array_equal(
        numpy_helper.to_array(bias), numpy_helper.to_array(onnx.load_from_string(second).graph.initializer[1])
    )


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), hidden=st.integers(1, 300), producer=st.text(max_size=20))
def test_split_join_is_byte_identical(seed, hidden, producer):
    data = make_model(seed, hidden=hidden, producer=producer)
    reader, tensors, rebuilt = split_join(data)
    assert rebuilt == data
    assert sum(len(t.data) for t in tensors.values()) + len(reader.blobs["graph"]) == len(data)


def test_unpacked_dims_and_unknown_fields_survive():
    # Hand-made wire format a protobuf serialiser would not produce: dims not packed, and an
    # unknown field (number 99) in the initializer. Splicing keeps both.
    raw = np.arange(6, dtype=np.float32).tobytes()
    tensor = b"".join(
        [
            b"\x08\x02",
            b"\x08\x03",  # dims 2, 3 (unpacked varints)
            b"\x10\x01",  # data_type FLOAT
            b"\x42\x01w",  # name "w"
            b"\x4a" + encode_varint(len(raw)) + raw,  # raw_data
            b"\x98\x06\x07",  # field 99, varint 7
        ]
    )
    graph = b"\x2a" + encode_varint(len(tensor)) + tensor
    data = b"\x08\x08" + b"\x3a" + encode_varint(len(graph)) + graph
    reader, tensors, rebuilt = split_join(data)
    assert rebuilt == data
    assert tensors["w"].shape == (2, 3) and bytes(tensors["w"].data) == raw


def test_shape_change_is_refused():
    data = make_model()
    reader, tensors, _ = split_join(data)
    small = dict(tensors)
    small["fc1.bias"] = type(tensors["fc1.bias"])("fc1.bias", "F32", (2,), b"\0" * 8)

    with pytest.raises(CheckpointError, match="fc1.bias"):
        OnnxFormat().join(dict(reader.fields), MemorySource(reader.blobs, small.values()), io.BytesIO(), "m.onnx")


def test_truncated_file_is_an_error():
    with pytest.raises(CheckpointError, match="truncated"):
        split_join(make_model()[:-10])


def test_varint_round_trip():
    for value in (0, 1, 127, 128, 300, 2**35, 2**63 - 1):
        assert decode_varint(encode_varint(value), 0) == (value, len(encode_varint(value)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_torch_export_round_trips():
    torch = pytest.importorskip("torch")  # torch is an optional git-theta dependency
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4)
    )
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.randn(1, 16),), buffer, dynamo=False)
    data = buffer.getvalue()
    reader, tensors, rebuilt = split_join(data)
    assert rebuilt == data
    state = model.state_dict()
    assert set(tensors) == set(state)  # every parameter is a tensor, nothing left in the graph blob
    for name, tensor in tensors.items():
        assert bytes(tensor.data) == state[name].numpy().tobytes()
