"""The memcached server's loop (TCP and UDP on one port) against the in-memory fake LibOS,
then for real on the linux backend over loopback with memcaslap."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libos.api import LibOSError, SocketKind
from libos.apps.memcache.server import McServer
from libos.apps.memcache.udp import UDP_FRAME_HEADER
from tests.helpers import (App, FakeClock, FakeLibOS, free_port, linux_has_tcp, run_in_netns, stats_of,
                           vnic_has_tcp)
from kernelctl.names import Topology

PORT = 11211
CLIENT = ("10.0.0.9", 40000)


def frame(request_id: int, body: bytes, sequence: int = 0, total: int = 1) -> bytes:
    return UDP_FRAME_HEADER.pack(request_id, sequence, total, 0) + body


def run(server: McServer, turns: int = 5) -> None:
    for _ in range(turns):
        server.turn(0.0)


@pytest.fixture
def mc() -> tuple[FakeLibOS, McServer]:
    los = FakeLibOS()
    return los, McServer(los, PORT, clock=FakeClock(), max_udp_in_flight=8)


def test_tcp_and_udp_share_the_port_and_the_store(mc: tuple[FakeLibOS, McServer]) -> None:
    los, server = mc
    assert los.kinds[server.listen_qd] is SocketKind.TCP
    assert los.kinds[server.udp_qd] is SocketKind.UDP
    assert los.bound[server.listen_qd] == los.bound[server.udp_qd] == ("0.0.0.0", PORT)
    peer = los.connect_client()
    los.send(peer, b"set k 5 0 2\r\nhi\r\nget k\r\n")
    run(server)
    assert bytes(peer.received) == b"STORED\r\nVALUE k 5 2\r\nhi\r\nEND\r\n"
    los.send_udp(server.udp_qd, frame(7, b"get k\r\n"), CLIENT)
    run(server)
    assert los.udp_out == [(frame(7, b"VALUE k 5 2\r\nhi\r\nEND\r\n"), CLIENT)]


@pytest.mark.parametrize(
    ("datagram", "counter"),
    [
        (b"\x00\x01", "malformed"),
        (frame(1, b"get k\r\n", sequence=0, total=2), "multi_datagram_requests"),
        (frame(1, b"get k\r\n", sequence=3, total=2), "malformed"),
    ],
)
def test_bad_datagrams_get_no_reply(mc: tuple[FakeLibOS, McServer], datagram: bytes, counter: str) -> None:
    los, server = mc
    los.send_udp(server.udp_qd, datagram, CLIENT)
    run(server)
    assert los.udp_out == []
    assert server.udp_handler is not None
    assert getattr(server.udp_handler.counters, counter) == 1
    los.send_udp(server.udp_qd, frame(2, b"version\r\n"), CLIENT)
    run(server)
    assert len(los.udp_out) == 1  # still serving


def test_large_udp_reply_is_split_and_sends_are_bounded(mc: tuple[FakeLibOS, McServer]) -> None:
    los, server = mc
    peer = los.connect_client()
    value = b"v" * 5000
    los.send(peer, b"set big 0 0 5000\r\n" + value + b"\r\n")
    run(server)
    assert bytes(peer.received) == b"STORED\r\n"
    los.send_udp(server.udp_qd, frame(9, b"get big\r\n"), CLIENT)
    run(server)
    datagrams = [data for data, _ in los.udp_out]
    assert len(datagrams) == 4
    assert [UDP_FRAME_HEADER.unpack_from(d)[:3] for d in datagrams] == [(9, i, 4) for i in range(4)]
    assert b"".join(d[8:] for d in datagrams) == b"VALUE big 0 5000\r\n" + value + b"\r\nEND\r\n"
    # Sends that do not complete: at most max_udp_in_flight (8) datagrams outstanding.
    los.udp_out.clear()
    los.udp_stalled = True
    for request_id in range(5):
        los.send_udp(server.udp_qd, frame(request_id, b"get big\r\n"), CLIENT)
    run(server, 10)
    assert len(los.pushes) == 8
    assert server.udp_counters.replies_dropped == 3


def test_tcp_pipelined_multiget_is_served_in_bounded_steps(mc: tuple[FakeLibOS, McServer]) -> None:
    los, server = mc
    greedy = los.connect_client()
    polite = los.connect_client()
    los.send(greedy, b"set a 0 0 1\r\nx\r\n")
    run(server)
    keys = b" a" * 2000
    los.send(greedy, b"get" + keys + b"\r\n")
    server.turn(0.0)
    los.send(polite, b"version\r\n")
    server.turn(0.0)
    assert polite.received.startswith(b"VERSION ")
    run(server, 60)
    assert bytes(greedy.received) == b"STORED\r\n" + b"VALUE a 0 1\r\nx\r\n" * 2000 + b"END\r\n"
    assert server.server.counters.busy_turns > 0


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        (b"quit\r\nversion\r\n", b""),
        (b"set " + b"k" * 3000, b""),  # an overlong command line: closed without a reply
    ],
)
def test_session_close_closes_the_queue(mc: tuple[FakeLibOS, McServer], request_bytes: bytes,
                                        reply: bytes) -> None:
    los, server = mc
    peer = los.connect_client()
    los.send(peer, request_bytes)
    run(server)
    assert bytes(peer.received) == reply
    assert peer.closed_by_server
    assert server.engine.counters.curr_connections == 0
    assert len(server.server.pending) == 2  # the accept and the UDP pop


def test_bad_arguments_and_bind_failure_leave_nothing_open() -> None:
    los = FakeLibOS()
    with pytest.raises(ValueError):
        McServer(los, PORT, max_udp_in_flight=0)
    udp_squatter = los.socket(SocketKind.UDP)
    los.bind(udp_squatter, ("0.0.0.0", PORT))
    with pytest.raises(LibOSError):
        McServer(los, PORT)
    assert list(los.kinds) == [udp_squatter]
    server = McServer(los, PORT + 1, udp=False)
    assert server.udp_qd == -1 and server.udp_handler is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=200)), max_size=30))
def test_random_bytes_never_break_the_loop(inputs: list[tuple[int, bytes]]) -> None:
    los = FakeLibOS()
    server = McServer(los, PORT, clock=FakeClock())
    peers = [los.connect_client(), los.connect_client()]
    for index, data in inputs:
        if index == 2:
            los.send_udp(server.udp_qd, data, CLIENT)
        else:
            los.send(peers[index], data)
        server.turn(0.0)
    run(server, 20)
    assert server.engine.counters.curr_connections == len(server.server.connections)
    fresh = los.connect_client()
    los.send(fresh, b"version\r\n")
    los.udp_out.clear()
    los.send_udp(server.udp_qd, frame(1, b"version\r\n"), CLIENT)
    run(server)
    assert fresh.received.startswith(b"VERSION ")
    assert len(los.udp_out) == 1


def check_memcaslap(done: subprocess.CompletedProcess[str], udp: bool) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    # memcaslap's summary: "name: value" lines, then "Run time: 3.0s Ops: N TPS: N Net_rate: ...".
    summary = dict(re.findall(r"^(\w+): (\d+)$", out, re.MULTILINE))
    ops = re.search(r"Run time: \S+ Ops: (\d+) TPS", out)
    assert ops is not None and int(ops.group(1)) > 0, out
    assert int(summary["cmd_get"]) > 0 and int(summary["cmd_set"]) > 0, out
    assert summary["get_misses"] == "0", out
    if udp:
        for name in ("packet_disorder", "packet_drop", "udp_timeout"):
            assert summary[name] == "0", out


@pytest.fixture
def mc_linux() -> Iterator[tuple[App, int]]:
    if not linux_has_tcp():
        pytest.skip("the linux backend has no TCP yet")
    if shutil.which("memcaslap") is None:
        pytest.skip("memcaslap is not installed")
    port = free_port()
    app = App("libos.apps.memcache", "--backend", "linux", "--netns", "", "--address", "127.0.0.1",
              "--port", str(port), ready="memcache: ready")
    try:
        yield app, port
    finally:
        app.stop()


@pytest.mark.parametrize("udp", [False, True])
def test_linux_backend_with_memcaslap(mc_linux: tuple[App, int], udp: bool) -> None:
    app, port = mc_linux
    argv = ["memcaslap", "-s", f"127.0.0.1:{port}", "-t", "3s", "-c", "16"]
    if udp:
        argv.append("-U")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=40)
    check_memcaslap(done, udp)
    app.stop()
    stats = stats_of(app, "memcache: stats ")
    udp_stats = stats["udp"]
    assert isinstance(udp_stats, dict) and udp_stats["replies_dropped"] == 0
    if udp:
        assert udp_stats["datagrams_in"] > 0


def udp_set_get_client(address: tuple[str, int], count: int) -> list[bytes]:
    """``count`` set/get pairs over UDP, one datagram each way; the replies' bodies."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5.0)
    sock.connect(address)
    bodies = []
    for index in range(count):
        for request_id, body in ((2 * index, b"set u%d 0 0 3\r\nabc\r\n" % index), (2 * index + 1, b"get u%d\r\n" % index)):
            sock.send(frame(request_id, body))
            reply = sock.recv(2048)
            if UDP_FRAME_HEADER.unpack_from(reply) != (request_id, 0, 1, 0):
                raise AssertionError(f"bad frame header on {reply!r}")
            bodies.append(reply[UDP_FRAME_HEADER.size:])
    sock.close()
    return bodies


