"""One VNIC function: its registers, rings, DMA table, doorbells, limits and counters.

A function is what an application owns on the NIC (an SR-IOV virtual function in the paper).
It implements the vfio-user ``DeviceModel`` so the device host can serve it to the libOS
driver, and it offers the device's data path two calls: ``deliver`` (a received frame into
an RX buffer) and ``transmit`` (frames the driver posted on a TX ring, checked and copied out).

Every value the driver controls is hostile: ring registers are read once and checked, each
descriptor is copied out of shared memory once and validated there, every buffer address goes
through the DMA table, and a broken ring stops that ring only.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from vdev import layout
from vdev.dma import DmaFault
from vdev.function_base import DeviceFunction
from vdev.ring import DeviceRing
from vdev.vnic.rss import RssSteering
from vdev.ratelimit import TokenBucket, default_burst_bytes

RX_POLICER_WINDOW = 0.05  # seconds of traffic the receive policer lets through at once
_WRITEBACK = struct.Struct("<HHH")  # length, flags, status at VNIC_DESC_LENGTH_OFFSET


@dataclass
class FunctionCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_no_buffer: int = 0  # a frame arrived while the RX ring had no posted buffer
    rx_rate_dropped: int = 0  # the receive limiter refused the frame
    rx_errors: int = 0  # a frame dropped because its descriptor was bad
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0  # descriptors completed with a nonzero status
    tx_spoofed: int = 0  # frames refused by the transmit filter
    tx_rate_delayed: int = 0  # polls that stopped at the transmit limiter
    iommu_faults: int = 0
    ring_errors: int = 0
    doorbells: int = 0
    irqs: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class FunctionConfig:
    function_id: int
    mac: bytes
    ipv4: bytes
    num_queues: int = 1
    max_ring_size: int = layout.MAX_RING_SIZE
    rx_rate_bps: int = 0  # 0: unlimited
    tx_rate_bps: int = 0
    owner_pid: int = 0
    owner_uid: int = 0
    name: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class VnicFunction(DeviceFunction):
    """The device side of one function (DeviceModel for the vfio-user server): queue pairs
    of RX and TX rings over the shared half in ``DeviceFunction``."""

    MAGIC = layout.MAGIC_VNIC
    BAR_NAME = "vnic"
    config: FunctionConfig
    counters: FunctionCounters

    def __init__(self, config: FunctionConfig, now: float) -> None:
        if not 1 <= config.num_queues <= layout.MAX_RINGS // 2:
            raise ValueError(f"a function has 1..{layout.MAX_RINGS // 2} queue pairs")
        if len(config.mac) != 6 or len(config.ipv4) != 4:
            raise ValueError("mac is 6 bytes and ipv4 is 4 bytes")
        self.config = config
        self.counters = FunctionCounters()
        self.rx_rings: list[DeviceRing | None] = [None] * config.num_queues
        self.tx_rings: list[DeviceRing | None] = [None] * config.num_queues
        self.rss = RssSteering(config.num_queues)
        super().__init__(layout.VNIC_MAX_FRAME)
        self.rx_limit: TokenBucket | None = None
        self.tx_limit: TokenBucket | None = None
        self.set_rates(config.rx_rate_bps, config.tx_rate_bps, now)
        self._init_registers()

    def set_rates(self, rx_bps: int, tx_bps: int, now: float) -> None:
        """Program the function's limiters (0: unlimited).

        The receive limiter is a policer: it drops what exceeds the rate. Frames reach it in
        bursts whenever the device host was off the CPU for a while, even when they left the
        sender evenly spaced (and after Linux's own shaper on the tap), so its bucket holds
        RX_POLICER_WINDOW seconds of traffic; a smaller bucket punishes scheduling jitter,
        not excess traffic. The transmit limiter is a shaper (frames wait on the ring) and
        keeps the default burst.
        """
        self.config.rx_rate_bps, self.config.tx_rate_bps = rx_bps, tx_bps
        self.rx_limit = TokenBucket(rx_bps, max(default_burst_bytes(rx_bps), int(rx_bps / 8 * RX_POLICER_WINDOW)), now) if rx_bps else None
        self.tx_limit = TokenBucket(tx_bps, 0, now) if tx_bps else None

    # ---- registers ------------------------------------------------------------------

    def _init_function_registers(self) -> None:
        self._bar[layout.REG_MAC : layout.REG_MAC + 6] = self.config.mac
        self._bar[layout.REG_IPV4 : layout.REG_IPV4 + 4] = self.config.ipv4
        self.regs.write32(layout.REG_STATUS, layout.STATUS_ENABLED)

    def sync_rings(self) -> None:
        """Pick up rings the driver enabled or disabled since the last look.

        Enabling is a register store the device cannot trap, so the device looks at the
        enable bits whenever it is woken and on every idle-to-busy transition.
        """
        regs = self.regs
        self.rss.sync(regs)
        for queue in range(self.num_queues):
            for direction, rings in ((layout.RX, self.rx_rings), (layout.TX, self.tx_rings)):
                ring_index = layout.vnic_ring_index(queue, direction)
                enabled = regs.read32(layout.ring_reg(ring_index, layout.RING_ENABLE)) == 1
                current = rings[queue]
                if enabled and current is None:
                    if regs.read32(layout.ring_reg(ring_index, layout.RING_ERROR)):
                        continue  # stopped until the driver disables and re-enables it
                    rings[queue] = self._open_ring(ring_index, layout.VNIC_DESC)
                elif not enabled:
                    # Disabling resets the ring, a failed one included (how a driver recovers).
                    rings[queue] = None
                    regs.write32(layout.ring_reg(ring_index, layout.RING_ERROR), 0)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        super().region_write(index, offset, data)
        if offset >= layout.DOORBELL_PAGE_OFFSET:
            # A driver that changed its RSS setting rings a doorbell (libOS: set_rss). Look
            # at the block now: a busy device host looks at ring enables only on waking,
            # and a worker's queue taken out of the table must stop receiving at once.
            self.rss.sync(self.regs)

    def _fail_ring(self, rings: list[DeviceRing | None], queue: int, code: int) -> None:
        ring = rings[queue]
        if ring is not None:
            ring.fail(code)
            rings[queue] = None
            self.counters.ring_errors += 1

    def _on_unmap(self, iova: int, size: int) -> None:
        # The driver is taking memory away: stop every ring inside it before the mapping
        # goes, so the device never touches unmapped memory (vfio-user DMA_UNMAP rule).
        # Where a ring lives is the device's own record of it, taken when the ring was
        # enabled: the RING_IOVA register is the driver's to rewrite at any time.
        for rings in (self.rx_rings, self.tx_rings):
            for queue, ring in enumerate(rings):
                if ring is not None and ring.overlaps(iova, size):
                    ring.descs.release()
                    self._fail_ring(rings, queue, layout.RING_ERR_UNMAPPED)

    # ---- data path ------------------------------------------------------------------

    def deliver(self, queue: int, frame: bytes, now: float) -> bool:
        """Put one received frame into the next RX buffer of ``queue`` (the filter's; RSS
        may pick another of this function's queues for it); False if dropped."""
        queue = self.rss.queue_for(frame, queue)
        counters = self.counters
        rx_limit = self.rx_limit
        if rx_limit is not None and not rx_limit.try_consume(len(frame), now):
            counters.rx_rate_dropped += 1
            return False
        ring = self.rx_rings[queue] if queue < self.num_queues else None
        if ring is None:
            counters.rx_no_buffer += 1
            return False
        pending = ring.pending()
        if pending <= 0:
            if pending < 0:
                self._fail_ring(self.rx_rings, queue, layout.RING_ERR_INDEX)
            counters.rx_no_buffer += 1
            return False
        index = ring.cons
        iova, capacity, _flags, _status, _reserved = ring.fetch(index)
        length = len(frame)
        status = layout.DESC_OK
        if length > capacity:
            status = layout.DESC_BAD_LENGTH
        else:
            try:
                buffer, offset = self.dma_table.translate(iova, length, True)
            except DmaFault:
                status = layout.DESC_IOMMU_FAULT
                self._count_iommu_fault()
            else:
                buffer[offset : offset + length] = frame
        if status:
            ring.write_back(index, layout.VNIC_DESC_LENGTH_OFFSET, _WRITEBACK, 0, 0, status)
            ring.advance(1, 1)
            counters.rx_errors += 1
            return False
        ring.write_back(index, layout.VNIC_DESC_LENGTH_OFFSET, _WRITEBACK, length, 0, 0)
        ring.advance(1)
        counters.rx_packets += 1
        counters.rx_bytes += length
        return True

    def transmit(
        self, queue: int, budget: int, now: float, allowed: Callable[[int, bytes], bool]
    ) -> tuple[list[bytes], float]:
        """Take up to ``budget`` frames off TX ring ``queue``.

        Returns the frames to put on the wire and, if the transmit limiter stopped the
        poll, how many seconds until it allows the next frame (else 0).
        """
        ring = self.tx_rings[queue]
        if ring is None:
            return [], 0.0
        pending = ring.pending()
        if pending < 0:
            self._fail_ring(self.tx_rings, queue, layout.RING_ERR_INDEX)
            return [], 0.0
        frames: list[bytes] = []
        counters = self.counters
        tx_limit = self.tx_limit
        wait = 0.0
        errors = 0
        index = ring.cons
        done = 0
        for _ in range(min(pending, budget)):
            iova, length, _flags, _status, _reserved = ring.fetch(index + done)
            status = layout.DESC_OK
            frame = b""
            if not 14 <= length <= layout.VNIC_MAX_FRAME:
                status = layout.DESC_BAD_LENGTH
            else:
                if tx_limit is not None:
                    # The limiter judges the length before any work: a frame that must
                    # wait is left on the ring, untouched, for a later poll.
                    wait = tx_limit.time_until(length, now)
                    if wait > 0:
                        counters.tx_rate_delayed += 1
                        break
                    tx_limit.try_consume(length, now)
                try:
                    buffer, offset = self.dma_table.translate(iova, length, False)
                except DmaFault:
                    status = layout.DESC_IOMMU_FAULT
                    self._count_iommu_fault()
                else:
                    # Copy first, then check: the driver may rewrite its buffer at any time,
                    # and the filter must judge exactly the bytes that go on the wire.
                    frame = bytes(buffer[offset : offset + length])
                    if not allowed(self.function_id, frame):
                        status = layout.DESC_TX_FILTERED
                        counters.tx_spoofed += 1
            ring.write_back(index + done, layout.VNIC_DESC_LENGTH_OFFSET, _WRITEBACK, length, 0, status)
            done += 1
            if status:
                errors += 1
                continue
            frames.append(frame)
            counters.tx_packets += 1
            counters.tx_bytes += length
        if done:
            ring.advance(done, errors)
            counters.tx_errors += errors
        return frames, wait

    def has_tx_work(self) -> bool:
        for ring in self.tx_rings:
            if ring is not None and ring.pending() != 0:
                return True
        return False

    def set_asleep(self, asleep: bool) -> None:
        self.asleep = asleep
        for rings in (self.rx_rings, self.tx_rings):
            for ring in rings:
                if ring is not None:
                    ring.set_asleep(asleep)
        if not asleep:
            return
        # Rings not yet enabled: their register block must say "asleep" too, so a driver
        # that enables a ring and posts at once rings the doorbell.
        for ring_index in range(2 * self.num_queues):
            self.regs.write32(layout.ring_reg(ring_index, layout.RING_DEVICE_ASLEEP), 1)

    def raise_irqs(self) -> None:
        """Signal every queue whose driver asked for an interrupt and has completions."""
        for queue in range(self.num_queues):
            fd = self._irq_fds[queue]
            if fd is None:
                continue
            wanted = False
            for ring in (self.rx_rings[queue], self.tx_rings[queue]):
                if ring is not None and ring.irq_wanted():
                    ring.clear_irq_wanted()
                    wanted = True
            if wanted:
                self._signal_irq(fd)

    def _drop_rings(self) -> None:
        self.rx_rings = [None] * self.num_queues
        self.tx_rings = [None] * self.num_queues

    def snapshot(self) -> dict[str, object]:
        return {
            **self._snapshot_head(),
            "rx_rate_bps": self.config.rx_rate_bps,
            "tx_rate_bps": self.config.tx_rate_bps,
            "counters": self.counters.as_dict(),
        }
