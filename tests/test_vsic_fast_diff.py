"""The VSIC's compiled request check (vdev/fast/vsic.c) against the Python model.

Two levels, hostile descriptors included (bad opcodes and flags, zero and oversized counts,
block ranges that wrap past 2**64, IOVAs outside the DMA map, wrapping at the top of the
IOVA space, misaligned, in read-only or write-only mappings, writes to read-only VSAs, reads
into the descriptor ring itself, impossible ring indices, maps and unmaps between polls):

* the check: the same descriptors go through ``vs_check_batch`` and through ``_check``,
  ``DmaTable.translate`` and ``VirtualStorageArea.physical_runs``; status, mapping and runs
  must be equal;
* the function: two identical worlds (one ``VsicFunction`` on the pure model, one on the
  compiled check) take the same operations; after every step their driver memory, register
  page, counters, storage and return values must be equal.

With ARRAKIS_VDEV_FAST=asan (libasan preloaded) the module runs against the
AddressSanitizer/UBSan build; ``test_sanitized_build_passes_the_vsic_differential_test``
does that in a subprocess.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import module_loaded, run_sanitized_pytest, sanitized_vfast_env, scattered_extents
from vdev import layout
from vdev.fast.vsic_mirror import REQ_WORDS, VsicFastCheck
from vdev.ring import DriverRing
from vdev.vsic.function import FunctionConfig, VirtualStorageArea, VsicFunction

REPO = Path(__file__).resolve().parent.parent
BS = layout.VSIC_BLOCK_SIZE
U64 = (1 << 64) - 1
EXAMPLES = int(os.environ.get("VSICFAST_EXAMPLES", "150"))

STORE_BLOCKS = 96
RING = 16
MEM_IOVA = 0x20_0000_0000  # ring at its start, buffers after it; read-write
MEM_BLOCKS = 40
RO_IOVA = 0x30_0000_0000  # read-only mapping
WO_IOVA = 0x31_0000_0000  # write-only mapping
EXTRA_IOVA = 0x32_0000_0000  # mapped and unmapped by the operations
SMALL_BLOCKS = 4
TOP_IOVA = (1 << 64) - 2 * BS  # a mapping that ends at 2**64 exactly

IOVAS = {
    "buffer": MEM_IOVA + BS,
    "buffer_end": MEM_IOVA + (MEM_BLOCKS - 2) * BS,
    "ring": MEM_IOVA,  # a read here rewrites descriptors still to be fetched
    "ro": RO_IOVA,
    "wo": WO_IOVA,
    "extra": EXTRA_IOVA,
    "top": TOP_IOVA,
    "top_last": (1 << 64) - BS,
    "unmapped": 0x1000,
    "misaligned": MEM_IOVA + BS + 512,
    "gap": RO_IOVA + SMALL_BLOCKS * BS,
}


def _iova(value: int | str) -> int:
    """An IOVA of a descriptor: a number, or one of IOVAS by name."""
    return IOVAS[value] if isinstance(value, str) else value


class RamStorage:
    """Storage in memory, its content fixed by a seed so both worlds start equal."""

    def __init__(self, blocks: int) -> None:
        self.data = bytearray(random.Random(blocks).randbytes(blocks * BS))
        self.flushes = 0

    def read_into(self, physical_block: int, view: memoryview) -> None:
        view[:] = self.data[physical_block * BS : physical_block * BS + view.nbytes]

    def write_from(self, physical_block: int, view: memoryview) -> None:
        self.data[physical_block * BS : physical_block * BS + view.nbytes] = view

    def flush(self) -> None:
        self.flushes += 1


def _memfd(blocks: int, seed: int) -> int:
    fd = os.memfd_create("vsicfast-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, random.Random(seed).randbytes(blocks * BS))
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


class World:
    """One function with its driver's memory and ring, on the pure or the compiled check."""

    def __init__(self, compiled: bool, extents: list[tuple[int, int]], read_only: bool, iops: int = 0) -> None:
        self.storage = RamStorage(STORE_BLOCKS)
        config = FunctionConfig(function_id=1, extents=extents, read_only=read_only, iops=iops)
        vsa = VirtualStorageArea(extents, STORE_BLOCKS, read_only)
        self.function = VsicFunction(config, vsa, self.storage, 0.0)
        self.function.fast_check = VsicFastCheck() if compiled else None
        self.fds = {name: _memfd(blocks, seed) for name, blocks, seed in
                    (("mem", MEM_BLOCKS, 1), ("ro", SMALL_BLOCKS, 2), ("wo", SMALL_BLOCKS, 3),
                     ("extra", SMALL_BLOCKS, 4), ("top", 2, 5))}
        table = self.function.dma_table
        table.map(MEM_IOVA, MEM_BLOCKS * BS, self.fds["mem"], 0, True, True)
        table.map(RO_IOVA, SMALL_BLOCKS * BS, self.fds["ro"], 0, True, False)
        table.map(WO_IOVA, SMALL_BLOCKS * BS, self.fds["wo"], 0, False, True)
        table.map(TOP_IOVA, 2 * BS, self.fds["top"], 0, True, True)
        self.extra_mapped = False
        self.mem = mmap.mmap(self.fds["mem"], MEM_BLOCKS * BS)
        self.ring = DriverRing(self.function.regs, 0, memoryview(self.mem)[: RING * layout.VSIC_DESC_SIZE], RING,
                               layout.VSIC_DESC)
        self.ring.enable(MEM_IOVA)
        self.function.sync_rings()
        self.returns: list[object] = []

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        function = self.function
        if kind == "post":
            _, opcode, flags, block, count, iova, tag = op
            self.ring.post(opcode, flags, 0, tag, block, count, 0, _iova(iova))
            self.ring.publish()
        elif kind == "process":
            _, budget, now = op
            self.returns.append(function.process(0, budget, now))
        elif kind == "extra":
            if self.extra_mapped:
                function.dma_table.unmap(EXTRA_IOVA, SMALL_BLOCKS * BS)
            else:
                function.dma_table.map(EXTRA_IOVA, SMALL_BLOCKS * BS, self.fds["extra"], 0, True, True)
            self.extra_mapped = not self.extra_mapped
        elif kind == "limits":
            function.set_limits(op[1], 0, op[2])
        elif kind == "bad_prod":
            function.regs.u32[self.ring._prod_at] = op[1]
        elif kind == "reset":
            self.ring.disable()
            function.sync_rings()
            self.ring.prod = self.ring.reaped = 0
            self.ring.enable(MEM_IOVA)
            function.sync_rings()
        else:
            raise AssertionError(op)

    def state(self) -> tuple[object, ...]:
        regs = bytes(self.function.regs.page[: layout.PAGE_SIZE])
        return (bytes(self.mem), regs, self.function.counters.as_dict(), bytes(self.storage.data),
                self.storage.flushes, self.function.blocked_until, self.returns)

    def close(self) -> None:
        self.ring.descs.release()
        self.function.close()
        self.mem.close()
        for fd in self.fds.values():
            os.close(fd)


