"""ByteCursor, the stream reader format plugins share: positions, recording, padding, truncation."""

import io
import struct

import pytest
from hypothesis import given, settings, strategies as st

from git_theta.errors import CheckpointError
from git_theta.formats.stream import ByteCursor


class Trickle(io.RawIOBase):
    """A pipe that returns at most ``step`` bytes per read, like git's filter protocol may."""

    def __init__(self, data, step):
        self._data, self._step, self._pos = data, step, 0

    def read(self, n=-1):
        n = self._step if n is None or n < 0 else min(n, self._step)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


@settings(max_examples=25, deadline=None)
@given(payload=st.binary(max_size=3000), pad=st.integers(0, 70), step=st.integers(1, 5000))
def test_fields_payload_padding_and_tail(payload, pad, step):
    data = b"HDR" + struct.pack("<IQ", 7, len(payload)) + payload + bytes(pad)
    cursor = ByteCursor(Trickle(data, step), "m.bin", "toy")
    cursor.recording = bytearray()
    assert cursor.take(3, "magic") == b"HDR"
    assert cursor.unpack("IQ", "header") == (7, len(payload))
    assert bytes(cursor.recording) == data[:15]
    cursor.recording = None
    assert bytes(cursor.take_large(len(payload), "payload")) == payload
    assert cursor.position == 15 + len(payload)
    assert cursor.trailing_zeros("after the payload") == pad
    assert cursor.at_end()


def test_errors_name_the_file_and_what_was_read():
    cursor = ByteCursor(io.BytesIO(b"\0\0\1" + b"x" * 10), "model.toy", "toy")
    with pytest.raises(CheckpointError, match="model.toy: non-zero bytes in the padding"):
        cursor.skip_zeros(3, "the padding")
    with pytest.raises(
        CheckpointError, match=r"model.toy: toy file is truncated in tensor 'w' \(10 of 20 bytes\)"
    ) as info:
        cursor.take_large(20, "tensor 'w'")
    assert "save or download it again" in info.value.hint
    with pytest.raises(CheckpointError, match="unexpected bytes after the data"):
        ByteCursor(io.BytesIO(b"\0\0\3"), "m", "toy").trailing_zeros("after the data")


def test_read_ahead_replays_the_stream_exactly():
    """Clean reads a streamed file ahead to fingerprint it, then parses the same bytes."""
    import io
    import random

    from git_theta.formats.peekable import ReplayReader, read_ahead

    data = random.Random(0).randbytes(50000)
    for limit in (0, 100, 7000, 10**6):
        chunks, fingerprint = read_ahead(io.BytesIO(data), limit, chunk=4096)
        reader = ReplayReader(chunks, io.BytesIO(data[sum(map(len, chunks)) :]))
        rng, out = random.Random(limit), bytearray()
        while True:
            if rng.random() < 0.5:
                piece = reader.read(rng.randint(1, 9000))
            else:
                buf = bytearray(rng.randint(1, 9000))
                piece = bytes(buf[: reader.readinto(buf)])
            if not piece:
                break
            out += piece
        assert bytes(out) == data
        assert (fingerprint is not None) == (limit >= len(data))  # the whole file only when it fit
