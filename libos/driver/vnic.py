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

import socket
from dataclasses import dataclass

from libos.driver.base import FunctionDriver, page_align
from vdev import layout
from vdev.ring import DriverRing, U32_MASK

IOVA_BASE = 0x10_0000_0000
DEFAULT_RING_SIZE = 256


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


class VnicDriver(FunctionDriver):
    """One queue pair of a VNIC function, on the shared set-up of ``FunctionDriver``."""

    MAGIC = layout.MAGIC_VNIC
    KIND = "VNIC"
    QUEUE_NAME = "queues"
    ERROR = DriverError
    IOVA_BASE = IOVA_BASE
    counters: DriverCounters

    def __init__(self, sock: socket.socket, ring_size: int = DEFAULT_RING_SIZE, queue: int = 0) -> None:
        self.counters = DriverCounters()
        super().__init__(sock)
        try:
            self._setup(ring_size, queue)
        except Exception:
            self.client.close()
            raise

    def _rings(self) -> tuple[DriverRing, ...]:
        return (self.rx, self.tx)

    def _setup(self, ring_size: int, queue: int) -> None:
        regs = self._map_bar()
        self._check_queue(queue)
        max_ring = regs.read32(layout.REG_MAX_RING_SIZE)
        ring_size = min(ring_size, max_ring)
        self.queue = queue
        self.ring_size = ring_size
        self.mac = bytes(self._bar[layout.REG_MAC : layout.REG_MAC + 6])
        self.ipv4 = bytes(self._bar[layout.REG_IPV4 : layout.REG_IPV4 + 4])
        self.function_id = regs.read32(layout.REG_FUNCTION_ID)

        desc_bytes = ring_size * layout.VNIC_DESC_SIZE
        rings_bytes = page_align(2 * desc_bytes)
        buffers_bytes = 2 * ring_size * layout.VNIC_BUFFER_SIZE
        self._map_dma("libos-vnic-dma", page_align(rings_bytes + buffers_bytes))

        self._rx_desc_off = 0
        self._tx_desc_off = desc_bytes
        self._rx_buf_off = rings_bytes
        self._tx_buf_off = rings_bytes + ring_size * layout.VNIC_BUFFER_SIZE
        rx_index = layout.vnic_ring_index(queue, layout.RX)
        tx_index = layout.vnic_ring_index(queue, layout.TX)
        self.rx = DriverRing(regs, rx_index, self._mem_view[0:desc_bytes], ring_size, layout.VNIC_DESC)
        self.tx = DriverRing(regs, tx_index, self._mem_view[desc_bytes : 2 * desc_bytes], ring_size, layout.VNIC_DESC)
        self._tx_doorbell = layout.doorbell_offset(tx_index)

        self._setup_irq(queue)

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
            self._ring_doorbell(self._tx_doorbell)
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
            self._sleep(timeout)
        finally:
            self.rx.want_irq(False)
