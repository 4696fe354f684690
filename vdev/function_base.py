"""What every virtual device function has, whatever the device: BAR0, DMA table, interrupts.

A function (VNIC or VSIC) is served to its driver as a vfio-user ``DeviceModel``. The half
of that model that does not depend on the kind of device lives here: the BAR0 memfd (a
register page the driver maps, a doorbell page it may only write through REGION_WRITE, see
``vdev.layout``), the region and IRQ queries, the MSI-X eventfds the driver registers with
SET_IRQS, opening a ring from the registers the driver wrote, reset and close.

The data path (what a ring's descriptors mean) and which rings exist are the subclass's.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from typing import ClassVar, Protocol, Self

from vdev import layout
from vdev.dma import DmaFault, DmaTable
from vdev.eventfd_signal import shared_signaller
from vdev.ring import DeviceRing, Registers, is_valid_ring_size
from vdev.vfio_user.server import DeviceInfo, IrqInfo, RegionInfo
from vdev.vfio_user.wire import VfioError

# The seals of every memfd a function hands to its driver (BAR0): its size can never change,
# so the device host's own mapping of it can never fault (a truncated shared file turns the
# next access into SIGBUS), and the driver cannot add or remove seals (F_SEAL_SEAL).
HANDED_OUT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

# vfio-user device info: a PCI device with the nine standard regions and five IRQ types
# (linux/vfio.h: VFIO_PCI_NUM_REGIONS, VFIO_PCI_NUM_IRQS).
_PCI_NUM_REGIONS = 9
_PCI_NUM_IRQS = 5
_DEVICE_FLAG_RESET = 0x1
_DEVICE_FLAG_PCI = 0x2
_REGION_READ = 0x1
_REGION_WRITE = 0x2
_REGION_MMAP = 0x4
_IRQ_EVENTFD = 0x1
_IRQ_NORESIZE = 0x8


class FunctionConfigBase(Protocol):
    """The fields of a function's configuration that the shared half reads."""

    function_id: int
    num_queues: int
    max_ring_size: int
    owner_pid: int
    owner_uid: int
    name: str


class FunctionCountersBase(Protocol):
    """The counters the shared half keeps; a subclass's counters have these among theirs."""

    iommu_faults: int
    ring_errors: int
    doorbells: int
    irqs: int


