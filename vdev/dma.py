"""The device's DMA table: the IOMMU of this model.

A driver grants the device access to its memory with vfio-user DMA_MAP: an IOVA window,
a memfd and the permissions. The device host mmaps the granted range with exactly the
granted protection, so even a bug in the device cannot write where only reads were
allowed (Python's mmap refuses writes to a PROT_READ mapping, and the kernel backs it).
Every IOVA the device follows goes through ``translate``, which either returns memory
inside ONE mapping with the needed permission or raises ``DmaFault``.

Memory must be sealed against shrinking (``F_SEAL_SHRINK``) before it is mapped: a
driver that truncated its memfd under a live mapping would turn the device's next access
into SIGBUS, killing the device host for every client. The size check against ``fstat``
is only meaningful once the size cannot go down. For the same reason the memory must be
ordinary shared memory (tmpfs, what ``memfd_create`` gives without ``MFD_HUGETLB``): a
hugetlbfs page the driver punched out of its file is refaulted from the huge page pool,
and an empty pool answers with SIGBUS.

What a driver can make the device host hold is bounded: ``max_maps`` mappings (each one a
kernel VMA in the device host, which has at most ``vm.max_map_count`` of them for every
function together) and ``max_bytes`` bytes of address space. Sealed memfds can be huge and
sparse at no cost to the driver; without a byte bound a few maps would exhaust the device
host's address space, and the next allocation anywhere in it would fail.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
from bisect import bisect_right
from collections.abc import Callable
from typing import Final

from vdev.vfio_user.wire import U64_LIMIT, VfioError

DEFAULT_PAGE_SIZE: Final = 4096
# Per function. A device host serves up to 64 functions (vdev.hostloop.MAX_FUNCTIONS):
# 64 * 256 mappings stays far below the default vm.max_map_count of 65530.
DEFAULT_MAX_MAPS: Final = 256
# Per function: bytes of driver memory the device host maps. A VNIC driver needs about
# 1 MiB (256-entry rings, 2 KiB buffers) and a VSIC driver 16 MiB (64 slots of 256 KiB);
# 1 GiB leaves room for large rings and buffers, and 64 functions of it are 64 GiB of
# address space, far from the 128 TiB a process has.
MAX_DMA_BYTES_PER_FUNCTION: Final = 1 << 30

# statfs f_type values (linux/magic.h).
TMPFS_MAGIC: Final = 0x01021994

UnmapCallback = Callable[[int, int], None]


class DmaFault(Exception):
    """The device tried to reach memory the driver did not grant (an IOMMU fault)."""

    def __init__(self, iova: int, length: int, write: bool) -> None:
        access = "write" if write else "read"
        super().__init__(f"DMA {access} of {length} bytes at IOVA {iova:#x} is not mapped")
        self.iova = iova
        self.length = length
        self.write = write


class DmaMapping:
    """One granted window; ``memory`` is mapped with only the granted protection."""

    __slots__ = ("iova", "size", "end", "readable", "writable", "memory")

    def __init__(self, iova: int, size: int, readable: bool, writable: bool, memory: mmap.mmap) -> None:
        self.iova = iova
        self.size = size
        self.end = iova + size
        self.readable = readable
        self.writable = writable
        self.memory = memory


class DmaTable:
    """IOVA windows -> host memory, with overlap-free, page-aligned, bounded entries."""

    def __init__(
        self,
        page_size: int = DEFAULT_PAGE_SIZE,
        max_maps: int = DEFAULT_MAX_MAPS,
        require_shrink_seal: bool = True,
        max_bytes: int = MAX_DMA_BYTES_PER_FUNCTION,
    ) -> None:
        if page_size <= 0 or page_size & (page_size - 1) or page_size % mmap.ALLOCATIONGRANULARITY:
            raise ValueError(f"page size {page_size} is not a power-of-two multiple of the host page")
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.page_size = page_size
        self.max_maps = max_maps
        self.max_bytes = max_bytes
        self.mapped_bytes = 0
        self.require_shrink_seal = require_shrink_seal
        self._starts: list[int] = []  # sorted IOVAs, parallel to _mappings
        self._mappings: list[DmaMapping] = []
        self._last: DmaMapping | None = None  # one-entry translation cache
        self._unmap_callbacks: list[UnmapCallback] = []
        # Mappings whose memory the device still had views of at unmap time (see unmap).
        self.stale_unmaps = 0
        # Moves on every map and unmap: a mirror of the table (vdev.fast.vsic_mirror) is
        # current while its copy's generation is this one.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._mappings)

    def mappings(self) -> list[tuple[int, int]]:
        """(iova, size) of every mapping, in IOVA order."""
        return [(m.iova, m.size) for m in self._mappings]

    def on_unmap(self, callback: UnmapCallback) -> None:
        """Register ``callback(iova, size)``: it runs before a mapping goes away, so the
        device can stop rings and drop views that live there."""
        self._unmap_callbacks.append(callback)

    def remove_unmap_callback(self, callback: UnmapCallback) -> None:
        self._unmap_callbacks.remove(callback)

    def map(self, iova: int, size: int, fd: int, offset: int, readable: bool, writable: bool) -> None:
        """Map ``size`` bytes of ``fd`` from ``offset`` at ``iova``; the caller keeps ``fd``."""
        self._check_range(iova, size, offset)
        if not (readable or writable):
            raise VfioError(errno.EINVAL, "DMA map grants neither read nor write")
        if len(self._mappings) >= self.max_maps:
            raise VfioError(errno.ENOSPC, f"DMA table full ({self.max_maps} mappings)")
        if self.mapped_bytes + size > self.max_bytes:
            raise VfioError(
                errno.ENOSPC,
                f"DMA map of {size} bytes over the limit: {self.mapped_bytes} of "
                f"{self.max_bytes} bytes per function already mapped",
            )
        index = bisect_right(self._starts, iova)
        # Sorted and disjoint, so only the neighbours can overlap the new window.
        if index > 0 and self._mappings[index - 1].end > iova:
            raise VfioError(errno.EEXIST, f"IOVA {iova:#x} overlaps an existing mapping")
        if index < len(self._mappings) and self._starts[index] < iova + size:
            raise VfioError(errno.EEXIST, f"IOVA range ending {iova + size:#x} overlaps a mapping")
        self._check_fd(fd, offset + size)
        prot = (mmap.PROT_READ if readable else 0) | (mmap.PROT_WRITE if writable else 0)
        try:
            memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, offset=offset)
        except MemoryError:
            raise VfioError(errno.ENOMEM, "cannot mmap DMA memory: out of memory") from None
        except (OSError, ValueError, OverflowError) as exc:
            code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
            raise VfioError(code, f"cannot mmap DMA memory: {exc}") from None
        self._starts.insert(index, iova)
        self._mappings.insert(index, DmaMapping(iova, size, readable, writable, memory))
        self.mapped_bytes += size
        self.generation += 1

    def _check_range(self, iova: int, size: int, offset: int) -> None:
        if size <= 0:
            raise VfioError(errno.EINVAL, "DMA map of size 0")
        if iova < 0 or offset < 0:
            raise VfioError(errno.EINVAL, "negative DMA address or offset")
        if iova + size > U64_LIMIT or offset + size > U64_LIMIT:
            raise VfioError(errno.EINVAL, "DMA range wraps around 2**64")
        mask = self.page_size - 1
        if iova & mask or size & mask or offset & mask:
            raise VfioError(errno.EINVAL, f"DMA range not aligned to {self.page_size} bytes")

    def _check_fd(self, fd: int, needed_size: int) -> None:
        if self.require_shrink_seal:
            # First, because it asks no file system anything: only a memfd has seals, and
            # fstat of a file on a file system the driver serves (FUSE) could wait for it.
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise VfioError(errno.EBADF, f"DMA fd unusable: {exc.strerror}") from None
                raise VfioError(errno.EINVAL, "DMA fd is not a memfd") from None
            if not seals & fcntl.F_SEAL_SHRINK:
                raise VfioError(errno.EPERM, "DMA memory must be sealed with F_SEAL_SHRINK")
        try:
            info = os.fstat(fd)
        except OSError as exc:
            raise VfioError(errno.EBADF, f"DMA fd unusable: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise VfioError(errno.EINVAL, "DMA fd is not a regular file (memfd)")
        if self.require_shrink_seal and _filesystem_type(fd) != TMPFS_MAGIC:
            raise VfioError(errno.EINVAL, "DMA memory must be a memfd on shared memory (not hugetlbfs)")
        if needed_size > info.st_size:
            raise VfioError(errno.EINVAL, f"DMA range ends at {needed_size}, the file has {info.st_size}")

    def unmap(self, iova: int, size: int) -> None:
        """Remove the mapping that is exactly [iova, iova+size) (spec: exact match only)."""
        index = bisect_right(self._starts, iova) - 1
        if index < 0 or self._starts[index] != iova or self._mappings[index].size != size:
            raise VfioError(errno.ENOENT, f"no DMA mapping at {iova:#x} of {size} bytes")
        self._release(index)

    def _release(self, index: int) -> None:
        mapping = self._mappings[index]
        try:
            # The device drops its references (rings, in-flight buffers) first: after the
            # reply to DMA_UNMAP it must never touch this memory again (spec, "DMA_UNMAP").
            for callback in list(self._unmap_callbacks):
                callback(mapping.iova, mapping.size)
        finally:
            del self._starts[index]
            del self._mappings[index]
            self.mapped_bytes -= mapping.size
            self.generation += 1
            if self._last is mapping:
                self._last = None
            try:
                mapping.memory.close()
            except BufferError:
                # A memoryview of it is still alive somewhere in the device: the table no
                # longer hands it out, and the pages go when the last view does.
                self.stale_unmaps += 1

    def clear(self) -> None:
        """Unmap everything (the client went away); a failing callback stops nothing."""
        first_error: Exception | None = None
        while self._mappings:
            try:
                self._release(len(self._mappings) - 1)
            except Exception as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def translate(self, iova: int, length: int, write: bool) -> tuple[mmap.mmap, int]:
        """(memory, offset) such that ``memory[offset:offset+length]`` is the IOVA range.

        Raises ``DmaFault`` unless the whole range lies inside one mapping that grants
        the access. Python integers do not wrap, so ``iova + length`` is exact.
        """
        mapping = self._last
        if mapping is None or iova < mapping.iova or iova + length > mapping.end:
            index = bisect_right(self._starts, iova) - 1
            if index < 0:
                raise DmaFault(iova, length, write)
            mapping = self._mappings[index]
            if iova + length > mapping.end:
                raise DmaFault(iova, length, write)
            self._last = mapping
        if length <= 0 or iova < 0 or not (mapping.writable if write else mapping.readable):
            raise DmaFault(iova, length, write)
        return mapping.memory, iova - mapping.iova


_libc = ctypes.CDLL(None, use_errno=True)
# struct statfs starts with f_type (a long on x86-64 and arm64); the whole struct is 120
# bytes there, so 256 leaves room on any 64-bit ABI.
_STATFS_BUFFER_SIZE: Final = 256
_F_TYPE: Final = struct.Struct("l")


def _filesystem_type(fd: int) -> int:
    """The statfs ``f_type`` of the file system ``fd`` lives on, or -1 if unknown."""
    buffer = ctypes.create_string_buffer(_STATFS_BUFFER_SIZE)
    if _libc.fstatfs(fd, buffer) != 0:
        return -1
    value: int = _F_TYPE.unpack_from(buffer.raw)[0]
    return value
