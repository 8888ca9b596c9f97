"""Round-trip properties of every update type: decode(encode(new, base), base) == new, bit for bit.

Tensors are drawn as arbitrary bit patterns (so NaN payloads, infinities, -0.0 and subnormals all
occur) and as structured changes (a few elements, small steps, a low-rank product), over every
dtype and over empty, 0-d and n-d shapes.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from git_theta import registry as plugins
from git_theta.tensors.bits import as_bits, from_float
from git_theta.updates.chain import tensor_digest
from git_theta.dtypes import DTYPES, element_count, get_dtype
from git_theta.errors import ObjectCorruptError
from git_theta.store.container import header_bytes, unpack
from git_theta.updates.base import TensorData

DELTAS = ["sparse", "int-delta", "low-rank"]
SHAPES = st.sampled_from([(), (0,), (1,), (7,), (3, 0), (5, 3), (16, 12), (2, 3, 4), (24, 40)])
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tensor(name, dtype, shape, data):
    return TensorData(name, dtype, tuple(shape), bytes(data), tensor_digest(data))


def roundtrip(update_name, new, base, **options):
    """Encode through the real object container and decode; return the bytes or None."""
    update = plugins.get("update", update_name)
    encoded = update.encode(new, base, **options)
    if encoded is None:
        return None
    header = dict(encoded.header, update=update.name, dtype=new.dtype, shape=list(new.shape))
    raw = header_bytes(header) + b"".join(bytes(p) for p in encoded.parts)
    header, payload = unpack(raw)
    spec = TensorData(new.name, new.dtype, new.shape, None)
    return bytes(update.decode(header, payload, None if base is None else bytearray(base.data), spec))


@st.composite
def pairs(draw, dtypes=tuple(DTYPES)):
    """(new, base): a base of random bits and a new version changed in one of several ways."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(SHAPES)
    size = get_dtype(dtype).itemsize * element_count(shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    how = draw(st.sampled_from(["random", "few", "small-steps", "same"]))
    bits = as_bits(base, dtype).copy()
    if how == "random":
        new = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    elif how == "few":
        if bits.size:
            idx = rng.choice(bits.size, size=max(1, bits.size // 10), replace=False)
            bits[idx] = rng.integers(0, 2 ** (8 * bits.itemsize), idx.size, dtype=np.uint64).astype(bits.dtype)
        new = bits.tobytes()
    elif how == "small-steps":
        step = rng.integers(-3, 4, bits.size).astype(np.int64).astype(bits.dtype)
        new = (bits + step).tobytes()
    else:
        new = base
    return tensor("t", dtype, shape, new), tensor("t", dtype, shape, base)


@FAST
@given(pairs())
def test_dense_roundtrip(pair):
    new, _ = pair
    assert roundtrip("dense", new, None) == new.data


@pytest.mark.parametrize("name", DELTAS)
@FAST
@given(pair=pairs())
def test_delta_roundtrip(name, pair):
    new, base = pair
    out = roundtrip(name, new, base)
    if out is None:  # an update type may decline (low-rank: not 2-D float, or no low-rank structure)
        assert name == "low-rank"
        return
    assert out == new.data


def test_deltas_need_a_base():
    new = tensor("t", "F32", (4,), np.arange(4, dtype=np.float32).tobytes())
    for name in DELTAS:
        assert plugins.get("update", name).encode(new, None) is None


@FAST
@given(
    dtype=st.sampled_from(["F64", "F32", "F16", "BF16"]),
    m=st.integers(12, 40),
    n=st.integers(12, 40),
    rank=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    special=st.booleans(),
)
def test_low_rank_exact_on_low_rank_changes(dtype, m, n, rank, seed, special):
    """A merged low-rank product is found and stored exactly; NaN payloads and -0.0 survive."""
    rng = np.random.default_rng(seed)
    base_values = rng.standard_normal((m, n))
    new_values = base_values + (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)))
    base = bytearray(from_float(base_values, dtype))
    new = bytearray(from_float(new_values, dtype))
    if special:  # a NaN with a payload, -0.0 and inf in the new version
        bits = as_bits(new, dtype)
        width = bits.itemsize * 8
        nan = (((1 << (width - 1)) - 1) ^ 0b10) if dtype != "BF16" else 0x7FC3
        bits[0], bits[1], bits[2] = nan, 1 << (width - 1), bits[3]
    new_t, base_t = tensor("w", dtype, (m, n), new), tensor("w", dtype, (m, n), base)
    out = roundtrip("low-rank", new_t, base_t)
    if dtype in ("F64", "F32") and not special:
        assert out is not None, "a rank-<=3 change of a float32/64 matrix must be found"
    if out is not None:
        assert out == bytes(new)


@FAST
@given(dtype=st.sampled_from(["F64", "F32", "F16", "BF16"]), seed=st.integers(0, 2**32 - 1))
def test_supplied_factors_and_scales_are_exact(dtype, seed):
    """Whatever factors or scales are supplied (even wrong ones), the stored tensor is exact."""
    rng = np.random.default_rng(seed)
    shape = (12, 9)
    base = from_float(rng.standard_normal(shape), dtype)
    new = from_float(rng.standard_normal(shape), dtype)
    new_t, base_t = tensor("w", dtype, shape, new), tensor("w", dtype, shape, base)
    a, b = rng.standard_normal((12, 2)), rng.standard_normal((2, 9))
    assert roundtrip("low-rank", new_t, base_t, factors=(a, b)) == new
    assert roundtrip("ia3", new_t, base_t, scale=rng.standard_normal(9)) == new
    assert roundtrip("ia3", new_t, base_t, scale=rng.standard_normal((12, 1))) == new
    assert roundtrip("ia3", new_t, base_t, scale=rng.standard_normal(5)) is None  # does not broadcast


def test_low_rank_prediction_is_elementwise_fixed_order():
    """The prediction equals the documented formula evaluated one scalar at a time."""
    from git_theta.updates.low_rank import predict

    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 6))
    a, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((3, 6)).astype(np.float32)
    got = predict(base, a, b, "F64").view(np.float64).reshape(5, 6)
    for i in range(5):
        for j in range(6):
            acc = float(base[i, j])
            for k in range(3):
                acc = acc + float(a[i, k]) * float(b[k, j])
            assert got[i, j] == acc


