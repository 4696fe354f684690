"""A malicious application only hurts itself: error completions and counters, nothing more.

The test process plays the malicious app: it gets a function through kernelctl like any
app, then writes garbage into its own rings. A well-behaved echo app on another port must
keep working, and the device host must stay the same process.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from kernelctl.client import ControlClient
from kernelctl.names import Topology
from libos.driver.vnic import IOVA_BASE, VnicDriver
from tests.conftest import kernelctl
from tests.helpers import echo_app, run_in_netns
from tests.test_e2e_udp import count_client
from vdev import layout

pytestmark = pytest.mark.root


def device_host_pid(topo: Topology) -> int:
    import subprocess

    out = subprocess.run(["pgrep", "-f", f"vdev.vnic.host --tap {topo.tap} "], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    assert len(pids) == 1, out
    return pids[0]


def wait_completed(driver: VnicDriver, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while driver.tx.completed() < count and time.monotonic() < deadline:
        time.sleep(0.001)


def function_counters(topo: Topology, name: str) -> dict[str, int]:
    status = json.loads(kernelctl(topo.tag, "status", "-j").stdout)
    ids = [f["function_id"] for f in status["functions"] if f["name"] == name]
    for function in status["device"]["functions"]:
        if function["function_id"] in ids:
            counters: dict[str, int] = function["counters"]
            return counters
    raise AssertionError(f"no function {name}")


def tx_statuses(driver: VnicDriver, count: int) -> list[int]:
    wait_completed(driver, count)
    assert driver.tx.completed() == count
    statuses = [driver.tx.peek(driver.tx.reaped + i)[3] for i in range(count)]
    driver.tx.reap(count)
    return statuses


def send_only(address: tuple[str, int], count: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for index in range(count):
        sock.sendto(b"x" * 32, address)
        time.sleep(0.01)
    sock.close()


def test_garbage_descriptors_give_error_completions_only(instance: Topology) -> None:
    with echo_app("vnic", instance.tag, 7) as good:
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 7), 50) == 50
        host_pid = device_host_pid(instance)
        control = ControlClient(instance.control_socket)
        sock, _info = control.open_vnic([("udp", 9)], name="evil")
        driver = VnicDriver(sock, ring_size=64)
        try:
            tx = driver.tx
            valid_frame_iova = IOVA_BASE + driver._tx_buf_off  # inside the map
            # 1. IOVAs outside the DMA map, below and above it, and one that wraps 2**64.
            tx.post(0x1000, 60, 0, 0, 0)
            tx.post(IOVA_BASE + driver._mem_size, 60, 0, 0, 0)
            tx.post(0xFFFF_FFFF_FFFF_FFF0, 60, 0, 0, 0)
            # 2. Lengths: zero, larger than a frame, running past the end of the map.
            tx.post(valid_frame_iova, 0, 0, 0, 0)
            tx.post(valid_frame_iova, 0xFFFF, 0, 0, 0)
            tx.post(IOVA_BASE + driver._mem_size - 30, 60, 0, 0, 0)
            # 3. A well-formed frame with a forged source (anti-spoofing).
            frame = bytes(6) + driver.mac + b"\x08\x00" + bytes(46)
            driver._mem_view[driver._tx_buf_off : driver._tx_buf_off + len(frame)] = frame
            tx.post(valid_frame_iova, len(frame), 0, 0, 0)
            tx.publish()
            driver.client.region_write(layout.BAR0_INDEX, layout.doorbell_offset(tx.ring_index), b"\0\0\0\0", no_reply=True)
            statuses = tx_statuses(driver, 7)
            assert statuses == [
                layout.DESC_IOMMU_FAULT,
                layout.DESC_IOMMU_FAULT,
                layout.DESC_IOMMU_FAULT,
                layout.DESC_BAD_LENGTH,
                layout.DESC_BAD_LENGTH,
                layout.DESC_IOMMU_FAULT,
                layout.DESC_TX_FILTERED,
            ]
            # 4. Descriptors rewritten after the doorbell: the device acts on one reading.
            for _ in range(32):
                tx.post(0x1000, 60, 0, 0, 0)
            tx.publish()
            for index in range(32):
                layout.VNIC_DESC.pack_into(tx.descs, ((tx.prod - 32 + index) & tx.mask) * 16, valid_frame_iova, 0xFFFF, 0, 0, 0)
            driver.client.region_write(layout.BAR0_INDEX, layout.doorbell_offset(tx.ring_index), b"\0\0\0\0", no_reply=True)
            rewritten = tx_statuses(driver, 32)
            assert all(s in (layout.DESC_IOMMU_FAULT, layout.DESC_BAD_LENGTH) for s in rewritten)
            # 5. A producer index beyond the ring stops that ring, and only it.
            driver.regs.write32(layout.ring_reg(tx.ring_index, layout.RING_PROD), tx.prod + 1000)
            driver.client.region_write(layout.BAR0_INDEX, layout.doorbell_offset(tx.ring_index), b"\0\0\0\0", no_reply=True)
            deadline = time.monotonic() + 20  # a deadline, not a delay: the loop ends at the condition
            while tx.error == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert tx.error == layout.RING_ERR_INDEX
            counters = function_counters(instance, "evil")
            assert counters["iommu_faults"] == 4 + rewritten.count(layout.DESC_IOMMU_FAULT)
            assert counters["tx_spoofed"] == 1
            assert counters["ring_errors"] >= 1
            # Meanwhile the other app and the device host carry on.
            assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 7), 50) == 50
            assert device_host_pid(instance) == host_pid
            # 6. RX buffers outside the map (rewritten while the device owns them): frames
            # for us complete with errors, nothing else.
            delivered_before = function_counters(instance, "evil")["rx_packets"]
            for slot in range(driver.rx.size):
                layout.VNIC_DESC.pack_into(driver.rx.descs, slot * 16, 0x2000, 2048, 0, 0, 0)
            run_in_netns(instance.client_netns, send_only, (instance.vnic_ip, 9), 5)
            deadline = time.monotonic() + 20
            while function_counters(instance, "evil")["rx_errors"] < 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            counters = function_counters(instance, "evil")
            assert counters["rx_errors"] >= 5  # ARP replicated to us may fail the same way
            assert counters["rx_packets"] == delivered_before
        finally:
            driver.close()
            control.close()
        assert run_in_netns(instance.client_netns, count_client, (instance.vnic_ip, 7), 50) == 50
        assert device_host_pid(instance) == host_pid
