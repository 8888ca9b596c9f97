"""Fuzzing the readers of untrusted bytes: they may only fail with a GitThetaError.

Random and mutated inputs go to the pkt-line reader, the manifest parser, the safetensors reader and
the object decoder (and the torch/npz readers when those formats are installed). Anything but a
GitThetaError subclass (an IndexError, a MemoryError, a RecursionError, a hang) is a bug.

Brief in CI (profile ``ci``). A long run::

    HYPOTHESIS_PROFILE=fuzz python -m pytest -q -p no:xdist tests/test_fuzz.py
"""

import io
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_theta.updates import chain as codec
from git_theta import registry as plugins
from git_theta.errors import GitThetaError
from git_theta.formats.base import CheckpointFormat
from git_theta.manifest import Manifest, ObjectRef, TensorEntry
from git_theta.store.objects import ObjectStore
from git_theta.filter.pktline import PktContentReader, PktReader, PktWriter
from git_theta.updates.base import TensorData

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", max_examples=20000, deadline=10_000, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
fuzz = settings(settings.get_profile(PROFILE))


@st.composite
def mutated(draw, seed):
    """``seed`` bytes with a few random flips, insertions, deletions, truncation or duplication."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(0, len(data))))
        if op == "flip" and data:
            data[min(pos, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "dup" and data:
            end = min(len(data), pos + draw(st.integers(1, 64)))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def _inputs(seed):
    return st.one_of(st.binary(max_size=512), mutated(seed))


# --- pkt-line -------------------------------------------------------------------------------------


def _pkt_seed():
    out = io.BytesIO()
    writer = PktWriter(out)
    writer.write_text_list(["git-filter-client", "version=2"])
    writer.write_text_list(["command=clean", "pathname=model.safetensors"])
    writer.write_packet(b"\x00\x01payload")
    writer.flush()
    return out.getvalue()


@fuzz
@given(_inputs(_pkt_seed()))
def test_pktline_reader(data):
    reader = PktReader(io.BytesIO(data))
    try:
        for _ in range(len(data) + 1):
            reader.read_key_values()
            PktContentReader(reader).read()
    except EOFError:
        pass  # a clean end of input between packets: how the protocol ends, not an error
    except GitThetaError:
        pass


# --- manifests ------------------------------------------------------------------------------------


def _manifest_seed():
    d = "ab" * 32
    return (
        'git-theta manifest v1\nformat safetensors\nfield metadata {"a":"b"}\n'
        f"blob header {'cd' * 32}:12\n"
        f"tensor a%20b F32 [2,3] {d} dense {'ef' * 32}:40\n"
        f"tensor w BF16 [] {d} int-delta {'01' * 32}:9 {'23' * 32}:30\n"
    ).encode()


@fuzz
@given(_inputs(_manifest_seed()))
def test_manifest_parser(data):
    try:
        manifest = Manifest.parse(data, source="fuzz")
    except GitThetaError:
        return
    # whatever parses serialises and parses back to the same thing
    again = Manifest.parse(manifest.serialize(), source="again")
    assert again == manifest


# --- safetensors ----------------------------------------------------------------------------------


def _safetensors_seed():
    from safetensors.numpy import save

    return save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int8)}, metadata={"k": "v"})


def _read_all(fmt, data):
    reader = fmt.split(io.BytesIO(data), "fuzz.safetensors")
    for tensor in reader.tensors():
        assert len(tensor.data) >= 0


@fuzz
@given(_inputs(_safetensors_seed()))
def test_safetensors_reader(data):
    fmt = plugins.get("format", "safetensors")
    try:
        fmt.sniff(data[:4096], "fuzz.safetensors")
        _read_all(fmt, data)
    except GitThetaError:
        pass


@fuzz
@given(
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=4),
            st.lists(st.integers(-3, 20), max_size=3),
            st.fixed_dictionaries(
                {
                    "dtype": st.sampled_from(["F32", "I8", "BF16", "X"]),
                    "shape": st.lists(st.integers(-1, 4), max_size=3),
                    "data_offsets": st.lists(st.integers(-2, 64), max_size=3),
                }
            ),
        ),
        max_size=4,
    ),
    st.binary(max_size=64),
)
def test_safetensors_structured_headers(header, tail):
    raw = json.dumps(header).encode()
    try:
        _read_all(plugins.get("format", "safetensors"), struct.pack("<Q", len(raw)) + raw + tail)
    except GitThetaError:
        pass


# --- torch / npz (when installed) -----------------------------------------------------------------


def _format_or_skip(name):
    if name not in plugins.names("format"):
        pytest.skip(f"format {name} not installed")
    try:
        fmt = plugins.get("format", name)
    except GitThetaError as exc:  # e.g. torch missing
        pytest.skip(str(exc))
    if type(fmt).split is CheckpointFormat.split:
        pytest.skip(f"format {name} is not implemented in this build")
    return fmt


def _npz_seed():
    out = io.BytesIO()
    np.savez(out, a=np.arange(6, dtype=np.float32), b=np.ones(2, np.int64))
    return out.getvalue()


@fuzz
@given(data=st.data())
def test_npz_reader(data):
    fmt = _format_or_skip("npz")
    blob = data.draw(_inputs(_npz_seed()))
    try:
        for _ in fmt.split(io.BytesIO(blob), "fuzz.npz").tensors():
            pass
    except GitThetaError:
        pass


def _torch_seed():
    torch = pytest.importorskip("torch")
    out = io.BytesIO()
    torch.save({"w": torch.arange(4, dtype=torch.float32), "step": 3}, out)
    return out.getvalue()


@fuzz
@given(data=st.data())
def test_torch_reader(data):
    fmt = _format_or_skip("torch")
    blob = data.draw(_inputs(_torch_seed()))
    try:
        for _ in fmt.split(io.BytesIO(blob), "fuzz.pt").tensors():
            pass
    except GitThetaError:
        pass


# --- stored objects -------------------------------------------------------------------------------

_ARRAY = (np.arange(96, dtype=np.float32) * 0.01).tobytes()


def _object_seed(tmp_path_factory):
    store = ObjectStore(tmp_path_factory.mktemp("seed"))
    tensor = TensorData("w", "F32", (96,), _ARRAY, codec.tensor_digest(_ARRAY))
    entry = codec.encode_tensor(store, tensor)
    return store.read(entry.objects[0].oid), entry


@pytest.fixture(scope="module")
def object_seed(tmp_path_factory):
    return _object_seed(tmp_path_factory)


@fuzz
@given(data=st.data())
def test_object_decoder(object_seed, tmp_path_factory, data):
    """A stored object with the right id but mutated bytes (a malicious server or a tampered clone)."""
    seed, entry = object_seed
    blob = data.draw(mutated(seed))
    store = ObjectStore(tmp_path_factory.mktemp("fuzz", numbered=True))
    ref = store.put_bytes(blob)
    mutated_entry = TensorEntry("w", entry.dtype, entry.shape, entry.digest, entry.update, (ref,))
    try:
        out = codec.decode_tensor(store, mutated_entry, "fuzz.safetensors")
    except GitThetaError:
        return
    assert bytes(out) == _ARRAY  # only an unchanged meaning may decode, and then exactly


def test_object_ref_parse_rejects_everything_but_hex_and_digits():
    for text in ["", ":", "a:1", "../x:1", f"{'a' * 64}:", f"{'a' * 64}:1x", f"{'A' * 64}:1"]:
        with pytest.raises(GitThetaError):
            ObjectRef.parse(text)
