"""Acceptance, as root: real memcached clients against the libOS memcache server on both backends.

The libOS server (``python -m libos.apps.memcache``, TCP and UDP on one port) runs on the
VNIC (``topo.vnic_ip``) and on the Linux baseline (``topo.linux_ip``); the clients run in
the instance's client namespace and reach it over the bridge.

* memcaslap, its default get/set mix (90% get, 10% set), 16 connections, 10 seconds, over
  TCP and over UDP (``-U``): no errors and no get misses (memcaslap only reads keys it has
  written and nothing expires; the server gets ``--memory`` enough for every set of the
  run, and must report no eviction), and over UDP no disorder, drop or timeout; the
  server's own counters must show no reply dropped or failed.
* A UDP client that checks every reply datagram: each request id gets exactly one reply
  (each of its datagrams exactly once, with a consistent total), and nothing arrives for a
  request that is not outstanding. memcaslap asserts (and aborts) on a datagram whose
  request id is not the one it waits for, so a duplicated, late or misdirected reply
  would show there as a crash; this test names it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernelctl.client import ControlClient
from kernelctl.names import Topology
from tests.helpers import App, run_in_netns
from tests.test_redis_clients import our_app

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("memcaslap") is None, reason="needs memcaslap (libmemcached-tools)"),
]

PORT = 11211
MEMORY_MB = 512  # well above what 10 s of sets can fill, even on a fast server
BACKENDS = ("vnic", "linux")
MEMCASLAP_SECONDS = 10
FRAME_HEADER = struct.Struct("!HHHH")  # request id, sequence, total, reserved
MAX_DATAGRAM = 1400  # memcached's UDP payload size, frame header included

Address = tuple[str, int]


@contextlib.contextmanager
def mc_servers(topo: Topology) -> Iterator[dict[str, tuple[Address, App]]]:
    with contextlib.ExitStack() as stack:
        servers = {}
        for backend, ip in zip(BACKENDS, (topo.vnic_ip, topo.linux_ip)):
            app = stack.enter_context(our_app("libos.apps.memcache", backend, topo, PORT))
            servers[backend] = ((ip, PORT), app)
        yield servers


def server_stats(app: App) -> dict[str, Any]:
    """The counters the server printed when it stopped."""
    app.stop()
    for line in reversed(app.lines):
        if line.startswith("memcache: stats "):
            parsed: dict[str, Any] = json.loads(line[len("memcache: stats "):])
            return parsed
    raise AssertionError(f"no stats line in {app.lines}")


def memcaslap(topo: Topology, address: Address, udp: bool) -> tuple[str, dict[str, int]]:
    argv = ["ip", "netns", "exec", topo.client_netns, "memcaslap", "-s", f"{address[0]}:{address[1]}",
            "-t", f"{MEMCASLAP_SECONDS}s", "-c", "16"]
    if udp:
        argv.append("-U")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=MEMCASLAP_SECONDS + 60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"memcaslap exited {done.returncode} (an assert aborts it):\n{output[-3000:]}"
    counters = {name: int(value) for name, value in re.findall(r"^(\w+): (\d+)$", output, re.MULTILINE)}
    return output, counters


def wait_functions_reclaimed(topo: Topology, timeout: float = 30.0) -> None:
    """Until kernelctl has reclaimed every function (a stopped vnic app's included): from
    then on nothing that app queued can still leave the device host."""
    deadline = time.monotonic() + timeout
    with ControlClient(topo.control_socket) as control:
        while control.status()["functions"]:
            if time.monotonic() > deadline:
                raise AssertionError(f"functions not reclaimed within {timeout} s: {control.status()['functions']}")
            time.sleep(0.05)


def memcaslap_alone(topo: Topology, backend: str, udp: bool) -> tuple[tuple[str, dict[str, int]], dict[str, Any]]:
    """memcaslap against one backend's server, that server stopped before the next run.

    memcaslap's UDP sockets are unconnected (bound to 0.0.0.0 and an ephemeral port): a
    datagram from any source reaches them, and one whose request id is not the one awaited
    aborts it (``ms_sort_udp_packet``'s assertion). When one run ends, its last requests
    are still in flight; if the next run started while the first server still answered
    them, a new socket that drew a port of the old run got the old server's late reply:
    the abort then showed in the *second* run. So the first server is stopped, and its
    function reclaimed, before the next memcaslap starts.
    """
    ip = topo.vnic_ip if backend == "vnic" else topo.linux_ip
    # Room for every set of the run: memcaslap writes about 1 KiB per set, and a server
    # that evicted would turn later reads of those keys into misses, which must be none.
    with our_app("libos.apps.memcache", backend, topo, PORT, "--memory", str(MEMORY_MB)) as app:
        run = memcaslap(topo, (ip, PORT), udp)
        stats = server_stats(app)
    wait_functions_reclaimed(topo)
    return run, stats


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_memcaslap_default_mix_on_both_backends(instance: Topology, udp: bool) -> None:
    runs: dict[str, tuple[str, dict[str, int]]] = {}
    stats: dict[str, dict[str, Any]] = {}
    for backend in BACKENDS:
        runs[backend], stats[backend] = memcaslap_alone(instance, backend, udp)

    for backend in BACKENDS:
        output, counters = runs[backend]
        assert not re.search(r"error|fail|assert", output, re.IGNORECASE), f"{backend}:\n{output[-3000:]}"
        assert counters["cmd_get"] > 1000 and counters["cmd_set"] > 100, f"{backend}: {counters}"
        assert stats[backend]["limit_maxbytes"] == MEMORY_MB << 20, stats[backend]
        assert stats[backend]["evictions"] == 0, f"{backend}: the store filled up: {stats[backend]}"
        assert counters["get_misses"] == 0, f"{backend}: {counters}"
        if udp:
            for name in ("packet_disorder", "packet_drop", "udp_timeout"):
                assert counters[name] == 0, f"{backend}: {name} {counters}"
        server = stats[backend]
        # Every request memcaslap counted reached the server (it may stop with a few in flight).
        assert server["cmd_get"] + server["cmd_set"] >= counters["cmd_get"] + counters["cmd_set"] - 16
        udp_counters = server["udp"]
        assert udp_counters["replies_dropped"] == 0 and udp_counters["push_failed"] == 0, f"{backend}: {server}"
        assert udp_counters["pop_failed"] == 0, f"{backend}: {server}"
        if udp:
            assert udp_counters["datagrams_in"] >= counters["cmd_get"] + counters["cmd_set"] - 16
        else:
            assert udp_counters["datagrams_in"] == 0


def _tcp_set(address: Address, key: str, value: bytes) -> None:
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(value), value))
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = conn.recv(64)
            if not chunk:
                break
            reply += chunk
        if reply != b"STORED\r\n":
            raise AssertionError(f"set {key} over TCP: {reply!r}")


def udp_exactness_client(address: Address, sockets: int, rounds: int, window: int) -> dict[str, Any]:
    """``sockets`` UDP sockets, each with ``window`` requests in flight per round.

    Every datagram that comes back is checked against the requests outstanding on its
    socket; anything else is counted as a violation by kind.
    """
    big = bytes(range(256)) * 16  # 4096 bytes: its reply spans three datagrams
    _tcp_set(address, "exact-big", big)
    expected = {
        b"get exact-big\r\n": b"VALUE exact-big 0 4096\r\n" + big + b"\r\nEND\r\n",
        b"get exact-none\r\n": b"END\r\n",
        b"set exact-small 0 0 5\r\nhello\r\n": b"STORED\r\n",
    }
    requests = list(expected)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(sockets)]
    violations: dict[str, int] = {"unknown_id": 0, "duplicate": 0, "bad_total": 0, "bad_reply": 0,
                                  "short": 0, "unanswered": 0}
    completed = 0
    next_id = 1
    try:
        for sock in socks:
            sock.connect(address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for round_index in range(rounds):
            # id -> (request, total seen or 0, {sequence: payload})
            outstanding: list[dict[int, tuple[bytes, int, dict[int, bytes]]]] = []
            for sock in socks:
                mine: dict[int, tuple[bytes, int, dict[int, bytes]]] = {}
                for slot in range(window):
                    request = requests[(round_index + slot) % len(requests)]
                    sock.send(FRAME_HEADER.pack(next_id, 0, 1, 0) + request)
                    mine[next_id] = (request, 0, {})
                    next_id += 1
                outstanding.append(mine)
            deadline = time.monotonic() + 20.0  # ends when every reply is in
            for sock, mine in zip(socks, outstanding):
                while mine and time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        datagram = sock.recv(65536)
                    except TimeoutError:
                        break
                    if len(datagram) < FRAME_HEADER.size:
                        violations["short"] += 1
                        continue
                    request_id, sequence, total, _reserved = FRAME_HEADER.unpack_from(datagram)
                    if request_id not in mine:
                        violations["unknown_id"] += 1
                        continue
                    request, seen_total, parts = mine[request_id]
                    if total == 0 or sequence >= total or (seen_total and total != seen_total):
                        violations["bad_total"] += 1
                        continue
                    if sequence in parts:
                        violations["duplicate"] += 1
                        continue
                    if len(datagram) > MAX_DATAGRAM or (sequence < total - 1 and len(datagram) != MAX_DATAGRAM):
                        violations["bad_total"] += 1
                    parts[sequence] = datagram[FRAME_HEADER.size:]
                    mine[request_id] = (request, total, parts)
                    if len(parts) == total:
                        reply = b"".join(parts[index] for index in range(total))
                        if reply != expected[request]:
                            violations["bad_reply"] += 1
                        del mine[request_id]
                        completed += 1
                violations["unanswered"] += len(mine)
        # Anything still arriving now is a late or duplicated reply.
        time.sleep(0.3)
        for sock in socks:
            sock.setblocking(False)
            while True:
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
                violations["unknown_id"] += 1
    finally:
        for sock in socks:
            sock.close()
    return {"completed": completed, "sent": next_id - 1, "violations": violations}


def test_udp_replies_are_exact_on_both_backends(instance: Topology) -> None:
    with mc_servers(instance) as servers:
        results = {backend: run_in_netns(instance.client_netns, udp_exactness_client, address, 8, 100, 4,
                                         timeout=240)
                   for backend, (address, _app) in servers.items()}
        stats = {backend: server_stats(app) for backend, (_address, app) in servers.items()}

    for backend in BACKENDS:
        result = results[backend]
        assert result["sent"] == 8 * 100 * 4
        assert result["violations"] == dict.fromkeys(result["violations"], 0), f"{backend}: {result}"
        assert result["completed"] == result["sent"], f"{backend}: {result}"
        frames = stats[backend]["udp_frames"]
        assert frames["malformed"] == 0 and frames["replies"] == result["sent"], f"{backend}: {frames}"


def test_memcaslap_aborts_on_any_datagram_with_a_foreign_request_id(instance: Topology) -> None:
    """Pins the cause ``memcaslap_alone`` guards against: memcaslap's UDP sockets accept a
    datagram from any source, and one reply with another request id aborts the whole run
    (here a forged one, from a third party; in the flake, the previous run's late reply)."""
    argv = ["ip", "netns", "exec", instance.client_netns, "memcaslap", "-s", f"{instance.linux_ip}:{PORT}",
            "-t", "30s", "-c", "1", "-U"]
    # No server answers: memcaslap waits for its first reply on an unconnected socket.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        ports: list[int] = []
        while not ports and time.monotonic() < deadline and proc.poll() is None:
            shown = subprocess.run(["ip", "netns", "exec", instance.client_netns, "ss", "-Huanp"],
                                   capture_output=True, text=True).stdout
            ports = [int(line.split()[3].rsplit(":", 1)[1]) for line in shown.splitlines()
                     if f"pid={proc.pid}," in line and line.split()[4] == "0.0.0.0:*"]
            time.sleep(0.05)
        assert ports, "memcaslap opened no unconnected UDP socket"
        forged = FRAME_HEADER.pack(0xBEEF, 0, 1, 0) + b"STORED\r\n"
        run_in_netns(instance.client_netns, _send_to_loopback, ports[0], forged)
        output, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0 and "ms_sort_udp_packet" in output, output[-2000:]


def _send_to_loopback(port: int, datagram: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(datagram, ("127.0.0.1", port))
