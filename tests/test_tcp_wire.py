"""The TCP header codec against scapy-built golden segments, error tables and fuzzing."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from vdev.wire.errors import ChecksumError, IntegrityError, SanityError, TruncatedError, WireError
from vdev.wire.tcp import (
    ACK,
    FIN,
    NO_OPTIONS,
    PSH,
    RST,
    SYN,
    URG,
    TcpOptions,
    TcpSegment,
)

SRC = bytes([192, 0, 2, 1])
DST = bytes([198, 51, 100, 7])
SRC_TEXT = "192.0.2.1"
DST_TEXT = "198.51.100.7"


def scapy_segment(**fields: Any) -> bytes:
    """The TCP part of an IPv4 packet built (and checksummed) by scapy."""
    payload = fields.pop("payload", b"")
    packet = IP(src=SRC_TEXT, dst=DST_TEXT) / TCP(**fields) / payload
    return bytes(IP(bytes(packet))[TCP])


GOLDEN = [
    pytest.param(
        dict(sport=40000, dport=80, seq=1, ack=0, flags="S", window=65535,
             options=[("MSS", 1460), ("NOP", None), ("WScale", 7), ("NOP", None), ("NOP", None),
                      ("SAckOK", b""), ("NOP", None), ("NOP", None), ("Timestamp", (11, 22))]),
        TcpSegment(40000, 80, 1, 0, SYN, 65535, b"",
                   TcpOptions(mss=1460, window_scale=7, sack_permitted=True, timestamps=(11, 22))),
        id="syn-all-options",
    ),
    pytest.param(
        dict(sport=80, dport=40000, seq=0xFFFFFFFF, ack=2, flags="SA", window=29200,
             options=[("MSS", 536)]),
        TcpSegment(80, 40000, 0xFFFFFFFF, 2, SYN | ACK, 29200, b"", TcpOptions(mss=536)),
        id="syn-ack-mss",
    ),
    pytest.param(
        dict(sport=1234, dport=5678, seq=100, ack=200, flags="PA", window=512, payload=b"hello"),
        TcpSegment(1234, 5678, 100, 200, PSH | ACK, 512, b"hello"),
        id="data-even",
    ),
    pytest.param(
        dict(sport=1234, dport=5678, seq=100, ack=200, flags="FA", window=0, payload=b"odd"),
        TcpSegment(1234, 5678, 100, 200, FIN | ACK, 0, b"odd"),
        id="fin-odd-length",
    ),
    pytest.param(
        dict(sport=9, dport=10, seq=0, ack=77, flags="RA", window=0),
        TcpSegment(9, 10, 0, 77, RST | ACK, 0),
        id="rst-ack",
    ),
    pytest.param(
        dict(sport=9, dport=10, seq=5, ack=6, flags="UA", window=1, urgptr=3, payload=b"abcd"),
        TcpSegment(9, 10, 5, 6, URG | ACK, 1, b"abcd", urgent=3),
        id="urgent",
    ),
]


@pytest.mark.parametrize(("fields", "expected"), GOLDEN)
def test_parse_and_emit_match_scapy(fields: dict[str, Any], expected: TcpSegment) -> None:
    wire = scapy_segment(**fields)
    parsed = TcpSegment.parse(wire, SRC, DST)
    assert parsed.src_port == expected.src_port and parsed.dst_port == expected.dst_port
    assert (parsed.seq, parsed.ack, parsed.flags) == (expected.seq, expected.ack, expected.flags)
    assert (parsed.window, parsed.urgent) == (expected.window, expected.urgent)
    assert bytes(parsed.payload) == bytes(expected.payload)
    assert parsed.options == expected.options
    # Our encoder lays options out the way the scapy list above does, so the bytes match.
    assert expected.emit(SRC, DST) == wire


def test_options_that_we_skip_or_stop_at() -> None:
    wire = scapy_segment(sport=1, dport=2, flags="S",
                         options=[("SAck", (1, 2)), ("MSS", 1000), ("EOL", None)])
    assert TcpSegment.parse(wire, SRC, DST).options == TcpOptions(mss=1000, sack_blocks=((1, 2),))
    # Everything after EOL is padding and ignored, even what looks like an option.
    after_eol = _with_options(bytes([0, 2, 4, 5, 0xB4, 1, 1, 1]))
    assert TcpSegment.parse(after_eol, SRC, DST).options == NO_OPTIONS
    # An unknown kind with a sane length is skipped (RFC 9293 3.2).
    unknown = _with_options(bytes([30, 4, 0, 0, 2, 4, 0x05, 0xB4]))
    assert TcpSegment.parse(unknown, SRC, DST).options == TcpOptions(mss=1460)


def _refresh_checksum(segment: bytes) -> bytes:
    from vdev.wire.checksum import internet_checksum, pseudo_header_sum

    buf = bytearray(segment)
    buf[16:18] = b"\x00\x00"
    struct.pack_into("!H", buf, 16, internet_checksum(buf, pseudo_header_sum(SRC, DST, 6, len(buf))))
    return bytes(buf)


def _with_options(options: bytes, *, flags: int = SYN, offset_words: int | None = None) -> bytes:
    header_len = 20 + len(options)
    words = header_len // 4 if offset_words is None else offset_words
    header = struct.pack("!HHIIBBHHH", 1000, 2000, 1, 0, words << 4, flags, 100, 0, 0)
    return _refresh_checksum(header + options)


BASE = TcpSegment(1000, 2000, 1, 0, ACK, 100, b"data").emit(SRC, DST)


@pytest.mark.parametrize(
    ("segment", "error"),
    [
        pytest.param(b"", TruncatedError, id="empty"),
        pytest.param(BASE[:19], TruncatedError, id="short-header"),
        pytest.param(_with_options(b"", offset_words=4), IntegrityError, id="offset-below-5"),
        pytest.param(_with_options(b"", offset_words=6), TruncatedError, id="offset-past-end"),
        pytest.param(BASE[:-1] + bytes([BASE[-1] ^ 1]), ChecksumError, id="bad-checksum"),
        pytest.param(_refresh_checksum(b"\x00\x00" + BASE[2:]), SanityError, id="src-port-0"),
        pytest.param(_refresh_checksum(BASE[:2] + b"\x00\x00" + BASE[4:]), SanityError, id="dst-port-0"),
        pytest.param(_with_options(b"", flags=SYN | FIN), SanityError, id="syn-fin"),
        pytest.param(_with_options(b"", flags=SYN | RST), SanityError, id="syn-rst"),
        pytest.param(_with_options(bytes([2, 0, 0, 0])), SanityError, id="option-length-0"),
        pytest.param(_with_options(bytes([2, 1, 0, 0])), SanityError, id="option-length-1"),
        pytest.param(_with_options(bytes([30, 9, 0, 0])), SanityError, id="option-overruns"),
        pytest.param(_with_options(bytes([1, 1, 1, 2])), SanityError, id="no-length-byte"),
        pytest.param(_with_options(bytes([2, 3, 5, 0])), SanityError, id="mss-length-3"),
        pytest.param(_with_options(bytes([3, 4, 7, 0])), SanityError, id="wscale-length-4"),
        pytest.param(_with_options(bytes([4, 3, 0, 0])), SanityError, id="sackok-length-3"),
        pytest.param(_with_options(bytes([8, 6, 0, 0, 0, 0, 0, 0])), SanityError, id="ts-length-6"),
        pytest.param(_with_options(bytes([5, 2, 1, 1])), SanityError, id="sack-no-blocks"),
        pytest.param(_with_options(bytes([5, 6, 0, 0, 0, 1, 1, 1])), SanityError, id="sack-half-block"),
        pytest.param(_with_options(bytes([5, 11]) + bytes(10)), SanityError, id="sack-length-11"),
        pytest.param(_with_options(bytes([5, 10]) + bytes(6)), SanityError, id="sack-overruns"),
        pytest.param(_with_options(bytes([5, 42]) + bytes(38)), SanityError, id="sack-five-blocks"),
    ],
)
def test_bad_segments_raise_the_right_error(segment: bytes, error: type[WireError]) -> None:
    with pytest.raises(error):
        TcpSegment.parse(segment, SRC, DST)


def test_checksum_covers_the_pseudo_header() -> None:
    with pytest.raises(ChecksumError):
        TcpSegment.parse(BASE, SRC, bytes([198, 51, 100, 8]))
    assert TcpSegment.parse(BASE, SRC, bytes([198, 51, 100, 8]), verify_checksum=False).seq == 1


def test_payload_is_a_view_not_a_copy() -> None:
    buf = bytearray(BASE)
    parsed = TcpSegment.parse(buf, SRC, DST)
    assert isinstance(parsed.payload, memoryview)
    buf[-1] = ord("X")
    assert bytes(parsed.payload) == b"datX"


def test_seg_len_counts_syn_and_fin() -> None:
    assert TcpSegment(1, 2, 0, 0, SYN, 0).seg_len == 1
    assert TcpSegment(1, 2, 0, 0, FIN | ACK, 0, b"abc").seg_len == 4
    assert TcpSegment(1, 2, 0, 0, ACK, 0, b"abc").seg_len == 3


def test_emit_refuses_oversized_segments() -> None:
    with pytest.raises(ValueError):
        TcpSegment(1, 2, 0, 0, ACK, 0, bytes(65516)).emit(SRC, DST)


segments = st.builds(
    TcpSegment,
    src_port=st.integers(1, 0xFFFF),
    dst_port=st.integers(1, 0xFFFF),
    seq=st.integers(0, 0xFFFFFFFF),
    ack=st.integers(0, 0xFFFFFFFF),
    flags=st.integers(0, 0xFF).filter(lambda f: not (f & SYN and f & (FIN | RST))),
    window=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=64),
    options=st.builds(
        TcpOptions,
        mss=st.none() | st.integers(0, 0xFFFF),
        window_scale=st.none() | st.integers(0, 255),
        sack_permitted=st.booleans(),
        timestamps=st.none() | st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)),
    ),
    urgent=st.integers(0, 0xFFFF),
)


@given(segments)
@settings(max_examples=300, deadline=None)
def test_emit_then_parse_round_trips(segment: TcpSegment) -> None:
    wire = segment.emit(SRC, DST)
    parsed = TcpSegment.parse(wire, SRC, DST)
    assert (parsed.src_port, parsed.dst_port, parsed.seq, parsed.ack) == (
        segment.src_port, segment.dst_port, segment.seq, segment.ack)
    assert (parsed.flags, parsed.window, parsed.urgent) == (segment.flags, segment.window, segment.urgent)
    assert parsed.options == segment.options
    assert bytes(parsed.payload) == segment.payload


def test_sack_blocks_golden_and_bounded() -> None:
    blocks = ((0xFFFFFF00, 0x100), (5000, 6460), (7000, 8000), (1, 2))
    wire = scapy_segment(sport=80, dport=40000, seq=9, ack=5000, flags="A", window=300,
                         options=[("NOP", None), ("NOP", None), ("SAck", tuple(x for b in blocks for x in b))])
    parsed = TcpSegment.parse(wire, SRC, DST)
    assert parsed.options == TcpOptions(sack_blocks=blocks)
    assert TcpSegment(80, 40000, 9, 5000, ACK, 300, b"", TcpOptions(sack_blocks=blocks)).emit(SRC, DST) == wire
    with pytest.raises(ValueError):
        TcpOptions(sack_blocks=blocks + ((3, 4),)).encode()


@given(
    st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)), min_size=1, max_size=4),
    st.binary(max_size=32),
)
@settings(max_examples=200, deadline=None)
def test_sack_blocks_round_trip(blocks: list[tuple[int, int]], payload: bytes) -> None:
    segment = TcpSegment(1, 2, 3, 4, ACK, 5, payload, TcpOptions(sack_blocks=tuple(blocks)))
    parsed = TcpSegment.parse(segment.emit(SRC, DST), SRC, DST)
    assert parsed.options.sack_blocks == tuple(blocks)
    assert bytes(parsed.payload) == payload


@given(st.binary(max_size=120))
@settings(max_examples=500, deadline=None)
def test_random_bytes_raise_only_wire_errors(data: bytes) -> None:
    for verify in (True, False):
        try:
            TcpSegment.parse(data, SRC, DST, verify_checksum=verify)
        except WireError:
            pass


@given(segments, st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6))
@settings(max_examples=300, deadline=None)
def test_mutated_segments_raise_only_wire_errors(
    segment: TcpSegment, mutations: list[tuple[int, int]]
) -> None:
    buf = bytearray(segment.emit(SRC, DST))
    for position, value in mutations:
        buf[position % len(buf)] = value
    try:
        TcpSegment.parse(buf, SRC, DST, verify_checksum=False)
    except WireError:
        pass
