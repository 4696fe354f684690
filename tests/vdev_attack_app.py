"""A hostile application for tests/test_hardening_vdev.py, run as an unprivileged uid.

``python -m tests.vdev_attack_app ATTACK CONTROL_SOCKET PORT [ARGS...]`` opens a VNIC function
through kernelctl like any app, then misbehaves against the device host in one of the ways
of issue 7. It prints one JSON line (what it did and what it saw) and keeps its function
open until its stdin closes, so the test can look at the device host meanwhile.

Only the standard library, kernelctl's client, the vfio-user client, the ring code and the
wire codecs: what any application could run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from kernelctl.client import ControlClient
from libos.driver.vnic import VnicDriver
from vdev import layout
from vdev.ring import DriverRing, Registers
from vdev.vfio_user.client import VfioUserClient
from vdev.vfio_user.wire import VfioError
from vdev.wire import arp, ethernet, ipv4, udp

F_SEAL_FUTURE_WRITE = 0x0010  # linux/fcntl.h; the fcntl module may not name it
MAX_EVENTFD_WRITE = 0xFFFF_FFFF_FFFF_FFFE  # the largest counter write(2) can reach
GiB = 1 << 30
TiB = 1 << 40
PAGE = 4096


def _errno_name(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    except VfioError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "done"


def _sealed_memfd(name: str, size: int, flags: int = 0) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def _udp_frame(driver: VnicDriver, port: int, eth_src: bytes | None = None) -> bytes:
    datagram = udp.build(port, 9, b"hostile", driver.ipv4, bytes([10, 10, 0, 1]))
    packet = ipv4.build(driver.ipv4, bytes([10, 10, 0, 1]), ipv4.PROTO_UDP, datagram)
    return ethernet.build(ethernet.BROADCAST_MAC, eth_src or driver.mac, ethernet.ETHERTYPE_IPV4, packet)


def _arp_frame(eth_src: bytes, operation: int, sender_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    body = arp.build(operation, sender_mac, sender_ip, bytes(6), target_ip)
    return ethernet.build(ethernet.BROADCAST_MAC, eth_src, ethernet.ETHERTYPE_ARP, body)


def _tx_statuses(driver: VnicDriver, count: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while driver.tx.completed() < count and time.monotonic() < deadline:
        time.sleep(0.001)
    done = driver.tx.completed()
    statuses = [driver.tx.peek(driver.tx.reaped + i)[3] for i in range(done)]
    driver.tx.reap(done)
    return statuses


def _eventfd_count(fd: int) -> int:
    for line in open(f"/proc/self/fdinfo/{fd}"):
        if line.startswith("eventfd-count:"):
            return int(line.split()[1], 16)
    raise RuntimeError("no eventfd-count in fdinfo")


def attack_bar(control: ControlClient, port: int, args: list[str]) -> dict[str, Any]:
    """Defect 1: resize (or seal) the BAR0 memfd the device maps too, then make it touch it."""
    sock, _info = control.open_vnic([("udp", port)], name="evil-bar")
    client = VfioUserClient(sock)
    _region, fd = client.get_region_info(layout.BAR0_INDEX)
    if fd is None:
        raise RuntimeError("BAR0 came without an fd")
    result: dict[str, Any] = {
        "shrink": _errno_name(lambda: os.ftruncate(fd, 0)),
        "grow": _errno_name(lambda: os.ftruncate(fd, 1 << 20)),
        "fallocate_beyond": _errno_name(lambda: os.posix_fallocate(fd, layout.BAR0_SIZE, 1 << 20)),
        "seal_write": _errno_name(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)),
        "seal_future_write": _errno_name(lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)),
        "size": os.fstat(fd).st_size,
    }
    # The device reads and writes its own mapping of the same memory for these.
    client.region_write(layout.BAR0_INDEX, layout.ring_reg(0, layout.RING_IRQ_WANTED), bytes(4))
    result["magic"] = int.from_bytes(client.region_read(layout.BAR0_INDEX, layout.REG_MAGIC, 4), "little")
    os.close(fd)
    _hold([client.close])
    return result


def attack_irq(control: ControlClient, port: int, args: list[str]) -> dict[str, Any]:
    """Defect 2: a full interrupt eventfd in blocking mode, then ask for an interrupt."""
    sock, _info = control.open_vnic([("udp", port)], name="evil-irq")
    driver = VnicDriver(sock, ring_size=64)
    fd = driver.irq_fd
    os.eventfd_write(fd, MAX_EVENTFD_WRITE)  # now a write(2) of 1 would wait for a read
    # O_NONBLOCK belongs to the open file description, which the device host shares.
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    before = _eventfd_count(fd)
    driver.tx.want_irq(True)
    driver.rx.want_irq(True)
    sent = driver.transmit([_udp_frame(driver, port)])
    statuses = _tx_statuses(driver, sent)
    # The device raises the interrupt right after completing the frame.
    deadline = time.monotonic() + 10
    after = _eventfd_count(fd)
    while after == before and time.monotonic() < deadline:
        time.sleep(0.005)
        after = _eventfd_count(fd)
    result = {
        "blocking": not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK,
        "before": before,
        "after": after,
        "tx_statuses": statuses,
    }
    _hold([driver.close])
    return result


def attack_dma(control: ControlClient, port: int, args: list[str]) -> dict[str, Any]:
    """Defect 3: map far more address space than any driver needs, in huge sparse memfds."""
    sock, _info = control.open_vnic([("udp", port)], name="evil-dma")
    client = VfioUserClient(sock)
    huge = _sealed_memfd("evil-sparse", TiB)  # costs nothing: never touched
    tib_maps = [_errno_name(lambda n=n: client.dma_map(n * TiB, TiB, huge)) for n in range(1, 129)]
    # hugetlbfs memory refaults from the huge page pool, which may be empty: SIGBUS.
    try:
        hugetlb: int | None = _sealed_memfd("evil-hugetlb", 2 << 20, os.MFD_HUGETLB)
    except OSError:
        hugetlb = None  # this kernel offers none; tests/test_dma.py checks the refusal itself
    hugetlb_map = "unavailable" if hugetlb is None else _errno_name(lambda: client.dma_map(0x300 * TiB, 2 << 20, hugetlb))
    budget = int(args[0])
    quarter = budget // 4
    pieces = [_errno_name(lambda n=n: client.dma_map(0x100 * TiB + n * quarter, quarter, huge)) for n in range(4)]
    one_more = _errno_name(lambda: client.dma_map(0x200 * TiB, PAGE, huge))
    unmap = _errno_name(lambda: client.dma_unmap(0x100 * TiB, quarter))
    again = _errno_name(lambda: client.dma_map(0x200 * TiB, quarter, huge))
    os.close(huge)
    result = {
        "tib_maps": tib_maps,
        "pieces": pieces,
        "one_more": one_more,
        "unmap": unmap,
        "again": again,
        "hugetlb": hugetlb_map,
    }
    _hold([client.close])
    return result


def attack_spoof(control: ControlClient, port: int, args: list[str]) -> dict[str, Any]:
    """Defect 14: frames from someone else's MAC, ARP naming a forged sender MAC or IP."""
    client_mac, forged_mac = bytes.fromhex(args[0]), bytes.fromhex(args[1])
    client_ip, linux_ip = socket.inet_aton(args[2]), socket.inet_aton(args[3])
    sock, _info = control.open_vnic([("udp", port)], name="evil-spoof")
    driver = VnicDriver(sock, ring_size=64)
    own = driver.mac
    frames = [
        _udp_frame(driver, port, eth_src=client_mac),  # teaches the bridge the client is here
        _udp_frame(driver, port, eth_src=forged_mac),
        # Our own IP at a forged MAC: the client's neighbour entry for the NIC goes astray.
        _arp_frame(own, arp.OP_REQUEST, forged_mac, driver.ipv4, client_ip),
        _arp_frame(forged_mac, arp.OP_REPLY, forged_mac, driver.ipv4, client_ip),
        # The baseline host's IP at our MAC: its traffic would come to us.
        _arp_frame(own, arp.OP_REPLY, own, linux_ip, client_ip),
        _udp_frame(driver, port),  # an honest frame: it must still go out
    ]
    sent = driver.transmit(frames)
    result = {"sent": sent, "tx_statuses": _tx_statuses(driver, sent)}
    _hold([driver.close])
    return result


