"""Micro-benchmark (not a test): the VSIC's per-request validation and translation, Python
against C (vdev/fast/vsic.c).

    python -m tools.bench_vsic_check [--batches N] [--repeats R] [--extents E] [--json PATH]

One function (a VSA of ``--extents`` extents of 64 blocks, two DMA mappings) has a ring of
32 valid 2-block requests, half reads and half writes, each landing in one extent. Two
figures per path, in microseconds of CPU per request (``time.process_time``, best of
``--repeats``, since the machine is shared):

* ``check``: what decides and translates a request. Python: ``ring.fetch``, ``_check``
  (which includes the DMA lookup), ``DmaTable.translate`` and ``physical_runs`` again as
  ``_perform`` does them. C: one ``vs_check_batch`` per 32 requests plus reading its words
  and each request's runs back into Python objects.
* ``process``: ``VsicFunction.process`` end to end with a storage that does no I/O, so the
  remaining Python work around the decision (counters, write-back, the view of the buffer)
  is included; the ring is re-armed between batches by resetting cons and prod.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from vdev import layout
from vdev.fast.vsic_mirror import VsicFastCheck
from vdev.ring import DriverRing
from vdev.vsic.function import FunctionConfig, VirtualStorageArea, VsicFunction

BS = layout.VSIC_BLOCK_SIZE
RING = 32
IOVA = 0x20_0000_0000
MEM_BLOCKS = 128


class NullStorage:
    def read_into(self, physical_block: int, view: memoryview) -> None:
        pass

    def write_from(self, physical_block: int, view: memoryview) -> None:
        pass

    def flush(self) -> None:
        pass


class Rig:
    def __init__(self, compiled: bool, extents: int) -> None:
        layout_extents = [(1000 + 100 * i, 64) for i in range(extents)]
        image = 1000 + 100 * extents
        self.function = VsicFunction(FunctionConfig(1, layout_extents), VirtualStorageArea(layout_extents, image),
                                     NullStorage(), 0.0)
        self.function.fast_check = VsicFastCheck() if compiled else None
        self.fd = os.memfd_create("bench-vsic", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, MEM_BLOCKS * BS)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.function.dma_table.map(IOVA - 16 * BS, 16 * BS, self.fd, 0, True, True)  # a second window
        self.function.dma_table.map(IOVA, (MEM_BLOCKS - 16) * BS, self.fd, 16 * BS, True, True)
        self.mem = mmap.mmap(self.fd, MEM_BLOCKS * BS)
        descs = memoryview(self.mem)[16 * BS : 16 * BS + RING * layout.VSIC_DESC_SIZE]
        self.ring = DriverRing(self.function.regs, 0, descs, RING, layout.VSIC_DESC)
        self.ring.enable(IOVA)
        self.function.sync_rings()
        for index in range(RING):
            opcode = layout.VSIC_OP_READ if index % 2 else layout.VSIC_OP_WRITE
            block = (index * 7 % extents) * 64 + index % 60
            self.ring.post(opcode, 0, 0, index, block, 2, 0, IOVA + (2 + 2 * index) * BS)
        self.ring.publish()

    def rearm(self) -> None:
        """Make the same 32 requests pending again."""
        device_ring = self.function.rings[0]
        assert device_ring is not None
        device_ring.cons = 0
        self.function.regs.u32[device_ring._cons_at] = 0

    def close(self) -> None:
        self.ring.descs.release()
        self.function.close()
        self.mem.close()
        os.close(self.fd)


def python_check(rig: Rig) -> None:
    function = rig.function
    ring = function.rings[0]
    assert ring is not None
    table, vsa = function.dma_table, function.vsa
    for index in range(RING):
        opcode, flags, _status, _tag, block, count, _reserved, iova = ring.fetch(index)
        status, nbytes = function._check(opcode, flags, block, count, iova)
        if status == layout.DESC_OK:
            table.translate(iova, nbytes, opcode == layout.VSIC_OP_READ)
            vsa.physical_runs(block, count)


def c_check(rig: Rig) -> None:
    function = rig.function
    fast = function.fast_check
    ring = function.rings[0]
    assert fast is not None and ring is not None
    words = fast.check(function.vsa, function.dma_table, ring, 0, RING)
    runs = fast.runs
    for base in range(0, len(words), 8):
        if words[base] == 0:
            runs(words[base + 7])


def measure(batch: Callable[[], object], rearm: Callable[[], None] | None, batches: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(batches):
            if rearm is not None:
                rearm()
            batch()
        best = min(best, time.process_time() - start)
    return best / (batches * RING) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--extents", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    pure, compiled = Rig(False, args.extents), Rig(True, args.extents)
    try:
        results = {
            "check_python_us": measure(lambda: python_check(pure), None, args.batches, args.repeats),
            "check_c_us": measure(lambda: c_check(compiled), None, args.batches, args.repeats),
            "process_python_us": measure(lambda: pure.function.process(0, RING, 0.0), pure.rearm, args.batches,
                                         args.repeats),
            "process_c_us": measure(lambda: compiled.function.process(0, RING, 0.0), compiled.rearm, args.batches,
                                    args.repeats),
        }
        assert pure.function.counters.error_completions == 0 == compiled.function.counters.error_completions
    finally:
        pure.close()
        compiled.close()
    for name, value in results.items():
        print(f"{name:20s} {value:6.2f}")
    print(f"check: C is {results['check_python_us'] / results['check_c_us']:.1f}x faster; "
          f"process: {results['process_python_us'] / results['process_c_us']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
