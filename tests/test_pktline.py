"""pkt-line framing: packets, flushes, content streams split across packets."""

import io

import pytest

from git_theta.errors import FilterProtocolError
from git_theta.filter.pktline import MAX_PAYLOAD, PktContentReader, PktContentWriter, PktReader, PktWriter


def framed(*payloads):
    out = io.BytesIO()
    writer = PktWriter(out)
    for payload in payloads:
        if payload is None:
            writer.flush()
        else:
            writer.write_packet(payload)
    return out.getvalue()


def test_packet_layout_is_four_hex_digits_of_total_length():
    assert framed(b"abc", None) == b"0007abc0000"


def test_reader_returns_payloads_and_none_for_flush():
    reader = PktReader(io.BytesIO(framed(b"a\n", b"", None)))
    assert reader.read_packet() == b"a\n"
    assert reader.read_packet() == b""
    assert reader.read_packet() is None
    with pytest.raises(EOFError):
        reader.read_packet()


def test_key_values_and_text_lists():
    data = framed(b"command=clean\n", b"pathname=a b.safetensors\n", None)
    assert PktReader(io.BytesIO(data)).read_key_values() == {
        "command": "clean",
        "pathname": "a b.safetensors",
    }


@pytest.mark.parametrize("bad", [b"00zz", b"0002", b"fff0" + b"x" * 10])
def test_malformed_lengths_are_protocol_errors(bad):
    with pytest.raises(FilterProtocolError):
        PktReader(io.BytesIO(bad)).read_packet()


def test_truncated_packet_is_protocol_error():
    with pytest.raises(FilterProtocolError):
        PktReader(io.BytesIO(b"0010abc")).read_packet()


@pytest.mark.parametrize("size", [0, 1, MAX_PAYLOAD - 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 3 * MAX_PAYLOAD + 17])
def test_content_round_trip_over_packet_boundaries(size):
    payload = bytes(i % 251 for i in range(size))
    out = io.BytesIO()
    writer = PktWriter(out)
    body = PktContentWriter(writer)
    # write in uneven pieces to exercise the partial-packet buffer
    for start in range(0, size, 7919):
        body.write(payload[start : start + 7919])
    body.flush()
    writer.flush()
    packets = PktReader(io.BytesIO(out.getvalue()))
    content = PktContentReader(packets)
    got = bytearray()
    buf = bytearray(5000)
    while True:
        n = content.readinto(buf)
        if not n:
            break
        got += buf[:n]
    assert bytes(got) == payload
    assert body.bytes_written == size


def test_content_reader_read_all_and_drain():
    data = framed(b"abc", b"def", None, b"next", None)
    reader = PktReader(io.BytesIO(data))
    content = PktContentReader(reader)
    assert content.read(2) == b"ab"
    assert content.read() == b"cdef"
    second = PktContentReader(reader)
    second.drain()
    with pytest.raises(EOFError):
        reader.read_packet()


def test_writer_refuses_oversized_packet():
    with pytest.raises(ValueError):
        PktWriter(io.BytesIO()).write_packet(b"x" * (MAX_PAYLOAD + 1))


def test_content_through_a_pipe_fd_with_partial_writes(tmp_path, monkeypatch):
    """On a file descriptor, full packets go out several per writev call, straight from the
    caller's buffer; a pipe that takes only part of a call gets the rest, and text written before
    stays in order."""
    import os

    real_writev = os.writev
    calls = []

    def stingy_writev(fd, parts):  # a pipe accepting at most 100,000 bytes per call
        calls.append(len(parts))
        budget, taken = 100_000, []
        for part in parts:
            taken.append(bytes(part[: max(0, budget)]))
            budget -= len(part)
        return real_writev(fd, [t for t in taken if t])

    monkeypatch.setattr(os, "writev", stingy_writev)
    data = bytes(range(256)) * 2000  # 512,000 bytes: 7 full packets and a partial one
    path = tmp_path / "out"
    with open(path, "wb", buffering=1 << 16) as stream:
        writer = PktWriter(stream)
        writer.write_text("status=success")
        body = PktContentWriter(writer)
        body.write(data)
        body.flush()
        writer.flush()
    assert max(calls) == 14  # 7 packets, a header and a payload each, in one call at first
    with open(path, "rb") as stream:
        reader = PktReader(stream)
        assert reader.read_packet() == b"status=success\n"
        assert PktContentReader(reader).read() == data
