"""End to end, as root: a Linux TCP socket in the client namespace, the tap, the device host
(optionally with a lossy wire), and this test process as the libOS on the ``vnic`` backend.

The Linux peer runs in a forked child inside the instance's client namespace while the
parent drives the libOS; the ``instance`` fixture gives unique names and tears down.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import pytest

from kernelctl.names import Topology
from libos.api import open_libos
from libos.api.types import LibOS, Opcode, SocketKind
from libos.api.vnic import VnicLibOS

pytestmark = pytest.mark.root

PORT = 5000
CHUNK = 256 * 1024


def _blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _connect_retrying(address: tuple[str, int], limit: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + limit
    while True:
        sock = socket.socket()
        try:
            sock.connect(address)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def linux_transfer_peer(address: tuple[str, int], size: int) -> tuple[int, str]:
    """Send ``size`` bytes (seed 1), half-close, read to EOF; (bytes read, their SHA-256)."""
    sock = _connect_retrying(address)
    sock.settimeout(120)
    sock.sendall(_blob(1, size))
    sock.shutdown(socket.SHUT_WR)
    digest = hashlib.sha256()
    count = 0
    while chunk := sock.recv(1 << 20):
        digest.update(chunk)
        count += len(chunk)
    sock.close()
    return count, digest.hexdigest()


class Child:
    """``fn(*args)`` in a forked child inside ``netns``; the parent polls for the result."""

    def __init__(self, netns: str, fn: Callable[..., Any], *args: Any) -> None:
        ctx = multiprocessing.get_context("fork")
        self._receiver, sender = ctx.Pipe(duplex=False)

        def child(out: Connection) -> None:
            try:
                from pyroute2 import netns as pyroute2_netns

                pyroute2_netns.setns(netns)
                out.send(("ok", fn(*args)))
            except BaseException as exc:
                out.send(("error", repr(exc)))

        self.process = ctx.Process(target=child, args=(sender,), daemon=True)
        self.process.start()
        sender.close()

    def ready(self) -> bool:
        return self._receiver.poll(0)

    def result(self) -> Any:
        status, value = self._receiver.recv()
        assert status == "ok", value
        return value

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self._receiver.close()


def serve_transfer(los: LibOS, qd: int, outgoing: bytes, limit: float) -> tuple[int, str]:
    """Push ``outgoing`` while reading to EOF (full duplex), then close gracefully."""
    deadline = time.monotonic() + limit
    digest = hashlib.sha256()
    count = 0
    offset = 0
    push: int | None = None
    pop: int | None = los.pop(qd)
    while pop is not None or push is not None or offset < len(outgoing):
        if push is None and offset < len(outgoing):
            push = los.push(qd, outgoing[offset : offset + CHUNK])
            offset += CHUNK
        tokens = [t for t in (pop, push) if t is not None]
        found = los.wait_any(tokens, max(0.0, deadline - time.monotonic()))
        assert found is not None, f"transfer stalled: {count} bytes in, {offset} out"
        token = tokens[found[0]]
        result = found[1]
        if token == pop:
            assert result.opcode is Opcode.POP, result
            if result.data:
                digest.update(result.data)
                count += len(result.data)
                pop = los.pop(qd)
            else:
                pop = None
        else:
            assert result.opcode is Opcode.PUSH, result
            push = None
    los.close(qd)
    return count, digest.hexdigest()


def run_transfer(topo: Topology, size: int, limit: float) -> dict[str, float]:
    los = open_libos("vnic", instance=topo.tag, name="tcp-e2e")
    child = Child(topo.client_netns, linux_transfer_peer, (topo.vnic_ip, PORT), size)
    try:
        listener = los.socket(SocketKind.TCP)
        los.bind(listener, ("0.0.0.0", PORT))
        los.listen(listener, 16)
        accepted = los.wait(los.accept(listener), 20)
        assert accepted is not None and accepted.opcode is Opcode.ACCEPT, accepted
        start = time.monotonic()
        outgoing = _blob(2, size)
        count, digest = serve_transfer(los, accepted.new_qd, outgoing, limit)
        assert count == size
        assert digest == hashlib.sha256(_blob(1, size)).hexdigest()
        # Keep the stack running until the peer has read everything and reported.
        spare = los.accept(listener)
        while not child.ready():
            assert time.monotonic() - start < limit, "the Linux peer did not finish"
            los.wait(spare, 0.05)
        peer_count, peer_digest = child.result()
        elapsed = time.monotonic() - start
        assert peer_count == size
        assert peer_digest == hashlib.sha256(outgoing).hexdigest()
        return {"seconds": elapsed, "mbytes_per_s_each_way": size / elapsed / 1e6}
    finally:
        child.stop()
        los.shutdown()


def test_twenty_megabytes_each_way_clean(instance: Topology) -> None:
    stats = run_transfer(instance, 20 << 20, limit=120)
    print(f"vnic TCP, clean wire: {stats}")


@pytest.fixture
def lossy_instance(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Topology]:
    """An instance whose device host drops, duplicates and reorders 5% of frames each way."""
    monkeypatch.setenv("ARRAKIS_VNIC_FAULTS", "loss=0.05,dup=0.05,reorder=0.05,seed=1")
    topo: Topology = request.getfixturevalue("instance")
    yield topo


def test_two_megabytes_each_way_over_a_lossy_wire(lossy_instance: Topology) -> None:
    log = lossy_instance.run_dir / "vnic-host.log"
    stats = run_transfer(lossy_instance, 2 << 20, limit=120)
    assert "injecting faults" in log.read_text()
    print(f"vnic TCP, 5% loss/dup/reorder: {stats}")


@pytest.mark.slow
@pytest.mark.xfail(
    reason="stalls in RTO backoff: without SACK the Linux sender's reordering estimate "
    "(raised by the duplicates) disables fast retransmit; see the TCP issue",
    strict=False,
)
def test_twenty_megabytes_each_way_over_a_lossy_wire(lossy_instance: Topology) -> None:
    stats = run_transfer(lossy_instance, 20 << 20, limit=590)
    print(f"vnic TCP, 5% loss/dup/reorder, 20 MB: {stats}")


def syn_flood(src_ip: str, dst_ip: str, port: int, rate: int, seconds: float) -> int:
    """Raw SYNs from a spoofed address that never answers, ``rate`` per second."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    rng = random.Random(9)
    sent = 0
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            src_port = rng.randrange(1024, 65536)
            header = struct.pack("!HHIIBBHHH", src_port, port, rng.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
            pseudo = src + dst + struct.pack("!BBH", 0, 6, len(header))
            total = 0
            data = pseudo + header
            for index in range(0, len(data), 2):
                total += (data[index] << 8) | data[index + 1]
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            header = header[:16] + struct.pack("!H", ~total & 0xFFFF) + header[18:]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, sent & 0xFFFF, 0x4000, 64, 6, 0, src, dst)
            sock.sendto(ip + header, (dst_ip, 0))
            sent += 1
        time.sleep(0.001)
    sock.close()
    return sent


