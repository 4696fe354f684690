"""Two TcpLayers back to back through an in-memory wire, driven by a fake clock.

The wire can lose, duplicate and reorder segments from a seeded random generator, so
every run is the same run. Also unit tests of the helpers (sequence arithmetic, RTO,
NewReno, reassembly).
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import random
import weakref
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.net.tcp import (
    Closed,
    CloseReason,
    Connected,
    DataReadable,
    PeerClosed,
    TcpConfig,
    TcpConnection,
    TcpLayer,
    TcpState,
)
from libos.net.tcp.congestion import NewReno, initial_window
from libos.net.tcp.isn import IsnGenerator
from libos.net.tcp.reassembly import Reassembler
from libos.net.tcp.rto import RtoEstimator
from libos.net.tcp.seq import seq_add, seq_diff, seq_ge, seq_gt, seq_in_window, seq_le, seq_lt
from libos.net.tcp.timers import Timers
from vdev.wire.tcp import SYN, TcpSegment

A_IP = bytes([10, 0, 0, 1])
B_IP = bytes([10, 0, 0, 2])
PORT = 8080


class Wire:
    """Delivers each layer's outbox to the layer owning the destination address."""

    def __init__(
        self,
        layers: dict[bytes, TcpLayer],
        *,
        seed: int = 1,
        loss: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        latency: float = 0.005,
    ) -> None:
        self.layers = layers
        self.rng = random.Random(seed)
        self.loss = loss
        self.duplicate = duplicate
        self.reorder = reorder
        self.latency = latency
        self.now = 0.0
        self.queue: list[tuple[float, int, bytes, bytes, bytes]] = []
        self.counter = 0
        self.delivered = 0
        self.blocked: set[bytes] = set()  # sources whose segments are all dropped
        self.taps: list[Callable[[bytes, bytes, bytes], None]] = []

    def collect(self) -> None:
        for layer in self.layers.values():
            for dst, src, segment in layer.drain_outbox():
                for tap in self.taps:
                    tap(dst, src, segment)
                if src in self.blocked or self.rng.random() < self.loss:
                    continue
                copies = 2 if self.rng.random() < self.duplicate else 1
                for _ in range(copies):
                    delay = self.latency
                    if self.rng.random() < self.reorder:
                        delay += self.rng.uniform(0.001, 0.02)
                    self.counter += 1
                    heapq.heappush(self.queue, (self.now + delay, self.counter, dst, src, segment))

    def step(self, until: float) -> bool:
        """Advance to the next packet or timer; False when nothing happens before until."""
        self.collect()
        candidates = [self.queue[0][0]] if self.queue else []
        for layer in self.layers.values():
            deadline = layer.next_deadline()
            if deadline is not None:
                candidates.append(deadline)
        if not candidates:
            return False
        next_time = max(min(candidates), self.now)
        if next_time > until:
            return False
        self.now = next_time
        while self.queue and self.queue[0][0] <= self.now:
            _, _, dst, src, segment = heapq.heappop(self.queue)
            receiver = self.layers.get(dst)
            if receiver is not None:
                self.delivered += 1
                receiver.segment_received(src, dst, segment, self.now)
        for layer in self.layers.values():
            deadline = layer.next_deadline()
            if deadline is not None and deadline <= self.now:
                layer.on_timer(self.now)
        self.collect()
        return True

    def run(self, until: float, app: Callable[[float], bool] | None = None) -> bool:
        """Run until ``app(now)`` returns True (checked after each step) or time runs out."""
        while True:
            if app is not None and app(self.now):
                return True
            if not self.step(until):
                if app is not None and app(self.now):
                    return True
                # Nothing pending before ``until``: jump there.
                self.now = max(self.now, until)
                return False