@st.composite
def vsas(draw: st.DrawFn) -> tuple[list[tuple[int, int]], bool]:
    """1..6 disjoint extents of the store, in any VSA order, read-only or not."""
    return scattered_extents(draw, 12, 3), draw(st.booleans())


blocks = st.one_of(st.integers(0, 70), st.sampled_from([U64, U64 - 1, U64 - 255, 1 << 63, (1 << 32) + 1]))
counts = st.one_of(st.integers(1, 8), st.sampled_from([0, 255, 256, 257, 1 << 31, (1 << 32) - 1]))
iovas = st.one_of(st.sampled_from(sorted(IOVAS)), st.integers(0, U64),
                  st.integers(0, MEM_BLOCKS).map(lambda k: MEM_IOVA + k * BS))
descriptors = st.tuples(
    st.just("post"),
    st.one_of(st.sampled_from([layout.VSIC_OP_READ, layout.VSIC_OP_WRITE, layout.VSIC_OP_FLUSH]),
              st.integers(0, 255)),
    st.one_of(st.just(0), st.just(0), st.sampled_from([1, 2, 0x80, 0xFF])),
    blocks, counts, iovas, st.integers(0, (1 << 32) - 1),
)
operations = st.one_of(
    descriptors, descriptors, descriptors, descriptors,
    st.tuples(st.just("process"), st.integers(1, 40), st.floats(0, 10)),
    st.tuples(st.just("extra")),
    st.tuples(st.just("limits"), st.sampled_from([0, 0, 1, 5, 1000]), st.floats(0, 10)),
    st.tuples(st.just("bad_prod"), st.sampled_from([RING + 1, 1 << 31, (1 << 32) - 1])),
    st.tuples(st.just("reset")),
)


