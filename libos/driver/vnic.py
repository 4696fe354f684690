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
from typing import Any

from libos import fast
from libos.driver.base import FunctionDriver, page_align
from vdev import layout
from vdev.ring import DriverRing, U32_MASK
from vdev.vfio_user.client import VfioUserClient

IOVA_BASE = 0x10_0000_0000
# Queue q's region starts at IOVA_BASE + q * QUEUE_IOVA_STRIDE: the drivers of one
# function's queues share its DMA table, so their IOVA ranges must not overlap.
QUEUE_IOVA_STRIDE = 0x1_0000_0000
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

    def __init__(
        self, sock: socket.socket, ring_size: int = DEFAULT_RING_SIZE, queue: int = 0,
        client: VfioUserClient | None = None,
    ) -> None:
        """The driver of queue pair ``queue``; ``client``: the vfio-user session of a driver
        of another queue of the same function, to share (``sock`` is then that session's)."""
        self.counters = DriverCounters()
        super().__init__(sock, client)
        try:
            self._setup(ring_size, queue)
        except Exception:
            if self._owns_client:
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
        self._iova = IOVA_BASE + queue * QUEUE_IOVA_STRIDE
        self.ring_size = ring_size
        self.mac = bytes(self._bar[layout.REG_MAC : layout.REG_MAC + 6])
        self.ipv4 = bytes(self._bar[layout.REG_IPV4 : layout.REG_IPV4 + 4])
        self.function_id = regs.read32(layout.REG_FUNCTION_ID)

        desc_bytes = ring_size * layout.VNIC_DESC_SIZE
        rings_bytes = page_align(2 * desc_bytes)
        buffers_bytes = 2 * ring_size * layout.VNIC_BUFFER_SIZE
        self._map_dma("libos-vnic-dma", page_align(rings_bytes + buffers_bytes), self._iova)

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

        self.rx.enable(self._iova + self._rx_desc_off)
        self.tx.enable(self._iova + self._tx_desc_off)
        # Hand every RX buffer to the device at once.
        for slot in range(ring_size):
            self.rx.post(self._iova + self._rx_buf_off + slot * layout.VNIC_BUFFER_SIZE, layout.VNIC_BUFFER_SIZE, 0, 0, 0)
        self.rx.publish()
        # What the last ``receive`` learnt about each frame in C (``libos.fast.KIND_*``);
        # empty on the pure path.
        self.rx_kinds: list[int] = []
        self._fast: Any = None
        if fast.ENABLED:
            self._setup_fast(ring_size)

    def _setup_fast(self, ring_size: int) -> None:
        """Raw pointers into the DMA region for the C bursts, and the RX staging arena."""
        ffi = fast.ffi
        mem = ffi.from_buffer("uint8_t[]", self._mem_view, require_writable=True)
        buf = layout.VNIC_BUFFER_SIZE
        self._fast_mem = mem  # keeps the buffer exported while the pointers below live
        self._fast_rx_descs = ffi.cast("struct arx_desc *", mem + self._rx_desc_off)
        self._fast_tx_descs = ffi.cast("struct arx_desc *", mem + self._tx_desc_off)
        self._fast_rx_bufs = mem + self._rx_buf_off
        self._fast_tx_bufs = mem + self._tx_buf_off
        self._fast_bufs_len = ring_size * buf
        # Frames are copied out of the RX buffers into this arena in one C call, so the
        # buffers go back to the device at once, as on the pure path.
        self._fast_arena = bytearray(ring_size * buf)
        self._fast_arena_view = memoryview(self._fast_arena)
        self._fast_arena_ptr = ffi.from_buffer("uint8_t[]", self._fast_arena, require_writable=True)
        self._fast_lengths = ffi.new("uint32_t[]", ring_size)
        self._fast_kinds = ffi.new("uint8_t[]", ring_size)
        self._fast_errors = ffi.new("uint32_t *")
        self._fast = fast.lib

    # ---- data path -------------------------------------------------------------------

    def receive(self, budget: int = 64) -> list[bytes]:
        """Frames received since the last call (copied out; their buffers go back at once)."""
        rx = self.rx
        ready = rx.completed()
        if not ready:
            return []
        if ready > budget:
            ready = budget
        if self._fast is not None:
            return self._receive_fast(ready)
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
            rx.post(self._iova + base + slot * layout.VNIC_BUFFER_SIZE, layout.VNIC_BUFFER_SIZE, 0, 0, 0)
        rx.reap(ready)
        self.counters.rx_packets += len(frames)
        # No doorbell for fresh RX buffers, even if the device sleeps: it looks at the RX
        # ring when a frame arrives, which is the only time it needs a buffer.
        rx.publish()
        return frames

    def _receive_fast(self, ready: int) -> list[bytes]:
        rx = self.rx
        buf = layout.VNIC_BUFFER_SIZE
        count = self._fast.arx_rx_burst(
            self._fast_rx_descs, rx.mask, self._fast_rx_bufs, self._fast_bufs_len,
            self._iova + self._rx_buf_off, buf, rx.reaped, ready,
            self._fast_arena_ptr, len(self._fast_arena), self._fast_lengths, self._fast_kinds,
            self._fast_errors,
        )  # fmt: skip
        if count < 0:
            raise DriverError("the RX burst was refused its own ring geometry (a driver bug)")
        # Every slot taken was posted back (prod stays reaped + ring size, as on the pure path).
        rx.reap(ready)
        rx.prod = (rx.prod + ready) & U32_MASK
        rx.publish()
        self.counters.rx_errors += self._fast_errors[0]
        self.counters.rx_packets += count
        arena = self._fast_arena_view
        lengths = self._fast_lengths
        self.rx_kinds = list(self._fast_kinds[0:count])
        return [arena[i * buf : i * buf + lengths[i]].tobytes() for i in range(count)]

    def transmit_tcp(
        self,
        macs_ips: bytes,
        ttl: int,
        ident: int,
        src_port: int,
        dst_port: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        options: bytes,
        payload: bytes | bytearray | memoryview,
    ) -> bool:
        """Build one TCP segment in C straight into a TX buffer and post it.

        ``macs_ips`` is destination MAC, source MAC, source IPv4, destination IPv4 (20
        bytes). False when there is no room on the ring or no compiled path: the caller
        then takes the general path.
        """
        lib = self._fast
        if lib is None:
            return False
        tx = self.tx
        if tx.space() == 0:
            self._reap_tx()
            if tx.space() == 0:
                return False
        ffi = fast.ffi
        payload_ptr = payload if type(payload) is bytes else ffi.from_buffer(payload)
        length = lib.arx_tx_tcp(
            self._fast_tx_descs, tx.mask, self._fast_tx_bufs, self._fast_bufs_len,
            self._iova + self._tx_buf_off, layout.VNIC_BUFFER_SIZE, tx.prod,
            macs_ips, macs_ips[12:], ttl, ident, src_port, dst_port, seq, ack, flags, window,
            options, len(options), payload_ptr, len(payload),
        )  # fmt: skip
        if length < 0:
            return False  # too long for a frame: the general path refuses it in its own words
        tx.prod = (tx.prod + 1) & U32_MASK
        if tx.publish():
            self._ring_doorbell(self._tx_doorbell)
        self.counters.tx_packets += 1
        return True

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
        lib = self._fast
        if lib is not None:
            descs = self._fast_tx_descs
            bufs = self._fast_tx_bufs
            bufs_len = self._fast_bufs_len
            iova = self._iova + base
            size = layout.VNIC_BUFFER_SIZE
            post = lib.arx_tx_post
            from_buffer = fast.ffi.from_buffer
            for frame in frames[:count]:
                data = frame if type(frame) is bytes else from_buffer(frame)
                if post(descs, mask, bufs, bufs_len, iova, size, tx.prod, data, len(frame)):
                    self.counters.tx_errors += 1
                    continue
                tx.prod = (tx.prod + 1) & U32_MASK
                taken += 1
            frames = []
        for frame in frames[:count]:
            length = len(frame)
            if length > layout.VNIC_BUFFER_SIZE:
                self.counters.tx_errors += 1
                continue
            slot = tx.prod & mask
            buf = base + slot * layout.VNIC_BUFFER_SIZE
            mem[buf : buf + length] = frame
            tx.post(self._iova + buf, length, 0, 0, 0)
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

    def set_rss(self, key: bytes, table: list[int]) -> int:
        """Spread the function's TCP/UDP flows over the queues in ``table`` (an
        indirection table: a power-of-two number of queue numbers) with Toeplitz ``key``;
        an empty table turns RSS off. Rings a doorbell so the device looks at once; returns
        the device's RSS_STATE_* as far as it has answered yet."""
        if table and (len(key) != layout.RSS_KEY_SIZE or len(table) > layout.RSS_TABLE_MAX):
            raise DriverError(f"an RSS key is {layout.RSS_KEY_SIZE} bytes and a table at most {layout.RSS_TABLE_MAX}")
        regs = self.regs
        regs.write32(layout.REG_RSS_CONTROL, 0)  # off while the block is rewritten
        if table:
            self._bar[layout.REG_RSS_KEY : layout.REG_RSS_KEY + len(key)] = key
            self._bar[layout.REG_RSS_TABLE : layout.REG_RSS_TABLE + len(table)] = bytes(table)
            regs.write32(layout.REG_RSS_TABLE_SIZE, len(table))
            regs.write32(layout.REG_RSS_CONTROL, layout.RSS_ENABLE)
        self._ring_doorbell(self._tx_doorbell)
        return regs.read32(layout.REG_RSS_STATE)

    def close(self) -> None:
        if getattr(self, "_fast", None) is not None:
            # The raw pointers hold an export of the DMA view, which must end before
            # the base class releases the view and unmaps the memory.
            self._fast = None
            fast.ffi.release(self._fast_mem)
        super().close()

    @property
    def compiled(self) -> bool:
        """Whether the C bursts and ``transmit_tcp`` are in use (not ARRAKIS_PURE)."""
        return self._fast is not None

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
