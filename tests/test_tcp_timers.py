"""The TCP layer's timer heap: ``next_deadline`` and ``on_timer`` without a walk over every
connection must behave exactly as that walk did.

``ScanningLayer`` is the walk, kept here as the reference: the same seeded scenarios run
over both, and the segments on the wire (with the time each left) must be identical.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.net.tcp import TcpConfig, TcpConnection, TcpLayer, TcpState
from libos.net.tcp.seq import SEQ_MOD, seq_diff, seq_ge, seq_gt, seq_le, seq_lt
from tests.test_tcp import A_IP, B_IP, PORT, Peer, Wire, payload

DEAD_IP = bytes([10, 0, 0, 9])  # owned by no layer: SYNs sent there are lost
ABORTABLE = (TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2)


class ScanningLayer(TcpLayer):
    """The reference: every connection's deadline looked at on every call."""

    def next_deadline(self) -> float | None:
        if self._dirty:
            return self._last_now
        deadline: float | None = None
        for conn in self._connections.values():
            candidate = conn.next_deadline()
            if candidate is not None and (deadline is None or candidate < deadline):
                deadline = candidate
        return deadline

    def on_timer(self, now: float) -> None:
        self._last_now = now
        self.flush(now)
        for conn in list(self._connections.values()):
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                conn.on_timer(now)


def brute_force_deadline(layer: TcpLayer) -> float | None:
    deadlines = [d for c in layer._connections.values() if (d := c.next_deadline()) is not None]
    return min(deadlines) if deadlines else None


def run_scenario(layer_type: type[TcpLayer], seed: int) -> tuple[list[tuple[float, bytes]], int]:
    """Ten connections at once over a lossy, reordering, duplicating wire, each one
    moving data both ways and closing; some of B's connections get aborted midway and a
    few SYNs go nowhere. Returns the wire trace and how many connections closed."""
    config = TcpConfig(min_rto=0.2, msl=0.5)
    a = layer_type(config, isn_key=b"a" * 16, rng=random.Random(seed))
    b = layer_type(config, isn_key=b"b" * 16, rng=random.Random(seed + 1))
    wire = Wire({A_IP: a, B_IP: b}, seed=seed, loss=0.05, duplicate=0.02, reorder=0.1)
    trace: list[tuple[float, bytes]] = []
    wire.taps.append(lambda dst, src, segment: trace.append((wire.now, src + dst + segment)))
    listener = b.listen(PORT, backlog=16)
    rng = random.Random(seed)
    clients = [a.connect(A_IP, B_IP, PORT, 0.0) for _ in range(10)]
    for _ in range(3):
        a.connect(A_IP, DEAD_IP, PORT, 0.0)
    peers = [Peer(conn, payload(rng.randrange(1, 200_000), rng.randrange(1000))) for conn in clients]
    aborted: set[TcpConnection] = set()

    def app(now: float) -> bool:
        while (conn := listener.accept()) is not None:
            peers.append(Peer(conn, payload(rng.randrange(1, 50_000), rng.randrange(1000))))
        for peer in peers:
            if peer.conn.state not in (TcpState.SYN_SENT, TcpState.CLOSED):
                peer.pump(now)  # (a close in SYN-SENT would just drop the connection)
        if now > 0.05 and len(aborted) < 2:
            for peer in peers:
                if peer.conn.passive and peer.conn.state in ABORTABLE:
                    aborted.add(peer.conn)
                    peer.conn.abort(now)
                    break
        for layer in (a, b):
            assert layer.next_deadline() == (
                layer._last_now if layer._dirty else brute_force_deadline(layer)
            )
        return False

    wire.run(120.0, app)
    assert len(aborted) == 2
    closed = sum(peer.conn.state == TcpState.CLOSED for peer in peers)
    return trace, closed


@pytest.mark.parametrize("seed", [1, 2])
def test_heap_replays_the_scan_exactly(seed: int) -> None:
    trace, closed = run_scenario(TcpLayer, seed)
    reference, reference_closed = run_scenario(ScanningLayer, seed)
    assert closed == reference_closed == 20  # every connection ran to its end
    assert len(trace) == len(reference) > 100
    assert trace == reference


def idle_and_busy(count: int) -> tuple[TcpLayer, TcpLayer, Wire, list[TcpConnection]]:
    """``count`` idle connections from A (SYN-SENT towards an address nobody owns, their
    retransmission timers seconds away) and one established A-B connection."""
    config = TcpConfig(min_rto=0.2, max_syn_retries=3)
    a = TcpLayer(config, isn_key=b"a" * 16, rng=random.Random(3))
    b = TcpLayer(config, isn_key=b"b" * 16, rng=random.Random(4))
    wire = Wire({A_IP: a, B_IP: b})
    idle = [a.connect(A_IP, DEAD_IP, PORT, 0.0, local_port=10000 + i) for i in range(count)]
    return a, b, wire, idle


