"""The TCP endpoint on the compiled path against the pure-Python reference.

Hypothesis writes scenarios: a handshake (passive or active, with or without window scaling
and SACK, the peer's sequence space near the 2**32 wrap or not), then steps: bursts of the
peer's segments, hostile ones included (bad checksums, lying lengths and data offsets,
truncated or odd options, segments out of the window, overlapping or ahead of a hole, RST
and SYN inside the window, acknowledgments of data never sent, zero windows, any flag
byte), the application reading, writing and closing, and time passing. The same scenario
runs in two worlds (``tools/tcp_worlds.py``) that differ only in the path; after every step
their frames on the wire must be equal byte for byte, and so must the bytes delivered to
the application, the events, the connection's state and every counter.

The comparison needs the compiled module but not ``ENABLED``: under ARRAKIS_PURE=1 the
pure world is the libOS's own path and the compiled world loads the module directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libos import fast
from libos.net.tcp import TcpConfig, TcpState
from tests.helpers import run_sanitized_pytest
from tools.tcp_worlds import PEER_IP, PEER_PORT, PORT, World, frame, layer_state, snapshot
from vdev.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpSegment

COMPILED: tuple[Any, Any] | None
try:
    COMPILED = fast.compiled()
except fast.FastPathMissing:  # pragma: no cover - the set-up builds it
    COMPILED = None

pytestmark = pytest.mark.skipif(COMPILED is None, reason="libos.fast is not built")

REPO = Path(__file__).resolve().parent.parent
# Fewer examples in the sanitizer run, where every C call costs several times more.
EXAMPLES = int(os.environ.get("TCPDIFF_EXAMPLES", "300"))


@dataclass(frozen=True)
class Segment:
    seq_mode: str  # "next": right after the previous one; "rel": seq_offset from RCV.NXT
    seq_offset: int
    ack_offset: int  # from SND.UNA; or, with ack_all, the fraction of the flight acked (%)
    flags: int
    window: int  # -1: the window the peer last announced (what a steady peer sends)
    length: int
    options: str
    corrupt: str
    total_delta: int
    pad: int
    flip: bool  # payload bytes that disagree with what was sent before at that place
    ack_all: bool = False


@dataclass(frozen=True)
class Scenario:
    active: bool
    peer_isn: int
    window_scale: int | None
    sack: bool
    peer_mss: int
    recv_buffer: int
    mss: int
    steps: list[tuple[str, object]]


_flags = st.one_of(
    st.sampled_from([ACK, ACK, ACK | PSH, ACK | PSH, ACK | FIN, ACK | PSH | FIN, RST, RST | ACK, SYN,
                     SYN | ACK, 0, FIN, ACK | 0x20, ACK | 0x40 | 0x80]),
    st.integers(0, 255),
)  # fmt: skip
_seq_offset = st.one_of(
    st.just(0), st.integers(-3000, 3000), st.integers(-70_000, 70_000),
    st.integers(-(2**31) - 5, -(2**31) + 5), st.integers(2**31 - 5, 2**31 + 5),
)  # fmt: skip
_ack_offset = st.one_of(st.just(0), st.integers(0, 3000), st.integers(-70_000, 70_000))
_segment = st.builds(
    Segment,
    seq_mode=st.sampled_from(["next", "next", "rel"]),
    seq_offset=_seq_offset,
    ack_offset=_ack_offset,
    flags=_flags,
    window=st.one_of(st.just(65535), st.just(0), st.integers(0, 65535)),
    length=st.one_of(st.just(0), st.integers(1, 100), st.integers(100, 1460)),
    options=st.sampled_from(["", "", "", "sack", "timestamps", "mss", "nops", "truncated",
                             "zero_length", "garbage", "offset_short", "offset_long"]),
    corrupt=st.sampled_from(["", "", "", "", "tcp_csum", "ip_csum", "total", "cut"]),
    total_delta=st.integers(-60, 60),
    pad=st.sampled_from([0, 0, 6, 30]),
    flip=st.booleans(),
)  # fmt: skip
# The segments of a well-behaved peer: in order, ACK or ACK|PSH, the window unchanged,
# acknowledging some or all of our flight. Most of them are header prediction's case, so
# the compiled world takes its fast path on them while the others go through Python.
_good_segment = st.builds(
    Segment,
    seq_mode=st.just("next"),
    seq_offset=st.just(0),
    ack_offset=st.sampled_from([0, 50, 100, 100]),
    flags=st.sampled_from([ACK, ACK | PSH]),
    window=st.sampled_from([-1, -1, -1, 65535]),
    length=st.one_of(st.just(0), st.integers(1, 1460)),
    options=st.just(""),
    corrupt=st.just(""),
    total_delta=st.just(0),
    pad=st.sampled_from([0, 6]),
    flip=st.just(False),
    ack_all=st.just(True),
)
_step = st.one_of(
    st.tuples(st.just("burst"), st.lists(_segment | _good_segment, min_size=1, max_size=4)),
    st.tuples(st.just("burst"), st.lists(_good_segment, min_size=1, max_size=6)),
    st.tuples(st.just("recv"), st.integers(1, 70_000)),
    st.tuples(st.just("send"), st.integers(1, 9000)),
    st.tuples(st.just("close"), st.none()),
    st.tuples(st.just("advance"), st.sampled_from([0.001, 0.03, 0.05, 0.3, 1.1, 3.0, 70.0])),
)
_scenario = st.builds(
    Scenario,
    active=st.booleans(),
    peer_isn=st.one_of(st.just(1000), st.integers(2**32 - 3000, 2**32 - 1), st.integers(0, 2**32 - 1)),
    window_scale=st.one_of(st.none(), st.integers(0, 14)),
    sack=st.booleans(),
    peer_mss=st.sampled_from([536, 1460, 100]),
    recv_buffer=st.sampled_from([65535, 4096, 300_000]),
    mss=st.sampled_from([1460, 536]),
    steps=st.lists(_step, min_size=1, max_size=30),
)


def _options(kind: str, snd_una: int) -> bytes:
    if kind == "sack":
        left = (snd_una + 100) & 0xFFFFFFFF
        right = (snd_una + 600) & 0xFFFFFFFF
        return b"\x01\x01\x05\x0a" + left.to_bytes(4, "big") + right.to_bytes(4, "big")
    if kind == "timestamps":
        return b"\x01\x01\x08\x0a" + (12345).to_bytes(4, "big") + (0).to_bytes(4, "big")
    if kind == "mss":
        return b"\x02\x04\x05\xb4"
    if kind == "nops":
        return b"\x01\x01\x01\x00"
    if kind == "truncated":
        return b"\x01\x01\x08\x0a"  # timestamps claiming 10 bytes of 4
    if kind == "zero_length":
        return b"\x05\x00\x01\x01"
    if kind == "garbage":
        return b"\xfe\x03\x99\x07\x02\x09\x00\x00"
    return b""


class Duo:
    """The pure and the compiled world, driven alike."""

    def __init__(self, config: TcpConfig, predict: bool) -> None:
        self.pure = World(config, None)
        self.compiled = World(config, COMPILED, predict)
        self.now = 0.0
        self.ident = 0

    def both(self) -> tuple[World, World]:
        return self.pure, self.compiled

    def deliver(self, frames: list[bytes]) -> None:
        for world in self.both():
            world.deliver(frames, self.now)

    def turn(self) -> None:
        for world in self.both():
            world.turn(self.now)

    def check(self) -> list[bytes]:
        """Equal output, events, state and counters; returns the frames sent."""
        pure, compiled = self.both()
        sent = pure.take_wire()
        assert compiled.take_wire() == sent
        pure_events = [(conn.four_tuple, event) for conn, event in pure.tcp.pop_events()]
        assert [(conn.four_tuple, event) for conn, event in compiled.tcp.pop_events()] == pure_events
        assert layer_state(compiled) == layer_state(pure)
        if pure.conn is not None:
            assert compiled.conn is not None
            assert snapshot(compiled.conn) == snapshot(pure.conn)
        return sent

    def next_ident(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident


def _open(duo: Duo, scenario: Scenario) -> bool:
    """The handshake; False when the peer's options make one impossible here."""
    options = b"\x02\x04" + scenario.peer_mss.to_bytes(2, "big")
    if scenario.window_scale is not None:
        options += b"\x01\x03\x03" + bytes([scenario.window_scale])
    if scenario.sack:
        options += b"\x01\x01\x04\x02"
    isn = scenario.peer_isn
    if scenario.active:
        for world in duo.both():
            world.conn = world.tcp.connect(world.stack.ip, PEER_IP, PEER_PORT, duo.now, local_port=PORT)
            world.turn(duo.now)
        (syn,) = duo.check()
        iss = TcpSegment.parse(syn[34:], duo.pure.stack.ip, PEER_IP).seq
        duo.deliver([frame(isn, iss + 1, SYN | ACK, 65535, b"", options, ident=duo.next_ident())])
        duo.check()
    else:
        for world in duo.both():
            world.tcp.listen(PORT)
        duo.deliver([frame(isn, 0, SYN, 65535, b"", options, ident=duo.next_ident())])
        (syn_ack,) = duo.check()
        iss = TcpSegment.parse(syn_ack[34:], duo.pure.stack.ip, PEER_IP).seq
        duo.deliver([frame(isn + 1, iss + 1, ACK, 65535, b"", ident=duo.next_ident())])
        for world in duo.both():
            world.conn = world.tcp.accept(PORT)
        duo.check()
    assert duo.pure.conn is not None
    return duo.pure.conn.state == TcpState.ESTABLISHED


