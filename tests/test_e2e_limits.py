"""Rate limits, system calls per request and idle CPU, measured on the real path (root).

These check behaviour with generous, fixed bounds taken from the issue, not speed: the speed
comparison lives in ``tools/bench``.
"""

from __future__ import annotations

import re
import select
import socket
import subprocess
import threading
import time

import psutil
import pytest

from kernelctl.client import ControlClient
from kernelctl.names import Topology
from tests.helpers import echo_app, run_in_netns

pytestmark = pytest.mark.root


def paced_client(address: tuple[str, int], rate: float, duration: float, payload_size: int = 64) -> dict[str, int]:
    """Send ``rate`` datagrams a second for ``duration`` seconds; count the replies."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(address)
    payload = b"r" * payload_size
    interval = 1.0 / rate
    start = time.monotonic()
    next_send = start
    sent = received = 0
    end = start + duration
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_send:
            try:
                sock.send(payload)
                sent += 1
            except BlockingIOError:
                pass
            next_send += interval
            continue
        readable, _, _ = select.select([sock], [], [], next_send - now)
        if readable:
            while True:
                try:
                    sock.recv(2048)
                    received += 1
                except (BlockingIOError, ConnectionRefusedError):
                    break
    drain_until = time.monotonic() + 0.5
    while time.monotonic() < drain_until:
        if select.select([sock], [], [], 0.05)[0]:
            try:
                sock.recv(2048)
                received += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
    sock.close()
    return {"sent": sent, "received": received}


def count_syscalls(pid: int, seconds: float) -> tuple[int, str]:
    """System calls made by ``pid`` (all threads) during ``seconds``, counted by strace -c."""
    result = subprocess.run(
        ["timeout", "-s", "INT", str(seconds), "strace", "-c", "-f", "-p", str(pid)],
        capture_output=True,
        text=True,
    )
    match = re.search(r"^-+.*\n\s*100\.00\s+\S+\s+\S+\s+(\d+)", result.stderr, re.MULTILINE)
    if match is None:
        if "total" not in result.stderr:
            return 0, result.stderr  # strace prints no table when it saw no system call at all
        match = re.search(r"^\s*\S+\s+\S+\s+\S+\s+(\d+)(?:\s+\d+)?\s+total\s*$", result.stderr, re.MULTILINE)
    if match is None:
        raise AssertionError(f"cannot read strace output:\n{result.stderr}")
    return int(match.group(1)), result.stderr


def syscalls_per_request(topo: Topology, backend: str, ip: str) -> tuple[float, str, dict[str, int]]:
    rate, duration = 2000.0, 6.0
    with echo_app(backend, topo.tag, 7) as app:
        outcome: dict[str, dict[str, int]] = {}

        def load() -> None:
            outcome["client"] = run_in_netns(topo.client_netns, paced_client, (ip, 7), rate, duration, timeout=60)

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(1.5)  # steady state first
        window = 3.0
        calls, table = count_syscalls(app.pid, window)
        thread.join()
    requests = int(rate * window)
    return calls / requests, table, outcome["client"]


def test_vnic_app_makes_almost_no_system_calls_and_baseline_makes_many(instance: Topology) -> None:
    per_request, table, client = syscalls_per_request(instance, "vnic", instance.vnic_ip)
    assert client["received"] >= 0.95 * client["sent"], client
    assert per_request < 0.05, f"vnic app: {per_request:.3f} system calls per request\n{table}"
    per_request, table, client = syscalls_per_request(instance, "linux", instance.linux_ip)
    assert client["received"] >= 0.95 * client["sent"], client
    assert per_request >= 2, f"baseline: only {per_request:.3f} system calls per request\n{table}"


def device_host_process(topo: Topology) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "vdev.vnic.host" in cmdline and topo.tap in cmdline:
            return process
    raise AssertionError("no device host")


def test_idle_system_uses_no_cpu(instance: Topology) -> None:
    with echo_app("vnic", instance.tag, 7) as app:
        run_in_netns(instance.client_netns, paced_client, (instance.vnic_ip, 7), 2000.0, 2.0)
        time.sleep(1.0)  # polling windows run out
        processes = [device_host_process(instance), psutil.Process(app.pid)]
        before = [sum(p.cpu_times()[:2]) for p in processes]
        time.sleep(5.0)
        after = [sum(p.cpu_times()[:2]) for p in processes]
        for name, used in zip(("device host", "app"), (a - b for a, b in zip(after, before))):
            assert used / 5.0 < 0.02, f"{name} used {used / 5.0:.1%} CPU while idle"


def flood_client(address: tuple[str, int], seconds: float, bits_per_second: float, size: int) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"f" * size
    interval = size * 8 / bits_per_second
    start = time.monotonic()
    sent = 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        due = start + sent * interval
        if now < due:
            time.sleep(due - now)
        try:
            sock.sendto(payload, address)
            sent += 1
        except OSError:
            pass
    sock.close()
    return sent


def test_rate_limit_holds_a_flood_to_ten_megabits(instance: Topology) -> None:
    limit = 10_000_000
    with echo_app("vnic", instance.tag, 7, "--rate", "10mbit", "--sink"):
        with ControlClient(instance.control_socket) as control:

            def delivered_bytes() -> int:
                for function in control.status()["device"]["functions"]:
                    return int(function["counters"]["rx_bytes"])
                raise AssertionError("no function")

            thread = threading.Thread(
                target=run_in_netns,
                args=(instance.client_netns, flood_client, (instance.vnic_ip, 7), 5.0, 3 * limit, 1000),
                kwargs={"timeout": 60},
            )
            thread.start()
            time.sleep(1.0)
            t0, b0 = time.monotonic(), delivered_bytes()
            time.sleep(3.5)
            t1, b1 = time.monotonic(), delivered_bytes()
            thread.join()
            classes = subprocess.run(
                ["tc", "-n", instance.client_netns, "-s", "class", "show", "dev", instance.tap],
                capture_output=True,
                text=True,
            ).stdout
    rate = (b1 - b0) * 8 / (t1 - t0)
    assert abs(rate - limit) / limit < 0.05, f"delivered {rate / 1e6:.2f} Mbit/s"
    assert "rate 10Mbit" in classes, classes