# ---- the check, descriptor by descriptor ---------------------------------------------------


def _expected(function: VsicFunction, opcode: int, flags: int, block: int, count: int, iova: int) -> tuple[object, ...]:
    status, nbytes = function._check(opcode, flags, block, count, iova)
    if status != layout.DESC_OK or opcode == layout.VSIC_OP_FLUSH:
        return (status,)
    memory, offset = function.dma_table.translate(iova, nbytes, opcode == layout.VSIC_OP_READ)
    index = [m.memory for m in function.dma_table._mappings].index(memory)
    runs = []
    for physical, run_count in function.vsa.physical_runs(block, count):
        runs.append((physical, run_count, offset))
        offset += run_count * BS
    return (status, index, runs)


@given(vsas(), st.lists(descriptors, min_size=1, max_size=RING), st.booleans())
@settings(max_examples=EXAMPLES, deadline=None)
def test_check_matches_the_python_check(vsa: tuple[list[tuple[int, int]], bool],
                                        posts: list[tuple[Any, ...]], extra: bool) -> None:
    world = World(True, *vsa)
    try:
        if extra:
            world.apply(("extra",))
        for op in posts:
            world.apply(op)
        function, fast = world.function, world.function.fast_check
        assert fast is not None
        ring = function.rings[0]
        assert ring is not None
        done = 0
        while done < len(posts):
            words = fast.check(function.vsa, function.dma_table, ring, ring.cons + done, len(posts) - done)
            assert words, "C refused a ring the model opened"
            for base in range(0, len(words), REQ_WORDS):
                status, opflags, tag, block, count, iova, map_index, runs = words[base : base + REQ_WORDS]
                _, opcode, flags, want_block, want_count, want_iova, want_tag = posts[done]
                want_iova = _iova(want_iova)
                assert (opflags & 0xFF, opflags >> 8, tag, block, count, iova) == (
                    opcode, flags, want_tag, want_block, want_count, want_iova)
                assert status != fast.fallback, "an ordinary mirror never needs the model"
                expected = _expected(function, opcode, flags, block, count, iova)
                got: tuple[object, ...] = (status,)
                if status == layout.DESC_OK and opcode != layout.VSIC_OP_FLUSH:
                    got = (status, map_index, fast.runs(runs))
                assert got == expected, posts[done]
                done += 1
    finally:
        world.close()


# ---- the function, pure against compiled -------------------------------------------------


def run_both(vsa: tuple[list[tuple[int, int]], bool], ops: list[tuple[Any, ...]]) -> tuple[World, World]:
    pure, fast = World(False, *vsa), World(True, *vsa)
    try:
        for step, op in enumerate(ops):
            pure.apply(op)
            fast.apply(op)
            assert pure.state() == fast.state(), f"worlds differ after step {step}: {op!r}"
    except BaseException:
        pure.close()
        fast.close()
        raise
    return pure, fast


@given(vsas(), st.lists(operations, min_size=2, max_size=50))
@settings(max_examples=EXAMPLES, deadline=None)
def test_compiled_function_matches_the_python_model(vsa: tuple[list[tuple[int, int]], bool],
                                                    ops: list[tuple[Any, ...]]) -> None:
    pure, fast = run_both(vsa, ops + [("process", RING, 100.0)])
    pure.close()
    fast.close()


def test_ordinary_requests_take_the_compiled_check() -> None:
    """The differential tests would pass if C did nothing: check that it does the work."""
    ops: list[tuple[Any, ...]] = []
    for index in range(6):
        ops.append(("post", layout.VSIC_OP_WRITE, index & 1, index, 2, MEM_IOVA + (1 + 2 * index) * BS, index))
        ops.append(("post", layout.VSIC_OP_READ, 0, index, 2, MEM_IOVA + (20 + 2 * index) * BS, 100 + index))
    ops += [("post", layout.VSIC_OP_FLUSH, 0, 0, 0, 0, 9), ("process", 32, 0.0)]
    pure, fast = run_both(([(50, 4), (10, 8)], False), ops)
    try:
        check = fast.function.fast_check
        assert check is not None and check.batches == 1
        counters = fast.function.counters
        assert (counters.reads, counters.writes, counters.fua_writes, counters.flushes) == (6, 6, 3, 1)
        assert counters.error_completions == 0
        assert fast.mem[20 * BS : 32 * BS] == fast.mem[BS : 13 * BS]  # read back what was written
    finally:
        pure.close()
        fast.close()


