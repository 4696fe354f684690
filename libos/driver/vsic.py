"""The libOS driver for a VSIC function: set-up over vfio-user, then one request ring.

Set-up is the VNIC driver's: VERSION, GET_INFO, GET_REGION_INFO for BAR0 (map its register
page), DMA_MAP of one sealed memfd holding the ring and the I/O buffers, GET_IRQ_INFO and
SET_IRQS with an eventfd for the queue. After that the data path is loads and stores to
shared memory; the socket carries a doorbell only when the device has said it is asleep.

Memory layout of the DMA region (IOVAs from ``IOVA_BASE``)::

    [request descriptors, ring_size x 32 bytes] (page aligned)
    [I/O buffers: ring_size slots x slot_blocks x 4096 bytes]

Buffer ``i`` belongs to ring slot ``i`` (the netmap habit of naming buffers by index): the
device completes a ring's requests in order, so a slot's buffer is free exactly when the
slot is, and the pool needs no allocator. Every buffer starts on a 4096-byte boundary, which
the device's direct I/O requires. A memfd's pages are allocated only when touched, so the
pool costs memory only for the buffers actually used.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from libos.driver.base import FunctionDriver, page_align
from vdev import layout
from vdev.ring import U32_MASK, DriverRing

IOVA_BASE = 0x20_0000_0000
DEFAULT_RING_SIZE = 64
DEFAULT_SLOT_BLOCKS = 64  # 256 KiB per request at most; larger transfers are split above
BLOCK_SIZE = layout.VSIC_BLOCK_SIZE


class VsicDriverError(Exception):
    """The device is not what this driver drives, it stopped the ring, or a request is bad."""


class RingFull(VsicDriverError):
    """Every slot holds a request not yet reaped: poll completions first."""


@dataclass(frozen=True)
class Completion:
    """One completed request: its tag, what it was, its DESC_* status, and read data."""

    tag: int
    opcode: int
    status: int
    data: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == layout.DESC_OK


@dataclass
class DriverCounters:
    submitted: int = 0
    completed: int = 0
    errors: int = 0
    ring_full: int = 0
    doorbells: int = 0
    sleeps: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class VsicDriver(FunctionDriver):
    """One request queue of a VSIC function, on the shared set-up of ``FunctionDriver``."""

    MAGIC = layout.MAGIC_VSIC
    KIND = "VSIC"
    QUEUE_NAME = "request queues"
    ERROR = VsicDriverError
    IOVA_BASE = IOVA_BASE
    counters: DriverCounters

    def __init__(
        self,
        sock: socket.socket,
        ring_size: int = DEFAULT_RING_SIZE,
        queue: int = 0,
        slot_blocks: int = DEFAULT_SLOT_BLOCKS,
    ) -> None:
        if not 1 <= slot_blocks <= layout.VSIC_MAX_REQUEST_BLOCKS:
            raise ValueError(f"slot_blocks must be in 1..{layout.VSIC_MAX_REQUEST_BLOCKS}")
        self.counters = DriverCounters()
        super().__init__(sock)
        try:
            self._setup(ring_size, queue, slot_blocks)
        except Exception:
            self.client.close()
            raise

    def _rings(self) -> tuple[DriverRing, ...]:
        return (self.ring,)

    def _setup(self, ring_size: int, queue: int, slot_blocks: int) -> None:
        regs = self._map_bar()
        if regs.read32(layout.REG_MAX_FRAME) != BLOCK_SIZE:
            raise VsicDriverError(f"the device's block size is not {BLOCK_SIZE}")
        self._check_queue(queue)
        ring_size = min(ring_size, regs.read32(layout.REG_MAX_RING_SIZE))
        if ring_size < layout.MIN_RING_SIZE or ring_size & (ring_size - 1):
            raise VsicDriverError(f"ring size {ring_size} is not a power of two >= {layout.MIN_RING_SIZE}")
        self.queue = queue
        self.ring_size = ring_size
        self.slot_blocks = slot_blocks
        self.function_id = regs.read32(layout.REG_FUNCTION_ID)
        self.capacity_blocks = regs.read64(layout.REG_CAPACITY_BLOCKS)
        self.read_only = bool(regs.read32(layout.REG_STATUS) & layout.STATUS_READ_ONLY)

        desc_bytes = ring_size * layout.VSIC_DESC_SIZE
        self._buf_off = page_align(desc_bytes)
        self._slot_bytes = slot_blocks * BLOCK_SIZE
        self._map_dma("libos-vsic-dma", self._buf_off + ring_size * self._slot_bytes)

        self.ring = DriverRing(regs, queue, self._mem_view[0:desc_bytes], ring_size, layout.VSIC_DESC)
        self._doorbell = layout.doorbell_offset(queue)
        # What each slot's request was, in the driver's own memory (not the shared ring).
        self._slot_opcode = [0] * ring_size
        self._slot_blocks = [0] * ring_size
        self._next_tag = 0

        self._setup_irq(queue)
        self.ring.enable(IOVA_BASE)

    # ---- data path -------------------------------------------------------------------

    def space(self) -> int:
        """Requests that may be submitted now."""
        return self.ring.space()

    def outstanding(self) -> int:
        """Requests submitted and not yet reaped by ``poll``."""
        return (self.ring.prod - self.ring.reaped) & U32_MASK

    def buffer_iova(self, slot: int) -> int:
        """The IOVA of slot ``slot``'s I/O buffer."""
        return IOVA_BASE + self._buf_off + slot * self._slot_bytes

    def submit(
        self,
        opcode: int,
        block: int,
        count: int,
        data: bytes | bytearray | memoryview | None = None,
        fua: bool = False,
        *,
        publish: bool = True,
    ) -> int:
        """Post one request; returns its tag. ``data`` for a write is ``count`` blocks.

        With ``publish=False`` the request waits for a later ``publish()`` (a batch is
        then one store, and at most one doorbell).
        """
        ring = self.ring
        if ring.space() == 0:
            self.counters.ring_full += 1
            raise RingFull(f"all {self.ring_size} slots are in flight")
        slot = ring.prod & ring.mask
        flags = 0
        if opcode == layout.VSIC_OP_FLUSH:
            if data is not None or fua:
                raise VsicDriverError("a flush carries no data and no FUA")
            block = count = 0
            iova = 0
        elif opcode in (layout.VSIC_OP_READ, layout.VSIC_OP_WRITE):
            if not 1 <= count <= self.slot_blocks:
                raise VsicDriverError(f"a request moves 1..{self.slot_blocks} blocks, not {count}")
            if not 0 <= block <= 0xFFFF_FFFF_FFFF_FFFF:
                raise VsicDriverError(f"block {block} does not fit the descriptor")
            iova = self.buffer_iova(slot)
            if opcode == layout.VSIC_OP_WRITE:
                if data is None:
                    raise VsicDriverError("a write needs data")
                source = memoryview(data).cast("B")
                if source.nbytes != count * BLOCK_SIZE:
                    raise VsicDriverError(f"a write of {count} blocks takes {count * BLOCK_SIZE} bytes")
                start = self._buf_off + slot * self._slot_bytes
                self._mem_view[start : start + source.nbytes] = source
                flags = layout.VSIC_FLAG_FUA if fua else 0
            elif data is not None or fua:
                raise VsicDriverError("a read carries no data and no FUA")
        else:
            raise VsicDriverError(f"unknown opcode {opcode}")
        tag = self._next_tag
        self._next_tag = (tag + 1) & U32_MASK
        self._slot_opcode[slot] = opcode
        self._slot_blocks[slot] = count
        ring.post(opcode, flags, 0, tag, block, count, 0, iova)
        self.counters.submitted += 1
        if publish:
            self.publish()
        return tag

    def publish(self) -> None:
        """Hand every posted request to the device; ring the doorbell only if it sleeps."""
        if self.ring.publish():
            self._ring_doorbell(self._doorbell)

    def poll(self, budget: int = 64) -> list[Completion]:
        """Completions since the last call, in submission order (read data copied out)."""
        ring = self.ring
        ready = min(ring.completed(), budget)
        if ready <= 0:
            return []
        completions: list[Completion] = []
        start = ring.reaped
        mem = self._mem_view
        for offset in range(ready):
            index = (start + offset) & U32_MASK
            slot = index & ring.mask
            status, tag = layout.VSIC_COMPLETION.unpack_from(ring.descs, slot * layout.VSIC_DESC_SIZE + layout.VSIC_DESC_STATUS_OFFSET)
            opcode = self._slot_opcode[slot]
            data = None
            if status == layout.DESC_OK and opcode == layout.VSIC_OP_READ:
                buf = self._buf_off + slot * self._slot_bytes
                data = mem[buf : buf + self._slot_blocks[slot] * BLOCK_SIZE].tobytes()
            elif status != layout.DESC_OK:
                self.counters.errors += 1
            completions.append(Completion(tag, opcode, status, data))
        ring.reap(ready)
        self.counters.completed += ready
        return completions

    def check_errors(self) -> None:
        if self.ring.error:
            raise VsicDriverError(f"the device stopped the request ring (error {self.ring.error})")

    def wait(self, timeout: float) -> None:
        """Sleep until the device raises the queue's interrupt, or ``timeout`` seconds.

        The interrupt is asked for first and the ring checked again after, so a completion
        that arrived in between is not slept through.
        """
        ring = self.ring
        ring.want_irq(True)
        try:
            if ring.completed() or ring.error:
                return
            self._sleep(timeout)
        finally:
            ring.want_irq(False)
