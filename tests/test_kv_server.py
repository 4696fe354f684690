"""The key-value server's event loop, against an in-memory fake LibOS (no root, no sockets),
then for real on the linux backend over loopback with redis-cli and redis-benchmark."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernelctl.names import Topology
from libos.api import LibOSError, Opcode, QResult, SocketKind
from libos.apps.kv.server import KvServer
from libos.apps.kv.session import DEFAULT_MAX_COMMANDS
from libos.apps.streams import EVENTS_PER_TURN
from tests.helpers import App, FakeClock, FakeLibOS, free_port, linux_has_tcp, stats_of, vnic_has_tcp

PORT = 6379


def resp_command(*args: bytes) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


@pytest.fixture
def kv() -> tuple[FakeLibOS, KvServer, FakeClock]:
    los = FakeLibOS()
    clock = FakeClock()
    return los, KvServer(los, PORT, clock=clock, max_clients=4), clock


def run(server: KvServer, turns: int = 5) -> None:
    for _ in range(turns):
        server.turn(0.0)


def test_request_reply_roundtrip(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    peer = los.connect_client()
    los.send(peer, resp_command(b"SET", b"k", b"v") + resp_command(b"GET", b"k"))
    los.send(peer, b"PING\r\n")  # inline form, a second chunk
    run(server)
    assert bytes(peer.received) == b"+OK\r\n$1\r\nv\r\n+PONG\r\n"
    assert server.engine.stats.connected_clients == 1


def test_listener_is_tcp_on_the_port(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    assert los.kinds[server.listen_qd] is SocketKind.TCP
    assert los.bound[server.listen_qd] == ("0.0.0.0", PORT)
    assert server.listen_qd in los.listening


@pytest.mark.parametrize(
    ("requests", "reply", "reason_counter"),
    [
        (b"QUIT\r\n", b"+OK\r\n", "closed_by_session"),
        (b"*1\r\n$x\r\n", b"-ERR Protocol error: invalid bulk length\r\n", "closed_by_session"),
    ],
)
def test_session_closes_after_its_reply(kv: tuple[FakeLibOS, KvServer, FakeClock], requests: bytes,
                                        reply: bytes, reason_counter: str) -> None:
    los, server, _ = kv
    peer = los.connect_client()
    los.send(peer, requests + b"PING\r\n")
    run(server)
    assert bytes(peer.received) == reply
    assert peer.closed_by_server
    assert server.server.counters.as_dict()[reason_counter] == 1
    assert server.engine.stats.connected_clients == 0
    assert not los.done, "tokens of a closed queue were left uncollected"


def test_peer_eof_still_gets_replies_then_close(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    peer = los.connect_client()
    los.send(peer, b"PING\r\n" * 3)
    peer.eof_sent = True
    run(server)
    assert bytes(peer.received) == b"+PONG\r\n" * 3
    assert peer.closed_by_server
    assert server.server.counters.closed_by_peer == 1
    assert server.server.connections == {}


def test_pipelined_client_does_not_starve_another(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    greedy = los.connect_client()
    polite = los.connect_client()
    count = DEFAULT_MAX_COMMANDS * 20
    los.send(greedy, b"PING\r\n" * count)
    run(server, 2)  # accept both, read both
    los.send(polite, b"ECHO hi\r\n")
    server.turn(0.0)
    assert bytes(polite.received) == b"$2\r\nhi\r\n"
    # The greedy client got a bounded share per turn, not all of its pipeline at once.
    assert len(greedy.received) < count * len(b"+PONG\r\n")
    run(server, 25)
    assert bytes(greedy.received) == b"+PONG\r\n" * count
    assert server.server.counters.busy_turns > 0


def test_client_that_does_not_read_is_not_read(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    slow = los.connect_client()
    slow.stalled = True
    other = los.connect_client()
    run(server, 2)
    for _ in range(50):
        los.send(slow, b"PING\r\n")
    run(server, 10)
    # One reply push is outstanding, so the server stopped popping this connection's
    # input: it stays in the "stack", not in our memory.
    assert los.pops_issued[slow.qd] <= 2
    assert len(slow.inbound) >= 48
    los.send(other, b"PING\r\n")
    run(server, 2)
    assert bytes(other.received) == b"+PONG\r\n"
    los.unstall(slow)
    run(server, 120)
    assert bytes(slow.received) == b"+PONG\r\n" * 50


def test_output_backpressure_stops_running_requests() -> None:
    los = FakeLibOS()
    server = KvServer(los, PORT, clock=FakeClock())
    peer = los.connect_client()
    peer.stalled = True
    big = b"x" * 200_000
    los.send(peer, resp_command(b"SET", b"big", big))
    los.send(peer, resp_command(b"GET", b"big") * 100)
    run(server, 40)
    # The session stops at its high-water mark (1 MiB) instead of building 20 MB of replies.
    session = server.server.connections[peer.qd].session
    assert session.kv.output_bytes < 2 * 1024 * 1024  # type: ignore[attr-defined]
    los.unstall(peer)
    for _ in range(400):
        server.turn(0.0)
        los.unstall(peer)
    assert bytes(peer.received) == b"+OK\r\n" + (b"$200000\r\n" + big + b"\r\n") * 100


def test_reset_and_push_failure_close_cleanly(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    reset = los.connect_client()
    run(server)
    reset.reset = True
    run(server)
    assert reset.closed_by_server
    assert server.server.counters.read_failed == 1
    broken = los.connect_client()
    broken.stalled = True
    run(server)
    los.send(broken, b"PING\r\n")
    run(server)
    ((push_token, _),) = los.pushes.items()
    del los.pushes[push_token]
    los.done[push_token] = QResult(Opcode.FAILED, broken.qd, error="connection reset")
    run(server)
    assert broken.closed_by_server
    assert server.server.counters.push_failed == 1
    assert server.engine.stats.connected_clients == 0
    assert len(server.server.pending) == 1  # the accept, nothing else


def test_max_clients_refused_and_accept_failure_survived(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    los.fail_accepts = 1
    peers = [los.connect_client() for _ in range(5)]
    run(server, 10)
    assert server.server.counters.accept_failed == 1
    assert server.server.counters.accepted == 4
    assert server.server.counters.refused_max_clients == 1
    assert peers[4].closed_by_server
    for peer in peers[:4]:
        los.send(peer, b"PING\r\n")
    run(server)
    assert all(bytes(peer.received) == b"+PONG\r\n" for peer in peers[:4])


def test_active_expiry_runs_from_the_loop(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, clock = kv
    peer = los.connect_client()
    los.send(peer, resp_command(b"SET", b"k", b"v", b"PX", b"100"))
    run(server)
    assert len(server.engine.keyspace) == 1
    clock.now += 1.0
    server.turn(0.0)
    assert len(server.engine.keyspace) == 0  # nobody touched the key: the sweep took it


def test_bad_arguments_rejected() -> None:
    los = FakeLibOS()
    with pytest.raises(ValueError):
        KvServer(los, PORT, max_clients=0)
    KvServer(los, PORT)
    with pytest.raises(LibOSError):
        KvServer(los, PORT)  # address in use
    assert len(los.kinds) == 1, "the failed listener's queue was not closed"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=300)), max_size=30),
       st.sets(st.integers(0, 2), max_size=3))
def test_random_bytes_never_break_the_loop(chunks: list[tuple[int, bytes]], closers: set[int]) -> None:
    los = FakeLibOS()
    server = KvServer(los, PORT, clock=FakeClock())
    peers = [los.connect_client() for _ in range(3)]
    for index, data in chunks:
        los.send(peers[index], data)
        server.turn(0.0)
    for index in closers:
        peers[index].eof_sent = True
    run(server, 30)
    # Every connection is either still served (one pop pending) or closed and forgotten.
    for peer in peers:
        conn = server.server.connections.get(peer.qd)
        if conn is None:
            assert peer.closed_by_server
        else:
            assert peer.qd not in closers or not conn.session.should_close()
    assert len(server.server.pending) <= 1 + 2 * len(server.server.connections)
    assert server.engine.stats.connected_clients == len(server.server.connections)
    # The server still works for a newcomer.
    fresh = los.connect_client()
    los.send(fresh, b"PING\r\n")
    run(server)
    assert bytes(fresh.received) == b"+PONG\r\n"


def test_loop_bounds_events_per_turn(kv: tuple[FakeLibOS, KvServer, FakeClock]) -> None:
    los, server, _ = kv
    server.server.max_clients = 1000
    for _ in range(EVENTS_PER_TURN * 2):
        los.connect_client()
    server.turn(0.0)
    assert server.server.counters.accepted <= EVENTS_PER_TURN


# Real runs on the linux backend over loopback, in this namespace.


@pytest.fixture
def kv_linux() -> Iterator[tuple[App, int]]:
    if not linux_has_tcp():
        pytest.skip("the linux backend has no TCP yet")
    port = free_port()
    app = App("libos.apps.kv", "--backend", "linux", "--netns", "", "--address", "127.0.0.1",
              "--port", str(port), ready="kv: ready")
    try:
        yield app, port
    finally:
        app.stop()


def test_linux_backend_with_redis_cli(kv_linux: tuple[App, int]) -> None:
    app, port = kv_linux
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    cli = ["redis-cli", "-h", "127.0.0.1", "-p", str(port)]

    def call(*args: str) -> str:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    assert call("PING") == "PONG"
    assert call("SET", "greeting", "hello") == "OK"
    assert call("GET", "greeting") == "hello"
    assert call("INCR", "n") == "1"
    assert call("DBSIZE") == "2"
    piped = subprocess.run(cli, input="SET a 1\nGET a\nDEL a\n", capture_output=True, text=True,
                           timeout=10, check=True).stdout.split()
    assert piped == ["OK", "1", "1"]
    app.stop()
    stats = stats_of(app, "kv: stats ")
    server = stats["server"]
    assert isinstance(server, dict) and server["accepted"] >= 6


@pytest.mark.parametrize("pipeline", ["1", "16"])
def test_linux_backend_with_redis_benchmark(kv_linux: tuple[App, int], pipeline: str) -> None:
    app, port = kv_linux
    if shutil.which("redis-benchmark") is None:
        pytest.skip("redis-benchmark is not installed")
    requests = 20000 if pipeline == "16" else 4000
    done = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "ping,set,get,incr,mset",
         "-n", str(requests), "-c", "50", "-P", pipeline, "-q"],
        capture_output=True, text=True, timeout=50,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert "error" not in out.lower(), out
    rates = dict(re.findall(r"^(\w+)(?: \(10 keys\))?: ([\d.]+) requests per second", out, re.MULTILINE))
    for name in ("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET"):
        assert float(rates.get(name, "0")) > 0, out
    app.stop()
    stats = stats_of(app, "kv: stats ")
    assert isinstance(stats["commands"], int) and stats["commands"] >= 6 * requests
    assert stats["error_replies"] == 0


# The same server on the vnic backend, clients in the instance's client namespace (root;
# the ``h11_instance`` fixture is conftest's).


@pytest.mark.root
def test_vnic_backend_with_redis_cli_and_benchmark(h11_instance: Topology) -> None:
    if not vnic_has_tcp():
        pytest.skip("the vnic backend has no TCP yet")
    if shutil.which("redis-benchmark") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis tools are not installed")
    topo = h11_instance
    with App("libos.apps.kv", "--backend", "vnic", "--instance", topo.tag, "--port", str(PORT),
             ready="kv: ready") as app:
        netns = ["ip", "netns", "exec", topo.client_netns]
        cli = [*netns, "redis-cli", "-h", topo.vnic_ip, "-p", str(PORT)]
        piped = subprocess.run(cli, input="PING\nSET a 1\nINCR a\nGET a\n", capture_output=True,
                               text=True, timeout=20, check=True).stdout.split()
        assert piped == ["PONG", "OK", "2", "2"]
        for pipeline, requests in (("1", "1000"), ("16", "5000")):
            done = subprocess.run(
                [*netns, "redis-benchmark", "-h", topo.vnic_ip, "-p", str(PORT), "-t", "ping,set,get,incr,mset",
                 "-n", requests, "-c", "50", "-P", pipeline, "-q"],
                capture_output=True, text=True, timeout=50,
            )
            out = done.stdout + done.stderr
            assert done.returncode == 0 and "error" not in out.lower(), out
            assert re.search(r"^GET: [\d.]+ requests per second", out, re.MULTILINE), out
        app.stop()
        stats = stats_of(app, "kv: stats ")
        assert stats["error_replies"] == 0
        assert isinstance(stats["commands"], int) and stats["commands"] >= 6 * (1000 + 5000)