def test_hostile_requests_get_the_model_statuses() -> None:
    read, write = layout.VSIC_OP_READ, layout.VSIC_OP_WRITE
    ops: list[tuple[Any, ...]] = [
        ("post", 9, 0, 0, 1, "buffer", 1),  # unknown opcode
        ("post", read, 1, 0, 1, "buffer", 2),  # FUA on a read
        ("post", write, 0, 0, 0, "buffer", 3),  # zero blocks
        ("post", write, 0, 0, 257, "buffer", 4),  # too many
        ("post", read, 0, U64, 1, "buffer", 5),  # the range wraps past 2**64
        ("post", read, 0, 11, 2, "buffer", 6),  # one block past the end
        ("post", read, 0, 0, 1, "misaligned", 7),
        ("post", read, 0, 0, 1, "ro", 8),  # the device would write a read-only mapping
        ("post", write, 0, 0, 1, "wo", 9),  # ... or read a write-only one
        ("post", read, 0, 0, 2, "top_last", 10),  # the buffer wraps at the top of the IOVA space
        ("post", read, 0, 0, 1, "unmapped", 11),
        ("post", read, 0, 0, 2, "buffer_end", 12),  # the last block of a mapping is fine...
        ("post", read, 0, 0, 3, "buffer_end", 13),  # ...one more crosses its end
        ("process", 32, 0.0),
    ]
    pure, fast = run_both(([(0, 4), (20, 8)], False), ops)
    try:
        statuses = [fast.ring.peek(i)[2] for i in range(13)]
        assert statuses == [6, 6, 2, 2, 5, 5, 7, 1, 1, 1, 1, 0, 1]
    finally:
        pure.close()
        fast.close()


def test_a_read_into_the_ring_is_seen_by_the_next_descriptors() -> None:
    """A read whose buffer is the descriptor ring rewrites the requests after it; the model
    fetches them afterwards, so C must stop its batch there."""
    ops: list[tuple[Any, ...]] = [("post", layout.VSIC_OP_READ, 0, 0, 1, "ring", 1)]
    ops += [("post", layout.VSIC_OP_WRITE, 0, 1, 1, "buffer", 2 + i) for i in range(4)]
    ops.append(("process", 16, 0.0))
    pure, fast = run_both(([(0, 16)], False), ops)
    try:
        check = fast.function.fast_check
        assert check is not None and check.batches == 2
    finally:
        pure.close()
        fast.close()


def test_runs_that_do_not_fit_fall_back_or_stop_the_batch() -> None:
    """vs_check_batch with room for one run: a request of two runs alone goes to the model;
    after a one-run request it ends the batch."""
    world = World(True, [(30, 2), (10, 2)], False)
    try:
        for op in [("post", layout.VSIC_OP_READ, 0, 1, 2, "buffer", 1), ("post", layout.VSIC_OP_READ, 0, 0, 1, "buffer", 2),
                   ("post", layout.VSIC_OP_READ, 0, 1, 2, "buffer", 3)]:
            world.apply(op)
        fast = world.function.fast_check
        ring = world.function.rings[0]
        assert fast is not None and ring is not None
        fast.sync(world.function.vsa, world.function.dma_table)
        ffi, lib = fast.ffi, fast.lib
        out, runs, used = ffi.new("vs_req[]", 4), ffi.new("vs_run[]", 1), ffi.new("uint32_t *")
        descs = ffi.from_buffer("uint8_t[]", ring.descs)
        try:
            assert lib.vs_check_batch(fast._fn, descs, ring.nbytes, RING, ring.iova, 0, 3, out, runs, 1, used) == 2
            assert (out[0].status, out[1].status) == (lib.VS_FALLBACK, layout.DESC_OK)
            assert lib.vs_check_batch(fast._fn, descs, ring.nbytes, RING, ring.iova, 2, 1, out, runs, 1, used) == 1
            assert out[0].status == lib.VS_FALLBACK
            # A ring C cannot describe (not a power of two, or longer than its memory): none.
            assert lib.vs_check_batch(fast._fn, descs, ring.nbytes, 12, ring.iova, 0, 3, out, runs, 1, used) == 0
            assert lib.vs_check_batch(fast._fn, descs, ring.nbytes, 2 * RING, ring.iova, 0, 3, out, runs, 1, used) == 0
        finally:
            ffi.release(descs)
        # process() still completes all three, through the model where C handed back.
        assert world.function.process(0, 8, 0.0) == (3, 0.0)
        assert world.function.counters.reads == 3
    finally:
        world.close()


