"""End to end, as root: real Linux sockets in a namespace, a tap, the device host, the libOS.

Each test gets its own kernelctl instance (unique names) from the ``instance`` fixture, which
also checks that ``kernelctl down`` left nothing behind.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time

import pytest

from kernelctl.names import Topology
from tests.conftest import kernelctl
from tests.helpers import echo_app, run_in_netns

pytestmark = pytest.mark.root


def echo_sizes_client(address: tuple[str, int], count: int, seed: int) -> dict[str, int]:
    """Send ``count`` datagrams of sizes 1..1472 one at a time; each must come back intact."""
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    sock.connect(address)
    ok = mismatched = retries = 0
    for index in range(count):
        size = index % 1472 + 1
        payload = rng.randbytes(size)
        for _attempt in range(4):
            sock.send(payload)
            try:
                reply = sock.recv(2048)
            except TimeoutError:
                retries += 1
                continue
            while reply != payload:
                # A late reply to an earlier retry; anything else is a corruption.
                mismatched += 1
                reply = sock.recv(2048)
            ok += 1
            break
    sock.close()
    return {"ok": ok, "mismatched": mismatched, "retries": retries}


def status(topo: Topology) -> dict[str, object]:
    result = kernelctl(topo.tag, "status", "-j")
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def test_udp_echo_10000_datagrams_on_both_backends(instance: Topology) -> None:
    with echo_app("vnic", instance.tag, 7) as vnic, echo_app("linux", instance.tag, 7) as linux:
        results = {}
        for name, ip in (("vnic", instance.vnic_ip), ("linux", instance.linux_ip)):
            results[name] = run_in_netns(instance.client_netns, echo_sizes_client, (ip, 7), 10_000, 42, timeout=300)
        vnic.stop()
        linux.stop()
        for name, result in results.items():
            assert result["ok"] == 10_000, (name, result)
            assert result["mismatched"] <= result["retries"], (name, result)
        assert vnic.stats()["received"] >= 10_000
        assert linux.stats()["received"] >= 10_000


def unreachable_client(address: tuple[str, int]) -> str:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    sock.connect(address)
    sock.send(b"anyone there?")
    try:
        sock.recv(100)
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    finally:
        sock.close()
    return "answered"


def test_ping_and_port_unreachable(instance: Topology) -> None:
    ping = subprocess.run(
        ["ip", "netns", "exec", instance.client_netns, "ping", "-c", "3", "-i", "0.2", "-W", "2", instance.vnic_ip],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    assert "3 received" in ping.stdout
    assert run_in_netns(instance.client_netns, unreachable_client, (instance.vnic_ip, 9999)) == "refused"
    default = status(instance)["device"]["default_function"]  # type: ignore[index]
    assert default["echo_replies"] >= 3
    assert default["port_unreachable"] >= 1


def count_client(address: tuple[str, int], count: int, tries: int = 3) -> int:
    """How many of ``count`` numbered datagrams came back echoed.

    UDP may lose a datagram on a loaded machine (a full socket buffer, a scheduling gap), so
    each one is sent up to ``tries`` times, as a UDP client would; a late echo of an earlier
    datagram is recognised by its number and skipped, never counted for the wrong one."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    sock.connect(address)
    answered = 0
    for index in range(count):
        want = index.to_bytes(4, "big")
        for _ in range(tries):
            sock.send(want)
            try:
                while (reply := sock.recv(64)) != want and int.from_bytes(reply[:4], "big") < index:
                    pass  # a late echo of an earlier datagram
            except TimeoutError:
                continue
            answered += reply == want
            break
    sock.close()
    return answered


def test_two_apps_are_isolated_and_ports_are_exclusive(instance: Topology) -> None:
    with echo_app("vnic", instance.tag, 7) as first, echo_app("vnic", instance.tag, 8) as second:
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 7), 300) == 300
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 8), 100) == 100
        # A third app asking for a claimed port gets a clear error and exits.
        third = subprocess.run(
            [sys.executable, "-m", "libos.apps.echo", "--backend", "vnic", "--instance", instance.tag, "--port", "7"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert third.returncode == 1
        assert "already claimed" in third.stderr
        functions = {f["name"]: f for f in status(instance)["functions"]}  # type: ignore[union-attr]
        assert set(functions) == {"echo:7", "echo:8"}
        first.stop()
        second.stop()
        assert first.stats()["received"] == 300
        assert second.stats()["received"] == 100


def tc_classes(topo: Topology) -> str:
    shown = ""
    for dev in (topo.tap, topo.ifb):
        shown += subprocess.run(
            ["tc", "-n", topo.client_netns, "class", "show", "dev", dev], capture_output=True, text=True
        ).stdout
    return shown


def test_killed_app_is_reclaimed(instance: Topology) -> None:
    """Reclaiming is driven by the event (the app's vfio-user socket closes), never by a
    timeout, so it is done within milliseconds; the deadline below only bounds how long a
    loaded machine may take to show it through the CLI (a Python process per look)."""
    app = echo_app("vnic", instance.tag, 7, "--rate", "20mbit")
    try:
        assert len(status(instance)["functions"]) == 1  # type: ignore[arg-type]
        assert tc_classes(instance).count("rate 20Mbit") == 2  # toward the app and from it
        app.process.kill()
        app.process.wait()
        deadline = time.monotonic() + 20.0  # ends as soon as teardown shows; 1 s was too short under load
        while time.monotonic() < deadline and (status(instance)["functions"] or "rate 20Mbit" in tc_classes(instance)):
            time.sleep(0.05)
        assert status(instance)["functions"] == []
        assert "rate 20Mbit" not in tc_classes(instance)
        device = status(instance)["device"]
        assert device["functions"] == []  # type: ignore[index]
        assert [f for f in device["filters"] if f["kind"] == "filter"] == []  # type: ignore[index]
    finally:
        app.stop()
    # The port is free again.
    with echo_app("vnic", instance.tag, 7):
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 7), 10) == 10
