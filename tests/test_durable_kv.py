"""Durable SET under crashes, as root: nothing acknowledged with +OK is ever lost.

16 clients write concurrently; the server (or, on the bypass path, the VSIC device host
under it) is killed with SIGKILL at a random moment; after the restart every key that was
acknowledged must read back with its value. Twenty rounds per backend.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from kernelctl.names import Topology
from tests.helpers import App, run_in_netns

pytestmark = pytest.mark.root

CLIENTS = 16
ROUNDS = 10  # random kill times over 10 rounds; each round costs the writers' 2 s and a restart


def command(*args: bytes) -> bytes:
    out = b"*%d\r\n" % len(args)
    for arg in args:
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out


def writers(address: tuple[str, int], prefix: str, seconds: float) -> list[tuple[str, str]]:
    """CLIENTS connections each SET distinct keys until the server goes away."""
    acked: list[tuple[str, str]] = []
    lock = threading.Lock()

    def one(client: int) -> None:
        try:
            sock = socket.create_connection(address, timeout=5)
        except OSError:
            return
        deadline = time.monotonic() + seconds
        index = 0
        try:
            while (left := deadline - time.monotonic()) > 0:
                # A killed libOS app sends no RST: a reply that never comes ends this client
                # half a second after the round, not after a fixed five seconds.
                sock.settimeout(left + 0.5)
                key, value = f"{prefix}:{client}:{index}", f"v{index}-{random.random()}"
                sock.sendall(command(b"SET", key.encode(), value.encode()))
                reply = b""
                while not reply.endswith(b"\r\n"):
                    chunk = sock.recv(64)
                    if not chunk:
                        return
                    reply += chunk
                if reply != b"+OK\r\n":
                    return
                with lock:
                    acked.append((key, value))
                index += 1
        except OSError:
            return
        finally:
            sock.close()

    threads = [threading.Thread(target=one, args=(client,)) for client in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return acked


def read_back(address: tuple[str, int], pairs: list[tuple[str, str]]) -> list[str]:
    """Keys whose value is not what was acknowledged."""
    sock = socket.create_connection(address, timeout=10)
    wrong = []
    reader = sock.makefile("rb")
    for start in range(0, len(pairs), 200):
        chunk = pairs[start : start + 200]
        sock.sendall(b"".join(command(b"GET", key.encode()) for key, _ in chunk))
        for key, value in chunk:
            header = reader.readline()
            if header.startswith(b"$-1"):
                wrong.append(f"{key} missing")
                continue
            length = int(header[1:])
            data = reader.read(length + 2)[:-2].decode()
            if data != value:
                wrong.append(f"{key}={data!r}, acknowledged {value!r}")
    sock.close()
    return wrong


def kv_app(backend: str, tag: str) -> App:
    return App("libos.apps.kv", "--backend", backend, "--instance", tag, "--port", "6379", "--durable",
               "--log-size", str(64 << 20))


def vsic_host_pid(topo: Topology) -> int:
    daemon = psutil.Process(int(topo.pid_file.read_text()))
    for child in daemon.children():
        if "vdev.vsic.host" in child.cmdline():
            return int(child.pid)
    raise AssertionError("no VSIC device host")


def wait_for_new_vsic_host(topo: Topology, killed_pid: int, timeout: float = 30.0) -> None:
    """kernelctl notices the crash and starts a new VSIC host: wait for it (a deadline,
    not a guess at how long a loaded machine takes)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if vsic_host_pid(topo) != killed_pid:
                return
        except (AssertionError, psutil.Error):
            pass  # between the old host's exit and the new one's start
        if time.monotonic() > deadline:
            raise AssertionError(f"no new VSIC device host within {timeout} s")
        time.sleep(0.05)


def crash_rounds(topo: Topology, backend: str, kill_device_host: bool, rounds: int) -> int:
    ip = topo.vnic_ip if backend == "vnic" else topo.linux_ip
    rng = random.Random(f"{backend}-{kill_device_host}")
    acknowledged: list[tuple[str, str]] = []
    app = kv_app(backend, topo.tag)
    try:
        for round_number in range(rounds):
            result: dict[str, list[tuple[str, str]]] = {}
            load = threading.Thread(
                target=lambda: result.update(
                    acked=run_in_netns(topo.client_netns, writers, (ip, 6379), f"r{round_number}", 2.0, timeout=60)
                )
            )
            load.start()
            time.sleep(rng.uniform(0.3, 1.5))
            killed_pid = 0
            if kill_device_host:
                killed_pid = vsic_host_pid(topo)
                os.kill(killed_pid, signal.SIGKILL)
            else:
                app.process.send_signal(signal.SIGKILL)
            load.join()
            app.stop()  # after a device host crash the app fails its next commit and exits
            acknowledged += result["acked"]
            if kill_device_host:
                wait_for_new_vsic_host(topo, killed_pid)
            app = kv_app(backend, topo.tag)
            wrong = run_in_netns(topo.client_netns, read_back, (ip, 6379), acknowledged, timeout=120)
            assert wrong == [], f"round {round_number}: {len(wrong)} acknowledged writes lost: {wrong[:5]}"
    finally:
        app.stop()
    return len(acknowledged)


@pytest.mark.parametrize("backend", ["vnic", "linux"])
def test_acknowledged_sets_survive_sigkill_of_the_app(instance: Topology, backend: str) -> None:
    acknowledged = crash_rounds(instance, backend, kill_device_host=False, rounds=ROUNDS)
    assert acknowledged > ROUNDS * CLIENTS  # the clients really wrote between crashes


def test_acknowledged_sets_survive_sigkill_of_the_vsic_device_host(instance: Topology) -> None:
    acknowledged = crash_rounds(instance, "vnic", kill_device_host=True, rounds=5)
    assert acknowledged > 5 * CLIENTS