def attack_unmap(control: ControlClient, port: int, args: list[str]) -> dict[str, Any]:
    """Defect 15: a live ring in memory about to be unmapped, its RING_IOVA register
    rewritten first to point at memory that stays mapped."""
    sock, _info = control.open_vnic([("udp", port)], name="evil-unmap")
    client = VfioUserClient(sock)
    bar = client.map_region(layout.BAR0_INDEX)
    regs = Registers(bar)
    kept_iova, doomed_iova, size = 0x10_0000_0000, 0x20_0000_0000, 16 * PAGE
    kept_fd, doomed_fd = _sealed_memfd("evil-kept", size), _sealed_memfd("evil-doomed", size)
    client.dma_map(kept_iova, size, kept_fd)
    client.dma_map(doomed_iova, size, doomed_fd)
    kept = mmap.mmap(kept_fd, size)
    doomed = mmap.mmap(doomed_fd, size)
    mac = bytes(bar[layout.REG_MAC : layout.REG_MAC + 6])
    ip = bytes(bar[layout.REG_IPV4 : layout.REG_IPV4 + 4])
    datagram = udp.build(port, 9, b"x", ip, bytes([10, 10, 0, 1]))
    frame = ethernet.build(
        ethernet.BROADCAST_MAC, mac, ethernet.ETHERTYPE_IPV4,
        ipv4.build(ip, bytes([10, 10, 0, 1]), ipv4.PROTO_UDP, datagram),
    )
    kept[0 : len(frame)] = frame
    ring_index = layout.vnic_ring_index(0, layout.TX)
    doorbell = layout.doorbell_offset(ring_index)
    ring = DriverRing(regs, ring_index, memoryview(doomed)[0 : 8 * layout.VNIC_DESC_SIZE], 8, layout.VNIC_DESC)
    ring.enable(doomed_iova)  # the descriptors live in the memory that will be unmapped
    ring.post(kept_iova, len(frame), 0, 0, 0)
    ring.publish()
    cons_at = layout.ring_reg(ring_index, layout.RING_CONS)
    deadline = time.monotonic() + 10
    while regs.read32(cons_at) < 1 and time.monotonic() < deadline:
        # The device picks an enabled ring up when it wakes: ring until it has.
        client.region_write(layout.BAR0_INDEX, doorbell, bytes(4))
        time.sleep(0.01)
    live_cons = regs.read32(cons_at)
    # The attack: RING_IOVA now names memory that stays mapped, then unmap the real ring.
    regs.write64(layout.ring_reg(ring_index, layout.RING_IOVA), kept_iova)
    client.dma_unmap(doomed_iova, size)
    error = regs.read32(layout.ring_reg(ring_index, layout.RING_ERROR))
    # Post once more on the ring (its memory is still ours) and make sure the device has run
    # a poll since: a doorbell with a reply wakes it, a later round trip follows that poll.
    ring.post(kept_iova, len(frame), 0, 0, 0)
    ring.publish()
    client.region_write(layout.BAR0_INDEX, doorbell, bytes(4))
    client.region_read(layout.BAR0_INDEX, layout.REG_MAGIC, 4)
    client.region_read(layout.BAR0_INDEX, layout.REG_MAGIC, 4)
    result = {"live_cons": live_cons, "error": error, "cons_after": regs.read32(cons_at)}
    ring.descs.release()
    regs.release()

    def close() -> None:
        doomed.close()
        kept.close()
        bar.close()
        client.close()

    _hold([close])
    return result


ATTACKS: dict[str, Callable[[ControlClient, int, list[str]], dict[str, Any]]] = {
    "bar": attack_bar,
    "irq": attack_irq,
    "dma": attack_dma,
    "spoof": attack_spoof,
    "unmap": attack_unmap,
}

_pending_close: list[Callable[[], None]] = []


def _hold(closers: list[Callable[[], None]]) -> None:
    _pending_close.extend(closers)


def main(argv: list[str]) -> int:
    attack, control_path, port = argv[0], argv[1], int(argv[2])
    control = ControlClient(control_path)
    try:
        result = ATTACKS[attack](control, port, argv[3:])
        result["uid"] = os.getuid()
        print(json.dumps(result), flush=True)
        sys.stdin.readline()  # the test is done looking
    finally:
        for close in _pending_close:
            try:
                close()
            except Exception:
                pass  # the device may be gone already; leaving is all that is left to do
        control.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