class Peer:
    """An application on one connection: streams ``data`` out and hashes what comes in."""

    def __init__(self, conn: TcpConnection, data: bytes, *, close_when_done: bool = True) -> None:
        self.conn = conn
        self.data = data
        self.sent = 0
        self.received = 0
        self.digest = hashlib.sha256()
        self.close_when_done = close_when_done
        self.closed = False
        self.reading = True

    def pump(self, now: float) -> None:
        conn = self.conn
        while self.sent < len(self.data) and conn.send_space:
            self.sent += conn.send(memoryview(self.data)[self.sent : self.sent + 65536])
        if self.sent == len(self.data) and self.close_when_done and not self.closed:
            self.closed = True
            conn.close(now)
        while self.reading:
            chunk = conn.recv(65536)
            if not chunk:
                break
            self.received += len(chunk)
            self.digest.update(chunk)


def pumping(*peers: Peer) -> Callable[[float], bool]:
    """An app callback that keeps the peers sending and reading, and never stops the run."""

    def app(now: float) -> bool:
        for peer in peers:
            peer.pump(now)
        return False

    return app


def make_pair(config: TcpConfig | None = None, **wire_args: float) -> tuple[TcpLayer, TcpLayer, Wire]:
    a = TcpLayer(config, isn_key=b"a" * 16, rng=random.Random(1))
    b = TcpLayer(config, isn_key=b"b" * 16, rng=random.Random(2))
    wire = Wire({A_IP: a, B_IP: b}, **wire_args)  # type: ignore[arg-type]
    return a, b, wire


def establish(a: TcpLayer, b: TcpLayer, wire: Wire) -> tuple[TcpConnection, TcpConnection]:
    listener = b.listen(PORT, backlog=8)
    client = a.connect(A_IP, B_IP, PORT, wire.now)
    accepted: list[TcpConnection] = []

    def ready(now: float) -> bool:
        conn = listener.accept()
        if conn is not None:
            accepted.append(conn)
        return bool(accepted) and client.state == TcpState.ESTABLISHED

    assert wire.run(wire.now + 30.0, ready)
    return client, accepted[0]


def transfer(
    wire: Wire, left: Peer, right: Peer, until: float
) -> None:
    def done(now: float) -> bool:
        left.pump(now)
        right.pump(now)
        return (
            left.received == len(right.data)
            and right.received == len(left.data)
            and left.conn.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
            and right.conn.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
        )

    assert wire.run(until, done), (left.conn, right.conn, left.received, right.received)


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_handshake_events_and_options() -> None:
    a, b, wire = make_pair()
    client, server = establish(a, b, wire)
    assert client.state == server.state == TcpState.ESTABLISHED
    assert client.snd_mss == server.snd_mss == 1460
    # The SYN-ACK window is never scaled (RFC 7323 2.2); the final ACK's is, with the
    # shift of 3 that a 256 KiB buffer needs.
    assert client.snd_wnd == 0xFFFF
    assert server.snd_wnd == 256 * 1024
    assert (client, Connected()) in a.pop_events()
    assert (server, Connected()) in b.pop_events()
    server.send(b"hello")
    assert wire.run(1.0, lambda now: client.readable == 5)
    assert client.snd_wnd == 256 * 1024


def test_two_megabytes_each_way_clean() -> None:
    a, b, wire = make_pair()
    client, server = establish(a, b, wire)
    left = Peer(client, payload(2 << 20, 1))
    right = Peer(server, payload(2 << 20, 2))
    transfer(wire, left, right, until=120.0)
    assert left.digest.digest() == hashlib.sha256(right.data).digest()
    assert right.digest.digest() == hashlib.sha256(left.data).digest()
    assert a.counters.retransmits == b.counters.retransmits == 0
    events_a = [event for conn, event in a.pop_events() if conn is client]
    assert events_a.count(PeerClosed()) == 1
    assert events_a[-1] == Closed(CloseReason.NORMAL)
    # 2 MB over a 256 KiB window and 10 ms RTT: the window, not timeouts, paces it.
    assert a.counters.timeouts == 0 and b.counters.timeouts == 0


