"""The libOS driver for a VNIC function: set-up over vfio-user, then rings in shared memory.

Set-up follows the minimal vfio-user session: VERSION, GET_INFO, GET_REGION_INFO for BAR0
(map its register page), DMA_MAP of one memfd that holds the rings and all packet buffers,
GET_IRQ_INFO and SET_IRQS with one eventfd per queue. After that the data path is loads and
stores to shared memory; the socket is used again only to ring a doorbell, and only when the
device has said it is asleep.

Memory layout of the DMA region (IOVAs from ``IOVA_BASE``)::

    [RX descriptors][TX descriptors] (page aligned)
    [RX buffers: ring_size x 2048][TX buffers: ring_size x 2048]

Buffer ``i`` of a ring belongs to ring slot ``i``: a slot's buffer is free exactly when the
slot is, so no allocator is needed (the netmap habit of naming buffers by index).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
from dataclasses import dataclass

from vdev import layout
from vdev.ring import DriverRing, Registers, U32_MASK
from vdev.vfio_user.client import VfioUserClient

IOVA_BASE = 0x10_0000_0000
DEFAULT_RING_SIZE = 256
_DOORBELL_WRITE = (0).to_bytes(4, "little")


class DriverError(Exception):
    """The device is not what this driver drives, or it stopped a ring."""


@dataclass
class DriverCounters:
    rx_packets: int = 0
    rx_errors: int = 0
    tx_packets: int = 0
    tx_errors: int = 0
    tx_full: int = 0
    doorbells: int = 0
    sleeps: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def _page_align(value: int) -> int:
    return (value + layout.PAGE_SIZE - 1) // layout.PAGE_SIZE * layout.PAGE_SIZE


class VnicDriver:
    """One queue pair of a VNIC function."""

    def __init__(self, sock: socket.socket, ring_size: int = DEFAULT_RING_SIZE, queue: int = 0) -> None:
        self.client = VfioUserClient(sock)
        self.counters = DriverCounters()
        self._closed = False
        try:
            self._setup(ring_size, queue)
        except Exception:
            self.client.close()
            raise

    def _setup(self, ring_size: int, queue: int) -> None:
        client = self.client
        self._bar = client.map_region(layout.BAR0_INDEX)
        regs = self.regs = Registers(self._bar)
        if regs.read32(layout.REG_MAGIC) != layout.MAGIC_VNIC:
            raise DriverError("not a VNIC function")
        if regs.read32(layout.REG_ABI_VERSION) != layout.ABI_VERSION:
            raise DriverError("device ABI version mismatch")
        num_queues = regs.read32(layout.REG_NUM_QUEUES)
        if not 0 <= queue < num_queues:
            raise DriverError(f"the function has {num_queues} queues")
        max_ring = regs.read32(layout.REG_MAX_RING_SIZE)
        ring_size = min(ring_size, max_ring)
        self.queue = queue
        self.ring_size = ring_size
        self.mac = bytes(self._bar[layout.REG_MAC : layout.REG_MAC + 6])
        self.ipv4 = bytes(self._bar[layout.REG_IPV4 : layout.REG_IPV4 + 4])
        self.function_id = regs.read32(layout.REG_FUNCTION_ID)

        desc_bytes = ring_size * layout.VNIC_DESC_SIZE
        rings_bytes = _page_align(2 * desc_bytes)
        buffers_bytes = 2 * ring_size * layout.VNIC_BUFFER_SIZE
        size = _page_align(rings_bytes + buffers_bytes)
        self._mem_fd = os.memfd_create("libos-vnic-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self._mem_fd, size)
        # The device maps this memory; a sealed size means we cannot pull it from under it.
        fcntl.fcntl(self._mem_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self._mem = mmap.mmap(self._mem_fd, size)
        self._mem_view = memoryview(self._mem)
        self._mem_size = size
        client.dma_map(IOVA_BASE, size, self._mem_fd, 0, True, True)

        self._rx_desc_off = 0
        self._tx_desc_off = desc_bytes
        self._rx_buf_off = rings_bytes
        self._tx_buf_off = rings_bytes + ring_size * layout.VNIC_BUFFER_SIZE
        rx_index = layout.vnic_ring_index(queue, layout.RX)
        tx_index = layout.vnic_ring_index(queue, layout.TX)
        self.rx = DriverRing(regs, rx_index, self._mem_view[0:desc_bytes], ring_size, layout.VNIC_DESC)
        self.tx = DriverRing(regs, tx_index, self._mem_view[desc_bytes : 2 * desc_bytes], ring_size, layout.VNIC_DESC)
        self._tx_doorbell = layout.doorbell_offset(tx_index)

        irq_info = client.get_irq_info(layout.IRQ_INDEX_MSIX)
        if irq_info.count <= queue:
            raise DriverError("the function has no interrupt for this queue")
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        client.set_irq_eventfds(layout.IRQ_INDEX_MSIX, queue, [self.irq_fd])
        self._poller = select.epoll()
        self._poller.register(self.irq_fd, select.EPOLLIN)

        self.rx.enable(IOVA_BASE + self._rx_desc_off)
        self.tx.enable(IOVA_BASE + self._tx_desc_off)
        # Hand every RX buffer to the device at once.
        for slot in range(ring_size):
            self.rx.post(IOVA_BASE + self._rx_buf_off + slot * layout.VNIC_BUFFER_SIZE, layout.VNIC_BUFFER_SIZE, 0, 0, 0)
        self.rx.publish()

    # ---- data path -------------------------------------------------------------------

    def receive(self, budget: int = 64) -> list[bytes]:
        """Frames received since the last call (copied out; their buffers go back at once)."""
        rx = self.rx
        ready = rx.completed()
        if not ready:
            return []
        if ready > budget:
            ready = budget
        frames: list[bytes] = []
        mem = self._mem_view
        base = self._rx_buf_off
        mask = rx.mask
        start = rx.reaped
        for offset in range(ready):
            index = (start + offset) & U32_MASK
            _iova, length, _flags, status, _reserved = rx.peek(index)
            slot = index & mask
            if status == layout.DESC_OK:
                buf = base + slot * layout.VNIC_BUFFER_SIZE
                frames.append(mem[buf : buf + length].tobytes())
            else:
                self.counters.rx_errors += 1
            rx.post(IOVA_BASE + base + slot * layout.VNIC_BUFFER_SIZE, layout.VNIC_BUFFER_SIZE, 0, 0, 0)
        rx.reap(ready)
        self.counters.rx_packets += len(frames)
        # No doorbell for fresh RX buffers, even if the device sleeps: it looks at the RX
        # ring when a frame arrives, which is the only time it needs a buffer.
        rx.publish()
        return frames

    def transmit(self, frames: list[bytes]) -> int:
        """Post frames on the TX ring; returns how many were taken (the rest: ring full)."""
        tx = self.tx
        self._reap_tx()
        room = tx.space()
        count = min(room, len(frames))
        if count < len(frames):
            self.counters.tx_full += len(frames) - count
        mem = self._mem_view
        base = self._tx_buf_off
        mask = tx.mask
        taken = 0
        for frame in frames[:count]:
            length = len(frame)
            if length > layout.VNIC_BUFFER_SIZE:
                self.counters.tx_errors += 1
                continue
            slot = tx.prod & mask
            buf = base + slot * layout.VNIC_BUFFER_SIZE
            mem[buf : buf + length] = frame
            tx.post(IOVA_BASE + buf, length, 0, 0, 0)
            taken += 1
        if taken and tx.publish():
            self._ring(self._tx_doorbell)
        self.counters.tx_packets += taken
        return taken

    def _reap_tx(self) -> None:
        tx = self.tx
        done = tx.completed()
        if not done:
            return
        start = tx.reaped
        for offset in range(done):
            if tx.peek(start + offset)[3] != layout.DESC_OK:
                self.counters.tx_errors += 1
        tx.reap(done)

    def _ring(self, doorbell: int) -> None:
        self.counters.doorbells += 1
        self.client.posted_write(layout.BAR0_INDEX, doorbell, _DOORBELL_WRITE)

    def has_rx(self) -> bool:
        return self.rx.completed() != 0

    def check_errors(self) -> None:
        for ring, name in ((self.rx, "RX"), (self.tx, "TX")):
            if ring.error:
                raise DriverError(f"the device stopped the {name} ring (error {ring.error})")

    def wait(self, timeout: float) -> None:
        """Sleep until the device raises the queue's interrupt, or ``timeout`` seconds.

        The interrupt is asked for first and the ring checked again after, so a frame that
        arrived in between is not slept through.
        """
        self.rx.want_irq(True)
        try:
            if self.rx.completed():
                return
            self.counters.sleeps += 1
            if self._poller.poll(timeout):
                try:
                    os.eventfd_read(self.irq_fd)
                except BlockingIOError:
                    pass
        finally:
            self.rx.want_irq(False)

    def fileno(self) -> int:
        return self.irq_fd

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.rx.disable()
            self.tx.disable()
            self.client.disable_irqs(layout.IRQ_INDEX_MSIX)
            self.client.dma_unmap(IOVA_BASE, self._mem_size)
        except (OSError, Exception):
            pass  # the device may already be gone; closing the socket tears it all down
        self.client.close()
        self.rx.descs.release()
        self.tx.descs.release()
        self.regs.release()
        self._mem_view.release()
        self._mem.close()
        os.close(self._mem_fd)
        os.close(self.irq_fd)
        self._poller.close()