def test_low_rank_f32_product_prediction_is_elementwise_fixed_order():
    """``product="f32"``: the terms summed in float64 in order, rounded to float32, added to the
    base in float64, rounded to the dtype: evaluated one scalar at a time."""
    from git_theta.updates.low_rank import predict

    rng = np.random.default_rng(4)
    base = rng.standard_normal((5, 6)).astype(np.float32)
    a, b = rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((3, 6)).astype(np.float32)
    got = predict(base, a, b, "F32", product="f32").view(np.float32).reshape(5, 6)
    for i in range(5):
        for j in range(6):
            acc = float(a[i, 0]) * float(b[0, j])
            for k in range(1, 3):
                acc = acc + float(a[i, k]) * float(b[k, j])
            assert got[i, j] == np.float32(float(base[i, j]) + float(np.float32(acc)))


def merged_lora(dtype, seed=6):
    """(new, base, factors): a rank-4 LoRA merged in float32 (PEFT's ``W + B @ A * scale``)."""
    rng = np.random.default_rng(seed)
    w = (0.02 * rng.standard_normal((64, 48))).astype(np.float32)
    lora_a = (rng.standard_normal((4, 48)) / 7).astype(np.float32)
    lora_b = (0.02 * rng.standard_normal((64, 4))).astype(np.float32)
    merged = w + (lora_b @ lora_a) * np.float32(2.0)
    base_t = tensor("w", dtype, w.shape, from_float(w, dtype))
    new_t = tensor("w", dtype, w.shape, from_float(merged, dtype))
    return new_t, base_t, (lora_b, lora_a * np.float32(2.0))