def test_a_finished_connection_is_freed_without_the_cycle_collector() -> None:
    """The parts of a connection hold no reference back to it, so once the layer and the
    application let go it is freed at once; a cycle would leave every closed connection
    to the cyclic garbage collector, a cost per connection."""
    a, b, wire = make_pair(TcpConfig(msl=0.0))
    client, server = establish(a, b, wire)
    left = Peer(client, payload(5000, 1))
    right = Peer(server, payload(3000, 2))
    transfer(wire, left, right, until=60.0)
    assert client.state == server.state == TcpState.CLOSED
    a.pop_events()
    b.pop_events()
    refs = [weakref.ref(client), weakref.ref(server)]
    gc.disable()
    try:
        del client, server, left, right
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()


def test_timers_earliest_is_the_minimum_of_the_armed_ones() -> None:
    timers = Timers()
    assert timers.earliest() is None
    for name, deadline in [("time_wait", 9.0), ("persist", 7.0), ("delayed_ack", 8.0),
                           ("probe", 3.0), ("retransmit", 5.0)]:
        setattr(timers, name, deadline)
    assert timers.earliest() == 3.0
    timers.probe = None
    assert timers.earliest() == 5.0
    timers.retransmit = None
    assert timers.earliest() == 7.0
    timers.stop_all()
    assert timers.earliest() is None


@pytest.mark.parametrize("seed", [3, 4])
def test_two_megabytes_each_way_lossy(seed: int) -> None:
    a, b, wire = make_pair(seed=seed, loss=0.05, duplicate=0.02, reorder=0.1)
    client, server = establish(a, b, wire)
    left = Peer(client, payload(2 << 20, seed))
    right = Peer(server, payload(2 << 20, seed + 100))
    transfer(wire, left, right, until=1200.0)
    assert left.digest.digest() == hashlib.sha256(right.data).digest()
    assert right.digest.digest() == hashlib.sha256(left.data).digest()
    assert a.counters.retransmits > 0 and b.counters.retransmits > 0
    assert a.counters.fast_retransmits > 0
    assert client.close_reason == server.close_reason == CloseReason.NORMAL


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_zero_window_stall_recovers(loss: float) -> None:
    a, b, wire = make_pair(seed=7, loss=loss)
    client, server = establish(a, b, wire)
    left = Peer(client, payload(1 << 20, 5))
    right = Peer(server, b"")
    right.reading = False
    wire.run(60.0, pumping(left, right))
    # The receiver's buffer filled and its window closed; the sender holds on.
    assert server.readable >= 256 * 1024
    # The receiver half-closed at once (it has nothing to send): data still flows.
    assert client.state == TcpState.CLOSE_WAIT
    assert client.snd_wnd == 0
    before = a.counters.segments_out
    wire.run(wire.now + 60.0, pumping(left, right))
    # Persist probes back off (RFC 9293 3.8.6.1): only a handful in a minute.
    assert 1 <= a.counters.segments_out - before <= 8
    assert client.state != TcpState.CLOSED
    right.reading = True
    transfer(wire, left, right, until=wire.now + 600.0)
    assert right.digest.digest() == hashlib.sha256(left.data).digest()


def test_simultaneous_open_and_close() -> None:
    a, b, wire = make_pair(TcpConfig(msl=5.0))
    left_conn = a.connect(A_IP, B_IP, 5000, 0.0, local_port=6000)
    right_conn = b.connect(B_IP, A_IP, 6000, 0.0, local_port=5000)
    assert wire.run(10.0, lambda now: left_conn.state == right_conn.state == TcpState.ESTABLISHED)
    assert (left_conn, Connected()) in a.pop_events()
    assert (right_conn, Connected()) in b.pop_events()
    left_conn.send(b"ping")
    right_conn.send(b"pong")
    assert wire.run(20.0, lambda now: left_conn.readable == 4 and right_conn.readable == 4)
    assert left_conn.recv(10) == b"pong" and right_conn.recv(10) == b"ping"
    # Both close at the same instant: FIN-WAIT-1 -> CLOSING -> TIME-WAIT on both sides.
    left_conn.close(wire.now)
    right_conn.close(wire.now)
    seen: set[TcpState] = set()

    def both_time_wait(now: float) -> bool:
        seen.add(left_conn.state)
        return left_conn.state == right_conn.state == TcpState.TIME_WAIT

    assert wire.run(wire.now + 5.0, both_time_wait)
    assert TcpState.CLOSING in seen
    assert a.pop_events()[-1] == (left_conn, Closed(CloseReason.NORMAL))
    entered = wire.now
    wire.run(entered + 9.9)
    assert a.connection_count == 1 and b.connection_count == 1
    wire.run(entered + 10.1)
    assert a.connection_count == 0 and b.connection_count == 0
    assert left_conn.state == TcpState.CLOSED


