"""The exact low-rank order: round32 of the exact product sum, computed with BLAS, proven per
element, identical whatever the summation order; and its use by the low-rank update."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from git_theta.errors import ObjectCorruptError
from git_theta.updates import low_rank
from git_theta.updates.exact_product import ExactProduct, exact_dot32, round_exact
from test_update_types import decode_encoded, merged_lora, tensor

FAST = settings(max_examples=60, deadline=None)


def reference(a, b):
    """round32 of each exact sum, one element at a time with rationals."""
    return np.array([[exact_dot32(a[i], b[:, j]) for j in range(b.shape[1])] for i in range(a.shape[0])], np.float32)


def product(a, b, cls=ExactProduct):
    exact = cls(a, b)
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    exact.block(0, a.shape[0], out)
    return out, exact.ambiguous


class ReversedSums(ExactProduct):
    """Another "BLAS": each element's float64 sum in reverse term order (numpy elementwise)."""

    def sums(self, start, stop, out):
        out[...] = 0.0
        for k in reversed(range(self.a.shape[1])):
            out += self.a[start:stop, k, None] * self.b[None, k, :]
        return out


class FirstTermSums(ExactProduct):
    """A "BLAS" whose accumulator starts from the first term, not from +0.0: a row of signed zeros
    then sums to -0.0 (numpy's OpenBLAS starts from +0.0 and gives +0.0)."""

    def sums(self, start, stop, out):
        out[...] = self.a[start:stop, 0, None] * self.b[None, 0, :]
        for k in range(1, self.a.shape[1]):
            out += self.a[start:stop, k, None] * self.b[None, k, :]
        return out


def bits(x):
    return np.asarray(x, np.float32).view(np.uint32)


@given(
    values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=50),
)
@FAST
def test_round_exact_is_numpys_float32_rounding(values):
    """A float64 (rounded once to float32 by the hardware) gives the same bits through rationals,
    subnormals, overflow and ties included."""
    with np.errstate(over="ignore"):
        for value in values + [2.0**-149 * 1.5, 2.0**-149 * 0.5, 3.4028235677973366e38, 1 + 2.0**-24]:
            expected = np.float32(value) if value != 0 else np.float32(0.0)  # a rational zero: +0.0
            assert bits(round_exact(Fraction(value))) == bits(expected), value


def test_round_exact_between_floats():
    """Values no float64 holds: just above a tie rounds up, the tie itself to even."""
    one = Fraction(1)
    tie = one + Fraction(1, 2**24)
    assert round_exact(tie) == 1.0  # ties to even
    assert round_exact(tie + Fraction(1, 2**200)) == float(np.float32(1 + 2.0**-23))
    assert round_exact(-tie - Fraction(1, 2**200)) == -float(np.float32(1 + 2.0**-23))
    assert round_exact(Fraction(0)) == 0.0 and bits(round_exact(Fraction(0))) == 0


@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    rank=st.integers(0, 9),
    scale=st.integers(-140, 120),
    seed=st.integers(0, 2**32 - 1),
)
@FAST
def test_exact_product_is_the_exact_sum_rounded(m, n, rank, scale, seed):
    """Every element is round32 of the exact sum, for any magnitude (subnormal to overflowing)."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        a = (rng.standard_normal((m, rank)) * 2.0 ** (scale / 2)).astype(np.float32)
        b = (rng.standard_normal((rank, n)) * 2.0 ** (scale / 2)).astype(np.float32)
    a[np.isinf(a)] = 1.0
    b[np.isinf(b)] = 1.0
    got, _ = product(a, b)
    assert np.array_equal(bits(got), bits(reference(a, b)))


def test_cancellations_near_rounding_edges_and_zero_signs():
    """Sums that cancel exactly (+0.0, never -0.0), land just beside a float32 tie or on one, and
    differ from the float64 sum's rounding in either order: all are the exact sum rounded."""
    eps = np.float32(2.0**-24)
    a = np.array(
        [
            [1.0, -1.0, 0.0],  # exact zero from non-zero terms
            [-0.0, -0.0, -0.0],  # signed zeros only
            [1.0, eps, 2.0**-60],  # 1 + half an ulp + a hair: rounds up
            [1.0, eps, -(2.0**-60)],  # 1 + half an ulp - a hair: rounds down
            [1.0, eps, 0.0],  # an exact tie: to even
            [2.0**60, 1.0, -(2.0**60)],  # the float64 sum in order loses the 1.0
        ],
        np.float32,
    )
    b = np.ones((3, 2), np.float32)
    b[:, 1] = -1.0
    for cls in (ExactProduct, ReversedSums, FirstTermSums):
        got, ambiguous = product(a, b, cls)
        assert np.array_equal(bits(got), bits(reference(a, b))), cls.__name__
        assert ambiguous > 0
        assert bits(got[0, 0]) == 0 and bits(got[1, 0]) == 0  # +0.0, whatever the order
    assert got[5, 0] == 1.0  # the ordered float64 sum gives 0.0


