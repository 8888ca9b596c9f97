"""Tensor bytes: dtypes, bit views, byte planes, compression, buffers, chain encode/decode."""
