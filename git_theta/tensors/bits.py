"""Views of raw tensor bytes as bit patterns and as float64 values, for deltas, diffs and merges.

Deltas work on bit patterns (unsigned integers of the element width) so that every value, including
NaN payloads and -0.0, round-trips exactly. Arithmetic (low-rank deltas, diffs, merges) needs values:
bf16 and the float8 types have no numpy dtype, so they are widened by bit manipulation or a table.
"""

import numpy as np

from git_theta.dtypes import get_dtype


def as_bits(data, dtype_name):
    """The raw bytes as a 1-D array of unsigned integers of the element width (no copy)."""
    return np.frombuffer(data, dtype=get_dtype(dtype_name).bits_name)


def _fp8_table(exponent_bits, mantissa_bits, bias, finite_only):
    """float64 value of every byte of an 8-bit float format."""
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> mantissa_bits) & ((1 << exponent_bits) - 1)
    mantissa = codes & ((1 << mantissa_bits) - 1)
    normal = sign * (1 + mantissa / (1 << mantissa_bits)) * np.exp2(exponent.astype(float) - bias)
    subnormal = sign * (mantissa / (1 << mantissa_bits)) * np.exp2(1.0 - bias)
    values = np.where(exponent == 0, subnormal, normal)
    top = (1 << exponent_bits) - 1
    if finite_only:  # E4M3FN: only S.1111.111 is NaN, no infinities
        values[(exponent == top) & (mantissa == (1 << mantissa_bits) - 1)] = np.nan
    else:  # E5M2: IEEE-like
        values[(exponent == top) & (mantissa == 0)] = sign[(exponent == top) & (mantissa == 0)] * np.inf
        values[(exponent == top) & (mantissa != 0)] = np.nan
    return values


_TABLES = {}


def _table(name):
    if name not in _TABLES:
        if name == "F8_E4M3":
            _TABLES[name] = _fp8_table(4, 3, 7, True)
        elif name == "F8_E5M2":
            _TABLES[name] = _fp8_table(5, 2, 15, False)
        else:  # F8_E8M0: a power of two per code, 255 is NaN
            values = np.exp2(np.arange(256, dtype=float) - 127)
            values[255] = np.nan
            _TABLES[name] = values
    return _TABLES[name]


def to_float(data, dtype_name, shape=None, precision=np.float64):
    """The tensor's values as a float array (float64 by default); ints and bools are converted."""
    dtype = get_dtype(dtype_name)
    with np.errstate(invalid="ignore"):  # converting a signalling NaN is expected, not an error
        values = _to_float(data, dtype_name, dtype, precision)
    return values.reshape(shape) if shape is not None else values


def _to_float(data, dtype_name, dtype, precision):
    if dtype_name == "BF16":
        widened = (as_bits(data, "BF16").astype(np.uint32) << 16).view(np.float32)
        values = widened.astype(precision, copy=False)
    elif dtype_name.startswith("F8_"):
        values = _table(dtype_name)[np.frombuffer(data, dtype=np.uint8)].astype(precision, copy=False)
    elif dtype.kind == "complex":
        raise TypeError("complex tensors have no real value view")
    else:
        values = np.frombuffer(data, dtype=dtype.numpy_name).astype(precision, copy=False)
    return values


def from_float(values, dtype_name):
    """Round float values to ``dtype_name`` (round to nearest even); return the raw bytes.

    Only for float dtypes numpy can represent plus bf16; results are deterministic on every machine
    because every step is an IEEE elementwise operation.
    """
    values = np.ascontiguousarray(values)
    if dtype_name == "BF16":
        bits = values.astype(np.float32).view(np.uint32)
        is_nan = np.isnan(values)
        # round to nearest even on the upper 16 bits
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded[is_nan] = ((bits[is_nan] >> 16) | 0x40).astype(np.uint16)
        return rounded.tobytes()
    dtype = get_dtype(dtype_name)
    if dtype.kind != "float" or dtype.numpy_name is None:
        raise TypeError(f"cannot round to {dtype_name}")
    return values.astype(dtype.numpy_name).tobytes()


def is_float(dtype_name):
    return get_dtype(dtype_name).kind == "float"