class DeviceFunction:
    """The device-independent half of a function's vfio-user ``DeviceModel``.

    A subclass provides:

    * ``MAGIC`` and ``BAR_NAME`` (class attributes: the register page's magic and the
      memfd's name prefix), and ``max_frame``, passed to ``__init__``;
    * ``config`` and ``counters`` objects with at least the fields of
      ``FunctionConfigBase`` and ``FunctionCountersBase``, set before ``__init__`` runs;
    * ``_init_function_registers()``: the registers past the common global block (MAC,
      capacity, status...), written after ``_init_registers`` zeroed the page;
    * ``_drop_rings()``: forget every open ring (reset and close call it);
    * ``_on_unmap(iova, size)``: stop the rings inside memory the driver is unmapping;
    * ``sync_rings``, ``set_asleep``, ``raise_irqs`` and its data path.

    It calls ``_init_registers()`` once its own state is set up, at the end of its
    ``__init__``.
    """

    MAGIC: ClassVar[int]
    BAR_NAME: ClassVar[str]
    config: FunctionConfigBase
    counters: FunctionCountersBase

    def __init__(self, max_frame: int) -> None:
        config = self.config
        self.function_id = config.function_id
        self.num_queues = config.num_queues
        self.max_frame = max_frame
        self.dma_table = DmaTable()
        self.dma_table.on_unmap(self._on_unmap)
        self._bar_fd = os.memfd_create(
            f"{self.BAR_NAME}-fn{config.function_id}-bar0", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        )
        try:
            os.ftruncate(self._bar_fd, layout.BAR0_SIZE)
            fcntl.fcntl(self._bar_fd, fcntl.F_ADD_SEALS, HANDED_OUT_SEALS)
            self._bar = mmap.mmap(self._bar_fd, layout.BAR0_SIZE)
        except OSError:
            os.close(self._bar_fd)
            raise
        self.regs = Registers(self._bar)
        self._irq_fds: list[int | None] = [None] * config.num_queues
        self.closed = False
        self.asleep = False
        # Called on every doorbell (the device host stays awake to poll this function).
        self.doorbell_listener: Callable[[Self], None] | None = None

    # ---- hooks ---------------------------------------------------------------------------

    def _init_function_registers(self) -> None:
        raise NotImplementedError

    def _drop_rings(self) -> None:
        raise NotImplementedError

    def _on_unmap(self, iova: int, size: int) -> None:
        raise NotImplementedError

    # ---- registers and rings ---------------------------------------------------------------

    def _init_registers(self) -> None:
        regs = self.regs
        self._bar[: layout.BAR0_SIZE] = bytes(layout.BAR0_SIZE)
        regs.write32(layout.REG_MAGIC, self.MAGIC)
        regs.write32(layout.REG_ABI_VERSION, layout.ABI_VERSION)
        regs.write32(layout.REG_NUM_QUEUES, self.num_queues)
        regs.write32(layout.REG_MAX_RING_SIZE, self.config.max_ring_size)
        regs.write32(layout.REG_MAX_FRAME, self.max_frame)
        regs.write32(layout.REG_FUNCTION_ID, self.function_id)
        self._init_function_registers()

    def _open_ring(self, ring_index: int, desc: struct.Struct) -> DeviceRing | None:
        """The ring the driver described in ring block ``ring_index``, or None after
        setting RING_ERR_SETUP there (a size out of range, or memory outside the DMA map).

        The registers are read once: the ring keeps what was checked, whatever the driver
        writes there later.
        """
        regs = self.regs
        ring_iova = regs.read64(layout.ring_reg(ring_index, layout.RING_IOVA))
        ring_size = regs.read32(layout.ring_reg(ring_index, layout.RING_SIZE))
        if not is_valid_ring_size(ring_size, self.config.max_ring_size):
            self._ring_error(ring_index, layout.RING_ERR_SETUP)
            return None
        nbytes = ring_size * desc.size
        try:
            buffer, offset = self.dma_table.translate(ring_iova, nbytes, True)
        except DmaFault:
            self._count_iommu_fault()
            self._ring_error(ring_index, layout.RING_ERR_SETUP)
            return None
        descs = memoryview(buffer)[offset : offset + nbytes]
        return DeviceRing(regs, ring_index, descs, ring_size, desc, ring_iova)

    def _ring_error(self, ring_index: int, code: int) -> None:
        self.counters.ring_errors += 1
        self.regs.write32(layout.ring_reg(ring_index, layout.RING_ERROR), code)

    def _count_iommu_fault(self) -> None:
        # The register mirrors the counter, so the driver can see its own faults.
        self.counters.iommu_faults += 1
        self.regs.write64(layout.REG_IOMMU_FAULTS, self.counters.iommu_faults)

    def _signal_irq(self, fd: int) -> None:
        # Never write(2) the driver's eventfd: it shares its O_NONBLOCK flag with the
        # driver, which could make the write block forever (see vdev.eventfd_signal). A
        # refused signal (cannot happen to a checked eventfd) only costs the driver latency:
        # it sleeps with a timeout.
        try:
            signalled = shared_signaller().signal(fd)
        except OSError:
            signalled = False
        if signalled:
            self.counters.irqs += 1

    # ---- vfio-user DeviceModel -------------------------------------------------------------

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(flags=_DEVICE_FLAG_RESET | _DEVICE_FLAG_PCI, num_regions=_PCI_NUM_REGIONS, num_irqs=_PCI_NUM_IRQS)

    def region_info(self, index: int) -> RegionInfo:
        if index == layout.BAR0_INDEX:
            return RegionInfo(
                flags=_REGION_READ | _REGION_WRITE | _REGION_MMAP,
                size=layout.BAR0_SIZE,
                fd=self._bar_fd,
                offset=0,
                sparse_areas=[(layout.REGISTER_PAGE_OFFSET, layout.PAGE_SIZE)],
            )
        return RegionInfo(flags=0, size=0, fd=None, offset=0, sparse_areas=[])

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        if index != layout.BAR0_INDEX:
            raise VfioError(errno.EINVAL, "only BAR0 exists")
        return bytes(self._bar[offset : offset + count])

    def region_write(self: Self, index: int, offset: int, data: bytes) -> None:
        if index != layout.BAR0_INDEX:
            raise VfioError(errno.EINVAL, "only BAR0 exists")
        if offset >= layout.DOORBELL_PAGE_OFFSET:
            # A doorbell: the value is only a hint; waking up is what matters.
            self.counters.doorbells += 1
            if self.doorbell_listener is not None:
                self.doorbell_listener(self)
            return
        self._bar[offset : offset + len(data)] = data

    def irq_info(self, index: int) -> IrqInfo:
        if index == layout.IRQ_INDEX_MSIX:
            return IrqInfo(flags=_IRQ_EVENTFD | _IRQ_NORESIZE, count=self.num_queues)
        return IrqInfo(flags=0, count=0)

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        if index != layout.IRQ_INDEX_MSIX or start + len(fds) > self.num_queues:
            for fd in fds:
                os.close(fd)
            raise VfioError(errno.EINVAL, "no such interrupt vectors")
        try:
            shared_signaller()  # interrupts are raised through it: refuse now if it cannot be
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise VfioError(errno.ENOTSUP, f"interrupts unavailable: {exc.strerror}") from None
        for offset, fd in enumerate(fds):
            old = self._irq_fds[start + offset]
            if old is not None:
                os.close(old)
            # The fd is left exactly as the driver sent it: its flags are the driver's.
            self._irq_fds[start + offset] = fd

    def clear_irqs(self, index: int, start: int, count: int) -> None:
        if index != layout.IRQ_INDEX_MSIX:
            return
        if count == 0:
            start, count = 0, self.num_queues
        for vector in range(start, min(start + count, self.num_queues)):
            old = self._irq_fds[vector]
            if old is not None:
                os.close(old)
                self._irq_fds[vector] = None

    def reset(self) -> None:
        self._drop_rings()
        self.clear_irqs(layout.IRQ_INDEX_MSIX, 0, 0)
        self._init_registers()

    def disconnected(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._drop_rings()
        self.clear_irqs(layout.IRQ_INDEX_MSIX, 0, 0)
        self.dma_table.clear()
        self.regs.release()
        self._bar.close()
        os.close(self._bar_fd)

    def _snapshot_head(self) -> dict[str, object]:
        """The snapshot fields every function has, first in its snapshot."""
        config = self.config
        return {
            "function_id": self.function_id,
            "name": config.name,
            "owner_pid": config.owner_pid,
            "owner_uid": config.owner_uid,
            "queues": self.num_queues,
        }