def echo_peer(address: tuple[str, int], seconds: float) -> int:
    """Ping-pong 64-byte messages over one connection for ``seconds``; how many came back."""
    sock = _connect_retrying(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(10)
    answered = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        message = answered.to_bytes(64, "big")
        sock.sendall(message)
        got = b""
        while len(got) < 64:
            chunk = sock.recv(64 - len(got))
            assert chunk, "the server closed the connection"
            got += chunk
        assert got == message
        answered += 1
    sock.close()
    return answered


def test_syn_flood_is_bounded_and_the_established_connection_keeps_echoing(instance: Topology) -> None:
    los = open_libos("vnic", instance=instance.tag, name="tcp-flood")
    assert isinstance(los, VnicLibOS)
    backlog = 64
    echo = Child(instance.client_netns, echo_peer, (instance.vnic_ip, PORT), 8.0)
    flood: Child | None = None
    try:
        listener = los.socket(SocketKind.TCP)
        los.bind(listener, ("0.0.0.0", PORT))
        los.listen(listener, backlog)
        accepted = los.wait(los.accept(listener), 20)
        assert accepted is not None and accepted.opcode is Opcode.ACCEPT
        conn = accepted.new_qd
        flood = Child(instance.client_netns, syn_flood, "10.10.0.77", instance.vnic_ip, PORT, 10_000, 5.0)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        streams = los.streams
        assert streams is not None
        most_connections = 0
        echoed = 0
        pop = los.pop(conn)
        accept = los.accept(listener)
        while not echo.ready():
            found = los.wait_any([pop, accept], 0.05)
            most_connections = max(most_connections, streams.tcp.connection_count)
            if found is None:
                continue
            index, result = found
            if index == 1:
                accept = los.accept(listener)  # a flood SYN never completes a handshake
                continue
            assert result.opcode is Opcode.POP and result.data, result
            pushed = los.wait(los.push(conn, result.data), 5)
            assert pushed is not None and pushed.opcode is Opcode.PUSH
            echoed += len(result.data)
            pop = los.pop(conn)
        answered = echo.result()
        assert flood.ready()
        sent = flood.result()
        counters = streams.tcp.counters
        print(f"SYN flood: {sent} SYNs, {answered} echoes, counters {counters.as_dict()}")
        assert sent >= 40_000
        assert counters.drop_backlog_full > sent // 2  # the backlog, not memory, took the rest
        assert most_connections <= backlog + 1  # half-open ones plus the established one
        assert answered > 100  # the established connection was served throughout
        assert echoed == answered * 64
        rss_growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        assert rss_growth_kib < 64 * 1024
    finally:
        echo.stop()
        if flood is not None:
            flood.stop()
        los.shutdown()
