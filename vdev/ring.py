"""Single-producer/single-consumer descriptor rings over shared memory.

The ABI (offsets, who writes which field) is in ``vdev.layout``. This module holds the two
halves of the protocol, so that the device models and the libOS drivers share one
implementation of the index arithmetic:

* ``DriverRing``: the driver posts descriptors (advancing ``prod``) and reaps completions
  (up to the device's ``cons``);
* ``DeviceRing``: the device fetches posted descriptors, each read once into private memory,
  completes them in order (writing back length and status), and publishes ``cons``.

Both sides reach the registers through ``Registers``, u32/u64 views of the register page.
On x86-64 an aligned 4- or 8-byte store through a ``memoryview`` is a single instruction,
and x86 keeps stores in program order, so a side that writes a descriptor and *then* the
index it guards is seen in that order by the other side.

Sleeping without losing a wakeup is the usual two-step: the sleeper sets its flag
(``device_asleep`` or ``irq_wanted``), looks at the ring once more, and only then blocks; the
other side publishes its index and then looks at the flag. Because a store followed by a load
of another location may be reordered on x86, the sleeper also blocks with a timeout, so a
lost wakeup costs latency, never progress.
"""

from __future__ import annotations

import struct
import mmap
from typing import Final

from vdev import layout

U32_MASK: Final = 0xFFFFFFFF


class RingError(Exception):
    """The ring's registers or memory do not describe a usable ring."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Registers:
    """Typed access to a register page (4 KiB) mapped by both sides."""

    __slots__ = ("page", "u32", "u64")

    def __init__(self, page: mmap.mmap | bytearray | memoryview) -> None:
        view = memoryview(page)
        if view.nbytes < layout.PAGE_SIZE:
            raise ValueError("a register page is 4096 bytes")
        self.page = view[: layout.PAGE_SIZE].cast("B")
        self.u32 = self.page.cast("I")
        self.u64 = self.page.cast("Q")

    def read32(self, offset: int) -> int:
        return self.u32[offset >> 2]

    def write32(self, offset: int, value: int) -> None:
        self.u32[offset >> 2] = value & U32_MASK

    def read64(self, offset: int) -> int:
        return self.u64[offset >> 3]

    def write64(self, offset: int, value: int) -> None:
        self.u64[offset >> 3] = value

    def ring(self, ring_index: int, field: int) -> int:
        """The u32 index of ``field`` of ring ``ring_index`` (for the hot paths)."""
        return layout.ring_reg(ring_index, field) >> 2

    def release(self) -> None:
        self.u64.release()
        self.u32.release()
        self.page.release()


def is_valid_ring_size(size: int, max_size: int) -> bool:
    return layout.MIN_RING_SIZE <= size <= max_size and size & (size - 1) == 0


class DeviceRing:
    """The device's half of one ring.

    ``descs`` is a view of the descriptor array inside the driver's DMA memory, already
    checked by the caller to lie inside one DMA mapping, and ``iova`` where it starts: the
    ring's configuration as it was when the ring was enabled. The device decides everything
    about the ring from these private copies (which memory an unmap takes away, for one),
    never from the driver-writable RING_IOVA/RING_SIZE registers, which the driver may
    have rewritten since. The device keeps its own copy of ``cons`` too; the register is
    only ever written from it, never read back.
    """

    __slots__ = (
        "regs",
        "iova",
        "nbytes",
        "descs",
        "size",
        "mask",
        "desc",
        "cons",
        "_prod_at",
        "_cons_at",
        "_asleep_at",
        "_irq_wanted_at",
        "_error_at",
        "_errors_at",
        "error_completions",
    )

    def __init__(
        self,
        regs: Registers,
        ring_index: int,
        descs: memoryview,
        size: int,
        desc: struct.Struct,
        iova: int = 0,
    ) -> None:
        if descs.nbytes != size * desc.size:
            raise ValueError("descriptor view does not match the ring size")
        self.regs = regs
        self.iova = iova
        self.nbytes = descs.nbytes
        self.descs = descs
        self.size = size
        self.mask = size - 1
        self.desc = desc
        self._prod_at = regs.ring(ring_index, layout.RING_PROD)
        self._cons_at = regs.ring(ring_index, layout.RING_CONS)
        self._asleep_at = regs.ring(ring_index, layout.RING_DEVICE_ASLEEP)
        self._irq_wanted_at = regs.ring(ring_index, layout.RING_IRQ_WANTED)
        self._error_at = regs.ring(ring_index, layout.RING_ERROR)
        self._errors_at = layout.ring_reg(ring_index, layout.RING_ERROR_COMPLETIONS)
        # A ring starts where the driver left it: both counters at the driver's current prod
        # would lose posted work, so the device starts from whatever cons says (0 after reset).
        self.cons = regs.u32[self._cons_at]
        self.error_completions = 0

    def overlaps(self, iova: int, size: int) -> bool:
        """Whether the descriptor array shares a byte with IOVA range [iova, iova+size)."""
        return self.iova < iova + size and iova < self.iova + self.nbytes

    def pending(self) -> int:
        """Descriptors posted and not yet completed; -1 if the driver's prod is impossible."""
        ahead = (self.regs.u32[self._prod_at] - self.cons) & U32_MASK
        if ahead > self.size:
            return -1
        return ahead

    def fetch(self, index: int) -> tuple[int, ...]:
        """Descriptor ``index`` (a free-running counter), copied out of shared memory once."""
        return self.desc.unpack_from(self.descs, (index & self.mask) * self.desc.size)

    def write_back(self, index: int, offset_in_desc: int, fmt: struct.Struct, *values: int) -> None:
        fmt.pack_into(self.descs, (index & self.mask) * self.desc.size + offset_in_desc, *values)

    def advance(self, count: int, errors: int = 0) -> None:
        """Publish ``count`` more completions (after their write-backs)."""
        self.cons = (self.cons + count) & U32_MASK
        if errors:
            self.error_completions += errors
            self.regs.write64(self._errors_at, self.error_completions)
        self.regs.u32[self._cons_at] = self.cons

    def fail(self, code: int) -> None:
        self.regs.u32[self._error_at] = code

    @property
    def failed(self) -> bool:
        return self.regs.u32[self._error_at] != layout.RING_ERR_NONE

    def set_asleep(self, asleep: bool) -> None:
        self.regs.u32[self._asleep_at] = 1 if asleep else 0

    def irq_wanted(self) -> bool:
        return self.regs.u32[self._irq_wanted_at] != 0

    def clear_irq_wanted(self) -> None:
        self.regs.u32[self._irq_wanted_at] = 0