@given(m=st.integers(1, 40), n=st.integers(1, 40), rank=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
@FAST
def test_any_summation_order_gives_the_same_bits(m, n, rank, seed):
    """The result does not depend on how the float64 sums are evaluated: BLAS or reversed order."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, rank)).astype(np.float32)
    b = rng.standard_normal((rank, n)).astype(np.float32)
    b[:, ::3] *= np.float32(2.0**-30)  # wide magnitude ranges: the sums round differently
    assert np.array_equal(bits(product(a, b)[0]), bits(product(a, b, ReversedSums)[0]))


def test_non_finite_factors_are_corrupt():
    a = np.array([[np.inf]], np.float32)
    with pytest.raises(ObjectCorruptError, match="not finite"):
        ExactProduct(a, np.ones((1, 1), np.float32), "abc")


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
def test_float32_products_are_stored_in_the_exact_order(dtype, monkeypatch):
    """New float32-product objects use the exact order and decode bit for bit; objects in the
    ordered sum (older ones) still decode; a bad order is corrupt."""
    new_t, base_t, factors = merged_lora(dtype)
    monkeypatch.setattr(low_rank, "choose_product", lambda *args: "f32")
    encoded = low_rank.LowRankUpdate().encode(new_t, base_t, factors=factors)
    assert encoded.header["order"] == "exact"
    assert decode_encoded("low-rank", encoded, base_t) == bytes(new_t.data)
    monkeypatch.setattr(low_rank, "exact_budget", lambda elements: -1)  # as before the exact order
    older = low_rank.LowRankUpdate().encode(new_t, base_t, factors=factors)
    assert "order" not in older.header
    assert decode_encoded("low-rank", older, base_t) == bytes(new_t.data)
    for bad in ({"order": "fast"}, {"order": "exact", "product": None}):
        with pytest.raises(ObjectCorruptError):
            decode_encoded("low-rank", encoded, base_t, **bad)


def test_factors_that_cancel_everywhere_keep_the_ordered_sum(monkeypatch):
    """Factors whose terms cancel in every element would leave each one to rationals: the encoder
    keeps the ordered sum, and the stored tensor is still exact. Such an object in the exact
    order (crafted: git-theta does not write it) is refused rather than decoded slowly."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((128, 96)).astype(np.float32)
    half = rng.standard_normal((128, 2)).astype(np.float32)
    a = np.concatenate([half, -half], axis=1)  # a @ b == 0 exactly, with large terms
    b = np.concatenate([np.ones((2, 96), np.float32)] * 2)
    new_t = tensor("w", "F32", w.shape, (w + np.float32(1e-3)).tobytes())
    base_t = tensor("w", "F32", w.shape, w.tobytes())
    monkeypatch.setattr(low_rank, "choose_product", lambda *args: "f32")
    encoded = low_rank.encode_with_factors(new_t, base_t, a, b)
    assert "order" not in encoded.header
    assert decode_encoded("low-rank", encoded, base_t) == bytes(new_t.data)
    budget = low_rank.exact_budget
    monkeypatch.setattr(low_rank, "exact_budget", lambda elements: 10**9)
    crafted = low_rank.encode_with_factors(new_t, base_t, a, b)
    assert crafted.header["order"] == "exact"
    monkeypatch.setattr(low_rank, "exact_budget", budget)
    with pytest.raises(ObjectCorruptError, match="cancel almost everywhere"):
        decode_encoded("low-rank", crafted, base_t)
