"""The VSIC device model: the backing store and the functions over it.

This is the "hardware" of one virtual storage controller, without the process around it
(that is ``vdev.vsic.host``). The device owns the image (a loop device, or a plain file in
tests): functions see only their VSA's blocks, translated here into physical runs.

Direct I/O: the image is opened with ``O_DIRECT`` so a request moves between the page
cache-free disk and the application's DMA memory with no copy in between (Linux reads and
writes straight into the user pages). ``O_DIRECT`` wants the buffer, the file offset and the
length aligned to the logical block size; the VSIC's 4096-byte blocks and block-aligned
IOVAs inside page-aligned mappings satisfy that. Filesystems without direct I/O (tmpfs)
refuse the open with EINVAL: the store then falls back to buffered I/O, and says so in its
snapshot, because a flush costs something very different then. Every call takes ``now``;
nothing here sleeps.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from vdev import layout

from vdev.vsic.function import BLOCK_SIZE, FunctionConfig, VirtualStorageArea, VsaError, VsicFunction

POLL_BUDGET = 32  # requests taken from one ring per poll: a bound on one function's turn


@dataclass
class StoreCounters:
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class BackingStore:
    """The device's image: whole blocks in, whole blocks out, ``fdatasync`` to flush."""

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = True) -> None:
        self.path = os.fspath(path)
        self.counters = StoreCounters()
        flags = os.O_RDWR | os.O_CLOEXEC
        self.direct_io = False
        self.direct_io_note = "not requested"
        fd = -1
        if direct:
            try:
                fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct_io = True
                self.direct_io_note = "O_DIRECT"
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct_io_note = "the filesystem refused O_DIRECT (EINVAL): buffered I/O"
        if fd < 0:
            fd = os.open(self.path, flags)
        self._fd = fd
        try:
            # st_size is 0 for a block device; the end of the file is its size either way.
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            raise
        self.num_blocks = size // BLOCK_SIZE
        self.closed = False

    def read_into(self, physical_block: int, view: memoryview) -> None:
        self._transfer(os.preadv, "read", physical_block, view)
        self.counters.reads += 1
        self.counters.read_bytes += view.nbytes

    def write_from(self, physical_block: int, view: memoryview) -> None:
        self._transfer(os.pwritev, "write", physical_block, view)
        self.counters.writes += 1
        self.counters.write_bytes += view.nbytes

    def _transfer(
        self, call: Callable[[int, list[memoryview], int], int], what: str, physical_block: int, view: memoryview
    ) -> None:
        """All of ``view`` at ``physical_block``: a short transfer is retried, a zero one is EIO."""
        offset = physical_block * BLOCK_SIZE
        length = view.nbytes
        done = 0
        while done < length:
            with view[done:] as rest:
                moved = call(self._fd, [rest], offset + done)
            if moved <= 0:
                self.counters.errors += 1
                raise OSError(errno.EIO, f"short {what} at byte {offset + done} of the image")
            done += moved

    def flush(self) -> None:
        # fdatasync: the data and what is needed to read it back, not the mtime (the
        # same promise an NVMe Flush makes about the volatile write cache).
        os.fdatasync(self._fd)
        self.counters.flushes += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "path": self.path,
            "num_blocks": self.num_blocks,
            "direct_io": self.direct_io,
            "direct_io_note": self.direct_io_note,
            "counters": self.counters.as_dict(),
        }

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._fd)


@dataclass
class DeviceCounters:
    polls_with_work: int = 0
    completed: int = 0
    functions_created: int = 0
    functions_refused: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class VsicDevice:
    def __init__(self, store: BackingStore) -> None:
        self.store = store
        self.functions: dict[int, VsicFunction] = {}
        self.counters = DeviceCounters()
        self.deadline: float | None = None  # when a rate-limited ring may go on

    # ---- configuration (from the control plane) -------------------------------------

    def add_function(self, config: FunctionConfig, now: float) -> VsicFunction:
        """Create a function over ``config.extents``.

        VSAs that may be written never share a physical block with another VSA: the
        device keeps that isolation even if the control plane's registry were wrong.
        Read-only VSAs may share, and so may two functions of *one* VSA (the same name
        and the very same extents): that is the shared VSA mapping, two applications
        granted the same area, which is the control plane's decision to make.
        """
        if config.function_id in self.functions:
            self.counters.functions_refused += 1
            raise ValueError(f"function {config.function_id} exists")
        try:
            vsa = VirtualStorageArea(config.extents, self.store.num_blocks, config.read_only)
            for other in self.functions.values():
                same_vsa = bool(config.name) and config.name == other.config.name and list(vsa.extents) == list(
                    other.vsa.extents
                )
                if (not vsa.read_only or not other.vsa.read_only) and not same_vsa and vsa.overlaps(other.vsa):
                    raise VsaError(f"the VSA overlaps function {other.function_id}'s")
        except VsaError:
            self.counters.functions_refused += 1
            raise
        function = VsicFunction(config, vsa, self.store, now)
        self.functions[config.function_id] = function
        self.counters.functions_created += 1
        return function

    def remove_function(self, function_id: int) -> None:
        function = self.functions.pop(function_id, None)
        if function is not None:
            function.close()

    # ---- data path -------------------------------------------------------------------

    def poll(self, now: float) -> int:
        """One turn over every function's rings, each bounded by ``POLL_BUDGET``."""
        completed = 0
        deadline: float | None = None
        for function in self.functions.values():
            if function.blocked_until > now:
                deadline = function.blocked_until if deadline is None else min(deadline, function.blocked_until)
                continue
            for queue in range(function.num_queues):
                if function.rings[queue] is None:
                    continue
                try:
                    done, wait = function.process(queue, POLL_BUDGET, now)
                except Exception:
                    # A device bug met by one ring's requests: stop that ring, keep serving
                    # every other one (the same promise a hostile driver gets).
                    traceback.print_exc(file=sys.stderr)
                    function.fail_ring(queue, layout.RING_ERR_DEVICE)
                    continue
                completed += done
                if wait > 0.0:
                    due = now + wait
                    deadline = due if deadline is None else min(deadline, due)
        self.deadline = deadline
        if completed:
            self.counters.polls_with_work += 1
            self.counters.completed += completed
        return completed

    def has_work(self, now: float) -> bool:
        """Requests posted on a ring the limiter does not hold back now."""
        return any(f.blocked_until <= now and f.has_work() for f in self.functions.values())

    def raise_irqs(self) -> None:
        for function in self.functions.values():
            function.raise_irqs()

    def set_asleep(self, asleep: bool) -> None:
        for function in self.functions.values():
            function.set_asleep(asleep)

    def sync_rings(self) -> None:
        for function in self.functions.values():
            function.sync_rings()

    def snapshot(self) -> dict[str, object]:
        return {
            "device": self.counters.as_dict(),
            "store": self.store.snapshot(),
            "functions": [function.snapshot() for function in self.functions.values()],
        }

    def close(self) -> None:
        for function_id in list(self.functions):
            self.remove_function(function_id)
        self.store.close()
