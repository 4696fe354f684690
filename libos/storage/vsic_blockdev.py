"""A VSA as a :class:`~libos.storage.blockdev.BlockDevice`: the persistent log on a VSIC.

Each call is synchronous: it splits the transfer into requests of at most the driver's slot
size, keeps the ring as full as it can, and returns once every request has completed (or
raises :class:`VsicIoError` naming the first failure, after the rest have drained, so the
ring is never left with requests the next call would mistake for its own).

The promises are the device's: a write completes once the data is in the image (the page
cache, or the disk with direct I/O), ``fua=True`` makes the device write through with
``fdatasync`` before completing, and ``flush`` is a VSIC flush request.

Waiting polls first, because a completion usually arrives within microseconds while the
device host is busy, and only then sleeps on the queue's interrupt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Final

from libos.driver.vsic import BLOCK_SIZE, Completion, VsicDriver
from libos.storage.blockdev import BlockDeviceError, check_range
from vdev import layout

DEFAULT_TIMEOUT: Final = 30.0
SPIN_SECONDS: Final = 0.0002  # polling before sleeping on the interrupt
_SLEEP_SLICE: Final = 0.05


class VsicIoError(BlockDeviceError):
    """The device completed a request with an error status (``layout.DESC_*``)."""

    def __init__(self, opcode: int, block: int, status: int) -> None:
        op = layout.VSIC_OP_NAMES.get(opcode, str(opcode))
        name = layout.VSIC_STATUS_NAMES.get(status, str(status))
        super().__init__(f"VSIC {op} at block {block} failed: {name}")
        self.opcode = opcode
        self.block = block
        self.status = status


class VsicBlockDevice:
    """The driver's VSA, whole blocks of 4096 bytes, safe to call from several threads."""

    def __init__(self, driver: VsicDriver, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._driver = driver
        self._timeout = timeout
        self._lock = threading.Lock()
        self._broken: str | None = None

    @property
    def block_size(self) -> int:
        return BLOCK_SIZE

    @property
    def num_blocks(self) -> int:
        return self._driver.capacity_blocks

    def write(self, block: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        length = view.nbytes
        if length == 0 or length % BLOCK_SIZE:
            raise BlockDeviceError(f"write of {length} bytes is not a positive multiple of {BLOCK_SIZE}")
        count = length // BLOCK_SIZE
        check_range(block, count, self.num_blocks)
        step = self._driver.slot_blocks
        requests = [
            (layout.VSIC_OP_WRITE, block + first, min(step, count - first), view[first * BLOCK_SIZE : (first + step) * BLOCK_SIZE], fua, 0)
            for first in range(0, count, step)
        ]
        self._run(requests, None)

    def read(self, block: int, count: int) -> bytes:
        check_range(block, count, self.num_blocks)
        if count == 0:
            return b""
        out = bytearray(count * BLOCK_SIZE)
        step = self._driver.slot_blocks
        requests = [
            (layout.VSIC_OP_READ, block + first, min(step, count - first), None, False, first * BLOCK_SIZE)
            for first in range(0, count, step)
        ]
        self._run(requests, out)
        return bytes(out)

    def flush(self) -> None:
        self._run([(layout.VSIC_OP_FLUSH, 0, 0, None, False, 0)], None)

    def _run(
        self,
        requests: Sequence[tuple[int, int, int, memoryview | None, bool, int]],
        out: bytearray | None,
    ) -> None:
        with self._lock:
            if self._broken is not None:
                raise BlockDeviceError(self._broken)
            driver = self._driver
            deadline = time.monotonic() + self._timeout
            # tag -> (opcode, block, offset in ``out``)
            pending: dict[int, tuple[int, int, int]] = {}
            failures: list[VsicIoError] = []
            try:
                for opcode, block, count, data, fua, offset in requests:
                    while driver.space() == 0:
                        self._collect(pending, out, failures, deadline)
                    tag = driver.submit(opcode, block, count, data, fua)
                    pending[tag] = (opcode, block, offset)
                while pending:
                    self._collect(pending, out, failures, deadline)
            except BlockDeviceError as exc:
                # Requests may still be in flight: their completions would be taken for
                # the next call's, so this device is done.
                self._broken = f"VSIC block device unusable after: {exc}"
                raise
            if failures:
                raise failures[0]

    def _collect(
        self,
        pending: dict[int, tuple[int, int, int]],
        out: bytearray | None,
        failures: list[VsicIoError],
        deadline: float,
    ) -> None:
        driver = self._driver
        completions = driver.poll()
        if not completions:
            spin_until = time.monotonic() + SPIN_SECONDS
            while not completions and time.monotonic() < spin_until:
                completions = driver.poll()
        while not completions:
            if driver.ring.error:
                raise BlockDeviceError(f"the device stopped the request ring (error {driver.ring.error})")
            now = time.monotonic()
            if now >= deadline:
                raise BlockDeviceError(f"the device completed nothing in {self._timeout} s")
            driver.wait(min(_SLEEP_SLICE, deadline - now))
            completions = driver.poll()
        for completion in completions:
            self._complete(completion, pending, out, failures)

    @staticmethod
    def _complete(
        completion: Completion,
        pending: dict[int, tuple[int, int, int]],
        out: bytearray | None,
        failures: list[VsicIoError],
    ) -> None:
        request = pending.pop(completion.tag, None)
        if request is None:
            raise BlockDeviceError(f"completion for unknown tag {completion.tag}")
        opcode, block, offset = request
        if not completion.ok:
            failures.append(VsicIoError(opcode, block, completion.status))
        elif completion.data is not None and out is not None:
            out[offset : offset + len(completion.data)] = completion.data
