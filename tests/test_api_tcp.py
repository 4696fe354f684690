"""Stream (TCP) queues of the libOS API, without root.

* the ``linux`` backend over loopback in the current namespace (real kernel sockets);
* the ``vnic`` backend's stream layer (``VnicStreams``) as two instances back to back on a
  fake clock, exactly as ``VnicLibOS`` drives it minus the device;
* the device host's fault-injecting wire (``vdev.vnic.faults``).
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.api.linux import LinuxLibOS
from libos.api.queues import PollingRuntime, QueueTable
from libos.api.types import LibOSError, Opcode, QResult, SocketKind
from libos.api.vnic_tcp import VnicStreams
from libos.net.tcp import TcpConfig
from vdev.vnic.faults import FaultSpec, FaultSpecError, FaultyBackend
from vdev.wire.ipv4 import PROTO_TCP, Ipv4Packet


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def los() -> Iterator[LinuxLibOS]:
    libos = LinuxLibOS("")
    try:
        yield libos
    finally:
        libos.shutdown()


def connected_pair(los: LinuxLibOS) -> tuple[int, int, int]:
    """(listener, client, server) queues, connected over loopback."""
    port = free_port()
    listener = los.socket(SocketKind.TCP)
    los.bind(listener, ("127.0.0.1", port))
    los.listen(listener, 16)
    client = los.socket(SocketKind.TCP)
    connect = los.connect(client, ("127.0.0.1", port))
    accepted = los.wait(los.accept(listener), 5)
    assert accepted is not None and accepted.opcode is Opcode.ACCEPT
    assert accepted.address is not None and accepted.address[0] == "127.0.0.1"
    done = los.wait(connect, 5)
    assert done is not None and done.opcode is Opcode.CONNECT, done
    return listener, client, accepted.new_qd


def stream_both_ways(los: LinuxLibOS, a: int, b: int, size: int, chunk: int) -> tuple[str, str]:
    """Send ``size`` bytes a->b and b->a at once; the SHA-256 each side received."""
    rng = random.Random(size)
    data = {a: rng.randbytes(size), b: rng.randbytes(size)}
    offset = {a: 0, b: 0}
    digest = {a: hashlib.sha256(), b: hashlib.sha256()}
    received = {a: 0, b: 0}
    pushes: dict[int, int] = {}
    pops = {los.pop(a): a, los.pop(b): b}
    while received[a] < size or received[b] < size:
        for qd in (a, b):
            if qd not in pushes.values() and offset[qd] < size:
                pushes[los.push(qd, data[qd][offset[qd] : offset[qd] + chunk])] = qd
                offset[qd] += chunk
        tokens = list(pops) + list(pushes)
        found = los.wait_any(tokens, 10)
        assert found is not None, "transfer stalled"
        token = tokens[found[0]]
        result = found[1]
        if token in pops:
            qd = pops.pop(token)
            assert result.opcode is Opcode.POP and result.data, result
            digest[qd].update(result.data)
            received[qd] += len(result.data)
            if received[qd] < size:
                pops[los.pop(qd)] = qd
        else:
            assert result.opcode is Opcode.PUSH, result
            del pushes[token]
    assert hashlib.sha256(data[b]).hexdigest() == digest[a].hexdigest()
    return digest[a].hexdigest(), digest[b].hexdigest()


def test_linux_transfer_four_megabytes_each_way(los: LinuxLibOS) -> None:
    _listener, client, server = connected_pair(los)
    got_client, got_server = stream_both_ways(los, client, server, 4 << 20, 256 * 1024)
    rng = random.Random(4 << 20)
    sent_client, sent_server = rng.randbytes(4 << 20), rng.randbytes(4 << 20)
    assert got_client == hashlib.sha256(sent_server).hexdigest()
    assert got_server == hashlib.sha256(sent_client).hexdigest()
    assert los.stats()["queues"]["push_failed"] == 0  # type: ignore[index]


def test_linux_graceful_close_delivers_pending_bytes_then_eof(los: LinuxLibOS) -> None:
    _listener, client, server = connected_pair(los)
    blob = random.Random(3).randbytes(8 << 20)  # more than the socket buffers hold
    token = los.push(client, blob)
    los.close(client)  # the push has not completed: the bytes still go out, then the FIN
    assert los.wait(token, 1) == QResult(Opcode.FAILED, client, error="queue closed")
    received = bytearray()
    while True:
        result = los.wait(los.pop(server), 10)
        assert result is not None and result.opcode is Opcode.POP
        if not result.data:
            break
        received += result.data
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()
    again = los.wait(los.pop(server), 1)  # EOF stays EOF
    assert again is not None and again.opcode is Opcode.POP and again.data == b""


def test_linux_connect_refused(los: LinuxLibOS) -> None:
    qd = los.socket(SocketKind.TCP)
    result = los.wait(los.connect(qd, ("127.0.0.1", free_port())), 5)
    assert result is not None and result.opcode is Opcode.FAILED
    assert "refused" in result.error.lower()
    with pytest.raises(LibOSError):
        los.push(qd, b"x")


def test_linux_reset_fails_the_waiting_pop_and_later_pushes(los: LinuxLibOS) -> None:
    port = free_port()
    listener = los.socket(SocketKind.TCP)
    los.bind(listener, ("127.0.0.1", port))
    los.listen(listener, 4)
    accept = los.accept(listener)
    peer = socket.create_connection(("127.0.0.1", port))
    accepted = los.wait(accept, 5)
    assert accepted is not None
    pop = los.pop(accepted.new_qd)
    # SO_LINGER with a zero timeout makes close() send RST (RFC 9293 3.10.5 ABORT).
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    result = los.wait(pop, 5)
    assert result is not None and result.opcode is Opcode.FAILED
    assert "reset" in result.error.lower()
    push = los.wait(los.push(accepted.new_qd, b"late"), 5)
    assert push is not None and push.opcode is Opcode.FAILED


def test_linux_accepts_many_in_one_burst_and_mixes_with_udp(los: LinuxLibOS) -> None:
    port = free_port()
    listener = los.socket(SocketKind.TCP)
    los.bind(listener, ("127.0.0.1", port))
    los.listen(listener, 64)
    peers = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
    udp = los.socket(SocketKind.UDP)
    udp_port = free_port()
    los.bind(udp, ("127.0.0.1", udp_port))
    udp_pop = los.pop(udp)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"datagram", ("127.0.0.1", udp_port))
    accepted = []
    tokens = [udp_pop, los.accept(listener)]
    got_datagram = False
    while len(accepted) < 10 or not got_datagram:
        found = los.wait_any(tokens, 5)
        assert found is not None
        index, result = found
        if result.opcode is Opcode.POP:
            assert result.data == b"datagram"
            got_datagram = True
            tokens[0] = los.pop(udp)
        else:
            assert result.opcode is Opcode.ACCEPT
            accepted.append(result.new_qd)
            tokens[1] = los.accept(listener)
    assert len(set(accepted)) == 10
    for peer in peers:
        peer.close()


@pytest.mark.parametrize(
    "call",
    [
        lambda los, listener, conn: los.push(listener, b"x"),
        lambda los, listener, conn: los.pop(listener),
        lambda los, listener, conn: los.accept(conn),
        lambda los, listener, conn: los.listen(conn, 4),
        lambda los, listener, conn: los.connect(listener, ("127.0.0.1", 1)),
        lambda los, listener, conn: los.pushto(conn, b"x", ("127.0.0.1", 1)),
        lambda los, listener, conn: los.listen(listener, 0),
        lambda los, listener, conn: los.push(999, b"x"),
        lambda los, listener, conn: los.connect(los.socket(SocketKind.TCP), ("no such host", "x")),
    ],
)
def test_linux_misuse_raises_libos_error(los: LinuxLibOS, call: object) -> None:
    listener, conn, _server = connected_pair(los)
    with pytest.raises(LibOSError):
        call(los, listener, conn)  # type: ignore[operator]


class Pair:
    """Two ``VnicStreams`` wired back to back, a fake clock, an optionally lossy wire."""

    A = bytes([10, 0, 0, 1])
    B = bytes([10, 0, 0, 2])

    def __init__(self, loss: float = 0.0, config: TcpConfig | None = None) -> None:
        self.now = 0.0
        self.rng = random.Random(7)
        self.loss = loss
        self.tables = {self.A: QueueTable(), self.B: QueueTable()}
        self.sides = {ip: VnicStreams(table, config) for ip, table in self.tables.items()}

    def step(self, dt: float = 0.001) -> None:
        self.now += dt
        for side in self.sides.values():
            side.poll(self.now)
        for src, side in self.sides.items():
            for dst, _src, segment in side.tcp.drain_outbox():
                if self.rng.random() < self.loss:
                    continue
                self.sides[dst].ip_input(Ipv4Packet(src, dst, PROTO_TCP, segment), b"", self.now)

    def wait(self, ip: bytes, token: int, limit: float = 30.0) -> QResult:
        table = self.tables[ip]
        end = self.now + limit
        while self.now < end:
            found = table.take([token])
            if found is not None:
                return found[1]
            self.step()
        raise AssertionError(f"token {token} did not complete")

    def connect(self) -> tuple[int, int, int]:
        a, b = self.sides[self.A], self.sides[self.B]
        listener = b.socket()
        b.bind(listener, 80)
        b.listen(listener, 8)
        accept = b.accept(listener)
        client = a.socket()
        connect = a.connect(client, self.A, 40000, self.B, 80, self.now)
        assert self.wait(self.A, connect).opcode is Opcode.CONNECT
        accepted = self.wait(self.B, accept)
        assert accepted.opcode is Opcode.ACCEPT and accepted.address == ("10.0.0.1", 40000)
        return listener, client, accepted.new_qd

    def pop(self, ip: bytes, qd: int) -> int:
        token = self.tables[ip].pop(qd)
        self.sides[ip].pop_service(qd)
        return token


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_vnic_streams_transfer_with_hash(loss: float) -> None:
    pair = Pair(loss, TcpConfig(min_rto=0.2))
    _listener, client, server = pair.connect()
    blob = random.Random(5).randbytes(1 << 20)
    a, b = pair.sides[pair.A], pair.sides[pair.B]
    push = a.push(client, blob)  # more than the send buffer: completes as it drains
    assert pair.tables[pair.A].take([push]) is None
    received = bytearray()
    while len(received) < len(blob):
        result = pair.wait(pair.B, pair.pop(pair.B, server))
        assert result.opcode is Opcode.POP and result.data
        received += result.data
    assert pair.wait(pair.A, push).opcode is Opcode.PUSH
    assert hashlib.sha256(received).digest() == hashlib.sha256(blob).digest()
    a.close(client, pair.now)
    eof = pair.wait(pair.B, pair.pop(pair.B, server))
    assert eof == QResult(Opcode.POP, server, b"")
    assert b.stats()["drop_checksum"] == 0


def test_vnic_streams_unread_bytes_close_the_window() -> None:
    pair = Pair()
    _listener, client, server = pair.connect()
    a = pair.sides[pair.A]
    push = a.push(client, bytes(2 << 20))
    for _ in range(3000):
        pair.step(0.01)
    # Nobody pops at B: its receive buffer (256 KiB) and A's send buffer fill, the rest waits.
    assert pair.tables[pair.A].take([push]) is None
    assert len(a._streams[client].unsent) == 1


def test_vnic_streams_reset_and_refused() -> None:
    pair = Pair()
    _listener, client, server = pair.connect()
    pop = pair.pop(pair.A, client)
    conn = pair.sides[pair.B]._streams[server].conn
    assert conn is not None
    conn.abort(pair.now)  # RST to A
    result = pair.wait(pair.A, pop)
    assert result.opcode is Opcode.FAILED and "reset" in result.error
    push = pair.sides[pair.A].push(client, b"late")
    assert pair.wait(pair.A, push).opcode is Opcode.FAILED
    # No listener on port 81: B answers RST, A's connect fails.
    other = pair.sides[pair.A].socket()
    token = pair.sides[pair.A].connect(other, pair.A, 40001, pair.B, 81, pair.now)
    refused = pair.wait(pair.A, token)
    assert refused.opcode is Opcode.FAILED and "refused" in refused.error


def test_vnic_streams_close_fails_waiting_tokens_and_misuse_raises() -> None:
    pair = Pair()
    listener, client, _server = pair.connect()
    b = pair.sides[pair.B]
    accept = b.accept(listener)
    b.close(listener, pair.now)
    assert pair.wait(pair.B, accept).error == "queue closed"
    a = pair.sides[pair.A]
    with pytest.raises(LibOSError):
        a.listen(client, 4)
    with pytest.raises(LibOSError):
        a.accept(client)
    fresh = a.socket()
    with pytest.raises(LibOSError):
        a.push(fresh, b"x")
    with pytest.raises(LibOSError):
        a.listen(fresh, 4)  # not bound
    a.bind(fresh, 90)
    with pytest.raises(LibOSError):
        a.listen(fresh, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", FaultSpec()),
        ("loss=0.05", FaultSpec(loss=0.05)),
        ("loss=0.05,reorder=0.05,dup=0.05,seed=1", FaultSpec(0.05, 0.05, 0.05, 1)),
        (" seed=9 , dup=0.5 ", FaultSpec(dup=0.5, seed=9)),
    ],
)
def test_fault_spec_parses(text: str, expected: FaultSpec) -> None:
    assert FaultSpec.parse(text) == expected


@pytest.mark.parametrize("text", ["loss", "loss=x", "loss=1.0", "loss=-0.1", "jitter=1", "seed=1.5", "dup=0.1,dup=0.2"])
def test_fault_spec_rejects(text: str) -> None:
    with pytest.raises(FaultSpecError):
        FaultSpec.parse(text)


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_fault_spec_random_text_raises_only_our_error(text: str) -> None:
    try:
        FaultSpec.parse(text)
    except FaultSpecError:
        pass


class ListWire:
    def __init__(self, frames: list[bytes]) -> None:
        self.pending = list(frames)
        self.sent: list[bytes] = []

    def fds(self) -> list[int]:
        return []

    def receive(self, queue: int, budget: int) -> list[bytes]:
        taken, self.pending = self.pending[:budget], self.pending[budget:]
        return taken

    def send(self, queue: int, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def close(self) -> None:
        pass


@given(st.lists(st.binary(min_size=1, max_size=8), min_size=1, max_size=60), st.integers(0, 1000))
@settings(max_examples=100, deadline=None)
def test_faulty_wire_without_loss_delivers_every_frame(frames: list[bytes], seed: int) -> None:
    spec = FaultSpec(dup=0.3, reorder=0.3, seed=seed)
    wire = FaultyBackend(ListWire(frames + [b"last"]), spec)  # type: ignore[arg-type]
    out: list[bytes] = []
    while True:
        batch = wire.receive(0, 7)
        if not batch:
            break
        out += batch
    held = wire._rx.held
    if held is not None:
        out.append(held)
    # Every frame arrives at least once; only duplicates are extra.
    assert sorted(set(out)) == sorted(set(frames + [b"last"]))
    assert len(out) == len(frames) + 1 + wire.counters.duplicated


def test_faulty_wire_rates_and_determinism() -> None:
    frames = [i.to_bytes(4, "big") for i in range(20000)]
    runs = []
    for _ in range(2):
        inner = ListWire([])
        wire = FaultyBackend(inner, FaultSpec(loss=0.05, dup=0.05, reorder=0.05, seed=3))  # type: ignore[arg-type]
        for frame in frames:
            wire.send(0, frame)
        runs.append(inner.sent)
        counters = wire.counters
        assert 800 < counters.lost < 1200
        assert 700 < counters.duplicated < 1200
        assert 700 < counters.reordered < 1200
    assert runs[0] == runs[1]
    assert runs[0] != frames


def reference_take(done: dict[int, QResult], tokens: list[int]) -> tuple[int, QResult] | None:
    """What ``QueueTable.take`` returns: the first token in list order that completed."""
    for index, token in enumerate(tokens):
        if token in done:
            return index, done.pop(token)
    return None


def table_with(done_count: int, pending_count: int) -> tuple[QueueTable, list[int], list[int]]:
    table = QueueTable()
    qd = table.new_queue(SocketKind.UDP)
    done = [table.completed(Opcode.PUSH, qd) for _ in range(done_count)]
    pending = [table.pending(qd) for _ in range(pending_count)]
    return table, done, pending


@pytest.mark.parametrize(
    ("done_count", "picks", "expected_index"),
    [
        (0, [], None),  # nothing completed
        (1, [0], 3),  # one completion, looked up directly
        (3, [2, 0], 3),  # the first by position wins, not the oldest
        (40, [39, 5, 17], 3),  # many completions: the scan
        (40, [], None),  # completions, none of them waited on here
    ],
)
def test_take_finds_the_first_completed_token_by_position(
    done_count: int, picks: list[int], expected_index: int | None
) -> None:
    table, done, pending = table_with(done_count, 6)
    tokens = pending[:3] + [done[i] for i in picks] + pending[3:]
    found = table.take(tokens)
    if expected_index is None:
        assert found is None
        return
    assert found is not None and found[0] == expected_index
    assert found[1] == QResult(Opcode.PUSH, 3)
    with pytest.raises(LibOSError, match="unknown token"):
        table.take([tokens[expected_index]])  # taken out: gone for good


def test_take_rejects_unknown_tokens_only_when_nothing_completed() -> None:
    table, done, pending = table_with(1, 2)
    with pytest.raises(LibOSError, match="unknown token 999"):
        table.take(pending + [999])
    # A completed token comes first: found, whatever else the list holds.
    assert table.take([999, done[0]]) == (1, QResult(Opcode.PUSH, 3))
    with pytest.raises(LibOSError, match="unknown token"):
        table.take([done[0]])  # taken already


@settings(max_examples=150, deadline=None)
@given(
    st.integers(0, 40),
    st.integers(1, 30),
    st.lists(st.integers(0, 69), min_size=1, max_size=60),
)
def test_take_agrees_with_the_linear_scan(done_count: int, pending_count: int, picks: list[int]) -> None:
    table, done, pending = table_with(done_count, pending_count)
    known = done + pending
    tokens = [known[pick % len(known)] for pick in picks]  # duplicates allowed
    expected_done = dict(table.done)
    while True:
        want = reference_take(expected_done, tokens)
        got = table.take(tokens)
        assert got == want
        if got is None:
            break
        tokens = [token for token in tokens if token != tokens[got[0]]] or pending[:1]
    assert table.done == expected_done


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 40), st.integers(1, 30), st.sets(st.integers(0, 69), min_size=1, max_size=60),
       st.booleans())
def test_take_many_takes_every_completed_token(done_count: int, pending_count: int, picks: set[int],
                                               as_list: bool) -> None:
    table, done, pending = table_with(done_count, pending_count)
    everything = done + pending
    chosen = [everything[i] for i in sorted(picks) if i < len(everything)]
    if not chosen:
        return
    tokens: list[int] | dict[int, None] = chosen if as_list else dict.fromkeys(chosen)
    expected = [token for token in done if token in chosen]  # completion order
    found = table.take_many(tokens)
    assert [token for token, _ in found] == expected
    assert all(result == QResult(Opcode.PUSH, 3) for _, result in found)
    assert not any(token in table.done for token in expected), "taken tokens stay taken out"
    waiting = [token for token in chosen if token not in expected]
    if waiting:
        assert table.take_many(waiting) == []  # pending ones: no result, no error
    with pytest.raises(LibOSError, match="unknown token"):
        table.take_many(expected or [999])


def test_wait_many_hands_back_a_batch_and_times_out_empty() -> None:
    class Runtime(PollingRuntime):
        def __init__(self) -> None:
            self.table = QueueTable()
            self.polls = 0

        def _progress(self, now: float) -> int:
            self.polls += 1
            return 0

        def _sleep(self, timeout: float) -> None:
            pass

    runtime = Runtime()
    qd = runtime.table.new_queue(SocketKind.UDP)
    pops = [runtime.table.pop(qd) for _ in range(3)]
    runtime.table.deliver(qd, b"a", ("10.0.0.1", 1))
    runtime.table.deliver(qd, b"b", ("10.0.0.1", 1))
    batch = runtime.wait_many(dict.fromkeys(pops), timeout=1.0)
    assert [(token, result.data) for token, result in batch] == [(pops[0], b"a"), (pops[1], b"b")]
    assert runtime.polls == 0, "completions already there come back without a poll"
    assert runtime.wait_many([pops[2]], timeout=0.0) == []
    assert runtime.polls == 1
    with pytest.raises(LibOSError):
        runtime.wait_many([], timeout=0.0)
    push = runtime.table.completed(Opcode.PUSH, qd)
    assert runtime.table.done[push] is runtime.table.pushed(qd), "successful pushes share one result"
