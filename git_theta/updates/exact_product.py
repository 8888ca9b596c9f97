"""The low-rank product rounded to float32 exactly, computed with BLAS.

``round32(a[i, :] @ b[:, j])`` is defined on the real numbers: the exact sum of the products,
rounded once to float32. Its value does not depend on how the sum is evaluated, so a decoder may
use any matrix multiply (numpy's BLAS, multithreaded, blocked, with or without FMA) as long as it
proves the rounding: for a sum of ``r`` products of float32 numbers, any float64 evaluation order
is within ``(r - 1) * 2**-53 * sum(|a[i, k] * b[k, j]|)`` of the exact value (products of two
float32 are exact in float64). Rounding the interval ``s +- bound`` to float32 gives one value
almost everywhere; the few elements whose interval straddles a rounding boundary (about 1 in
300,000 on merged LoRAs) are computed exactly with rationals. The result is bit-identical on
every machine and library, and it costs a matrix multiply plus a few elementwise passes instead
of two passes per rank.

Exact zero is +0.0 (a float64 sum of signed zeros has an order-dependent sign); no non-finite
factor is accepted (the encoder never writes one, and NaN payloads would depend on the library).
A decoder refuses factors that leave more elements to rationals than the encoder ever stores
(``limit``): a crafted object must not make a checkout crawl.
"""

from fractions import Fraction

import numpy as np

from git_theta.errors import ObjectCorruptError


class TooManyUncertain(ObjectCorruptError):
    """More elements than ``limit`` would be left to rationals (their terms cancel)."""


#: float32: significand bits (with the implicit one), smallest normal exponent, largest exponent
_F32 = (24, -126, 127)


def round_exact(value, significand=_F32[0], min_exponent=_F32[1], max_exponent=_F32[2]):
    """``value`` (a Fraction) rounded to nearest, ties to even, in a binary format; a float.

    Subnormals keep the smallest normal exponent's quantum; overflow gives an infinity; an exact
    zero gives +0.0.
    """
    if value == 0:
        return 0.0
    negative = value < 0
    value = -value if negative else value
    num, den = value.numerator, value.denominator
    exponent = num.bit_length() - den.bit_length()  # 2**exponent <= value < 2**(exponent + 2)
    if (num << max(0, -exponent)) < (den << max(0, exponent)):
        exponent -= 1
    exponent = max(exponent, min_exponent)
    quantum = Fraction(2) ** (exponent - significand + 1)
    steps, rest = divmod(value, quantum)
    if rest > quantum / 2 or (rest == quantum / 2 and steps % 2):
        steps += 1
    rounded = steps * quantum
    result = float("inf") if rounded >= Fraction(2) ** (max_exponent + 1) else float(rounded)
    return -result if negative else result


def exact_dot32(a_row, b_column):
    """``round32(sum(a_row * b_column))`` computed exactly (the slow path, per element)."""
    total = sum((Fraction(float(x)) * Fraction(float(y)) for x, y in zip(a_row, b_column)), Fraction(0))
    return round_exact(total)


class ExactProduct:
    """Blocks of ``round32(a @ b)`` for float32 factors ``a`` (m x r) and ``b`` (r x n)."""

    def __init__(self, a, b, oid="?", limit=None):
        self.oid, self.limit = oid, limit
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise ObjectCorruptError(f"object {oid}: low-rank factors are not finite")
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        rank = self.a.shape[1]
        # Row i's terms are at most row_bound[i] in total: a bound on every element of the row.
        row_bound = np.abs(self.a) @ (np.abs(self.b).max(axis=1) if rank and self.b.size else np.zeros(rank))
        # Any order of the r - 1 additions (FMA or not) is within (r - 1) * 2**-53 * row_bound
        # of the exact sum. Four more units cover that bound's own rounding and keep the float64
        # rounding of s +- error off a float32 rounding boundary the exact sum could be beyond.
        self.row_error = (row_bound * ((rank + 3) * 2.0**-53))[:, None]
        self.ambiguous = 0  # elements computed with rationals so far

    def sums(self, start, stop, out):
        """float64 sums of rows ``start:stop``, in any order: here numpy's matrix multiply."""
        return np.matmul(self.a[start:stop], self.b, out=out)

    def block(self, start, stop, out):
        """Write ``round32(a[start:stop] @ b)`` into ``out`` (float32, ``stop - start`` x n)."""
        shape = out.shape
        if getattr(self, "_shape", None) != shape:  # scratch for this block size, reused
            self._shape = shape
            self._sum = np.empty(shape, dtype=np.float64)
            self._edge = np.empty(shape, dtype=np.float64)
            self._high = np.empty(shape, dtype=np.float32)
            self._differ = np.empty(shape, dtype=bool)
        total = self.sums(start, stop, self._sum)
        error = self.row_error[start:stop]
        # Both ends of the interval rounded to float32 (an assignment casts faster than a ufunc).
        out[...] = np.subtract(total, error, out=self._edge)
        self._high[...] = np.add(total, error, out=self._edge)
        # Bit patterns, not values, are compared: -0.0 and +0.0 must differ (zero's sign).
        np.not_equal(out.view(np.uint32), self._high.view(np.uint32), out=self._differ)
        uncertain = np.flatnonzero(self._differ)
        if self.limit is not None and self.ambiguous + len(uncertain) > self.limit:
            raise TooManyUncertain(
                f"object {self.oid}: low-rank factors whose terms cancel almost everywhere (not written by git-theta)"
            )
        for flat in uncertain:
            row, column = divmod(int(flat), shape[1])
            out[row, column] = exact_dot32(self.a[start + row], self.b[:, column])
            self.ambiguous += 1
        return out
