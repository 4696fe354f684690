"""The Python half of the VSIC's compiled request check (vsic.c): mirror a function's VSA and
DMA table into C, check a batch of descriptors there, hand the verdicts to the model.

What is mirrored, and when: the DMA table's windows (IOVA, size, rights; never a pointer)
when its ``generation`` moved (every map and unmap moves it), and the VSA's extents when the
function's VSA object or its read-only flag differs from the one last copied. Both checks
run before every batch, so C never judges a request against a stale table. The descriptor
array is exported to C for the length of one call only, and released before it returns.

C decides and translates; the model (``VsicFunction``) still counts refusals, applies the
limiter, does the I/O and writes the completions, from C's one copy of each descriptor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdev.fast import load_module, pure_requested

if TYPE_CHECKING:
    from vdev.dma import DmaMapping, DmaTable
    from vdev.ring import DeviceRing
    from vdev.vsic.function import VirtualStorageArea

REQ_WORDS = 8  # vs_req: status, opcode|flags<<8, tag, vsa_block, block_count, buffer_iova, map, runs
RUN_WORDS = 3  # vs_run: physical, count, offset
MAX_BATCH = 64  # descriptors per C call (process() asks for at most its budget)
MAX_RUNS = 1024  # runs per C call; C stops early, or falls back, when they do not fit


class VsicFastCheck:
    """One function's mirror and the buffers of its C calls."""

    def __init__(self) -> None:
        module = load_module()
        self.module_name: str = module.__name__
        self.ffi: Any = module.ffi
        self.lib: Any = module.lib
        ffi = self.ffi
        self.fallback: int = self.lib.VS_FALLBACK
        self._fn: Any = ffi.new("vs_fn *")
        self._out: Any = ffi.new("vs_req[]", MAX_BATCH)
        self._runs: Any = ffi.new("vs_run[]", MAX_RUNS)
        self._out_words: Any = ffi.cast("uint64_t *", self._out)
        self._run_words: Any = ffi.cast("uint64_t *", self._runs)
        self._runs_used: Any = ffi.new("uint32_t *")
        self._batch_runs: list[int] = []  # the last batch's runs, flat (RUN_WORDS per run)
        self._maps: Any = None  # the C arrays vs_fn points at, kept alive here
        self._extents: Any = None
        self._table: DmaTable | None = None
        self._generation = -1
        self._vsa: VirtualStorageArea | None = None
        self._read_only = False
        self.mappings: list[DmaMapping] = []  # index in C's map array -> the model's mapping
        self.batches = 0  # C calls (for tests and the snapshot)

    # ---- mirror -------------------------------------------------------------------------

    def sync(self, vsa: VirtualStorageArea, table: DmaTable) -> None:
        if table is not self._table or table.generation != self._generation:
            self._load_maps(table)
        if vsa is not self._vsa or vsa.read_only != self._read_only:
            self._load_vsa(vsa)

    def _load_maps(self, table: DmaTable) -> None:
        mappings = list(table._mappings)  # sorted by IOVA and disjoint, as C's search needs
        maps = self.ffi.new("vs_map[]", max(1, len(mappings)))
        for index, mapping in enumerate(mappings):
            entry = maps[index]
            entry.iova, entry.size = mapping.iova, mapping.size
            entry.readable, entry.writable = int(mapping.readable), int(mapping.writable)
        self._fn.maps, self._fn.nmaps = maps, len(mappings)
        self._maps = maps
        self.mappings = mappings
        self._table = table
        self._generation = table.generation

    def _load_vsa(self, vsa: VirtualStorageArea) -> None:
        extents = self.ffi.new("vs_extent[]", len(vsa.extents))
        start = 0
        for index, (physical, count) in enumerate(vsa.extents):
            entry = extents[index]
            entry.vsa_start, entry.physical, entry.count = start, physical, count
            start += count
        fn = self._fn
        fn.extents, fn.nextents = extents, len(vsa.extents)
        fn.capacity = vsa.capacity_blocks
        fn.read_only = int(vsa.read_only)
        self._extents = extents
        self._vsa = vsa
        self._read_only = vsa.read_only

    # ---- one batch ----------------------------------------------------------------------

    def check(self, vsa: VirtualStorageArea, table: DmaTable, ring: DeviceRing, first: int, count: int) -> list[int]:
        """The flat vs_req words of descriptors ``first`` .. (at most ``count`` of them; a
        multiple of REQ_WORDS). Empty when C cannot describe the ring: the model decides."""
        self.sync(vsa, table)
        count = min(count, MAX_BATCH)
        ffi = self.ffi
        descs = ffi.from_buffer("uint8_t[]", ring.descs)
        try:
            done = self.lib.vs_check_batch(
                self._fn, descs, ring.nbytes, ring.size, ring.iova, first & 0xFFFFFFFF, count,
                self._out, self._runs, MAX_RUNS, self._runs_used,
            )
        finally:
            ffi.release(descs)
        self.batches += 1
        # Both read back with one unpack each: a field access on cdata costs more than the
        # whole check of a request in C.
        self._batch_runs = ffi.unpack(self._run_words, self._runs_used[0] * RUN_WORDS)
        words: list[int] = ffi.unpack(self._out_words, done * REQ_WORDS)
        return words

    def runs(self, packed: int) -> list[tuple[int, int, int]]:
        """(physical block, count, byte offset in the mapping) of a request's ``runs`` word,
        from the last ``check``."""
        start, count = packed & 0xFFFFFFFF, packed >> 32
        flat = self._batch_runs
        if count == 1:
            at = start * RUN_WORDS
            return [(flat[at], flat[at + 1], flat[at + 2])]
        words = flat[start * RUN_WORDS : (start + count) * RUN_WORDS]
        return list(zip(words[0::3], words[1::3], words[2::3]))


def make_vsic_fast_check() -> VsicFastCheck | None:
    """The compiled check, or None when ARRAKIS_PURE=1 asks for the pure-Python model. A
    missing build is an error, as for the VNIC (``vdev.fast.mirror.make_fast_path``)."""
    if pure_requested():
        return None
    return VsicFastCheck()