def test_time_wait_expiry_only_on_active_closer() -> None:
    a, b, wire = make_pair(TcpConfig(msl=2.0))
    client, server = establish(a, b, wire)
    client.close(wire.now)
    assert wire.run(wire.now + 5.0, lambda now: server.state == TcpState.CLOSE_WAIT)
    assert server.eof
    server.close(wire.now)
    assert wire.run(wire.now + 5.0, lambda now: client.state == TcpState.TIME_WAIT)
    assert wire.run(wire.now + 1.0, lambda now: b.connection_count == 0)
    assert server.close_reason == CloseReason.NORMAL
    start = wire.now
    wire.run(start + 3.9)
    assert client.state == TcpState.TIME_WAIT
    wire.run(start + 4.1)
    assert client.state == TcpState.CLOSED and a.connection_count == 0


def test_retransmission_backoff_then_abort() -> None:
    a, b, wire = make_pair(TcpConfig(max_retries=4))
    client, server = establish(a, b, wire)
    sent_times: list[float] = []
    wire.taps.append(lambda dst, src, seg: sent_times.append(wire.now) if src == A_IP else None)
    wire.blocked.add(A_IP)
    start = wire.now
    client.send(b"x" * 100)
    assert wire.run(start + 200.0, lambda now: client.state == TcpState.CLOSED)
    assert client.close_reason == CloseReason.TIMEOUT
    gaps = [round(t2 - t1, 3) for t1, t2 in zip(sent_times, sent_times[1:])]
    # With SACK negotiated, a tail loss probe goes first (RFC 8985 7.2), and only once:
    # two smoothed RTTs (5 ms of wire delay each way) plus 200 ms for a delayed ACK, as
    # a single segment is out. Then RFC 6298: the RTO, re-armed by the probe, is at
    # least 1 s and doubles on each expiry (5.5).
    assert gaps == [0.22, 1.0, 2.0, 4.0, 8.0]
    assert a.counters.tail_loss_probes == 1
    assert a.counters.conn_aborted_timeout == 1
    assert (client, Closed(CloseReason.TIMEOUT)) in a.pop_events()


def test_close_reasons_keep_their_words() -> None:
    """The API reports ``reason.value``; these words are what applications have seen."""
    assert [reason.value for reason in CloseReason] == [
        "normal", "reset", "refused", "timeout", "aborted"
    ]


def test_connect_to_closed_port_is_refused() -> None:
    a, b, wire = make_pair()
    conn = a.connect(A_IP, B_IP, 9, 0.0)
    assert wire.run(5.0, lambda now: conn.state == TcpState.CLOSED)
    assert conn.close_reason == CloseReason.REFUSED
    assert b.counters.rst_sent == 1 and b.counters.drop_no_listener == 1


def test_syn_retransmitted_and_gives_up() -> None:
    a, b, wire = make_pair(TcpConfig(max_syn_retries=2))
    wire.blocked.add(A_IP)
    conn = a.connect(A_IP, B_IP, PORT, 0.0)
    assert wire.run(100.0, lambda now: conn.state == TcpState.CLOSED)
    assert conn.close_reason == CloseReason.TIMEOUT
    assert wire.now == pytest.approx(7.0)  # SYN at 0, 1, 3; give up at 7
    assert a.counters.retransmits == 2