def decode_encoded(update_name, encoded, base, **changes):
    """Decode ``encoded`` (an Encoded for ``base``'s tensor), its header changed by ``changes``."""
    header = dict(encoded.header, update=update_name, dtype=base.dtype, shape=list(base.shape), **changes)
    header, payload = unpack(header_bytes(header) + b"".join(bytes(p) for p in encoded.parts))
    spec = TensorData(base.name, base.dtype, base.shape, None)
    return bytes(plugins.get("update", update_name).decode(header, payload, bytearray(base.data), spec))


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_low_rank_both_predictions_decode(dtype, monkeypatch):
    """A float32 LoRA merge picks the float32-product prediction; objects of either prediction
    (and older ones without the ``product`` key) decode exactly; an unknown one is corrupt."""
    from git_theta.updates import low_rank

    new_t, base_t, factors = merged_lora(dtype)
    if dtype == "F32":
        assert low_rank.LowRankUpdate().encode(new_t, base_t, factors=factors).header.get("product") == "f32"
    for product in low_rank.PRODUCTS:
        monkeypatch.setattr(low_rank, "choose_product", lambda *args, p=product: p)
        encoded = low_rank.LowRankUpdate().encode(new_t, base_t, factors=factors)
        assert encoded.header.get("product") == product
        assert roundtrip("low-rank", new_t, base_t, factors=factors) == new_t.data
    with pytest.raises(ObjectCorruptError):
        decode_encoded("low-rank", encoded, base_t, product="f16")


def test_sparse_picks_the_smallest_index():
    base = np.zeros(10000, dtype=np.float32)
    few = base.copy()
    few[[5, 700, 9000]] = 1.0
    many = base.copy()
    many[::3] = 2.0
    scattered = base.copy()
    scattered[np.random.default_rng(3).choice(10000, 100, replace=False)] = 3.0
    sparse = plugins.get("update", "sparse")
    b = tensor("t", "F32", (10000,), base.tobytes())
    assert sparse.encode(tensor("t", "F32", (10000,), few.tobytes()), b).header["index"] in ("gaps", "rice")
    assert sparse.encode(tensor("t", "F32", (10000,), many.tobytes()), b).header["index"] == "bitmap"
    assert sparse.encode(tensor("t", "F32", (10000,), scattered.tobytes()), b).header["index"] == "rice"


def test_sparse_choices_on_a_sample_of_many_changes(monkeypatch):
    """With more changes than the sample, the index and value codings are chosen on the first ones
    (random positions: Rice; small float steps: zigzag) and the object still decodes exactly."""
    from git_theta.updates import sparse

    monkeypatch.setattr(sparse, "SAMPLE_COUNT", 64)
    rng = np.random.default_rng(9)
    base_values = rng.standard_normal(40_000)
    new_values = base_values.copy()
    idx = rng.choice(base_values.size, 400, replace=False)
    new_values[idx] *= 1 + 1e-3 * rng.standard_normal(idx.size)
    base = tensor("t", "BF16", (40_000,), from_float(base_values, "BF16"))
    new = tensor("t", "BF16", (40_000,), from_float(new_values, "BF16"))
    header = plugins.get("update", "sparse").encode(new, base).header
    assert header["index"] == "rice" and header.get("values") == "zigzag"
    assert roundtrip("sparse", new, base) == new.data


@FAST
@given(
    total=st.integers(1, 5000),
    density=st.sampled_from([0.0005, 0.01, 0.2, 0.9, 1.0]),
    clustered=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    step=st.sampled_from([1, 3, 1 << 18]),
)
def test_rice_index_roundtrip(total, density, clustered, seed, step):
    """The Rice code of any sorted set of positions (first, last, runs, one far outlier) decodes
    back, whether in one run or a few bytes of the code at a time (runs without a position)."""
    from git_theta.updates import sparse

    rng = np.random.default_rng(seed)
    count = max(1, int(total * density))
    if clustered:  # a run at the start plus the very last element: one huge gap
        positions = np.unique(np.r_[np.arange(min(count, total)), total - 1])
    else:
        positions = np.sort(rng.choice(total, min(count, total), replace=False))
    unary, low = sparse.encode_rice(positions, total)
    default, sparse.RICE_STEP = sparse.RICE_STEP, step
    try:
        assert np.array_equal(sparse.decode_index("rice", [unary, low], total, len(positions), "x"), positions)
    finally:
        sparse.RICE_STEP = default