class DriverRing:
    """The driver's half of one ring, in the driver's own DMA memory."""

    __slots__ = (
        "regs",
        "ring_index",
        "descs",
        "size",
        "mask",
        "desc",
        "prod",
        "reaped",
        "_prod_at",
        "_cons_at",
        "_asleep_at",
        "_irq_wanted_at",
        "_error_at",
    )

    def __init__(
        self, regs: Registers, ring_index: int, descs: memoryview, size: int, desc: struct.Struct
    ) -> None:
        if descs.nbytes != size * desc.size:
            raise ValueError("descriptor view does not match the ring size")
        self.regs = regs
        self.ring_index = ring_index
        self.descs = descs
        self.size = size
        self.mask = size - 1
        self.desc = desc
        self.prod = 0
        self.reaped = 0
        self._prod_at = regs.ring(ring_index, layout.RING_PROD)
        self._cons_at = regs.ring(ring_index, layout.RING_CONS)
        self._asleep_at = regs.ring(ring_index, layout.RING_DEVICE_ASLEEP)
        self._irq_wanted_at = regs.ring(ring_index, layout.RING_IRQ_WANTED)
        self._error_at = regs.ring(ring_index, layout.RING_ERROR)

    def enable(self, ring_iova: int) -> None:
        """Program the ring registers and hand the ring to the device."""
        regs = self.regs
        regs.write64(layout.ring_reg(self.ring_index, layout.RING_IOVA), ring_iova)
        regs.write32(layout.ring_reg(self.ring_index, layout.RING_SIZE), self.size)
        regs.u32[self._prod_at] = 0
        regs.u32[self._cons_at] = 0
        regs.write32(layout.ring_reg(self.ring_index, layout.RING_ENABLE), 1)

    def disable(self) -> None:
        self.regs.write32(layout.ring_reg(self.ring_index, layout.RING_ENABLE), 0)

    def space(self) -> int:
        """Free slots: descriptors that may be posted now."""
        return self.size - ((self.prod - self.reaped) & U32_MASK)

    def post(self, *fields: int) -> None:
        """Write the next descriptor; it is not the device's until ``publish``."""
        self.desc.pack_into(self.descs, (self.prod & self.mask) * self.desc.size, *fields)
        self.prod = (self.prod + 1) & U32_MASK

    def publish(self) -> bool:
        """Make posted descriptors visible; True if the device sleeps and must be rung."""
        self.regs.u32[self._prod_at] = self.prod
        return self.regs.u32[self._asleep_at] != 0

    def completed(self) -> int:
        """Descriptors completed by the device and not yet reaped."""
        return (self.regs.u32[self._cons_at] - self.reaped) & U32_MASK

    def peek(self, index: int) -> tuple[int, ...]:
        return self.desc.unpack_from(self.descs, (index & self.mask) * self.desc.size)

    def reap(self, count: int) -> None:
        self.reaped = (self.reaped + count) & U32_MASK

    def want_irq(self, wanted: bool) -> None:
        self.regs.u32[self._irq_wanted_at] = 1 if wanted else 0

    @property
    def error(self) -> int:
        return self.regs.u32[self._error_at]
