"""Acceptance, as root: the memcached-compatible server in two worker processes.

On ``vnic`` the function has two queue pairs and receive-side scaling spreads the clients'
flows over them, one worker per queue; on ``linux`` each worker has its own SO_REUSEPORT
socket. memcaslap, over TCP and over UDP, must see no error on either backend, and both
workers must have served part of the load. A worker killed with SIGKILL takes only its queue
down: the others keep serving new connections, and kernelctl reclaims the function once the
application is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kernelctl.client import ControlClient
from kernelctl.names import Topology
from tests.helpers import App, run_in_netns
from tests.test_memcache_clients import memcaslap, wait_functions_reclaimed

pytestmark = [pytest.mark.root]

PORT = 11311
WORKERS = 2


@contextlib.contextmanager
def mc_workers(topo: Topology, backend: str) -> Iterator[App]:
    app = App("libos.apps.memcache", "--backend", backend, "--instance", topo.tag, "--port", str(PORT),
              "--workers", str(WORKERS), ready="memcache: ready", timeout=90.0)
    try:
        yield app
    finally:
        app.stop()


def worker_pids(app: App) -> list[int]:
    for line in app.lines:
        found = re.search(r"memcache: ready .* workers=(\d+) pids=([\d,]+)", line)
        if found:
            return [int(pid) for pid in found.group(2).split(",")]
    raise AssertionError(f"no ready line with pids in {app.lines}")


def stopped_stats(app: App) -> dict[str, Any]:
    err = app.stop()
    assert app.process.returncode == 0 and "Traceback" not in err, f"rc {app.process.returncode}:\n{err}"
    for line in reversed(app.lines):
        if line.startswith("memcache: stats "):
            parsed: dict[str, Any] = json.loads(line[len("memcache: stats "):])
            return parsed
    raise AssertionError(f"no stats line in {app.lines}")


@pytest.mark.skipif(shutil.which("memcaslap") is None, reason="needs memcaslap (libmemcached-tools)")
@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
@pytest.mark.parametrize("backend", ["vnic", "linux"])
def test_memcaslap_against_two_workers(instance: Topology, backend: str, udp: bool) -> None:
    ip = instance.vnic_ip if backend == "vnic" else instance.linux_ip
    with mc_workers(instance, backend) as app:
        assert len(worker_pids(app)) == WORKERS
        output, counters = memcaslap(instance, (ip, PORT), udp)
        stats = stopped_stats(app)
    wait_functions_reclaimed(instance)
    assert not re.search(r"error|fail|assert", output, re.IGNORECASE), output[-3000:]
    assert counters["cmd_get"] > 1000 and counters["cmd_set"] > 100, counters
    # Each worker has a store of its own, and a flow stays with one worker: memcaslap
    # reads back on a connection only what it wrote there, so it misses nothing.
    assert counters["get_misses"] == 0, counters
    if udp:
        for name in ("packet_disorder", "packet_drop", "udp_timeout"):
            assert counters[name] == 0, f"{name}: {counters}"
    assert stats["cmd_get"] + stats["cmd_set"] >= counters["cmd_get"] + counters["cmd_set"] - 16
    per_worker = stats["workers"]
    assert [part["worker"] for part in per_worker] == list(range(WORKERS))
    # 16 connections (or UDP sockets) over two workers: each got some of them.
    assert all(part["cmd_get"] > 0 for part in per_worker), [part["cmd_get"] for part in per_worker]
    if backend == "vnic":
        assert sorted(part["libos"]["queue"] for part in per_worker) == list(range(WORKERS))


def _sets_and_gets(address: tuple[str, int], prefix: str, count: int) -> None:
    """``count`` fresh connections (new flows, so new RSS hashes), a set and a get on each."""
    for index in range(count):
        _set_and_get(address, f"{prefix}{index}")


def _set_and_get(address: tuple[str, int], key: str, timeout: float = 15.0) -> None:
    with socket.create_connection(address, timeout=timeout) as conn:
        conn.sendall(b"set %s 0 0 2\r\nok\r\nget %s\r\n" % (key.encode(), key.encode()))
        reply = b""
        while not reply.endswith(b"END\r\n"):
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply == b"STORED\r\nVALUE %s 0 2\r\nok\r\nEND\r\n" % key.encode(), reply


def test_a_dead_worker_takes_only_its_queue_down(instance: Topology) -> None:
    address = (instance.vnic_ip, PORT)
    with mc_workers(instance, "vnic") as app:
        pids = worker_pids(app)
        run_in_netns(instance.client_netns, _sets_and_gets, address, "before", 8)
        os.kill(pids[1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not any("worker 1" in line and "queue is down" in line for line in _stderr_lines(app)):
            assert time.monotonic() < deadline, "the parent did not notice the dead worker"
            time.sleep(0.1)
        # The function lives on: kernelctl still holds it, and every new flow is served
        # (steered to the live queue), however the hash would have placed it before.
        with ControlClient(instance.control_socket) as control:
            assert len(control.status()["functions"]) == 1
        run_in_netns(instance.client_netns, _sets_and_gets, address, "after", 20, timeout=120.0)
        assert app.process.poll() is None and _alive(pids[0])
        app.stop()
        assert app.process.returncode == 0
    wait_functions_reclaimed(instance)
    assert not _alive(pids[0])


_STDERR: dict[int, list[str]] = {}


def _stderr_lines(app: App) -> list[str]:
    """What the app printed on stderr so far (read without blocking)."""
    lines = _STDERR.setdefault(app.pid, [])
    stream = app.process.stderr
    if stream is None:
        return lines
    os.set_blocking(stream.fileno(), False)
    try:
        data = os.read(stream.fileno(), 65536)
    except BlockingIOError:
        data = b""
    lines.extend(data.decode(errors="replace").splitlines())
    return lines


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_kernelctl_refuses_a_function_with_too_many_queues(instance: Topology) -> None:
    """The device host refuses a queue count past what its register page holds; the control
    plane says so and goes on serving."""
    from kernelctl.client import ControlError

    with ControlClient(instance.control_socket) as control:
        with pytest.raises(ControlError):
            control.open_vnic([("udp", PORT)], queues=31)
        sock, info = control.open_vnic([("udp", PORT)], queues=2)
        sock.close()
        assert info["function_id"] > 0
