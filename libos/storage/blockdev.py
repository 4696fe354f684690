"""Block devices the persistent log runs on.

:class:`BlockDevice` is the whole contract: a fixed number of fixed-size blocks, whole-block
reads and writes, and a ``flush`` that makes every completed write durable. A write with
``fua=True`` (force unit access, as in NVMe and SCSI) is durable by itself when it returns,
but says nothing about earlier unflushed writes. Nothing else is assumed: a device may keep
completed writes in a volatile cache, persist them in any order, and tear a write that is in
flight at a power failure, with only each 512-byte sector written atomically.

Two implementations live here:

* :class:`FileBlockDevice`: a file used through ``pwrite``/``pread``, with ``fdatasync`` for
  flush and FUA. This is the ``linux`` backend and the fair baseline: ``fdatasync`` is what
  a database on ext4 does to commit.
* :class:`MemoryBlockDevice`: an in-memory disk that models the volatile write cache, for
  tests. It remembers the writes issued since the last flush and produces the images a
  power failure could leave behind (:meth:`MemoryBlockDevice.crash`,
  :meth:`MemoryBlockDevice.crash_states`), and it can be told to fail at the N-th
  operation to inject a crash in the middle of a multi-step update.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

SECTOR_SIZE: Final = 512  # the unit a device writes atomically
SUPPORTED_BLOCK_SIZES: Final = (512, 4096)


class BlockDeviceError(Exception):
    """A block device was used outside its contract (range, alignment, closed)."""


class SimulatedCrash(BlockDeviceError):
    """Raised by a :class:`MemoryBlockDevice` armed with ``crash_after`` (power failure)."""


@runtime_checkable
class BlockDevice(Protocol):
    """What the log needs from a disk; a VSIC-backed device will implement it too."""

    @property
    def block_size(self) -> int:
        """Bytes per block: 512 or 4096."""
        ...

    @property
    def num_blocks(self) -> int:
        """Capacity in blocks."""
        ...

    def write(self, block: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        """Write whole blocks starting at ``block``; durable on return only with ``fua``."""
        ...

    def read(self, block: int, count: int) -> bytes:
        """Read ``count`` blocks starting at ``block``."""
        ...

    def flush(self) -> None:
        """Make every write that completed before this call durable."""
        ...


def check_block_size(block_size: int) -> int:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise BlockDeviceError(f"block size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")
    return block_size


def check_range(block: int, count: int, num_blocks: int) -> None:
    """Reject a request outside ``[0, num_blocks)``; Python ints cannot overflow."""
    if block < 0 or count < 0 or block + count > num_blocks:
        raise BlockDeviceError(f"blocks [{block}, {block + count}) outside the device [0, {num_blocks})")


def _write_length(data: bytes | bytearray | memoryview, block_size: int) -> int:
    length = memoryview(data).nbytes
    if length == 0 or length % block_size:
        raise BlockDeviceError(f"write of {length} bytes is not a positive multiple of {block_size}")
    return length


class FileBlockDevice:
    """A regular file (or a block device node) as a :class:`BlockDevice`.

    ``num_blocks=None`` takes the size of an existing file; with ``num_blocks`` given and
    ``create=True`` the file is created and extended (sparse) to that size.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        block_size: int = 4096,
        num_blocks: int | None = None,
        *,
        create: bool = False,
    ) -> None:
        self.block_size: Final = check_block_size(block_size)
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        if create:
            flags |= os.O_CREAT
        self._fd = os.open(path, flags, 0o600)
        try:
            size = os.fstat(self._fd).st_size
            if num_blocks is None:
                num_blocks = size // block_size
            elif num_blocks * block_size > size:
                if not create:
                    raise BlockDeviceError(f"{path}: {size} bytes, fewer than {num_blocks} blocks")
                os.ftruncate(self._fd, num_blocks * block_size)
            if num_blocks <= 0:
                raise BlockDeviceError(f"{path}: no whole block of {block_size} bytes")
        except BaseException:
            os.close(self._fd)
            raise
        self.num_blocks: Final = num_blocks
        self._closed = False

    def _fileno(self) -> int:
        if self._closed:
            raise BlockDeviceError("device is closed")
        return self._fd

    def write(self, block: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        length = _write_length(data, self.block_size)
        check_range(block, length // self.block_size, self.num_blocks)
        fd = self._fileno()
        view = memoryview(data).cast("B")
        offset = block * self.block_size
        while view:
            done = os.pwrite(fd, view, offset)
            view = view[done:]
            offset += done
        if fua:
            # No portable per-write FUA for a file: fdatasync gives at least that guarantee.
            os.fdatasync(fd)

    def read(self, block: int, count: int) -> bytes:
        check_range(block, count, self.num_blocks)
        fd = self._fileno()
        want = count * self.block_size
        data = os.pread(fd, want, block * self.block_size)
        if len(data) != want:
            # The file shrank under us; a short read is not data we may interpret.
            raise BlockDeviceError(f"short read: {len(data)} of {want} bytes at block {block}")
        return data

    def flush(self) -> None:
        # fdatasync, not fsync: the log never changes the file size, so the inode's size and
        # timestamps need not be forced out with the data (the file was sized at creation).
        os.fdatasync(self._fileno())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> FileBlockDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class DeviceOp:
    """One operation a :class:`MemoryBlockDevice` carried out (reads are not recorded)."""

    kind: str  # "write" or "flush"
    block: int = 0
    count: int = 0
    fua: bool = False


@dataclass(frozen=True)
class _PendingWrite:
    block: int
    data: bytes
    durable: bool  # a completed FUA write: no crash can lose it


def garbage_bytes(length: int, seed: int) -> bytes:
    """Deterministic junk, the stale content a crash may expose."""
    return random.Random(seed).randbytes(length)


class MemoryBlockDevice:
    """An in-memory disk with a volatile write cache, for crash tests.

    ``read`` sees every completed write (the cache). The durable image holds only what a
    flush or a FUA write made stable; the writes since the last flush are *pending*, and
    :meth:`crash` builds the image a power failure leaves from any subset of them, with one
    torn at a sector boundary and junk where it pleases. ``crash_after=N`` makes the
    (N+1)-th write or flush fail with :class:`SimulatedCrash` (a write that fails this way
    is pending, possibly torn: it was in flight) and every later operation fail too.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 4096,
        *,
        image: bytes | bytearray | None = None,
        crash_after: int | None = None,
    ) -> None:
        self.block_size: Final = check_block_size(block_size)
        if num_blocks <= 0:
            raise BlockDeviceError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks: Final = num_blocks
        size = num_blocks * block_size
        if image is None:
            self._durable = bytearray(size)
        else:
            if len(image) != size:
                raise BlockDeviceError(f"image is {len(image)} bytes, expected {size}")
            self._durable = bytearray(image)
        self._cache = bytearray(self._durable)
        self._pending: list[_PendingWrite] = []
        self._lock = threading.Lock()
        self.ops: list[DeviceOp] = []
        self.crash_after = crash_after
        self.crashed = False

    def _power_fails_now(self) -> bool:
        """Count one write/flush against ``crash_after``; True when this one meets the failure."""
        if self.crashed:
            raise SimulatedCrash("device lost power")
        if self.crash_after is not None and len(self.ops) >= self.crash_after:
            self.crashed = True
            return True
        return False

    def write(self, block: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        length = _write_length(data, self.block_size)
        check_range(block, length // self.block_size, self.num_blocks)
        payload = bytes(memoryview(data).cast("B"))
        with self._lock:
            if self._power_fails_now():
                # The write that met the power failure was in flight: any part may land.
                self._pending.append(_PendingWrite(block, payload, durable=False))
                raise SimulatedCrash(f"device lost power during operation {len(self.ops)}")
            offset = block * self.block_size
            self._cache[offset : offset + length] = payload
            if fua:
                self._durable[offset : offset + length] = payload
            self._pending.append(_PendingWrite(block, payload, durable=fua))
            self.ops.append(DeviceOp("write", block, length // self.block_size, fua))

    def read(self, block: int, count: int) -> bytes:
        check_range(block, count, self.num_blocks)
        with self._lock:
            if self.crashed:
                raise SimulatedCrash("device lost power")
            return bytes(self._cache[block * self.block_size : (block + count) * self.block_size])

    def flush(self) -> None:
        with self._lock:
            if self._power_fails_now():
                raise SimulatedCrash(f"device lost power during operation {len(self.ops)}")
            self._durable[:] = self._cache
            self._pending.clear()
            self.ops.append(DeviceOp("flush"))

    @property
    def pending_writes(self) -> int:
        """Writes issued since the last flush (durable FUA writes included)."""
        return len(self._pending)

    @property
    def unflushed(self) -> bool:
        """True while some completed write could still be lost by a power failure."""
        return any(not write.durable for write in self._pending)

    def image(self) -> bytes:
        """What reads return now (the cache)."""
        return bytes(self._cache)

    def durable_image(self) -> bytes:
        """What survives a power failure that loses every pending write."""
        return bytes(self._durable)

    def crash(
        self,
        *,
        drop: Iterable[int] = (),
        tear_at: int | None = None,
        tear_keeps_end: bool = False,
        garbage_block: int | None = None,
    ) -> bytes:
        """The image after a power failure.

        ``drop``: indices of pending writes that never reached the media (durable FUA writes
        cannot be dropped). ``tear_at``: the last write that did land is torn after that many
        bytes (a multiple of 512); with ``tear_keeps_end`` the sectors *after* the tear landed
        instead of those before it. ``garbage_block``: that block holds junk afterwards.
        """
        dropped = set(drop)
        image = bytearray(self._durable)
        landed = [w for i, w in enumerate(self._pending) if w.durable or i not in dropped]
        for index, write in enumerate(landed):
            data = write.data
            start = write.block * self.block_size
            if tear_at is not None and index == len(landed) - 1:
                if write.durable:
                    raise BlockDeviceError("a completed FUA write cannot be torn")
                if tear_at % SECTOR_SIZE or not 0 <= tear_at <= len(data):
                    raise BlockDeviceError(f"tear_at {tear_at} is not a sector boundary inside the write")
                if tear_keeps_end:
                    image[start + tear_at : start + len(data)] = data[tear_at:]
                    continue
                data = data[:tear_at]
            image[start : start + len(data)] = data
        if garbage_block is not None:
            check_range(garbage_block, 1, self.num_blocks)
            offset = garbage_block * self.block_size
            image[offset : offset + self.block_size] = garbage_bytes(self.block_size, garbage_block)
        return bytes(image)

    def crash_states(self) -> Iterator[tuple[str, bytes]]:
        """Every distinct image a power failure now could plausibly leave, with a label.

        All pending writes lost; each in-order prefix landed; each single write lost while
        the later ones landed (caches reorder); the last landed write torn at every sector
        boundary, keeping either side; junk in the first block of the first volatile pending write
        and in the last block of the last one (a device may scramble a sector it was
        writing). Blocks no pending write touches keep their content: stale junk past the
        end of a log belongs in the image the test starts from.
        """
        seen: set[bytes] = set()

        def fresh(image: bytes) -> bool:
            digest = hashlib.blake2b(image, digest_size=16).digest()
            if digest in seen:
                return False
            seen.add(digest)
            return True

        count = len(self._pending)
        for label, image in self._crash_candidates(count):
            if fresh(image):
                yield label, image

    def _crash_candidates(self, count: int) -> Iterator[tuple[str, bytes]]:
        yield "all pending lost", self.crash(drop=range(count))
        for kept in range(1, count + 1):
            later = range(kept, count)
            yield f"first {kept} pending landed", self.crash(drop=later)
            last = self._pending[kept - 1]
            if last.durable:
                continue
            for tear in range(SECTOR_SIZE, len(last.data), SECTOR_SIZE):
                for keeps_end in (False, True):
                    side = "end" if keeps_end else "start"
                    label = f"first {kept} pending, last torn at {tear} keeping the {side}"
                    yield label, self.crash(drop=later, tear_at=tear, tear_keeps_end=keeps_end)
        for lost in range(count):
            yield f"pending write {lost} lost, others landed", self.crash(drop=(lost,))
        volatile = [write for write in self._pending if not write.durable]
        if volatile:
            first = volatile[0]
            yield "all pending lost, junk in their place", self.crash(drop=range(count), garbage_block=first.block)
            last = self._pending[-1]
            if not last.durable:
                final_block = last.block + len(last.data) // self.block_size - 1
                yield "all landed, junk in the last block written", self.crash(garbage_block=final_block)