def _burst(duo: Duo, segments: list[Segment]) -> None:
    conn = duo.pure.conn
    assert conn is not None
    rcv_nxt = conn.rcv_nxt
    snd_una = conn.snd_una
    next_seq = rcv_nxt
    frames = []
    for seg in segments:
        seq = next_seq if seg.seq_mode == "next" else rcv_nxt + seg.seq_offset
        # The peer's bytes are a function of their place in its stream (as a correct peer's
        # retransmissions are), unless this segment lies about them.
        start = (seq - conn.irs) & 0xFF
        payload = bytes((start + i) & 0xFF for i in range(seg.length))
        if seg.flip and payload:
            payload = bytes(b ^ 0x5A for b in payload)
        options = _options(seg.options, snd_una)
        data_offset = None
        if seg.options == "offset_short":
            options, data_offset = b"\x02\x04\x05\xb4", 3
        elif seg.options == "offset_long":
            data_offset = 15
        ack = snd_una + seg.ack_offset
        if seg.ack_all:
            ack = snd_una + ((conn.snd_max - snd_una) & 0xFFFFFFFF) * seg.ack_offset // 100
        window = seg.window
        if window < 0:
            window = min(conn.snd_wnd >> conn._tcb.snd_shift, 0xFFFF)
        raw = frame(
            seq, ack, seg.flags, window, payload, options,
            data_offset=data_offset, ident=duo.next_ident(), total_delta=seg.total_delta,
            pad=seg.pad, corrupt=seg.corrupt,
        )  # fmt: skip
        if seg.corrupt == "cut":
            raw = raw[: max(14, len(raw) - 1 - seg.total_delta % 40)]
        frames.append(raw)
        next_seq = (seq + seg.length) & 0xFFFFFFFF
    duo.deliver(frames)


