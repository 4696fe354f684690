"""The compiled fast path (libos.fast) against the pure-Python reference, byte for byte.

Hypothesis drives both with the same inputs, hostile ones included (flipped bytes,
truncations, lying lengths and descriptors), and compares frames, verdicts and ring state.
Run on the sanitizer build with ARRAKIS_FAST_SANITIZE=1 (see libos/fast/__init__.py).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos import fast
from libos.net import fastpath
from vdev import layout
from vdev.wire.checksum import internet_checksum, ones_complement_sum, pseudo_header_sum
from vdev.wire.tcp import TcpOptions, TcpSegment

pytestmark = pytest.mark.skipif(not fast.ENABLED, reason="ARRAKIS_PURE=1: no compiled path to compare")

MAC_A = bytes.fromhex("020000000001")
MAC_B = bytes.fromhex("020000000002")
ports = st.integers(1, 65535)
u32 = st.integers(0, 2**32 - 1)
addresses = st.binary(min_size=4, max_size=4)
options = st.builds(
    TcpOptions,
    mss=st.none() | st.integers(0, 65535),
    window_scale=st.none() | st.integers(0, 14),
    sack_permitted=st.booleans(),
    timestamps=st.none() | st.tuples(u32, u32),
)


def c_tcp_frame(*args: object, options: bytes, payload: bytes) -> bytes | None:
    out = bytearray(2048)
    n = fast.lib.arx_tcp_frame(
        fast.ffi.from_buffer("uint8_t[]", out, require_writable=True), len(out), *args,
        options, len(options), payload, len(payload),
    )  # fmt: skip
    return None if n < 0 else bytes(out[:n])


@settings(max_examples=300, deadline=None)
@given(
    src=addresses, dst=addresses, ttl=st.integers(1, 255), ident=st.integers(0, 65535),
    sport=ports, dport=ports, seq=u32, ack=u32, flags=st.integers(0, 255),
    window=st.integers(0, 65535), opts=options, payload=st.binary(max_size=1460),
)  # fmt: skip
def test_tcp_frames_equal_the_python_encoders(
    src: bytes, dst: bytes, ttl: int, ident: int, sport: int, dport: int, seq: int, ack: int,
    flags: int, window: int, opts: TcpOptions, payload: bytes,
) -> None:  # fmt: skip
    encoded = opts.encode()
    segment = TcpSegment(sport, dport, seq, ack, flags, window, payload, opts).emit(src, dst)
    expected = None
    if 14 + 20 + len(segment) <= layout.VNIC_MAX_FRAME:
        expected = fastpath.ipv4_frame(
            MAC_B, MAC_A, src, dst, fastpath.address_sum(src) + fastpath.address_sum(dst), ttl, ident, 6, segment
        )
    got = c_tcp_frame(
        MAC_B + MAC_A, src + dst, ttl, ident, sport, dport, seq, ack, flags, window,
        options=encoded, payload=payload,
    )  # fmt: skip
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(src=addresses, dst=addresses, ttl=st.integers(1, 255), ident=st.integers(0, 65535),
       sport=ports, dport=ports, payload=st.binary(max_size=1500))  # fmt: skip
def test_udp_frames_equal_the_python_encoder(
    src: bytes, dst: bytes, ttl: int, ident: int, sport: int, dport: int, payload: bytes
) -> None:
    expected = None
    if 42 + len(payload) <= layout.VNIC_MAX_FRAME:
        expected = fastpath.udp_frame(
            MAC_B, MAC_A, src, dst, fastpath.address_sum(src) + fastpath.address_sum(dst), ttl, ident,
            sport, dport, payload, fastpath.payload_sum(payload),
        )  # fmt: skip
    out = bytearray(2048)
    n = fast.lib.arx_udp_frame(
        fast.ffi.from_buffer("uint8_t[]", out, require_writable=True), len(out), MAC_B + MAC_A, src + dst,
        ttl, ident, sport, dport, payload, len(payload),
    )  # fmt: skip
    assert (None if n < 0 else bytes(out[:n])) == expected


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=3000), initial=st.integers(0, 0xFFFF))
def test_checksum_equals_the_python_one(data: bytes, initial: int) -> None:
    assert fast.lib.arx_checksum(data, len(data), initial) == internet_checksum(data, initial)


def python_kind(frame: bytes) -> int:
    """The reference verdict: what the Python parsers say about the same frame."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] != 0x45:
        return fast.KIND_OTHER
    total = int.from_bytes(frame[16:18], "big")
    if total < 20 or total > len(frame) - 14 or int.from_bytes(frame[20:22], "big") & 0x3FFF:
        return fast.KIND_OTHER
    proto = frame[23]
    l4 = frame[34 : 14 + total]
    if proto == 6 and len(l4) < 20:
        return fast.KIND_OTHER
    if proto == 17 and (len(l4) < 8 or int.from_bytes(l4[4:6], "big") != len(l4)):
        return fast.KIND_OTHER
    if proto not in (6, 17):
        return fast.KIND_OTHER
    # RFC 1071: a header or segment with a valid checksum sums to 0xffff.
    if ones_complement_sum(frame[14:34]) != 0xFFFF:
        return fast.KIND_BAD_CSUM
    if proto == 17 and l4[6:8] == b"\x00\x00":
        return fast.KIND_UDP
    if ones_complement_sum(l4, pseudo_header_sum(frame[26:30], frame[30:34], proto, len(l4))) != 0xFFFF:
        return fast.KIND_BAD_CSUM
    return fast.KIND_TCP if proto == 6 else fast.KIND_UDP


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    src, dst = draw(addresses), draw(addresses)
    payload = draw(st.binary(max_size=200))
    if draw(st.booleans()):
        frame = fastpath.udp_frame(
            MAC_B, MAC_A, src, dst, fastpath.address_sum(src) + fastpath.address_sum(dst), 64, 1,
            draw(ports), draw(ports), payload, fastpath.payload_sum(payload),
        )  # fmt: skip
    else:
        segment = TcpSegment(draw(ports), draw(ports), draw(u32), draw(u32), 0x10, 100, payload,
                             draw(options)).emit(src, dst)  # fmt: skip
        frame = fastpath.ipv4_frame(
            MAC_B, MAC_A, src, dst, fastpath.address_sum(src) + fastpath.address_sum(dst), 64, 1, 6, segment
        )
    raw = bytearray(frame)
    for _ in range(draw(st.integers(0, 3))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(raw)))
    if draw(st.booleans()):
        raw = raw[:cut]
    return bytes(raw) + draw(st.binary(max_size=8))


