"""The device's DMA table (IOMMU): map checks, exact unmaps, translation faults."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.dma import MAX_DMA_BYTES_PER_FUNCTION, DmaFault, DmaTable
from vdev.vfio_user.wire import VfioError

PAGE = 4096
U64 = 1 << 64


def sealed_memfd(size: int, seal: bool = True) -> int:
    fd = os.memfd_create("h1-dma-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = sealed_memfd(16 * PAGE)
    try:
        os.pwrite(fd, bytes(range(256)) * (16 * PAGE // 256), 0)
        yield fd
    finally:
        os.close(fd)


@pytest.fixture
def table() -> Iterator[DmaTable]:
    dma = DmaTable(max_maps=4)
    try:
        yield dma
    finally:
        dma.clear()


def test_map_translate_reads_the_file(table: DmaTable, memfd: int) -> None:
    table.map(0x10000, 4 * PAGE, memfd, PAGE, readable=True, writable=True)
    memory, offset = table.translate(0x10000 + 5, 3, write=False)
    assert bytes(memory[offset : offset + 3]) == bytes([5, 6, 7])
    memory[offset : offset + 1] = b"\xaa"
    assert os.pread(memfd, 1, PAGE + 5) == b"\xaa"


@pytest.mark.parametrize(
    ("iova", "size", "offset", "code"),
    [
        (0x1000, 0, 0, errno.EINVAL),  # empty
        (0x1001, PAGE, 0, errno.EINVAL),  # unaligned iova
        (0x1000, PAGE + 1, 0, errno.EINVAL),  # unaligned size
        (0x1000, PAGE, 100, errno.EINVAL),  # unaligned offset
        (U64 - PAGE, 2 * PAGE, 0, errno.EINVAL),  # iova + size wraps
        (0x1000, 2 * PAGE, U64 - PAGE, errno.EINVAL),  # offset + size wraps
        (0x1000, 17 * PAGE, 0, errno.EINVAL),  # beyond the file
        (0x1000, PAGE, 16 * PAGE, errno.EINVAL),  # starts at the file's end
        (-PAGE, PAGE, 0, errno.EINVAL),
    ],
)
def test_map_refuses_bad_ranges(table: DmaTable, memfd: int, iova: int, size: int, offset: int, code: int) -> None:
    with pytest.raises(VfioError) as caught:
        table.map(iova, size, memfd, offset, readable=True, writable=True)
    assert caught.value.errno == code
    assert len(table) == 0


@pytest.mark.parametrize(
    ("iova", "size"),
    [(0x10000, PAGE), (0x10000 - PAGE, 2 * PAGE), (0x13000, PAGE), (0xF000, 8 * PAGE), (0x11000, PAGE)],
)
def test_map_refuses_overlaps(table: DmaTable, memfd: int, iova: int, size: int) -> None:
    table.map(0x10000, 4 * PAGE, memfd, 0, readable=True, writable=True)
    with pytest.raises(VfioError) as caught:
        table.map(iova, size, memfd, 0, readable=True, writable=True)
    assert caught.value.errno == errno.EEXIST


def test_adjacent_maps_are_fine(table: DmaTable, memfd: int) -> None:
    table.map(0x10000, PAGE, memfd, 0, readable=True, writable=True)
    table.map(0x11000, PAGE, memfd, PAGE, readable=True, writable=True)
    table.map(0xF000, PAGE, memfd, 2 * PAGE, readable=True, writable=True)
    assert table.mappings() == [(0xF000, PAGE), (0x10000, PAGE), (0x11000, PAGE)]
    # A range that straddles two mappings is a fault even though both are mapped.
    with pytest.raises(DmaFault):
        table.translate(0x10FFF, 2, write=False)


def test_max_maps(table: DmaTable, memfd: int) -> None:
    for number in range(4):
        table.map(number * 0x10000, PAGE, memfd, 0, readable=True, writable=False)
    with pytest.raises(VfioError) as caught:
        table.map(0x100000, PAGE, memfd, 0, readable=True, writable=False)
    assert caught.value.errno == errno.ENOSPC


def test_refuses_unsealed_and_non_files(table: DmaTable) -> None:
    unsealed = sealed_memfd(PAGE, seal=False)
    reader, writer = os.pipe()
    try:
        with pytest.raises(VfioError) as caught:
            table.map(0, PAGE, unsealed, 0, readable=True, writable=True)
        assert caught.value.errno == errno.EPERM
        with pytest.raises(VfioError) as caught:
            table.map(0, PAGE, reader, 0, readable=True, writable=True)
        assert caught.value.errno == errno.EINVAL
    finally:
        for fd in (unsealed, reader, writer):
            os.close(fd)
    with pytest.raises(VfioError) as caught:
        table.map(0, PAGE, 999_999, 0, readable=True, writable=True)
    assert caught.value.errno == errno.EBADF


def test_mapped_bytes_are_bounded(memfd: int) -> None:
    table = DmaTable(max_maps=64, max_bytes=8 * PAGE)
    try:
        table.map(0x10000, 4 * PAGE, memfd, 0, readable=True, writable=True)
        table.map(0x20000, 4 * PAGE, memfd, 0, readable=True, writable=True)
        assert table.mapped_bytes == 8 * PAGE
        with pytest.raises(VfioError) as caught:
            table.map(0x30000, PAGE, memfd, 0, readable=True, writable=True)
        assert caught.value.errno == errno.ENOSPC and "per function" in caught.value.message
        table.unmap(0x10000, 4 * PAGE)
        assert table.mapped_bytes == 4 * PAGE
        table.map(0x30000, 4 * PAGE, memfd, 0, readable=True, writable=True)
    finally:
        table.clear()
    assert table.mapped_bytes == 0


def test_default_byte_bound_refuses_a_huge_sparse_memfd() -> None:
    huge = sealed_memfd(1 << 40)  # sparse: costs nothing until touched
    table = DmaTable()
    try:
        assert table.max_bytes == MAX_DMA_BYTES_PER_FUNCTION
        with pytest.raises(VfioError) as caught:
            table.map(0, 1 << 40, huge, 0, readable=True, writable=True)
        assert caught.value.errno == errno.ENOSPC
        table.map(0, MAX_DMA_BYTES_PER_FUNCTION, huge, 0, readable=True, writable=True)
        with pytest.raises(VfioError):
            table.map(1 << 41, PAGE, huge, 0, readable=True, writable=True)
    finally:
        table.clear()
        os.close(huge)


def test_refuses_hugetlbfs_memory(table: DmaTable) -> None:
    # A hole punched into a hugetlbfs file refaults from the huge page pool; an empty pool
    # is SIGBUS in the device host. Creating such a memfd needs no huge pages.
    fd = os.memfd_create("h1-dma-huge", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | os.MFD_HUGETLB)
    try:
        os.ftruncate(fd, 2 << 20)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        with pytest.raises(VfioError) as caught:
            table.map(0, 2 << 20, fd, 0, readable=True, writable=True)
        assert caught.value.errno == errno.EINVAL and "hugetlbfs" in caught.value.message
    finally:
        os.close(fd)


def test_permissions_are_enforced(table: DmaTable, memfd: int) -> None:
    table.map(0x1000, PAGE, memfd, 0, readable=True, writable=False)
    table.map(0x2000, PAGE, memfd, 0, readable=False, writable=True)
    memory, offset = table.translate(0x1000, 8, write=False)
    with pytest.raises(DmaFault):
        table.translate(0x1000, 8, write=True)
    with pytest.raises(TypeError):  # the mapping itself is PROT_READ
        memory[offset] = 1
    table.translate(0x2000, 8, write=True)
    with pytest.raises(DmaFault):
        table.translate(0x2000, 8, write=False)
    with pytest.raises(VfioError):
        table.map(0x3000, PAGE, memfd, 0, readable=False, writable=False)


@pytest.mark.parametrize(
    ("iova", "length"),
    [
        (0x10000, 0),
        (0x10000, -1),
        (0xFFFF, 1),
        (0x10000 + 4 * PAGE, 1),
        (0x10000 + 4 * PAGE - 1, 2),
        (0x10000, 4 * PAGE + 1),
        (-1, 2),
        (U64 - 1, 2),
        (0x10000, U64),
    ],
)
def test_translate_faults(table: DmaTable, memfd: int, iova: int, length: int) -> None:
    table.map(0x10000, 4 * PAGE, memfd, 0, readable=True, writable=True)
    table.translate(0x10000, 4 * PAGE, write=True)  # warm the one-entry cache
    with pytest.raises(DmaFault):
        table.translate(iova, length, write=False)


def test_unmap_exact_only_and_callbacks_run_first(table: DmaTable, memfd: int) -> None:
    seen: list[tuple[int, int, bool]] = []

    def on_unmap(iova: int, size: int) -> None:
        # The memory is still reachable while the callback runs.
        table.translate(iova, size, write=False)
        seen.append((iova, size, True))

    table.on_unmap(on_unmap)
    table.map(0x10000, 4 * PAGE, memfd, 0, readable=True, writable=True)
    table.translate(0x10000, 8, write=False)
    for iova, size in [(0x10000, PAGE), (0x11000, 3 * PAGE), (0x20000, 4 * PAGE)]:
        with pytest.raises(VfioError) as caught:
            table.unmap(iova, size)
        assert caught.value.errno == errno.ENOENT
    table.unmap(0x10000, 4 * PAGE)
    assert seen == [(0x10000, 4 * PAGE, True)]
    with pytest.raises(DmaFault):  # the cache must not keep the old entry alive
        table.translate(0x10000, 8, write=False)
    table.remove_unmap_callback(on_unmap)


def test_unmap_with_live_view_is_counted(table: DmaTable, memfd: int) -> None:
    table.map(0x10000, PAGE, memfd, 0, readable=True, writable=True)
    memory, _ = table.translate(0x10000, 8, write=False)
    view = memoryview(memory)
    table.unmap(0x10000, PAGE)
    assert table.stale_unmaps == 1
    view.release()


def test_clear_runs_every_callback_even_when_one_fails(table: DmaTable, memfd: int) -> None:
    calls: list[int] = []

    def failing(iova: int, size: int) -> None:
        calls.append(iova)
        raise RuntimeError("device bug")

    table.on_unmap(failing)
    table.map(0x10000, PAGE, memfd, 0, readable=True, writable=True)
    table.map(0x20000, PAGE, memfd, 0, readable=True, writable=True)
    with pytest.raises(RuntimeError):
        table.clear()
    assert sorted(calls) == [0x10000, 0x20000]
    assert len(table) == 0


@settings(max_examples=200, deadline=None)
@given(
    maps=st.lists(st.tuples(st.integers(0, 64), st.integers(1, 4)), max_size=6),
    probes=st.lists(st.tuples(st.integers(-PAGE, 70 * PAGE), st.integers(-2, 3 * PAGE), st.booleans()), max_size=20),
)
def test_translate_agrees_with_a_model(maps: list[tuple[int, int]], probes: list[tuple[int, int, bool]]) -> None:
    fd = sealed_memfd(4 * PAGE)
    table = DmaTable(max_maps=100)
    granted: list[tuple[int, int]] = []
    try:
        for page, pages in maps:
            iova, size = page * PAGE, pages * PAGE
            overlaps = any(iova < end and start < iova + size for start, end in granted)
            try:
                table.map(iova, size, fd, 0, readable=True, writable=bool(page % 2))
            except VfioError as exc:
                assert overlaps and exc.errno == errno.EEXIST
            else:
                assert not overlaps
                granted.append((iova, iova + size))
        for iova, length, write in probes:
            inside = [
                (start, end)
                for start, end in granted
                if length > 0 and start <= iova and iova + length <= end and (not write or (start // PAGE) % 2)
            ]
            try:
                memory, offset = table.translate(iova, length, write)
            except DmaFault:
                assert not inside
            else:
                assert inside and offset == iova - inside[0][0] and offset + length <= len(memory)
    finally:
        table.clear()
        os.close(fd)
