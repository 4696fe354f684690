"""One VSIC function: its VSA, registers, request rings, DMA table, doorbells, limits, counters.

A function is what an application owns on the storage controller: a virtual storage area
(VSA), a list of extents on the device's image, and request rings in the application's own
memory. It implements the vfio-user ``DeviceModel`` so the device host can serve it to the
libOS driver, and offers the device one data-path call, ``process``: take up to a budget of
requests off a ring, check each one, translate it, do the I/O, complete it.

Every value the driver controls is hostile. Ring registers are read once and checked; each
descriptor is copied out of shared memory once and judged on that copy; the block range is
checked against the VSA without ever forming ``vsa_block + block_count`` from unchecked
values; the buffer goes through the DMA table with the permission the transfer needs; a
broken ring stops that ring only. The I/O itself goes through a ``Storage`` the device owns:
the function never sees a file descriptor or a physical offset it did not compute.
"""

from __future__ import annotations

import mmap
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vdev import layout
from vdev.dma import DmaFault
from vdev.fast.vsic_mirror import REQ_WORDS, VsicFastCheck, make_vsic_fast_check
from vdev.function_base import DeviceFunction
from vdev.ring import DeviceRing, is_valid_ring_size
from vdev.ratelimit import RequestLimiter

BLOCK_SIZE = layout.VSIC_BLOCK_SIZE
MAX_QUEUES = layout.MAX_RINGS
MAX_EXTENTS = 4096  # a VSA's extent list is control-plane data, but still bounded
DEFAULT_MAX_RING_SIZE = 1024

_BLOCK_MASK = BLOCK_SIZE - 1


class VsaError(ValueError):
    """An extent list does not describe a usable VSA on the image."""


class Storage(Protocol):
    """The device's backing store, in physical blocks of ``BLOCK_SIZE`` bytes.

    ``view`` is a whole number of blocks of DMA memory; failures raise ``OSError``.
    """

    def read_into(self, physical_block: int, view: memoryview) -> None: ...

    def write_from(self, physical_block: int, view: memoryview) -> None: ...

    def flush(self) -> None: ...


class VirtualStorageArea:
    """VSA blocks ``[0, capacity_blocks)`` laid over extents ``(physical_block, count)``.

    The extents are the control plane's, checked here anyway: each inside the image, none
    empty, none overlapping another (a write through one VSA block must never land under
    a second VSA block).
    """

    __slots__ = ("extents", "capacity_blocks", "read_only", "_starts")

    def __init__(self, extents: Sequence[tuple[int, int]], image_blocks: int, read_only: bool = False) -> None:
        if not 1 <= len(extents) <= MAX_EXTENTS:
            raise VsaError(f"a VSA has 1..{MAX_EXTENTS} extents, got {len(extents)}")
        checked: list[tuple[int, int]] = []
        starts: list[int] = []
        capacity = 0
        for extent in extents:
            if len(extent) != 2:
                raise VsaError(f"an extent is (physical_block, count), got {extent!r}")
            physical, count = extent
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (physical, count)):
                raise VsaError(f"extent {extent!r} is not two integers")
            if physical < 0 or count <= 0 or count > image_blocks or physical > image_blocks - count:
                raise VsaError(f"extent ({physical}, {count}) is not inside the image of {image_blocks} blocks")
            starts.append(capacity)
            checked.append((physical, count))
            capacity += count
        by_start = sorted(checked)
        for (first, first_count), (second, _count) in zip(by_start, by_start[1:]):
            if first + first_count > second:
                raise VsaError(f"extents at physical blocks {first} and {second} overlap")
        self.extents: tuple[tuple[int, int], ...] = tuple(checked)
        self.capacity_blocks = capacity
        self.read_only = read_only
        self._starts = starts

    def in_range(self, vsa_block: int, count: int) -> bool:
        """True when ``[vsa_block, vsa_block + count)`` lies inside the VSA.

        Written so that no sum of two driver values is formed: in C (or a hardware adder)
        ``vsa_block + count`` can wrap past 2**64 and pass a naive check.
        """
        capacity = self.capacity_blocks
        return 0 <= count <= capacity and 0 <= vsa_block <= capacity - count

    def physical_runs(self, vsa_block: int, count: int) -> list[tuple[int, int]]:
        """The physical ``(block, count)`` runs under a range that ``in_range`` accepted."""
        runs: list[tuple[int, int]] = []
        index = bisect_right(self._starts, vsa_block) - 1
        position = vsa_block
        left = count
        while left:
            physical, extent_count = self.extents[index]
            into = position - self._starts[index]
            take = min(left, extent_count - into)
            runs.append((physical + into, take))
            position += take
            left -= take
            index += 1
        return runs

    def overlaps(self, other: VirtualStorageArea) -> bool:
        for physical, count in self.extents:
            for other_physical, other_count in other.extents:
                if physical < other_physical + other_count and other_physical < physical + count:
                    return True
        return False