@settings(max_examples=1000, deadline=None)
@given(frame=hostile_frames())
def test_classify_agrees_with_the_python_parsers(frame: bytes) -> None:
    assert fast.lib.arx_classify(frame, len(frame)) == python_kind(frame)


DESC = layout.VNIC_DESC


@settings(max_examples=300, deadline=None)
@given(
    size_log=st.integers(3, 6),
    start=u32,
    completions=st.lists(st.tuples(st.integers(0, 65535), st.integers(0, 5), st.binary(max_size=64)), max_size=64),
)
def test_rx_burst_copies_what_the_pure_driver_would(
    size_log: int, start: int, completions: list[tuple[int, int, bytes]]
) -> None:
    """Lying lengths and error statuses from the device: counted, never copied, slot reposted."""
    size = 1 << size_log
    completions = completions[:size]
    buf = layout.VNIC_BUFFER_SIZE
    descs = bytearray(size * DESC.size)
    bufs = bytearray(size * buf)
    for k, (length, status, content) in enumerate(completions):
        slot = (start + k) & (size - 1)
        DESC.pack_into(descs, slot * DESC.size, 0xDEAD, length, 7, status, 9)
        bufs[slot * buf : slot * buf + len(content)] = content
    expected = [
        bytes(bufs[((start + k) & (size - 1)) * buf :][:length])
        for k, (length, status, _) in enumerate(completions)
        if status == layout.DESC_OK and 0 < length <= buf
    ]
    ffi = fast.ffi
    out = bytearray(size * buf)
    lengths = ffi.new("uint32_t[]", size)
    kinds = ffi.new("uint8_t[]", size)
    errors = ffi.new("uint32_t *")
    n = fast.lib.arx_rx_burst(
        ffi.cast("struct arx_desc *", ffi.from_buffer("uint8_t[]", descs, require_writable=True)),
        size - 1, ffi.from_buffer("uint8_t[]", bufs), len(bufs), 0x1000, buf, start, len(completions),
        ffi.from_buffer("uint8_t[]", out, require_writable=True), len(out), lengths, kinds, errors,
    )  # fmt: skip
    got = [bytes(out[i * buf : i * buf + lengths[i]]) for i in range(n)]
    assert got == expected
    assert errors[0] == len(completions) - len(expected)
    for k in range(len(completions)):
        slot = (start + k) & (size - 1)
        assert DESC.unpack_from(descs, slot * DESC.size) == (0x1000 + slot * buf, buf, 0, 0, 0)


def test_rx_burst_refuses_a_burst_larger_than_its_arena() -> None:
    ffi = fast.ffi
    descs = ffi.new("struct arx_desc[]", 8)
    bufs = ffi.new("uint8_t[]", 8 * 2048)
    out = ffi.new("uint8_t[]", 2048)
    lengths = ffi.new("uint32_t[]", 8)
    kinds = ffi.new("uint8_t[]", 8)
    errors = ffi.new("uint32_t *")
    assert fast.lib.arx_rx_burst(descs, 7, bufs, 8 * 2048, 0, 2048, 0, 2, out, 2048, lengths, kinds, errors) == -1
    assert fast.lib.arx_rx_burst(descs, 15, bufs, 8 * 2048, 0, 2048, 0, 1, out, 2048, lengths, kinds, errors) == -1


def test_tx_post_refuses_oversized_and_empty_frames() -> None:
    ffi = fast.ffi
    descs = ffi.new("struct arx_desc[]", 8)
    bufs = ffi.new("uint8_t[]", 8 * 2048)
    assert fast.lib.arx_tx_post(descs, 7, bufs, 8 * 2048, 0, 2048, 3, b"x" * 2049, 2049) == -1
    assert fast.lib.arx_tx_post(descs, 7, bufs, 8 * 2048, 0, 2048, 3, b"", 0) == -1
    assert fast.lib.arx_tx_post(descs, 7, bufs, 8 * 2048, 0x100, 2048, 11, b"abc", 3) == 0
    assert (descs[3].iova, descs[3].length, descs[3].status) == (0x100 + 3 * 2048, 3, 0)
    assert bytes(ffi.buffer(bufs + 3 * 2048, 3)) == b"abc"


def test_missing_module_is_an_error_unless_pure_is_asked_for() -> None:
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.startswith('libos.fast._arx'): raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import libos.fast as f; print('enabled', f.ENABLED)\n"
    )
    env_pure = {"ARRAKIS_PURE": "1", "PATH": "/usr/bin:/bin"}
    missing = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode != 0 and "FastPathMissing" in missing.stderr
    pure = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env_pure)
    assert pure.returncode == 0 and "enabled False" in pure.stdout


def test_struct_layout_matches_vdev() -> None:
    assert fast.ffi.sizeof("struct arx_desc") == DESC.size == struct.calcsize("<QHHHH")