def test_thousand_idle_connections_and_one_busy() -> None:
    a, b, wire, idle = idle_and_busy(1000)
    wire.now = 0.5
    listener = b.listen(PORT)
    client = a.connect(A_IP, B_IP, PORT, wire.now)
    assert a.next_deadline() == 1.0  # the idle SYNs' first retransmission (RFC 6298 2.1)
    assert wire.run(0.9, lambda now: listener.accept() is not None)
    server = b.connection((B_IP, PORT, A_IP, client.local_port))
    assert server is not None
    left = Peer(client, payload(1 << 20, 1), close_when_done=False)
    right = Peer(server, payload(1 << 20, 2), close_when_done=False)
    steps = 0

    def app(now: float) -> bool:
        nonlocal steps
        steps += 1
        left.pump(now)
        right.pump(now)
        # The busy connection's timers come and go; the idle ones stay where they were.
        expected = a._last_now if a._dirty else brute_force_deadline(a)
        assert a.next_deadline() == expected
        assert len(a._timers) <= 2 * (a.connection_count) + 64
        return left.received == right.received == 1 << 20

    assert wire.run(0.99, app)
    assert steps > 20
    assert all(conn.state == TcpState.SYN_SENT for conn in idle)
    # Now the idle timers fall due together: every SYN is retransmitted once, at 1.0.
    sent_before = a.counters.retransmits
    wire.run(1.0)
    a.on_timer(1.0)
    assert a.counters.retransmits - sent_before == 1000
    assert a.next_deadline() == 3.0  # backed off to 2 s (RFC 6298 5.5)
    # ... and they give up after max_syn_retries: the heap empties with them.
    wire.run(20.0)
    assert all(conn.state == TcpState.CLOSED for conn in idle)
    assert a.connection_count == 1 and client.state == TcpState.ESTABLISHED
    assert len(a._timer_entry) <= 1 and len(a._timers) <= 64 + 2


def test_due_connections_run_in_creation_order() -> None:
    """Connections due by the same ``on_timer`` transmit in the order they were created,
    as the walk over the connection table made them (the wire trace depends on it), not
    in the order their deadlines fell."""
    a = TcpLayer(TcpConfig(), isn_key=b"a" * 16, rng=random.Random(3))
    # Later connections opened at earlier (fake) times: their timers fall due first.
    idle = [a.connect(A_IP, DEAD_IP, PORT, 0.5 - i * 0.01, local_port=10000 + i) for i in range(40)]
    a.drain_outbox()
    assert a.next_deadline() == pytest.approx(1.11)
    a.on_timer(1.6)
    ports = [int.from_bytes(segment[:2], "big") for _dst, _src, segment in a.drain_outbox()]
    assert ports == [conn.local_port for conn in idle]


def test_close_of_idle_connection_rearms_its_timer() -> None:
    """``close`` is called by the application, not the layer; the FIN's retransmission
    timer must still be known to ``next_deadline``."""
    a = TcpLayer(TcpConfig(min_rto=0.2), isn_key=b"a" * 16, rng=random.Random(5))
    b = TcpLayer(TcpConfig(min_rto=0.2), isn_key=b"b" * 16, rng=random.Random(6))
    wire = Wire({A_IP: a, B_IP: b})
    listener = b.listen(PORT)
    client = a.connect(A_IP, B_IP, PORT, 0.0)
    assert wire.run(1.0, lambda now: listener.accept() is not None and client.state == TcpState.ESTABLISHED)
    wire.run(wire.now + 1.0)
    assert a.next_deadline() is None  # all acknowledged: no timer runs
    wire.blocked.add(A_IP)  # the FIN is lost
    client.close(wire.now)
    assert client.state == TcpState.FIN_WAIT_1
    wire.collect()
    deadline = a.next_deadline()
    assert deadline is not None and deadline > wire.now
    assert deadline == brute_force_deadline(a)
    before = a.counters.timeouts
    wire.run(deadline)
    assert a.counters.timeouts == before + 1


def test_stale_entries_are_compacted() -> None:
    """A deadline that moves on every call (the RTO restarted by each ACK) must not
    grow the heap without bound."""
    a, _b, _wire, idle = idle_and_busy(1)
    conn = idle[0]
    for step in range(10_000):
        a.reschedule(conn, 5.0 + step * 1e-4)
    assert len(a._timers) <= 2 * len(a._timer_entry) + 64 + 1
    assert a.next_deadline() == 5.0 + 9_999 * 1e-4
    a.reschedule(conn, None)
    assert a.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(st.integers(0, SEQ_MOD - 1), st.integers(0, SEQ_MOD - 1))
def test_sequence_comparisons_agree_with_the_distance(a: int, b: int) -> None:
    distance = seq_diff(a, b)
    assert seq_lt(a, b) == (distance < 0)
    assert seq_le(a, b) == (distance <= 0)
    assert seq_gt(a, b) == (distance > 0)
    assert seq_ge(a, b) == (distance >= 0)


@pytest.mark.parametrize(
    ("a", "b"),
    [(0, 0), (0, 1 << 31), (1 << 31, 0), (0, (1 << 31) - 1), ((1 << 31) - 1, 0), (0, SEQ_MOD - 1)],
)
def test_sequence_comparisons_at_the_half_way_edge(a: int, b: int) -> None:
    distance = seq_diff(a, b)
    assert (seq_lt(a, b), seq_le(a, b), seq_gt(a, b), seq_ge(a, b)) == (
        distance < 0,
        distance <= 0,
        distance > 0,
        distance >= 0,
    )
