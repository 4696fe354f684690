"""The set-up and tear-down every function driver does over vfio-user, whatever the device.

A driver reaches its function the way a user-space VFIO driver reaches a PCI function:
GET_REGION_INFO for BAR0 and ``mmap`` of its register page; DMA_MAP of one memfd of its own
that holds its rings and buffers (the device's IOMMU table); GET_IRQ_INFO and SET_IRQS with
an eventfd per queue (the interrupt it sleeps on). After that the data path is loads and
stores to shared memory, and the socket carries only doorbells, posted writes to the
doorbell page that the driver sends only when the device said it sleeps.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
from typing import ClassVar, Protocol

from vdev import layout
from vdev.ring import DriverRing, Registers
from vdev.vfio_user.client import VfioUserClient

_DOORBELL_WRITE = (0).to_bytes(4, "little")


class DriverCountersBase(Protocol):
    """The counters the shared half keeps; a driver's counters have these among theirs."""

    doorbells: int
    sleeps: int


def page_align(value: int) -> int:
    """``value`` rounded up to a whole number of pages."""
    return (value + layout.PAGE_SIZE - 1) // layout.PAGE_SIZE * layout.PAGE_SIZE


class FunctionDriver:
    """The device-independent half of a driver for one queue of a function.

    A subclass provides:

    * ``MAGIC`` (the register page's magic), ``KIND`` (the device's name in messages),
      ``QUEUE_NAME`` (what a queue is called in messages), ``ERROR`` (the exception type
      its set-up raises) and ``IOVA_BASE`` (where its DMA memory is mapped);
    * ``counters``, with at least the fields of ``DriverCountersBase``, set before
      ``__init__`` runs;
    * ``_setup(...)``: its own set-up; it calls ``_map_bar``, ``_check_queue``,
      ``_map_dma`` and ``_setup_irq`` in that order and enables its rings;
    * ``_rings()``: the rings it opened, which ``close`` disables and releases.

    ``close`` undoes all of it; a set-up that fails closes the socket, and the device tears
    the function down when its socket closes.
    """

    MAGIC: ClassVar[int]
    KIND: ClassVar[str]
    QUEUE_NAME: ClassVar[str]
    ERROR: ClassVar[type[Exception]]
    IOVA_BASE: ClassVar[int]
    counters: DriverCountersBase

    def __init__(self, sock: socket.socket, client: VfioUserClient | None = None) -> None:
        # Several drivers (one per queue of a multi-queue function) may share one vfio-user
        # session: the first made it, and only it closes the socket.
        self._owns_client = client is None
        self.client = VfioUserClient(sock) if client is None else client
        self._closed = False
        self._dma_iova = self.IOVA_BASE

    def _rings(self) -> tuple[DriverRing, ...]:
        raise NotImplementedError

    # ---- set-up ---------------------------------------------------------------------------

    def _map_bar(self) -> Registers:
        """Map BAR0's register page and check that it is the function this driver drives."""
        self._bar = self.client.map_region(layout.BAR0_INDEX)
        regs = self.regs = Registers(self._bar)
        if regs.read32(layout.REG_MAGIC) != self.MAGIC:
            raise self.ERROR(f"not a {self.KIND} function")
        if regs.read32(layout.REG_ABI_VERSION) != layout.ABI_VERSION:
            raise self.ERROR("device ABI version mismatch")
        return regs

    def _check_queue(self, queue: int) -> None:
        num_queues = self.regs.read32(layout.REG_NUM_QUEUES)
        if not 0 <= queue < num_queues:
            raise self.ERROR(f"the function has {num_queues} {self.QUEUE_NAME}")

    def _map_dma(self, name: str, size: int, iova: int | None = None) -> None:
        """Create ``size`` bytes of DMA memory and register it at ``iova`` (``IOVA_BASE``
        unless given: drivers of one function's queues each map their own range)."""
        self._dma_iova = self.IOVA_BASE if iova is None else iova
        self._mem_fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self._mem_fd, size)
        # The device maps this memory; a sealed size means we cannot pull it from under it.
        fcntl.fcntl(self._mem_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self._mem = mmap.mmap(self._mem_fd, size)
        self._mem_view = memoryview(self._mem)
        self._mem_size = size
        self.client.dma_map(self._dma_iova, size, self._mem_fd, 0, True, True)

    def _setup_irq(self, queue: int) -> None:
        """Register an eventfd as the queue's MSI-X vector, and a poller to sleep on it."""
        irq_info = self.client.get_irq_info(layout.IRQ_INDEX_MSIX)
        if irq_info.count <= queue:
            raise self.ERROR("the function has no interrupt for this queue")
        self.irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.client.set_irq_eventfds(layout.IRQ_INDEX_MSIX, queue, [self.irq_fd])
        self._poller = select.epoll()
        self._poller.register(self.irq_fd, select.EPOLLIN)
        # The device host closing our vfio-user socket (it died, or the control plane took
        # the function away) must wake a sleeper and fail it, not leave it waiting forever.
        self._poller.register(self.client.sock.fileno(), select.EPOLLRDHUP | select.EPOLLHUP)

    # ---- data path helpers -------------------------------------------------------------------

    def _ring_doorbell(self, doorbell: int) -> None:
        self.counters.doorbells += 1
        self.client.posted_write(layout.BAR0_INDEX, doorbell, _DOORBELL_WRITE)

    def _sleep(self, timeout: float) -> None:
        """Block until the interrupt or ``timeout``. The caller asked for the interrupt and
        looked at its ring once more before calling, so nothing posted before is missed."""
        self.counters.sleeps += 1
        for fd, _mask in self._poller.poll(timeout):
            if fd != self.irq_fd:
                raise self.ERROR("the device went away (its vfio-user socket closed)")
            try:
                os.eventfd_read(self.irq_fd)
            except BlockingIOError:
                pass

    def fileno(self) -> int:
        return self.irq_fd

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        rings = self._rings()
        try:
            for ring in rings:
                ring.disable()
            if self._owns_client:
                self.client.disable_irqs(layout.IRQ_INDEX_MSIX)
            self.client.dma_unmap(self._dma_iova, self._mem_size)
        except Exception:
            pass  # the device may already be gone; closing the socket tears it all down
        if self._owns_client:
            self.client.close()
        for ring in rings:
            ring.descs.release()
        self.regs.release()
        self._mem_view.release()
        self._mem.close()
        self._bar.close()
        os.close(self._mem_fd)
        os.close(self.irq_fd)
        self._poller.close()