@FAST
@given(k=st.integers(1, 64), count=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_packed_fields_roundtrip(k, count, seed):
    """Fields of any width 1-64 bits (the Rice code's low bits) unpack to the values packed,
    and the packing is the plain MSB-first bit stream older objects hold."""
    from git_theta.updates.sparse import pack_fields, unpack_fields

    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**63, count, dtype=np.uint64) >> np.uint64(63 - (k - 1))
    values[: count // 3] = (1 << k) - 1  # all ones: the widest field
    packed = pack_fields(values, k)
    stream = "".join(format(int(v), f"0{k}b") for v in values)
    assert packed.tobytes() == int(stream + "0" * (-len(stream) % 8) or "0", 2).to_bytes(len(packed), "big")
    assert np.array_equal(unpack_fields(packed, count, k).astype(np.uint64), values)


@pytest.mark.parametrize("step", [1, 1 << 18])
def test_corrupt_rice_index_is_detected(step, monkeypatch):
    """Corrupt codes are refused whether decoded whole or a byte at a time."""
    from git_theta.updates import sparse
    from git_theta.updates.sparse import decode_index, encode_rice

    monkeypatch.setattr(sparse, "RICE_STEP", step)
    positions = np.array([3, 40, 41, 977, 999])
    unary, low = encode_rice(positions, 1000)
    bad = [
        ([unary, low], 4),  # wrong count of values
        ([unary, low[:-1]], 5),  # low bits cut short
        ([np.r_[unary, np.uint8(0)], low], 5),  # trailing bytes
        ([np.zeros_like(unary), low], 5),  # no terminating ones
        ([np.r_[np.zeros(200, np.uint8), unary], low], 5),  # gaps past the end of the tensor
        ([unary], 5),  # a section missing
        ([np.r_[unary, np.uint8(0xFF)], low], 5),  # more ones than values
    ]
    for arrays, count in bad:
        with pytest.raises(ObjectCorruptError):
            decode_index("rice", arrays, 1000, count, "x")
    with pytest.raises(ObjectCorruptError):
        decode_index("golomb", [unary], 1000, 5, "x")


def test_sparse_values_as_zigzag_steps_and_old_xor_objects():
    """Small steps of bf16 values are stored as zigzag differences (smaller than XOR); objects
    written before that coding existed (XOR values, uint32 gaps, no ``values`` key) still decode."""
    from git_theta.tensors.planes import encode_sections

    rng = np.random.default_rng(5)
    base_values = rng.standard_normal(50_000)
    new_values = base_values.copy()
    idx = np.sort(rng.choice(base_values.size, 500, replace=False))
    new_values[idx] *= 1 + 0.05 * rng.standard_normal(idx.size)
    base = tensor("t", "BF16", (50_000,), from_float(base_values, "BF16"))
    new = tensor("t", "BF16", (50_000,), from_float(new_values, "BF16"))
    sparse = plugins.get("update", "sparse")
    encoded = sparse.encode(new, base)
    assert encoded.header.get("values") == "zigzag"
    assert roundtrip("sparse", new, base) == new.data

    # What `git theta diff` reads without rebuilding the tensor: the positions and the XOR there.
    from git_theta.updates.sparse import decode_sparse

    new_bits, base_bits = as_bits(new.data, "BF16"), as_bits(base.data, "BF16")
    positions = np.flatnonzero(new_bits != base_bits)
    got_positions, got_xor = decode_sparse(
        encoded.header, memoryview(b"".join(bytes(p) for p in encoded.parts)), base_bits, "x"
    )
    assert np.array_equal(got_positions, positions)
    assert np.array_equal(got_xor, new_bits[positions] ^ base_bits[positions])
    gaps = np.diff(positions, prepend=0).astype(np.uint32)
    parts, sections = encode_sections([gaps, new_bits[positions] ^ base_bits[positions]])
    header = {"index": "gaps", "sections": sections, "update": "sparse", "dtype": "BF16", "shape": [50_000]}
    header, payload = unpack(header_bytes(header) + b"".join(bytes(p) for p in parts))
    spec = TensorData("t", "BF16", (50_000,), None)
    assert bytes(sparse.decode(header, payload, bytearray(base.data), spec)) == new.data
    with pytest.raises(ObjectCorruptError):
        sparse.decode(dict(header, values="delta"), payload, bytearray(base.data), spec)


@pytest.mark.parametrize("name", ["dense", *DELTAS])
def test_corrupt_payload_is_detected(name):
    """A payload cut short is an ObjectCorruptError, never garbage."""
    rng = np.random.default_rng(1)
    base_values = rng.standard_normal((16, 16))
    new_values = base_values + np.outer(rng.standard_normal(16), rng.standard_normal(16))
    base = tensor("w", "F32", (16, 16), from_float(base_values, "F32"))
    new = tensor("w", "F32", (16, 16), from_float(new_values, "F32"))
    update = plugins.get("update", name)
    encoded = update.encode(new, base)
    header = dict(encoded.header, update=name, dtype="F32", shape=[16, 16])
    raw = header_bytes(header) + b"".join(bytes(p) for p in encoded.parts)
    header, payload = unpack(raw[:-3])
    with pytest.raises(ObjectCorruptError):
        update.decode(header, payload, bytearray(base.data), TensorData("w", "F32", (16, 16), None))


@pytest.mark.parametrize("mismatch", [0.0, 0.02, 0.3, 1.0])
def test_residual_forms_roundtrip(mismatch):
    """The residual is stored whole or sparsely, whichever is smaller; both decode exactly."""
    from git_theta.updates.residual import decode_residual, encode_residual
    from git_theta.tensors.planes import decode_sections

    rng = np.random.default_rng(8)
    predicted = rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32)
    new = predicted.copy()
    idx = rng.random(predicted.size) < mismatch
    new[idx] += rng.integers(1, 5, idx.sum()).astype(np.uint32)
    mode, parts, sections = encode_residual(new, predicted)
    if mismatch in (0.0, 0.02):
        assert mode in ("gaps", "rice")
    if mismatch == 1.0:
        assert mode == "dense"
    arrays = decode_sections(memoryview(b"".join(bytes(p) for p in parts)), sections)
    assert np.array_equal(decode_residual(mode, arrays, predicted, "x"), new)