def test_c_constants_are_the_layout() -> None:
    lib = VsicFastCheck().lib
    pairs = [(lib.VS_DESC_SIZE, layout.VSIC_DESC_SIZE), (lib.VS_BLOCK_SIZE, layout.VSIC_BLOCK_SIZE),
             (lib.VS_MAX_REQUEST_BLOCKS, layout.VSIC_MAX_REQUEST_BLOCKS), (lib.VS_OP_READ, layout.VSIC_OP_READ),
             (lib.VS_OP_WRITE, layout.VSIC_OP_WRITE), (lib.VS_OP_FLUSH, layout.VSIC_OP_FLUSH),
             (lib.VS_KNOWN_FLAGS, layout.VSIC_KNOWN_FLAGS), (lib.VS_OK, layout.DESC_OK),
             (lib.VS_IOMMU_FAULT, layout.DESC_IOMMU_FAULT), (lib.VS_BAD_LENGTH, layout.DESC_BAD_LENGTH),
             (lib.VS_READ_ONLY, layout.DESC_READ_ONLY), (lib.VS_OUT_OF_RANGE, layout.DESC_OUT_OF_RANGE),
             (lib.VS_BAD_OPCODE, layout.DESC_BAD_OPCODE), (lib.VS_MISALIGNED, layout.DESC_MISALIGNED)]
    assert all(c == python for c, python in pairs), pairs
    assert lib.VS_FALLBACK not in layout.DESC_STATUS_NAMES


def test_pure_environment_variable_selects_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARRAKIS_PURE", "1")
    world = World(False, [(0, 4)], False)
    try:
        assert VsicFunction(FunctionConfig(2, [(0, 4)]), VirtualStorageArea([(0, 4)], 8), RamStorage(8),
                            0.0).fast_check is None
    finally:
        world.close()
    monkeypatch.delenv("ARRAKIS_PURE")
    function = VsicFunction(FunctionConfig(3, [(0, 4)]), VirtualStorageArea([(0, 4)], 8), RamStorage(8), 0.0)
    try:
        assert isinstance(function.fast_check, VsicFastCheck)
    finally:
        function.close()


def test_unmap_refreshes_the_mirror() -> None:
    """A buffer unmapped between polls faults on the compiled path too (the mirror follows
    the DMA table's generation), and leaves no export behind."""
    ops: list[tuple[Any, ...]] = [("extra",), ("post", layout.VSIC_OP_READ, 0, 0, 1, "extra", 1), ("process", 4, 0.0),
                                  ("extra",), ("post", layout.VSIC_OP_READ, 0, 0, 1, "extra", 2), ("process", 4, 0.0)]
    pure, fast = run_both(([(0, 4)], False), ops)
    try:
        assert [fast.ring.peek(i)[2] for i in range(2)] == [layout.DESC_OK, layout.DESC_IOMMU_FAULT]
        assert fast.function.dma_table.stale_unmaps == 0
    finally:
        pure.close()
        fast.close()


def test_sanitized_build_passes_the_vsic_differential_test() -> None:
    """The same differential and hostile-input tests against the ASan/UBSan build."""
    env = dict(sanitized_vfast_env(), VSICFAST_EXAMPLES="60")
    run_sanitized_pytest(env, __file__, "-k", "not sanitized")
    assert "_vfast_asan" in module_loaded(env, "m.VsicFastCheck().module_name", "import vdev.fast.vsic_mirror as m")


def test_sanitized_build_passes_the_vsic_and_malicious_app_tests() -> None:
    """The VSIC's functional and hostile-input tests (a malicious application against a
    device host process, random descriptors, bad ring set-ups) on the ASan/UBSan build: the
    host processes they start inherit the environment, so their checks run in it too."""
    env = sanitized_vfast_env()
    run_sanitized_pytest(env, str(REPO / "tests" / "test_vsic.py"), str(REPO / "tests" / "test_vsic_malicious.py"))
