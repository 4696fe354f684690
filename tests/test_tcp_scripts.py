"""Packet scripts in the spirit of packetdrill: inject one segment, expect exactly these
segments out. The layer under test is at LOCAL:80; the scripted peer at REMOTE:REMOTE_PORT
starts its sequence space at PEER_ISN. The fake clock is ``Script.now``.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libos.net.tcp import (
    Closed,
    CloseReason,
    Connected,
    DataReadable,
    PeerClosed,
    Reset,
    TcpConfig,
    TcpConnection,
    TcpCounters,
    TcpLayer,
    TcpState,
)
from vdev.wire.tcp import ACK, FIN, NO_OPTIONS, PSH, RST, SYN, TcpOptions, TcpSegment

LOCAL = bytes([192, 0, 2, 1])
REMOTE = bytes([198, 51, 100, 7])
REMOTE_PORT = 40000
PEER_ISN = 1000
# A 64 KiB receive buffer needs no window scaling, which keeps the numbers readable.
SCRIPT_CONFIG = TcpConfig(recv_buffer=65535, msl=10.0)

_FLAG_LETTERS = {"S": SYN, "F": FIN, "R": RST, "P": PSH, ".": ACK}

Expected = tuple[str, int, int] | tuple[str, int, int, int]


def flags_of(text: str) -> int:
    value = 0
    for letter in text:
        value |= _FLAG_LETTERS[letter]
    return value


class Script:
    def __init__(self, config: TcpConfig = SCRIPT_CONFIG) -> None:
        self.layer = TcpLayer(config, isn_key=b"script-key-16byt", rng=random.Random(0))
        self.now = 0.0
        self.iss = 0
        self.conn: TcpConnection | None = None

    def inject(
        self,
        flags: str,
        seq: int,
        ack: int = 0,
        *,
        window: int = 65535,
        payload: bytes = b"",
        options: TcpOptions = NO_OPTIONS,
        dport: int = 80,
    ) -> None:
        segment = TcpSegment(
            REMOTE_PORT, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags_of(flags), window,
            payload, options,
        )
        self.layer.segment_received(REMOTE, LOCAL, segment.emit(REMOTE, LOCAL), self.now)

    def output(self) -> list[TcpSegment]:
        segments = []
        for dst, src, raw in self.layer.drain_outbox():
            assert (dst, src) == (REMOTE, LOCAL)
            segments.append(TcpSegment.parse(raw, src, dst))
        return segments

    def expect(self, *expected: Expected) -> list[TcpSegment]:
        """Exactly these segments left: (flags, seq, ack[, payload length])."""
        segments = self.output()
        got = [
            (_flag_text(seg.flags), seg.seq, seg.ack, len(seg.payload)) for seg in segments
        ]
        want = [
            (flags, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, rest[0] if rest else 0)
            for flags, seq, ack, *rest in expected
        ]
        assert got == want
        return segments

    def advance(self, to: float) -> None:
        self.now = to
        deadline = self.layer.next_deadline()
        if deadline is not None and deadline <= to:
            self.layer.on_timer(to)

    def passive_open(self, *, peer_mss: int = 1460, peer_window: int = 65535) -> TcpConnection:
        self.layer.listen(80, backlog=4)
        self.inject("S", PEER_ISN, options=TcpOptions(mss=peer_mss, window_scale=0))
        (syn_ack,) = self.output()
        assert _flag_text(syn_ack.flags) == "S." and syn_ack.ack == PEER_ISN + 1
        self.iss = syn_ack.seq
        self.inject(".", PEER_ISN + 1, self.iss + 1, window=peer_window)
        self.expect()
        conn = self.layer.accept(80)
        assert conn is not None and conn.state == TcpState.ESTABLISHED
        self.conn = conn
        self.layer.pop_events()
        return conn


def _flag_text(flags: int) -> str:
    return "".join(letter for letter, bit in _FLAG_LETTERS.items() if flags & bit)



def test_passive_open() -> None:
    script = Script()
    script.layer.listen(80)
    script.inject("S", PEER_ISN, options=TcpOptions(mss=1200, window_scale=2))
    (syn_ack,) = script.output()
    assert _flag_text(syn_ack.flags) == "S." and syn_ack.ack == PEER_ISN + 1
    assert syn_ack.options == TcpOptions(mss=1460, window_scale=0)
    assert syn_ack.window == 65535
    iss = syn_ack.seq
    assert script.layer.accept(80) is None  # not before the handshake completes
    script.inject(".", PEER_ISN + 1, iss + 1, window=100)
    script.expect()
    conn = script.layer.accept(80)
    assert conn is not None and conn.state == TcpState.ESTABLISHED
    assert conn.snd_mss == 1200 and conn.snd_wnd == 400  # the peer's shift of 2 applies
    assert script.layer.pop_events() == [(conn, Connected())]


def test_syn_without_window_scale_gets_none_back() -> None:
    script = Script(TcpConfig())  # a 256 KiB buffer would want a shift of 3
    script.layer.listen(80)
    script.inject("S", PEER_ISN, options=TcpOptions(mss=1460))
    (syn_ack,) = script.output()
    assert syn_ack.options == TcpOptions(mss=1460)


def test_repeated_syn_gets_the_syn_ack_again() -> None:
    script = Script()
    script.layer.listen(80)
    script.inject("S", PEER_ISN)
    (first,) = script.output()
    script.now = 0.5
    script.inject("S", PEER_ISN)
    (second,) = script.expect(("S.", first.seq, PEER_ISN + 1))
    assert second.options == first.options


def test_syn_ack_retransmitted_then_half_open_expires() -> None:
    script = Script(TcpConfig(recv_buffer=65535, max_synack_retries=2))
    listener = script.layer.listen(80)
    script.inject("S", PEER_ISN)
    (syn_ack,) = script.output()
    script.advance(1.0)
    script.expect(("S.", syn_ack.seq, PEER_ISN + 1))
    script.advance(3.0)
    script.expect(("S.", syn_ack.seq, PEER_ISN + 1))
    script.advance(7.0)
    script.expect()
    assert script.layer.connection_count == 0 and listener.half_open == 0
    assert script.layer.counters.syn_received_expired == 1
    assert script.layer.pop_events() == []  # nobody had accepted it


def test_rst_in_syn_received_returns_to_listen() -> None:
    script = Script()
    listener = script.layer.listen(80)
    script.inject("S", PEER_ISN)
    script.output()
    script.inject("R", PEER_ISN + 1)
    script.expect()
    assert script.layer.connection_count == 0 and listener.half_open == 0
    assert script.layer.pop_events() == []


def test_bad_ack_in_syn_received_gets_rst() -> None:
    script = Script()
    script.layer.listen(80)
    script.inject("S", PEER_ISN)
    (syn_ack,) = script.output()
    script.inject(".", PEER_ISN + 1, syn_ack.seq + 5)
    script.expect(("R", syn_ack.seq + 5, 0))
    assert script.layer.connection_count == 1  # still waiting for the right ACK


def test_active_open() -> None:
    script = Script()
    conn = script.layer.connect(LOCAL, REMOTE, 80, 0.0, local_port=REMOTE_PORT)
    (syn,) = script.output()
    assert _flag_text(syn.flags) == "S"
    assert syn.options == TcpOptions(mss=1460, window_scale=0, sack_permitted=True)
    iss = syn.seq
    # Wrong ACK: RST at that sequence number, connection stays (RFC 9293 3.10.7.3).
    segment = TcpSegment(80, REMOTE_PORT, PEER_ISN, iss + 7, SYN | ACK, 65535)
    script.layer.segment_received(REMOTE, LOCAL, segment.emit(REMOTE, LOCAL), 0.0)
    script.expect(("R", iss + 7, 0))
    # An RST without an acceptable ACK is ignored.
    segment = TcpSegment(80, REMOTE_PORT, PEER_ISN, 0, RST, 0)
    script.layer.segment_received(REMOTE, LOCAL, segment.emit(REMOTE, LOCAL), 0.0)
    script.expect()
    assert conn.state == TcpState.SYN_SENT
    segment = TcpSegment(80, REMOTE_PORT, PEER_ISN, iss + 1, SYN | ACK, 5000, b"", TcpOptions(mss=900))
    script.layer.segment_received(REMOTE, LOCAL, segment.emit(REMOTE, LOCAL), 0.1)
    script.expect((".", iss + 1, PEER_ISN + 1))
    assert conn.state == TcpState.ESTABLISHED and conn.snd_mss == 900 and conn.snd_wnd == 5000
    assert script.layer.pop_events() == [(conn, Connected())]


def test_active_open_refused() -> None:
    script = Script()
    conn = script.layer.connect(LOCAL, REMOTE, 80, 0.0, local_port=REMOTE_PORT)
    (syn,) = script.output()
    segment = TcpSegment(80, REMOTE_PORT, 0, syn.seq + 1, RST | ACK, 0)
    script.layer.segment_received(REMOTE, LOCAL, segment.emit(REMOTE, LOCAL), 0.0)
    script.expect()
    assert conn.state == TcpState.CLOSED and conn.close_reason == CloseReason.REFUSED
    assert script.layer.pop_events() == [(conn, Reset()), (conn, Closed(CloseReason.REFUSED))]



def test_rst_with_exact_sequence_resets() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject("R", PEER_ISN + 1)
    script.expect()
    assert conn.state == TcpState.CLOSED and script.layer.connection_count == 0
    assert script.layer.pop_events() == [(conn, Reset()), (conn, Closed(CloseReason.RESET))]
    assert script.layer.counters.rst_received == 1


def test_in_window_rst_that_is_not_exact_gets_challenge_ack() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject("R", PEER_ISN + 1 + 100)
    script.expect((".", script.iss + 1, PEER_ISN + 1))
    assert conn.state == TcpState.ESTABLISHED
    assert script.layer.counters.challenge_acks == 1


def test_out_of_window_rst_is_dropped_silently() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject("R", PEER_ISN + 1 + 70_000)
    script.inject("R", PEER_ISN - 5)
    script.expect()
    assert conn.state == TcpState.ESTABLISHED
    assert script.layer.counters.drop_out_of_window == 2


def test_syn_in_established_gets_challenge_ack() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject("S", 123456)  # any sequence number (RFC 5961 4.2)
    script.expect((".", script.iss + 1, PEER_ISN + 1))
    script.inject("S", PEER_ISN + 1)
    script.expect((".", script.iss + 1, PEER_ISN + 1))
    assert conn.state == TcpState.ESTABLISHED
    assert script.layer.counters.challenge_acks == 2


def test_ack_for_unsent_data_is_answered_and_dropped() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject("P.", PEER_ISN + 1, script.iss + 1 + 10, payload=b"abc")
    script.expect((".", script.iss + 1, PEER_ISN + 1))
    assert conn.readable == 0


def test_ack_older_than_the_window_gets_challenge_ack() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject("P.", PEER_ISN + 1, script.iss + 1 - 70_000, payload=b"abc")
    script.expect((".", script.iss + 1, PEER_ISN + 1))
    assert conn.readable == 0
    assert script.layer.counters.drop_bad_ack == 1
    # An old ACK inside MAX.SND.WND is fine: the data is taken.
    script.inject("P.", PEER_ISN + 1, script.iss + 1 - 1000, payload=b"abc")
    assert conn.readable == 3


def test_challenge_acks_are_rate_limited() -> None:
    config = TcpConfig(recv_buffer=65535, challenge_ack_limit=5, challenge_ack_interval=1.0)
    script = Script(config)
    script.passive_open()
    for offset in range(8):
        script.inject("R", PEER_ISN + 10 + offset)
    assert len(script.output()) == 5
    assert script.layer.counters.challenge_acks == 5
    assert script.layer.counters.challenge_acks_suppressed == 3
    script.now = 1.0
    script.inject("R", PEER_ISN + 50)
    script.expect((".", script.iss + 1, PEER_ISN + 1))



def test_closed_port_answers_rst() -> None:
    script = Script()
    script.inject("S", 5000, dport=81)
    script.expect(("R.", 0, 5001))
    script.inject("F", 6000, payload=b"abcd", dport=81)
    script.expect(("R.", 0, 6005))
    script.inject(".", 7000, 4242, dport=81)
    script.expect(("R", 4242, 0))
    script.inject("R", 8000, dport=81)  # never answer an RST
    script.expect()
    assert script.layer.counters.drop_no_listener == 4


def test_listener_answers_stray_ack_with_rst() -> None:
    script = Script()
    script.layer.listen(80)
    script.inject(".", 7000, 31337)
    script.expect(("R", 31337, 0))
    script.inject("R", 7000)
    script.inject("P", 7000, payload=b"x")  # neither SYN nor ACK: dropped
    script.expect()
    assert script.layer.connection_count == 0



def test_delayed_ack_then_every_second_segment() -> None:
    script = Script()
    conn = script.passive_open()
    seq = PEER_ISN + 1
    script.inject("P.", seq, script.iss + 1, payload=b"a" * 100)
    script.expect()
    assert script.layer.pop_events() == [(conn, DataReadable())]
    script.advance(0.039)
    script.expect()
    script.advance(0.040)  # RFC 1122 4.2.3.2, with our 40 ms
    script.expect((".", script.iss + 1, seq + 100))
    script.inject(".", seq + 100, script.iss + 1, payload=b"b" * 1460)
    script.expect()
    script.inject(".", seq + 1560, script.iss + 1, payload=b"c" * 1460)
    script.expect((".", script.iss + 1, seq + 3020))  # second segment: ACK at once
    assert conn.recv(10_000) == b"a" * 100 + b"b" * 1460 + b"c" * 1460


def test_out_of_order_data_is_held_and_acked_at_once() -> None:
    script = Script()
    conn = script.passive_open()
    seq = PEER_ISN + 1
    script.inject(".", seq + 100, script.iss + 1, payload=b"B" * 100)
    script.expect((".", script.iss + 1, seq))  # duplicate ACK (RFC 5681 4.2)
    assert conn.readable == 0
    script.inject(".", seq + 300, script.iss + 1, payload=b"D" * 50, window=65535)
    script.now = 1.0  # past the out-of-window ACK limit, not that it matters here
    script.expect((".", script.iss + 1, seq))
    script.inject(".", seq, script.iss + 1, payload=b"A" * 100)
    script.expect((".", script.iss + 1, seq + 200))  # hole filled: ACK at once
    assert conn.recv(1000) == b"A" * 100 + b"B" * 100
    script.inject(".", seq + 200, script.iss + 1, payload=b"C" * 100)
    script.expect((".", script.iss + 1, seq + 350))
    assert conn.recv(1000) == b"C" * 100 + b"D" * 50


def test_overlapping_retransmission_is_trimmed() -> None:
    script = Script()
    conn = script.passive_open()
    seq = PEER_ISN + 1
    script.inject(".", seq, script.iss + 1, payload=b"0123456789")
    script.inject(".", seq + 5, script.iss + 1, payload=b"56789abcde")
    script.expect((".", script.iss + 1, seq + 15))
    assert conn.recv(100) == b"0123456789abcde"


def test_fin_past_the_window_is_not_taken() -> None:
    # RFC 9293 3.10.7.4: text past the window is trimmed, and a FIN after that text lies
    # past the window too; it counts only once the peer sends it again inside the window.
    script = Script(TcpConfig(recv_buffer=1000, msl=10.0))
    conn = script.passive_open()
    seq = PEER_ISN + 1
    script.inject("FP.", seq, script.iss + 1, payload=b"a" * 1000 + b"b" * 500)
    script.expect((".", script.iss + 1, seq + 1000))  # the window ended at 1000 bytes
    assert conn.state == TcpState.ESTABLISHED and not conn.fin_received
    assert conn.recv(2000) == b"a" * 1000
    script.advance(script.now)
    script.expect((".", script.iss + 1, seq + 1000))  # the window opened again
    script.inject("FP.", seq + 1000, script.iss + 1, payload=b"b" * 500)
    script.expect((".", script.iss + 1, seq + 1501))
    assert conn.state == TcpState.CLOSE_WAIT and conn.fin_received
    assert conn.recv(2000) == b"b" * 500


def test_passive_close() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject("F.", PEER_ISN + 1, script.iss + 1)
    script.expect((".", script.iss + 1, PEER_ISN + 2))
    assert conn.state == TcpState.CLOSE_WAIT and conn.eof
    assert script.layer.pop_events() == [(conn, PeerClosed())]
    conn.close(script.now)
    script.expect(("F.", script.iss + 1, PEER_ISN + 2))
    assert conn.state == TcpState.LAST_ACK
    script.inject(".", PEER_ISN + 2, script.iss + 2)
    script.expect()
    assert conn.state == TcpState.CLOSED and script.layer.connection_count == 0
    assert script.layer.pop_events() == [(conn, Closed(CloseReason.NORMAL))]


def test_active_close_and_time_wait() -> None:
    script = Script()  # MSL 10 s: TIME-WAIT lasts 20 s
    conn = script.passive_open()
    conn.close(0.0)
    script.expect(("F.", script.iss + 1, PEER_ISN + 1))
    script.inject(".", PEER_ISN + 1, script.iss + 2)
    assert conn.state == TcpState.FIN_WAIT_2
    script.inject("F.", PEER_ISN + 1, script.iss + 2)
    script.expect((".", script.iss + 2, PEER_ISN + 2))
    assert conn.state == TcpState.TIME_WAIT
    assert script.layer.pop_events() == [(conn, PeerClosed()), (conn, Closed(CloseReason.NORMAL))]
    # The peer missed our ACK and repeats its FIN: ACK again, restart 2*MSL.
    script.now = 5.0
    script.inject("F.", PEER_ISN + 1, script.iss + 2)
    script.expect((".", script.iss + 2, PEER_ISN + 2))
    script.advance(24.9)
    assert conn.state == TcpState.TIME_WAIT
    script.advance(25.0)
    assert conn.state == TcpState.CLOSED and script.layer.connection_count == 0
    # The 4-tuple is free again: now the port has no connection and answers RST.
    script.inject(".", PEER_ISN + 2, script.iss + 2)
    script.expect(("R", script.iss + 2, 0))


def test_retransmission_timer_doubles() -> None:
    script = Script()
    conn = script.passive_open()
    conn.send(b"x" * 100)
    script.advance(0.0)
    script.expect(("P.", script.iss + 1, PEER_ISN + 1, 100))
    script.advance(0.999)
    script.expect()
    script.advance(1.0)
    script.expect(("P.", script.iss + 1, PEER_ISN + 1, 100))
    script.advance(2.999)
    script.expect()
    script.advance(3.0)
    script.expect(("P.", script.iss + 1, PEER_ISN + 1, 100))
    assert script.layer.counters.retransmits == 2 and script.layer.counters.timeouts == 2
    script.inject(".", PEER_ISN + 1, script.iss + 101)
    assert conn.next_deadline() is None  # all acknowledged: the timer stops (RFC 6298 5.2)


def test_three_duplicate_acks_trigger_one_fast_retransmit() -> None:
    script = Script()
    conn = script.passive_open(peer_mss=1000)
    conn.send(b"y" * 4000)  # the initial window of four 1000-byte segments
    script.advance(0.0)
    script.expect(*[(".", script.iss + 1 + 1000 * i, PEER_ISN + 1, 1000) for i in range(3)],
                  ("P.", script.iss + 3001, PEER_ISN + 1, 1000))
    for _ in range(2):
        script.inject(".", PEER_ISN + 1, script.iss + 1)
        script.expect()
    script.inject(".", PEER_ISN + 1, script.iss + 1)
    script.expect((".", script.iss + 1, PEER_ISN + 1, 1000))
    assert script.layer.counters.fast_retransmits == 1
    assert conn.congestion.in_recovery


def test_zero_window_is_probed_with_backoff() -> None:
    script = Script()
    conn = script.passive_open(peer_window=0)
    conn.send(b"z" * 100)
    script.advance(0.0)
    script.expect()
    script.advance(1.0)
    script.expect((".", script.iss, PEER_ISN + 1))  # SND.UNA - 1: the peer must answer
    script.advance(2.9)
    script.expect()
    script.advance(3.0)
    script.expect((".", script.iss, PEER_ISN + 1))
    script.inject(".", PEER_ISN + 1, script.iss + 1, window=0)  # the answer, still closed
    script.advance(7.0)
    script.expect((".", script.iss, PEER_ISN + 1))
    script.inject(".", PEER_ISN + 1, script.iss + 1, window=1000)
    script.expect(("P.", script.iss + 1, PEER_ISN + 1, 100))
    assert conn.state == TcpState.ESTABLISHED


def test_receiver_answers_a_probe_with_its_window() -> None:
    script = Script()
    conn = script.passive_open()
    script.inject(".", PEER_ISN, script.iss + 1)  # a probe: one below RCV.NXT
    segments = script.expect((".", script.iss + 1, PEER_ISN + 1))
    assert segments[0].window == 65535
    assert conn.state == TcpState.ESTABLISHED


def test_malformed_segments_are_counted() -> None:
    script = Script()
    script.passive_open()
    good = TcpSegment(REMOTE_PORT, 80, PEER_ISN + 1, script.iss + 1, ACK, 100).emit(REMOTE, LOCAL)
    layer = script.layer
    before = layer.counters.as_dict()
    layer.segment_received(REMOTE, LOCAL, good[:10], 1.0)
    layer.segment_received(REMOTE, LOCAL, good[:-1] + bytes([good[-1] ^ 0xFF]), 1.0)
    syn_fin = TcpSegment(REMOTE_PORT, 80, 1, 0, SYN | FIN, 100).emit(REMOTE, LOCAL)
    layer.segment_received(REMOTE, LOCAL, syn_fin, 1.0)
    layer.segment_received(REMOTE[:3], LOCAL, good, 1.0)
    layer.segment_received(REMOTE, LOCAL, memoryview(good), 1.0)  # fine: a duplicate ACK
    script.expect()
    after = layer.counters.as_dict()
    changed = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    assert changed == {
        "segments_in": 5,
        "drop_truncated": 1,
        "drop_checksum": 1,
        "drop_malformed": 1,
        "drop_bad_address": 1,
    }



@given(st.binary(max_size=80), st.binary(min_size=0, max_size=5))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_raise(data: bytes, address: bytes) -> None:
    layer = TcpLayer(SCRIPT_CONFIG, isn_key=b"k" * 16)
    layer.listen(80)
    layer.segment_received(REMOTE, LOCAL, data, 0.0)
    layer.segment_received(address, LOCAL, data, 0.0)
    assert layer.counters.segments_in == 2


_fuzz_segments = st.lists(
    st.tuples(
        st.sampled_from([".", "P.", "F.", "R", "R.", "S", "S.", "", "F", "FP."]),
        st.integers(-70_000, 70_000),  # seq offset from RCV.NXT
        st.integers(-70_000, 70_000),  # ack offset from SND.UNA
        st.integers(0, 65535),
        st.integers(0, 3000),
        st.floats(0.0, 5.0),
    ),
    max_size=25,
)


@given(_fuzz_segments)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hostile_segments_never_raise_and_keep_invariants(
    segments: list[tuple[str, int, int, int, int, float]],
) -> None:
    script = Script()
    conn = script.passive_open()
    conn.send(b"q" * 5000)
    script.advance(0.0)
    for flags, seq_offset, ack_offset, window, length, dt in segments:
        script.advance(script.now + dt)
        script.inject(
            flags, conn.rcv_nxt + seq_offset, conn.snd_una + ack_offset,
            window=window, payload=b"p" * length,
        )
        if length % 7 == 0:
            conn.recv(length + 1)
        assert script.layer.connection_count <= 1
        if conn.state != TcpState.CLOSED:
            assert 0 <= (conn.snd_nxt - conn.snd_una) % (1 << 32) <= 5001
            assert conn.readable <= 65535 + 2
    script.advance(script.now + 100.0)
    script.output()
    # Whatever happened, the state machine ended in a state the RFC names.
    assert isinstance(conn.state, TcpState)
    assert isinstance(script.layer.counters, TcpCounters)


@pytest.mark.parametrize("limit", [1, 3])
def test_challenge_ack_limit_is_per_interval(limit: int) -> None:
    config = TcpConfig(recv_buffer=65535, challenge_ack_limit=limit)
    script = Script(config)
    script.passive_open()
    for second in range(3):
        script.now = float(second)
        for _ in range(limit + 2):
            script.inject("S", 777)
        assert len(script.output()) == limit