def run_scenario(scenario: Scenario, predict: bool = True) -> Duo:
    """Run ``scenario`` in both worlds, checking after every step; the worlds at the end."""
    config = TcpConfig(recv_buffer=scenario.recv_buffer, mss=scenario.mss, msl=10.0)
    duo = Duo(config, predict)
    if not _open(duo, scenario):
        return duo
    pure, compiled = duo.both()
    assert pure.conn is not None and compiled.conn is not None
    for action, argument in scenario.steps:
        if action == "burst":
            assert isinstance(argument, list)
            _burst(duo, argument)
        elif action == "recv":
            assert isinstance(argument, int)
            assert compiled.conn.recv(argument) == pure.conn.recv(argument)
            duo.turn()
        elif action == "send":
            assert isinstance(argument, int)
            data = bytes(i & 0xFF for i in range(argument))
            results: list[object] = []
            for world in duo.both():
                assert world.conn is not None
                try:
                    results.append(world.conn.send(data))
                except OSError as exc:
                    results.append(type(exc))
            assert results[0] == results[1]
            duo.turn()
        elif action == "close":
            for world in duo.both():
                assert world.conn is not None
                world.conn.close(duo.now)
            duo.turn()
        else:
            assert isinstance(argument, float)
            duo.now += argument
            duo.turn()
        duo.check()
    return duo