@pytest.mark.parametrize("rows", [40, 400])  # 400 x 256 elements: the sampled path
@pytest.mark.parametrize(
    "change,expected",
    [("few", "sparse"), ("steps", "int-delta"), ("lora", "low-rank"), ("new", "dense")],
)
def test_automatic_choice(rows, change, expected):
    """The automatic choice finds the encoding each kind of change calls for, and it is exact."""
    from git_theta.updates.choose import choose

    rng = np.random.default_rng(9)
    base = (rng.standard_normal((rows, 256)) * 0.05).astype(np.float32)
    if change == "few":
        new = base.copy()
        new.reshape(-1)[rng.choice(base.size, base.size // 100, replace=False)] += np.float32(0.01)
    elif change == "steps":
        new = (base * (1 + 1e-4 * rng.standard_normal(base.shape))).astype(np.float32)
    elif change == "lora":
        new = (base + rng.standard_normal((rows, 4)) @ rng.standard_normal((4, 256)) * 0.01).astype(np.float32)
    else:
        new = (rng.standard_normal(base.shape) * 0.05).astype(np.float32)
    new_t = tensor("w", "F32", base.shape, new.tobytes())
    base_t = tensor("w", "F32", base.shape, base.tobytes())
    update, encoded = choose(new_t, base_t)
    assert update.name == expected
    header = dict(encoded.header, update=update.name, dtype="F32", shape=list(base.shape))
    raw = header_bytes(header) + b"".join(bytes(p) for p in encoded.parts)
    h, payload = unpack(raw)
    spec = TensorData("w", "F32", base.shape, None)
    assert bytes(update.decode(h, payload, None if update.keyframe else bytearray(base_t.data), spec)) == new.tobytes()


def test_decoded_cache_shares_bases_and_stays_bounded(tmp_path):
    """A verified immediate base is cached by its chain's object ids and reused; the cache evicts
    to its bound."""
    from git_theta.updates.chain import DecodedCache, decode_tensor, encode_tensor
    from git_theta.store.objects import ObjectStore

    store = ObjectStore(tmp_path / "objects", fsync=False)
    rng = np.random.default_rng(10)
    values = [rng.standard_normal(64).astype(np.float32)]
    for _ in range(2):
        nxt = values[-1].copy()
        nxt[rng.integers(0, 64)] += 1
        values.append(nxt)
    entries, previous = [], None
    for v in values:
        t = tensor("w", "F32", (64,), v.tobytes())
        base = None if previous is None else tensor("w", "F32", (64,), values[len(entries) - 1].tobytes())
        entry = encode_tensor(store, t, "sparse" if previous else "dense", base, previous)
        entries.append(entry)
        previous = entry
    cache = DecodedCache(limit=300)
    assert bytes(decode_tensor(store, entries[2], cache=cache)) == values[2].tobytes()
    base_chain = tuple(r.oid for r in entries[2].objects[1:])
    assert cache.get(base_chain) == values[1].tobytes()  # the immediate base
    # with the base cached, the keyframe is not read again: remove it and decode still works
    keyframe = store.path(entries[2].objects[-1].oid)
    keyframe.chmod(0o644)
    keyframe.unlink()
    assert bytes(decode_tensor(store, entries[2], cache=cache)) == values[2].tobytes()
    cache.put("a" * 64, b"x" * 200)
    cache.put("b" * 64, b"y" * 200)  # over the 300-byte bound: the least recently used go
    assert cache.get("a" * 64) is None and cache.get("b" * 64) == b"y" * 200


def test_a_delta_past_the_chains_room_is_not_encoded_in_full(monkeypatch):
    """A fine-tune step whose sampled winner is int-delta: with room for it, it is encoded and
    chosen; with a room its estimate passes by more than ROOM_MARGIN, choose encodes nothing in
    full and answers None (the caller stores a keyframe, as the chain rule would have it)."""
    from git_theta.updates import choose as choosing

    full = []
    real = choosing.encode_update

    def recording(tensor, name, base=None, **options):
        if tensor.shape != (choosing.SAMPLE_BLOCKS * choosing.BLOCK_ELEMENTS,) and name != "low-rank":
            full.append(name)  # a full encoding (low-rank, structural, is always tried in full)
        return real(tensor, name, base, **options)

    monkeypatch.setattr(choosing, "encode_update", recording)
    rng = np.random.default_rng(10)
    base = (rng.standard_normal((400, 256)) * 0.05).astype(np.float32)
    new = (base * (1 + 1e-4 * rng.standard_normal(base.shape))).astype(np.float32)
    args = tensor("w", "F32", new.shape, new.tobytes()), tensor("w", "F32", base.shape, base.tobytes())
    update, encoded = choosing.choose(*args, room=new.nbytes)
    assert update.name == "int-delta" and full == ["int-delta"]
    full.clear()
    small = choosing.encoded_size(encoded) / (2 * choosing.ROOM_MARGIN)
    assert choosing.choose(*args, room=small) is None
    assert full == []  # neither int-delta nor dense encoded in full


def test_structural_candidates_skip_tensors_too_small_to_gain(monkeypatch):
    """Low-rank is not tried below STRUCTURAL_MIN_BYTES (a 20,000-tensor add spent most of its
    time in SVDs of 4 KiB matrices), and is tried from there on."""
    from git_theta.updates import choose as choosing

    tried = []
    real = choosing.encode_update

    def recording(tensor, name, base=None, **options):
        tried.append(name)
        return real(tensor, name, base, **options)

    monkeypatch.setattr(choosing, "encode_update", recording)
    rng = np.random.default_rng(3)
    for rows, expect in ((8, False), (32, True)):  # 8 x 128 fp32 = 4 KiB, 32 x 128 = 16 KiB
        base = (0.05 * rng.standard_normal((rows, 128))).astype(np.float32)
        new = (base + np.outer(rng.standard_normal(rows), rng.standard_normal(128)) * 0.01).astype(np.float32)
        tried.clear()
        choosing.choose(tensor("w", "F32", new.shape, new.tobytes()), tensor("w", "F32", base.shape, base.tobytes()))
        assert ("low-rank" in tried) is expect