def test_syn_flood_is_bounded_and_established_keeps_working() -> None:
    backlog = 16
    a, b, wire = make_pair()
    listener = b.listen(PORT, backlog=backlog)
    client = a.connect(A_IP, B_IP, PORT, 0.0)
    assert wire.run(5.0, lambda now: bool(listener.accept_queue))
    server = listener.accept()
    assert server is not None and client.state == TcpState.ESTABLISHED
    left = Peer(client, payload(200_000, 11), close_when_done=False)
    right = Peer(server, payload(200_000, 12), close_when_done=False)
    flood = random.Random(99)
    max_connections = 0
    for index in range(10_000):
        src = bytes([172, 16, flood.randrange(256), flood.randrange(1, 255)])
        syn = TcpSegment(flood.randrange(1024, 65536), PORT, flood.getrandbits(32), 0, SYN, 65535)
        b.segment_received(src, B_IP, syn.emit(src, B_IP), wire.now)
        max_connections = max(max_connections, b.connection_count)
        assert listener.pending <= backlog
        if index % 50 == 0:
            left.pump(wire.now)
            right.pump(wire.now)
            wire.run(wire.now + 0.05)
    assert max_connections <= backlog + 1
    assert b.counters.drop_backlog_full >= 10_000 - 10 * backlog
    app = pumping(left, right)
    assert wire.run(
        wire.now + 60.0,
        lambda now: app(now) or left.received == right.received == 200_000,
    )
    assert left.digest.digest() == hashlib.sha256(right.data).digest()
    # The spoofed half-open connections expire after their SYN-ACK retries.
    wire.run(wire.now + 60.0)
    assert listener.half_open == 0 and b.connection_count == 1
    assert b.counters.syn_received_expired > 0


def test_send_buffer_is_bounded() -> None:
    a, b, wire = make_pair(TcpConfig(send_buffer=10_000))
    client, _ = establish(a, b, wire)
    assert client.send(b"z" * 50_000) == 10_000
    assert client.send(b"z") == 0
    client.close(wire.now)
    with pytest.raises(BrokenPipeError):
        client.send(b"more")


def test_abort_sends_rst_and_peer_sees_reset() -> None:
    a, b, wire = make_pair()
    client, server = establish(a, b, wire)
    client.abort(wire.now)
    assert wire.run(wire.now + 1.0, lambda now: server.state == TcpState.CLOSED)
    assert server.close_reason == CloseReason.RESET
    with pytest.raises(ConnectionResetError):
        server.send(b"x")
    assert a.pop_events()[-1] == (client, Closed(CloseReason.ABORTED))


def test_data_readable_is_edge_triggered() -> None:
    a, b, wire = make_pair()
    client, server = establish(a, b, wire)
    b.pop_events()
    client.send(b"a" * 3000)
    assert wire.run(wire.now + 1.0, lambda now: server.readable == 3000)
    assert [event for _, event in b.pop_events()] == [DataReadable()]
    assert server.recv(5000) == b"a" * 3000
    assert server.recv(5000) == b""



@pytest.mark.parametrize(
    ("a", "b", "lt"),
    [
        (0, 1, True),
        (1, 0, False),
        (0xFFFFFFFF, 0, True),  # wraps
        (0, 0xFFFFFFFF, False),
        (5, 5, False),
        (0x7FFFFFFF, 0xFFFFFFFF, True),
    ],
)
def test_sequence_comparisons(a: int, b: int, lt: bool) -> None:
    assert seq_lt(a, b) is lt
    assert seq_ge(a, b) is not lt
    assert seq_le(a, b) is (lt or a == b)
    assert seq_gt(a, b) is (not lt and a != b)


def test_sequence_arithmetic_wraps() -> None:
    assert seq_add(0xFFFFFFFF, 2) == 1
    assert seq_add(0, -1) == 0xFFFFFFFF
    assert seq_diff(1, 0xFFFFFFFF) == 2
    assert seq_in_window(1, 0xFFFFFFF0, 20)
    assert not seq_in_window(4, 0xFFFFFFF0, 20)


def test_isn_depends_on_tuple_clock_and_key() -> None:
    gen = IsnGenerator(b"k" * 16)
    base = gen.isn(A_IP, 1000, B_IP, 80, 0.0)
    assert gen.isn(A_IP, 1000, B_IP, 80, 0.0) == base
    assert gen.isn(A_IP, 1001, B_IP, 80, 0.0) != base
    assert gen.isn(A_IP, 1000, B_IP, 80, 1.0) == (base + 250_000) & 0xFFFFFFFF
    assert IsnGenerator(b"j" * 16).isn(A_IP, 1000, B_IP, 80, 0.0) != base
    with pytest.raises(ValueError):
        IsnGenerator(b"short")