@pytest.mark.parametrize("predict", [True, False], ids=["prediction", "no-prediction"])
@given(scenario=_scenario)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_compiled_endpoint_matches_the_pure_one(predict: bool, scenario: Scenario) -> None:
    run_scenario(scenario, predict)


def _in_order_scenario(active: bool, sack: bool, window_scale: int | None) -> Scenario:
    """The established-connection case the fast path is for: in-order data both ways."""
    def data(length: int, flags: int = ACK | PSH, ack_offset: int = 0) -> Segment:
        return Segment("next", 0, ack_offset, flags, 65535 >> (window_scale or 0), length, "", "", 0, 0, False)

    steps: list[tuple[str, object]] = []
    for round_number in range(6):
        steps.append(("burst", [data(100 + round_number), data(1460, ACK)]))
        steps.append(("send", 300 + round_number))
        steps.append(("burst", [data(0, ACK, 300 + round_number)]))
        steps.append(("recv", 70_000))
        steps.append(("advance", 0.05))
    steps.append(("burst", [data(10, ACK | FIN)]))
    steps.append(("close", None))
    steps.append(("burst", [data(0, ACK, 1)]))
    steps.append(("advance", 70.0))
    return Scenario(active, 2**32 - 700, window_scale, sack, 1460, 300_000, 1460, steps)


@pytest.mark.parametrize("active", [False, True])
@pytest.mark.parametrize(("sack", "window_scale"), [(False, None), (True, 7)])
def test_in_order_exchange_matches(active: bool, sack: bool, window_scale: int | None) -> None:
    duo = run_scenario(_in_order_scenario(active, sack, window_scale))
    # The comparison means something only if the compiled world took the fast case: the
    # in-order data segments and pure ACKs of the six rounds (the handshake, the FIN and
    # what follows it take the full path, and so does a first segment whose scaled window
    # differs from the SYN's unscaled one).
    assert duo.compiled.tcp.counters.predicted >= 6 * 3 - 1
    assert duo.pure.tcp.counters.predicted == 0


def test_sanitized_build_passes_the_differential_test() -> None:
    """The same differential test against the AddressSanitizer/UBSan build of libos.fast."""
    built = subprocess.run([sys.executable, "-m", "libos.fast.build", "--sanitize"], cwd=REPO,
                           env=dict(os.environ, ARRAKIS_PURE="1"), capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.exists(libasan), "gcc's libasan.so is missing"
    env = dict(os.environ, ARRAKIS_FAST_SANITIZE="1", LD_PRELOAD=libasan, TCPDIFF_EXAMPLES="100",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env.pop("ARRAKIS_PURE", None)
    result = run_sanitized_pytest(env, __file__, "-k", "not sanitized", timeout=900)
    assert "passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
    loaded = subprocess.run(
        [sys.executable, "-c", "import libos.fast as f; print(f.compiled()[1])"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    assert "_arx_fast_san" in loaded.stdout + loaded.stderr, loaded