@dataclass
class FunctionCounters:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    fua_writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    error_completions: int = 0
    out_of_range: int = 0
    iommu_faults: int = 0
    misaligned: int = 0
    bad_requests: int = 0  # unknown opcode or flags, bad block count
    read_only_refused: int = 0
    io_errors: int = 0
    ring_errors: int = 0
    rate_delayed: int = 0  # polls that stopped at the limiter, the request left on the ring
    doorbells: int = 0
    irqs: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class FunctionConfig:
    function_id: int
    extents: list[tuple[int, int]]
    read_only: bool = False
    num_queues: int = 1
    max_ring_size: int = DEFAULT_MAX_RING_SIZE
    iops: int = 0  # 0: unlimited
    bps: int = 0  # bits per second of data; 0: unlimited
    owner_pid: int = 0
    owner_uid: int = 0
    name: str = ""
    extra: dict[str, object] = field(default_factory=dict)


class VsicFunction(DeviceFunction):
    """The device side of one function (DeviceModel for the vfio-user server): request
    rings over a VSA, on the shared half in ``DeviceFunction``."""

    MAGIC = layout.MAGIC_VSIC
    BAR_NAME = "vsic"
    config: FunctionConfig
    counters: FunctionCounters

    def __init__(self, config: FunctionConfig, vsa: VirtualStorageArea, storage: Storage, now: float) -> None:
        if not 1 <= config.num_queues <= MAX_QUEUES:
            raise ValueError(f"a function has 1..{MAX_QUEUES} request queues")
        if not is_valid_ring_size(config.max_ring_size, layout.MAX_RING_SIZE):
            raise ValueError(f"max ring size {config.max_ring_size} is not a power of two in range")
        self.config = config
        self.vsa = vsa
        self.storage = storage
        self.counters = FunctionCounters()
        self.limiter = RequestLimiter(config.iops, config.bps, now)
        # When the limiter stopped this function's rings, the time it lets requests go on.
        self.blocked_until = 0.0
        self.rings: list[DeviceRing | None] = [None] * config.num_queues
        self._completed: set[int] = set()  # queues with completions since the last IRQ pass
        # The compiled check and translation (vdev/fast/vsic.c); None: ARRAKIS_PURE=1, the
        # pure-Python model below decides every request.
        self.fast_check: VsicFastCheck | None = make_vsic_fast_check()
        super().__init__(BLOCK_SIZE)
        self._init_registers()

    def set_limits(self, iops: int, bps: int, now: float) -> None:
        """Program the function's limiter (0: unlimited). Requests over the limit wait on
        the ring (a shaper, like the VNIC's transmit side), so the application sees
        back-pressure, never an error."""
        self.limiter.set_limits(iops, bps, now)
        self.config.iops, self.config.bps = iops, bps
        self.blocked_until = 0.0

    # ---- registers ------------------------------------------------------------------

    def _init_function_registers(self) -> None:
        regs = self.regs
        regs.write64(layout.REG_CAPACITY_BLOCKS, self.vsa.capacity_blocks)
        status = layout.STATUS_ENABLED | (layout.STATUS_READ_ONLY if self.vsa.read_only else 0)
        regs.write32(layout.REG_STATUS, status)

    def sync_rings(self) -> None:
        """Pick up rings the driver enabled or disabled since the last look (a register
        store the device cannot trap: looked at on every wakeup and idle-to-busy change)."""
        regs = self.regs
        for queue in range(self.num_queues):
            enabled = regs.read32(layout.ring_reg(queue, layout.RING_ENABLE)) == 1
            current = self.rings[queue]
            if enabled and current is None:
                if regs.read32(layout.ring_reg(queue, layout.RING_ERROR)):
                    continue  # stopped until the driver disables and re-enables it
                self.rings[queue] = self._open_ring(queue, layout.VSIC_DESC)
                if self.asleep and self.rings[queue] is not None:
                    regs.write32(layout.ring_reg(queue, layout.RING_DEVICE_ASLEEP), 1)
            elif not enabled:
                # Disabling is how a driver resets a ring, stopped by an error or not.
                if current is not None:
                    current.descs.release()
                    self.rings[queue] = None
                regs.write32(layout.ring_reg(queue, layout.RING_ERROR), 0)

    def fail_ring(self, queue: int, code: int) -> None:
        """Stop ring ``queue`` with RING_ERR ``code`` until the driver disables it."""
        ring = self.rings[queue]
        if ring is not None:
            ring.fail(code)
            ring.descs.release()
            self.rings[queue] = None
            self.counters.ring_errors += 1

    def _on_unmap(self, iova: int, size: int) -> None:
        # The driver is taking memory away: stop every ring inside it before the mapping
        # goes (vfio-user DMA_UNMAP). Data buffers need nothing: the device holds a view of
        # one only for the duration of one request, inside ``process``.
        for queue, ring in enumerate(self.rings):
            if ring is None:
                continue
            if ring.overlaps(iova, size):  # the device's copy, not the driver's register
                self.fail_ring(queue, layout.RING_ERR_UNMAPPED)

    # ---- data path ------------------------------------------------------------------

    def process(self, queue: int, budget: int, now: float) -> tuple[int, float]:
        """Complete up to ``budget`` requests of ring ``queue``, in order.

        Returns how many were completed and, if the limiter stopped the poll, how many
        seconds until it lets the next request go (else 0).
        """
        ring = self.rings[queue]
        if ring is None:
            return 0, 0.0
        pending = ring.pending()
        if pending < 0:
            self.fail_ring(queue, layout.RING_ERR_INDEX)
            return 0, 0.0
        if self.fast_check is not None:
            return self._process_compiled(self.fast_check, queue, ring, min(pending, budget), now)
        limiter = self.limiter
        limited = limiter.iops != 0 or limiter.bps != 0
        index = ring.cons
        done = 0
        errors = 0
        wait = 0.0
        for _ in range(min(pending, budget)):
            opcode, flags, _status, tag, vsa_block, block_count, _reserved, buffer_iova = ring.fetch(index + done)
            status, nbytes = self._check(opcode, flags, vsa_block, block_count, buffer_iova)
            if limited:
                # Judged on the checked request before any I/O: one that must wait stays on
                # the ring untouched, and is fetched and checked afresh next time. Refused
                # requests cost an I/O too, so a flood of bad ones is bounded by the limit.
                wait = limiter.time_until(nbytes, now)
                if wait > 0.0:
                    self.counters.rate_delayed += 1
                    self.blocked_until = now + wait
                    break
                limiter.try_consume(nbytes, now)
            if status == layout.DESC_OK:
                status = self._perform(opcode, flags, vsa_block, block_count, buffer_iova, nbytes)
            ring.write_back(index + done, layout.VSIC_DESC_STATUS_OFFSET, layout.VSIC_COMPLETION, status, tag)
            done += 1
            if status != layout.DESC_OK:
                errors += 1
        self._finish_batch(queue, ring, done, errors)
        return done, wait

    def _process_compiled(
        self, fast: VsicFastCheck, queue: int, ring: DeviceRing, todo: int, now: float
    ) -> tuple[int, float]:
        """``process`` with the check and translation done in C, a batch at a time.

        Every step around the C verdict is the model's, in the model's order: the refusal
        counters, the limiter (before any I/O; a request that must wait stays on the ring,
        to be fetched and checked afresh), the I/O, the write-back. A descriptor C hands
        back (VS_FALLBACK), or a ring C cannot describe, goes through ``_check`` on the
        fields C copied, so the ring is still read once per request.
        """
        limiter = self.limiter
        limited = limiter.iops != 0 or limiter.bps != 0
        index = ring.cons
        done = 0
        errors = 0
        wait = 0.0
        stopped = False
        while done < todo and not stopped:
            words = fast.check(self.vsa, self.dma_table, ring, index + done, todo - done)
            if not words:
                fields = ring.fetch(index + done)
                # opcode, flags, tag, vsa_block, block_count, buffer_iova as C would give them
                words = [fast.fallback, fields[0] | fields[1] << 8, fields[3], fields[4], fields[5], fields[7], 0, 0]
            for base in range(0, len(words), REQ_WORDS):
                status, opflags, tag, vsa_block, block_count, buffer_iova, map_index, runs = words[base : base + REQ_WORDS]
                opcode, flags = opflags & 0xFF, opflags >> 8
                nbytes = 0
                if status == fast.fallback:
                    status, nbytes = self._check(opcode, flags, vsa_block, block_count, buffer_iova)
                    runs = -1
                elif status == layout.DESC_OK:
                    if opcode != layout.VSIC_OP_FLUSH:
                        nbytes = block_count * BLOCK_SIZE
                else:
                    self._count_refusal(status)
                if limited:
                    wait = limiter.time_until(nbytes, now)
                    if wait > 0.0:
                        self.counters.rate_delayed += 1
                        self.blocked_until = now + wait
                        stopped = True
                        break
                    limiter.try_consume(nbytes, now)
                if status == layout.DESC_OK:
                    if runs < 0 or opcode == layout.VSIC_OP_FLUSH:
                        status = self._perform(opcode, flags, vsa_block, block_count, buffer_iova, nbytes)
                    else:
                        memory = fast.mappings[map_index].memory
                        status = self._transfer(opcode == layout.VSIC_OP_WRITE, flags, memory, fast.runs(runs), nbytes)
                ring.write_back(index + done, layout.VSIC_DESC_STATUS_OFFSET, layout.VSIC_COMPLETION, status, tag)
                done += 1
                if status != layout.DESC_OK:
                    errors += 1
        self._finish_batch(queue, ring, done, errors)
        return done, wait

    def _finish_batch(self, queue: int, ring: DeviceRing, done: int, errors: int) -> None:
        """Publish ``done`` completions (``errors`` of them failures) of ``queue``."""
        if done:
            ring.advance(done, errors)
            self.counters.error_completions += errors
            self._completed.add(queue)

    def _count_refusal(self, status: int) -> None:
        """The counter ``_check`` moves when it refuses a request with ``status``."""
        counters = self.counters
        if status == layout.DESC_BAD_OPCODE or status == layout.DESC_BAD_LENGTH:
            counters.bad_requests += 1
        elif status == layout.DESC_READ_ONLY:
            counters.read_only_refused += 1
        elif status == layout.DESC_OUT_OF_RANGE:
            counters.out_of_range += 1
        elif status == layout.DESC_MISALIGNED:
            counters.misaligned += 1
        elif status == layout.DESC_IOMMU_FAULT:
            self._count_iommu_fault()
        else:
            raise ValueError(f"the compiled check gave status {status}")  # a device bug: fail the ring

    def _check(self, opcode: int, flags: int, vsa_block: int, block_count: int, buffer_iova: int) -> tuple[int, int]:
        """(status, data bytes) of one request, from the device's private copy of it."""
        counters = self.counters
        if flags & ~layout.VSIC_KNOWN_FLAGS:
            counters.bad_requests += 1
            return layout.DESC_BAD_OPCODE, 0
        if opcode == layout.VSIC_OP_FLUSH:
            if flags:
                counters.bad_requests += 1
                return layout.DESC_BAD_OPCODE, 0
            return layout.DESC_OK, 0
        if opcode == layout.VSIC_OP_READ:
            write = False
            if flags:
                counters.bad_requests += 1
                return layout.DESC_BAD_OPCODE, 0
        elif opcode == layout.VSIC_OP_WRITE:
            write = True
            if self.vsa.read_only:
                counters.read_only_refused += 1
                return layout.DESC_READ_ONLY, 0
        else:
            counters.bad_requests += 1
            return layout.DESC_BAD_OPCODE, 0
        if not 1 <= block_count <= layout.VSIC_MAX_REQUEST_BLOCKS:
            counters.bad_requests += 1
            return layout.DESC_BAD_LENGTH, 0
        if not self.vsa.in_range(vsa_block, block_count):
            counters.out_of_range += 1
            return layout.DESC_OUT_OF_RANGE, 0
        if buffer_iova & _BLOCK_MASK:
            counters.misaligned += 1
            return layout.DESC_MISALIGNED, 0
        nbytes = block_count * BLOCK_SIZE
        try:
            # A read from the VSA is a device *write* into the buffer, and vice versa.
            self.dma_table.translate(buffer_iova, nbytes, not write)
        except DmaFault:
            self._count_iommu_fault()
            return layout.DESC_IOMMU_FAULT, 0
        return layout.DESC_OK, nbytes

    def _perform(self, opcode: int, flags: int, vsa_block: int, block_count: int, buffer_iova: int, nbytes: int) -> int:
        counters = self.counters
        storage = self.storage
        if opcode == layout.VSIC_OP_FLUSH:
            try:
                storage.flush()
            except OSError:
                counters.io_errors += 1
                return layout.DESC_IO_ERROR
            counters.flushes += 1
            return layout.DESC_OK
        write = opcode == layout.VSIC_OP_WRITE
        memory, offset = self.dma_table.translate(buffer_iova, nbytes, not write)
        runs: list[tuple[int, int, int]] = []
        for physical, count in self.vsa.physical_runs(vsa_block, block_count):
            runs.append((physical, count, offset))
            offset += count * BLOCK_SIZE
        return self._transfer(write, flags, memory, runs, nbytes)

    def _transfer(self, write: bool, flags: int, memory: mmap.mmap, runs: list[tuple[int, int, int]], nbytes: int) -> int:
        """The I/O of a checked read or write: ``runs`` are (physical block, count, byte
        offset of the data in ``memory``), together ``nbytes`` of one DMA mapping."""
        counters = self.counters
        storage = self.storage
        view = memoryview(memory)
        try:
            for physical, count, offset in runs:
                with view[offset : offset + count * BLOCK_SIZE] as part:
                    if write:
                        storage.write_from(physical, part)
                    else:
                        storage.read_into(physical, part)
            if write and flags & layout.VSIC_FLAG_FUA:
                # FUA as write-through: the data is on stable storage before the completion.
                storage.flush()
        except OSError:
            counters.io_errors += 1
            return layout.DESC_IO_ERROR
        finally:
            view.release()
        if write:
            counters.writes += 1
            counters.write_bytes += nbytes
            if flags & layout.VSIC_FLAG_FUA:
                counters.fua_writes += 1
        else:
            counters.reads += 1
            counters.read_bytes += nbytes
        return layout.DESC_OK

    def has_work(self) -> bool:
        for ring in self.rings:
            if ring is not None and ring.pending() != 0:
                return True
        return False

    def set_asleep(self, asleep: bool) -> None:
        self.asleep = asleep
        # Every ring block, enabled or not: a driver that enables a ring and posts at once
        # must see "asleep" and ring the doorbell.
        value = 1 if asleep else 0
        for queue in range(self.num_queues):
            self.regs.write32(layout.ring_reg(queue, layout.RING_DEVICE_ASLEEP), value)

    def raise_irqs(self) -> None:
        """Signal every queue that completed requests and whose driver asked for an IRQ."""
        if not self._completed:
            return
        for queue in self._completed:
            ring = self.rings[queue]
            fd = self._irq_fds[queue]
            if ring is None or fd is None or not ring.irq_wanted():
                continue
            ring.clear_irq_wanted()
            self._signal_irq(fd)
        self._completed.clear()

    def _drop_rings(self) -> None:
        for ring in self.rings:
            if ring is not None:
                ring.descs.release()
        self.rings = [None] * self.num_queues
        self._completed.clear()

    def snapshot(self) -> dict[str, object]:
        return {
            **self._snapshot_head(),
            "capacity_blocks": self.vsa.capacity_blocks,
            "extents": [list(extent) for extent in self.vsa.extents],
            "read_only": self.vsa.read_only,
            "limits": self.limiter.stats(),
            "counters": self.counters.as_dict(),
        }