def test_rto_estimator() -> None:
    rto = RtoEstimator()
    assert rto.rto == 1.0
    rto.sample(0.010)
    assert rto.rto == 1.0  # floored at 1 s (RFC 6298 2.4)
    rto.back_off()
    rto.back_off()
    assert rto.rto == 4.0
    rto.reset_backoff()
    assert rto.rto == 1.0
    for _ in range(7):
        rto.back_off()
    assert rto.rto == 60.0
    slow = RtoEstimator()
    slow.sample(2.0)
    assert slow.srtt == 2.0 and slow.rttvar == 1.0 and slow.rto == pytest.approx(6.0)
    slow.sample(2.0)
    assert slow.rttvar == pytest.approx(0.75) and slow.rto == pytest.approx(5.0)


def test_newreno_fast_retransmit_and_recovery() -> None:
    mss = 1000
    cc = NewReno(mss, iss=0)
    assert cc.cwnd == initial_window(mss) == 4000
    cc.ssthresh = 8000
    cc.cwnd = 10_000
    assert not cc.on_dup_ack(snd_una=5001, snd_max=15001, flight=10_000)
    assert not cc.on_dup_ack(5001, 15001, 10_000)
    assert cc.on_dup_ack(5001, 15001, 10_000)  # third: fast retransmit
    assert cc.in_recovery and cc.ssthresh == 5000 and cc.cwnd == 8000
    assert not cc.on_dup_ack(5001, 15001, 10_000)
    assert cc.cwnd == 9000  # inflated
    # Partial ACK: retransmit the next hole, deflate (RFC 6582 3.2 step 5).
    assert cc.on_new_ack(ack=7001, acked=2000, flight_before=10_000)
    assert cc.cwnd == 8000 and cc.in_recovery
    # Full ACK past recover: leave recovery with cwnd <= ssthresh.
    assert not cc.on_new_ack(ack=15001, acked=8000, flight_before=8000)
    assert not cc.in_recovery and cc.cwnd == 1000 + mss
    cc.on_timeout(flight=6000, snd_max=20001)
    assert cc.cwnd == mss and cc.ssthresh == 3000


@given(
    chunks=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=40),
    seed=st.integers(min_value=0, max_value=10_000),
)
@settings(max_examples=150, deadline=None)
def test_reassembly_rebuilds_the_stream(chunks: list[int], seed: int) -> None:
    """Out-of-order pieces (with overlaps) always come back as the original bytes."""
    rng = random.Random(seed)
    stream = rng.randbytes(sum(chunks))
    pieces: list[tuple[int, bytes]] = []
    offset = 0
    for size in chunks:
        start = max(0, offset - rng.randrange(0, 20))  # some overlap
        pieces.append((start, stream[start : offset + size]))
        offset += size
    rng.shuffle(pieces)
    reassembler = Reassembler(max_fragments=1000)
    delivered = bytearray()
    for start, data in pieces:
        position = len(delivered)
        if start + len(data) <= position:
            continue
        if start > position:
            assert reassembler.insert(start - position, data)
            continue
        fresh = data[position - start :]
        delivered += fresh
        more = reassembler.advance(len(fresh))
        delivered += more
    assert bytes(delivered) == stream
    assert len(reassembler) == 0 and reassembler.buffered == 0


def test_reassembly_fragment_cap() -> None:
    reassembler = Reassembler(max_fragments=2)
    assert reassembler.insert(10, b"a")
    assert reassembler.insert(20, b"b")
    assert not reassembler.insert(30, b"c")  # a third hole is refused
    assert reassembler.insert(11, b"x")  # adjacent: merges, no new fragment
    assert reassembler.buffered == 3
    assert reassembler.advance(10) == b"ax"
    assert len(reassembler) == 1
    with pytest.raises(ValueError):
        reassembler.insert(0, b"y")