@pytest.mark.root
def test_vnic_backend_with_memcaslap_and_udp(h11_instance: Topology) -> None:
    if not vnic_has_tcp():
        pytest.skip("the vnic backend has no TCP yet")
    if shutil.which("memcaslap") is None:
        pytest.skip("memcaslap is not installed")
    topo = h11_instance
    with App("libos.apps.memcache", "--backend", "vnic", "--instance", topo.tag, "--port", str(PORT),
             ready="memcache: ready") as app:
        argv = ["ip", "netns", "exec", topo.client_netns, "memcaslap", "-s", f"{topo.vnic_ip}:{PORT}",
                "-t", "3s", "-c", "16"]
        check_memcaslap(subprocess.run(argv, capture_output=True, text=True, timeout=40), udp=False)
        # UDP from a scripted client rather than memcaslap -U: that run is covered on the linux
        # backend, and a reply later than memcaslap's own timeout makes it abort on an assert.
        bodies = run_in_netns(topo.client_netns, udp_set_get_client, (topo.vnic_ip, PORT), 200)
        assert bodies == [
            reply for index in range(200) for reply in (b"STORED\r\n", b"VALUE u%d 0 3\r\nabc\r\nEND\r\n" % index)]
        app.stop()
        stats = stats_of(app, "memcache: stats ")
        udp_stats = stats["udp"]
        assert isinstance(udp_stats, dict) and udp_stats["datagrams_in"] == 400
        assert udp_stats["replies_dropped"] == 0
