"""Issue 7, defects 1, 2, 3, 14 and 15: an unprivileged app cannot kill, hang or fool the VNIC
device host through its function.

Each test starts a well-behaved echo app, then runs ``tests.vdev_attack_app`` as uid 1000
(``setpriv``): it opens a function through kernelctl like any app and attacks the device
host through the real interfaces (the fds and memory it was given, vfio-user, its rings).
Afterwards the device host must be the same process, and the echo app must still answer.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
from typing import Any

import pytest

from kernelctl.names import Topology
from tests.conftest import REPO
from tests.helpers import echo_app, run_in_netns
from tests.test_e2e_udp import count_client
from tests.test_malicious_app import device_host_pid, function_counters
from vdev import layout
from vdev.dma import MAX_DMA_BYTES_PER_FUNCTION

pytestmark = pytest.mark.root

APP_UID = 1000
ECHO_PORT = 7
FORGED_MAC = "02dead0000ee"


class AttackApp:
    """``tests.vdev_attack_app ATTACK`` as uid 1000; it holds its function until ``finish``."""

    def __init__(self, topo: Topology, attack: str, port: int, *args: str) -> None:
        self.process = subprocess.Popen(
            [
                "setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
                sys.executable, "-m", "tests.vdev_attack_app", attack, str(topo.control_socket), str(port), *args,
            ],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else ""
        if not line:
            raise AssertionError(f"the attack app gave no result: {self.finish()}")
        loaded: dict[str, Any] = json.loads(line)
        assert loaded["uid"] == APP_UID
        return loaded

    def finish(self) -> str:
        """Let it close its function and exit; returns its stderr."""
        if self.process.poll() is None:
            try:
                _out, err = self.process.communicate("", timeout=15)
                return err
            except subprocess.TimeoutExpired:
                self.process.kill()
        _out, err = self.process.communicate()
        return err

    def __enter__(self) -> AttackApp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def assert_host_serves(topo: Topology, host_pid: int) -> None:
    assert device_host_pid(topo) == host_pid
    assert run_in_netns(topo.client_netns, count_client, (topo.vnic_ip, ECHO_PORT), 50) == 50
    assert device_host_pid(topo) == host_pid


def test_bar0_cannot_be_resized_or_resealed(instance: Topology) -> None:
    """Defect 1: the BAR0 memfd the app receives is sealed: no size change (the device host's
    own mapping would SIGBUS), no new seals."""
    with echo_app("vnic", instance.tag, ECHO_PORT):
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, ECHO_PORT), 20) == 20
        host_pid = device_host_pid(instance)
        with AttackApp(instance, "bar", 5001) as app:
            result = app.result()
            refused = {name: result[name] for name in ("shrink", "grow", "fallocate_beyond", "seal_write", "seal_future_write")}
            assert refused == dict.fromkeys(refused, "EPERM")
            assert result["size"] == layout.BAR0_SIZE
            assert result["magic"] == layout.MAGIC_VNIC
            assert_host_serves(instance, host_pid)
        assert_host_serves(instance, host_pid)


def test_full_blocking_interrupt_eventfd_does_not_hang_the_host(instance: Topology) -> None:
    """Defect 2: the app fills its eventfd and clears O_NONBLOCK on the shared file; the
    device still raises the interrupt (the counter saturates) and never waits."""
    with echo_app("vnic", instance.tag, ECHO_PORT):
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, ECHO_PORT), 20) == 20
        host_pid = device_host_pid(instance)
        with AttackApp(instance, "irq", 5002) as app:
            result = app.result()
            assert result["blocking"] is True
            assert result["tx_statuses"] == [layout.DESC_OK]
            # Signalled, saturating at the largest value an eventfd holds.
            assert (result["before"], result["after"]) == (0xFFFF_FFFF_FFFF_FFFE, 0xFFFF_FFFF_FFFF_FFFF)
            assert function_counters(instance, "evil-irq")["irqs"] >= 1
            assert_host_serves(instance, host_pid)
        assert_host_serves(instance, host_pid)


def test_dma_map_bytes_are_bounded(instance: Topology) -> None:
    """Defect 3: huge sparse memfds cannot make the device host map more than its per-function
    byte budget; each refusal is a clean vfio-user error."""
    with echo_app("vnic", instance.tag, ECHO_PORT):
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, ECHO_PORT), 20) == 20
        host_pid = device_host_pid(instance)
        with AttackApp(instance, "dma", 5003, str(MAX_DMA_BYTES_PER_FUNCTION)) as app:
            result = app.result()
            assert result["tib_maps"] == ["ENOSPC"] * 128
            assert result["pieces"] == ["done"] * 4  # the whole budget is usable
            assert result["one_more"] == "ENOSPC"
            assert (result["unmap"], result["again"]) == ("done", "done")  # and comes back
            assert result["hugetlb"] in ("unavailable", "EINVAL")
            assert_host_serves(instance, host_pid)
        assert_host_serves(instance, host_pid)


def _ip(topo: Topology, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", topo.client_netns, *args], capture_output=True, text=True, check=True
    ).stdout


def _mac_of(topo: Topology, ip: str) -> str:
    for line in _ip(topo, "-o", "addr", "show").splitlines():
        if f" {ip}/" in line:
            ifname = line.split()[1]
            link = _ip(topo, "-o", "link", "show", ifname)
            return link.split("link/ether ")[1].split()[0].replace(":", "")
    raise AssertionError(f"no interface with {ip} in {topo.client_netns}")


def test_transmit_filter_refuses_forged_sources(instance: Topology) -> None:
    """Defect 14: Ethernet sources and ARP senders other than the function's own MAC and IP
    are refused and counted; the bridge and the client's neighbour table learn nothing."""
    with echo_app("vnic", instance.tag, ECHO_PORT):
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, ECHO_PORT), 20) == 20
        host_pid = device_host_pid(instance)
        client_mac = _mac_of(instance, instance.client_ip)
        neighbour_before = _ip(instance, "neigh", "show", instance.vnic_ip)
        args = (client_mac, FORGED_MAC, instance.client_ip, instance.linux_ip)
        with AttackApp(instance, "spoof", 5014, *args) as app:
            result = app.result()
            assert result["sent"] == 6
            assert result["tx_statuses"] == [layout.DESC_TX_FILTERED] * 5 + [layout.DESC_OK]
            assert function_counters(instance, "evil-spoof")["tx_spoofed"] == 5
            forged = ":".join(FORGED_MAC[i : i + 2] for i in range(0, 12, 2))
            neighbour = _ip(instance, "neigh", "show", instance.vnic_ip)
            assert forged not in neighbour and neighbour.split("lladdr")[1:] == neighbour_before.split("lladdr")[1:]
            fdb = subprocess.run(
                ["bridge", "-n", instance.client_netns, "fdb", "show", "br", instance.bridge],
                capture_output=True, text=True, check=True,
            ).stdout
            assert forged not in fdb
            client = ":".join(client_mac[i : i + 2] for i in range(0, 12, 2))
            # Only a learned entry is poisoning: a bridge without a MAC of its own takes its lowest
            # port's, so the tap's own address can be the client's, as a "permanent" local entry.
            learned = [line for line in fdb.splitlines() if "permanent" not in line]
            assert not [line for line in learned if client in line and f"dev {instance.tap} " in line]
            assert_host_serves(instance, host_pid)
        assert_host_serves(instance, host_pid)


def test_unmap_stops_the_ring_the_device_enabled(instance: Topology) -> None:
    """Defect 15: which rings an unmap stops is decided from the device's own copy of each
    ring's IOVA, not from the RING_IOVA register the driver rewrote."""
    with echo_app("vnic", instance.tag, ECHO_PORT):
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, ECHO_PORT), 20) == 20
        host_pid = device_host_pid(instance)
        with AttackApp(instance, "unmap", 5015) as app:
            result = app.result()
            assert result["live_cons"] == 1  # the ring ran before the unmap
            assert result["error"] == layout.RING_ERR_UNMAPPED
            assert result["cons_after"] == 1  # and not after it
            assert_host_serves(instance, host_pid)
        assert_host_serves(instance, host_pid)

