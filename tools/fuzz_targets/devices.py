"""VNIC and VSIC descriptor rings under a driver that rewrites memory between the device's reads.

The driver's memory is a real sealed memfd, DMA-mapped into the function exactly as
DMA_MAP does (one read-write window and one read-only window). The harness then becomes a
hostile driver running *concurrently* with the device: it hooks every point where the device
reads driver memory (each descriptor fetch, each DMA translation, each storage transfer) and,
as the input says, rewrites there the descriptor just fetched, the ring registers (prod,
cons, ring_iova, ring_size, enable) and the data buffers. A device that reads a value twice,
or acts on one it did not check, then acts on something other than what it validated.

The oracle keeps the device's own private copy of every descriptor (what ``fetch``
returned) and recomputes, from that copy alone, the status the device must write back,
the DMA translations it may ask for and the I/O it may do. Besides that: no exception may
escape the data path, and a ring must never be used after the memory under it was unmapped.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Callable
from typing import Any

from tools.fuzz_targets import ContractViolation
from tools.fuzz_targets._input import Input
from vdev import layout
from vdev.dma import DmaFault, DmaTable
from vdev.ring import DeviceRing
from vdev.vfio_user.wire import VfioError
from vdev.vnic.function import FunctionConfig as VnicConfig
from vdev.vnic.function import VnicFunction
from vdev.vsic.function import BLOCK_SIZE, FunctionConfig as VsicConfig
from vdev.vsic.function import VirtualStorageArea, VsaError, VsicFunction

PAGES = 16
RW_IOVA = 0x10000  # pages 0..7 of the memfd, read-write
RW_PAGES = 8
RO_IOVA = 0x40000  # pages 8..11, read-only for the device
RO_PAGES = 4
# The ABI's frame limit (Ethernet header + 1500-byte MTU), stated here and not read from
# vdev.layout, so that the oracle does not move with the device it judges.
ABI_MAX_FRAME = 1514
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class SpyRing(DeviceRing):
    """A DeviceRing whose every fetch is reported to the harness (same slots, same layout)."""

    __slots__ = ()
    on_fetch: Callable[[DeviceRing, int, tuple[int, ...]], None] | None = None
    # Every write-back the device makes, (free-running index, values), in order: the oracle
    # judges these, not the ring memory, which the hostile driver may scribble over later.
    written: dict[int, tuple[int, ...]] = {}

    def fetch(self, index: int) -> tuple[int, ...]:
        values = DeviceRing.fetch(self, index)
        hook = SpyRing.on_fetch
        if hook is not None:
            hook(self, index, values)
        return values

    def write_back(self, index: int, offset_in_desc: int, fmt: struct.Struct, *values: int) -> None:
        DeviceRing.write_back(self, index, offset_in_desc, fmt, *values)
        SpyRing.written[index] = values


class Driver:
    """The hostile driver: its view of the DMA memory and of the register page."""

    def __init__(self, inp: Input, dma_table: DmaTable, regs_page: Any) -> None:
        self.inp = inp
        self.fd = os.memfd_create("fuzz-driver", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, PAGES * 4096)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.memory = mmap.mmap(self.fd, PAGES * 4096)
        self.dma_table = dma_table
        self.regs = regs_page
        dma_table.map(RW_IOVA, RW_PAGES * 4096, self.fd, 0, readable=True, writable=True)
        dma_table.map(RO_IOVA, RO_PAGES * 4096, self.fd, RW_PAGES * 4096, readable=True, writable=False)
        self.mapped = {RW_IOVA: RW_PAGES * 4096, RO_IOVA: RO_PAGES * 4096}
        self.ring_indices: list[int] = []
        self.active = False  # rewrites happen only while the device is working

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)

    # ---- addresses ------------------------------------------------------------------

    def offset_of(self, iova: int, length: int) -> int | None:
        """File offset of an IOVA range the driver can write, or None."""
        if RW_IOVA <= iova and iova + length <= RW_IOVA + RW_PAGES * 4096:
            return iova - RW_IOVA
        if RO_IOVA <= iova and iova + length <= RO_IOVA + RO_PAGES * 4096:
            return iova - RO_IOVA + RW_PAGES * 4096
        return None

    def reachable(self, iova: int, length: int, write: bool) -> bool:
        """What the IOMMU must allow: inside one current mapping with the permission."""
        if length <= 0 or iova < 0:
            return False
        for start, size in self.mapped.items():
            if start <= iova and iova + length <= start + size:
                return not write or start == RW_IOVA
        return False

    def write(self, iova: int, data: bytes) -> None:
        offset = self.offset_of(iova, len(data))
        if offset is not None:
            self.memory[offset : offset + len(data)] = data

    def read(self, iova: int, length: int) -> bytes:
        offset = self.offset_of(iova, length)
        return b"" if offset is None else bytes(self.memory[offset : offset + length])

    def reg32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.regs, offset, value & 0xFFFFFFFF)

    def get32(self, offset: int) -> int:
        value: int = _U32.unpack_from(self.regs, offset)[0]
        return value

    def get64(self, offset: int) -> int:
        value: int = _U64.unpack_from(self.regs, offset)[0]
        return value

    def a_ring_iova(self) -> int:
        kind = self.inp.below(8)
        if kind == 0:
            return RO_IOVA
        if kind == 1:
            return self.inp.interesting(64)
        if kind == 2:
            return RW_IOVA + RW_PAGES * 4096 - 64 * self.inp.below(4)
        return RW_IOVA + 1024 * self.inp.below(4)

    def a_buffer_iova(self) -> int:
        kind = self.inp.below(8)
        if kind == 0:
            return self.inp.interesting(64)
        if kind == 1:
            return RO_IOVA + 4096 * self.inp.below(RO_PAGES + 1) - self.inp.below(3) * 1000
        return RW_IOVA + 4096 * (4 + self.inp.below(4)) + self.inp.choice((0, 0, 0, 100, 4095))

    # ---- concurrent rewrites --------------------------------------------------------

    def meddle(self, ring: DeviceRing | None, index: int | None, ahead: int = 1) -> None:
        """One step of the concurrent driver, at a point where the device reads memory.

        ``ahead`` bounds which descriptors it rewrites: the one just fetched and those the
        device has not reached in this poll (not ones it completed: their write-back is
        what the oracle reads).
        """
        if not self.active:
            return
        inp = self.inp
        for _ in range(inp.below(3)):
            action = inp.below(9)
            if action == 0:
                return
            if action == 1 and ring is not None and index is not None:
                # The descriptor the device just fetched, or one it has not fetched yet.
                slot = (index + inp.below(min(3, max(1, ahead)))) & ring.mask
                start = slot * ring.desc.size
                ring.descs[start : start + ring.desc.size] = inp.take(ring.desc.size).ljust(ring.desc.size, b"\xff")
            elif action == 2 and self.ring_indices:
                ring_index = inp.choice(self.ring_indices)
                self.reg32(layout.ring_reg(ring_index, layout.RING_PROD), inp.interesting(32))
            elif action == 3 and self.ring_indices:
                ring_index = inp.choice(self.ring_indices)
                _U64.pack_into(self.regs, layout.ring_reg(ring_index, layout.RING_IOVA), inp.interesting(64))
            elif action == 4 and self.ring_indices:
                ring_index = inp.choice(self.ring_indices)
                self.reg32(layout.ring_reg(ring_index, layout.RING_SIZE), inp.interesting(32))
            elif action == 5 and self.ring_indices:
                ring_index = inp.choice(self.ring_indices)
                self.reg32(layout.ring_reg(ring_index, inp.choice((layout.RING_ENABLE, layout.RING_CONS, layout.RING_ERROR))), inp.u8() & 3)
            elif action == 6:
                self.write(self.a_buffer_iova(), inp.blob(64))
            elif action == 7:
                self.write(RW_IOVA + inp.below(RW_PAGES * 4096), inp.blob(32))


def _check_no_escape(what: str, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ContractViolation:
        raise
    except DmaFault as exc:
        raise ContractViolation(f"{what}: a DMA fault escaped the data path: {exc}") from exc


# ---- VNIC ---------------------------------------------------------------------------------


class _VnicRig:
    def __init__(self, inp: Input) -> None:
        self.inp = inp
        size = inp.choice((8, 16, 64))
        config = VnicConfig(function_id=3, mac=b"\x02\0\0\0\0\x03", ipv4=b"\x0a\0\0\x03", num_queues=1, max_ring_size=size)
        self.function = VnicFunction(config, 0.0)
        self.driver = Driver(inp, self.function.dma_table, self.function._bar)
        self.driver.ring_indices = [layout.vnic_ring_index(0, layout.RX), layout.vnic_ring_index(0, layout.TX)]
        self.ring_iova: dict[int, int] = {}  # ring index -> IOVA it was opened at
        self.fetched: list[tuple[DeviceRing, int, tuple[int, ...]]] = []
        self.translations: list[tuple[int, int, bool]] = []
        self.judged: list[bytes] = []
        self.call_start = 0  # cons when the device's current poll began
        original = self.function.dma_table.translate

        def translate(iova: int, length: int, write: bool) -> tuple[mmap.mmap, int]:
            if self.driver.active:
                self.translations.append((iova, length, write))
            result = original(iova, length, write)
            self.driver.meddle(None, None)
            return result

        self.function.dma_table.translate = translate  # type: ignore[method-assign]

    def on_fetch(self, ring: DeviceRing, index: int, values: tuple[int, ...]) -> None:
        ring_index = self.ring_index_of(ring)
        opened_at = self.ring_iova.get(ring_index)
        if opened_at is not None and not self.driver.reachable(opened_at, ring.size * ring.desc.size, False):
            raise ContractViolation(f"ring {ring_index} fetched a descriptor after its memory was unmapped")
        self.fetched.append((ring, index, values))
        self.driver.meddle(ring, index, ring.size - (index - self.call_start))

    def ring_index_of(self, ring: DeviceRing) -> int:
        if ring is self.function.rx_rings[0]:
            return layout.vnic_ring_index(0, layout.RX)
        if ring is self.function.tx_rings[0]:
            return layout.vnic_ring_index(0, layout.TX)
        return -1

    def program(self, ring_index: int) -> None:
        inp, driver = self.inp, self.driver
        size = inp.choice((8, 16, 64, 32, 5, 0))
        iova = driver.a_ring_iova()
        _U64.pack_into(driver.regs, layout.ring_reg(ring_index, layout.RING_IOVA), iova)
        driver.reg32(layout.ring_reg(ring_index, layout.RING_SIZE), size)
        driver.reg32(layout.ring_reg(ring_index, layout.RING_ENABLE), 1 if inp.below(8) else 0)
        driver.reg32(layout.ring_reg(ring_index, layout.RING_PROD), 0)
        driver.reg32(layout.ring_reg(ring_index, layout.RING_CONS), 0)
        for slot in range(min(size, 64)):
            length = inp.choice((60, 14, 13, 1514, 1515, 0, 2048, inp.u16()))
            desc = layout.VNIC_DESC.pack(driver.a_buffer_iova() & 0xFFFFFFFFFFFFFFFF, length, 0, 0, 0)
            driver.write(iova + slot * 16, desc)
        driver.reg32(layout.ring_reg(ring_index, layout.RING_PROD), inp.choice((size, 1, 3, size + 1, inp.u32())))

    def sync(self) -> None:
        function = self.function
        before = (function.rx_rings[0], function.tx_rings[0])
        _check_no_escape("sync_rings", function.sync_rings)
        for direction, ring in ((layout.RX, function.rx_rings[0]), (layout.TX, function.tx_rings[0])):
            ring_index = layout.vnic_ring_index(0, direction)
            if ring is None:
                self.ring_iova.pop(ring_index, None)
                continue
            if ring not in before:
                # Opened just now: the registers still hold what the device checked.
                self.ring_iova[ring_index] = self.driver.get64(layout.ring_reg(ring_index, layout.RING_IOVA))
                ring.__class__ = SpyRing

    def transmit(self, allowed_mask: int) -> None:
        function, driver = self.function, self.driver
        ring = function.tx_rings[0]
        ring_index = layout.vnic_ring_index(0, layout.TX)
        if ring is None:
            return
        prod = driver.get32(layout.ring_reg(ring_index, layout.RING_PROD))
        cons = ring.cons
        self.call_start = cons
        SpyRing.written.clear()
        self.fetched.clear()
        self.translations.clear()
        self.judged.clear()

        def allowed(_function_id: int, frame: bytes) -> bool:
            self.judged.append(frame)
            driver.meddle(None, None)
            return bool(allowed_mask >> (len(self.judged) % 8) & 1)

        driver.active = True
        try:
            frames, _wait = _check_no_escape("transmit", lambda: function.transmit(0, 64, 0.0, allowed))
        finally:
            driver.active = False
        ahead = (prod - cons) & 0xFFFFFFFF
        if ahead > ring.size:
            if self.fetched or frames:
                raise ContractViolation(f"TX used a ring whose prod was {ahead} ahead of cons (size {ring.size})")
            return
        if len(self.fetched) != min(ahead, 64):
            raise ContractViolation(f"TX fetched {len(self.fetched)} descriptors, {ahead} were posted")
        expected_translations: list[tuple[int, int, bool]] = []
        expected_frames: list[bytes] = []
        judged = iter(self.judged)
        judged_count = 0
        for number, (_ring, index, values) in enumerate(self.fetched):
            if index != cons + number:
                raise ContractViolation(f"TX fetched descriptor {index}, expected {cons + number}")
            iova, length = values[0], values[1]
            status = layout.DESC_OK
            if not 14 <= length <= ABI_MAX_FRAME:
                status = layout.DESC_BAD_LENGTH
            else:
                expected_translations.append((iova, length, False))
                if not driver.reachable(iova, length, False):
                    status = layout.DESC_IOMMU_FAULT
                else:
                    frame = next(judged, None)
                    if frame is None or len(frame) != length:
                        raise ContractViolation(f"TX judged a frame of {None if frame is None else len(frame)} bytes, descriptor said {length}")
                    judged_count += 1
                    if allowed_mask >> (judged_count % 8) & 1:
                        expected_frames.append(frame)
                    else:
                        status = layout.DESC_TX_FILTERED
            written = SpyRing.written.get(index, (None, None, None))
            if written[2] != status or written[0] != length:
                raise ContractViolation(f"TX descriptor {index}: wrote length {written[0]} status {written[2]}, expected {length}/{status}")
        if self.translations != expected_translations:
            raise ContractViolation(f"TX translated {self.translations}, the fetched descriptors say {expected_translations}")
        if frames != expected_frames:
            raise ContractViolation("TX put on the wire bytes other than those the filter judged")

    def deliver(self, frame: bytes) -> None:
        function, driver = self.function, self.driver
        ring = function.rx_rings[0]
        ring_index = layout.vnic_ring_index(0, layout.RX)
        if ring is None:
            return
        prod = driver.get32(layout.ring_reg(ring_index, layout.RING_PROD))
        cons = ring.cons
        self.call_start = cons
        SpyRing.written.clear()
        self.fetched.clear()
        self.translations.clear()
        driver.active = True
        try:
            delivered = _check_no_escape("deliver", lambda: function.deliver(0, frame, 0.0))
        finally:
            driver.active = False
        ahead = (prod - cons) & 0xFFFFFFFF
        if ahead == 0 or ahead > ring.size:
            if self.fetched or delivered:
                raise ContractViolation(f"RX used a ring with {ahead} posted of {ring.size}")
            return
        if len(self.fetched) != 1:
            raise ContractViolation(f"RX fetched {len(self.fetched)} descriptors for one frame")
        _ring, index, values = self.fetched[0]
        iova, capacity = values[0], values[1]
        expected: list[tuple[int, int, bool]] = []
        status = layout.DESC_OK
        if len(frame) > capacity:
            status = layout.DESC_BAD_LENGTH
        else:
            expected.append((iova, len(frame), True))
            if not driver.reachable(iova, len(frame), True):
                status = layout.DESC_IOMMU_FAULT
        if self.translations != expected:
            raise ContractViolation(f"RX translated {self.translations}, the fetched descriptor says {expected}")
        if delivered != (status == layout.DESC_OK):
            raise ContractViolation(f"RX returned {delivered} for status {status}")
        if status == layout.DESC_OK and driver.read(iova, len(frame)) != frame:
            raise ContractViolation("RX frame not where the fetched descriptor pointed")
        written = SpyRing.written.get(index, (None, None, None))
        if written[2] != status:
            raise ContractViolation(f"RX descriptor {index}: status {written[2]}, expected {status}")

    def unmap(self) -> None:
        driver = self.driver
        iova = driver.inp.choice((RW_IOVA, RO_IOVA))
        if iova not in driver.mapped:
            return
        try:
            self.function.dma_table.unmap(iova, driver.mapped[iova])
        except VfioError:
            return
        del driver.mapped[iova]

    def close(self) -> None:
        self.function.close()
        self.driver.close()


def one_input_vnic_double_fetch(data: bytes) -> None:
    inp = Input(data)
    rig = _VnicRig(inp)
    SpyRing.on_fetch = rig.on_fetch
    try:
        for step in range(1 + inp.below(12)):
            if inp.exhausted and step:
                break
            action = inp.below(8)
            if action == 0:
                rig.program(inp.choice(rig.driver.ring_indices))
            elif action == 1:
                rig.sync()
            elif action in (2, 3, 4):
                rig.sync()
                rig.transmit(inp.u8())
            elif action in (5, 6):
                rig.sync()
                rig.deliver(inp.blob(1600) or bytes(60))
            else:
                rig.unmap()
    finally:
        SpyRing.on_fetch = None
        rig.close()


def seeds_vnic_double_fetch() -> list[bytes]:
    return [
        bytes([0, 1, 3, 1, 0, 0, 0, 0, 2, 0xFF]) + bytes(range(200)),
        bytes([0, 0, 3, 1, 0, 0, 5, 0]) + bytes(range(100, 255)),
        bytes([3, 0, 1, 5, 1, 7, 0, 2, 0xAA, 3, 1]) * 8,
    ]


# ---- VSIC ---------------------------------------------------------------------------------


class _MemoryStorage:
    """The device's backing store: records every transfer for the oracle."""

    def __init__(self, blocks: int, driver: Driver) -> None:
        self.image = bytearray(blocks * BLOCK_SIZE)
        self.calls: list[tuple[str, int, int]] = []
        self.driver = driver
        self.fail = False

    def read_into(self, physical_block: int, view: memoryview) -> None:
        self._check(physical_block, view)
        self.calls.append(("read", physical_block, view.nbytes // BLOCK_SIZE))
        self.driver.meddle(None, None)
        if self.fail:
            raise OSError(5, "injected I/O error")
        view[:] = self.image[physical_block * BLOCK_SIZE : physical_block * BLOCK_SIZE + view.nbytes]

    def write_from(self, physical_block: int, view: memoryview) -> None:
        self._check(physical_block, view)
        self.calls.append(("write", physical_block, view.nbytes // BLOCK_SIZE))
        self.driver.meddle(None, None)
        if self.fail:
            raise OSError(5, "injected I/O error")
        self.image[physical_block * BLOCK_SIZE : physical_block * BLOCK_SIZE + view.nbytes] = view

    def flush(self) -> None:
        self.calls.append(("flush", 0, 0))
        if self.fail:
            raise OSError(5, "injected I/O error")

    def _check(self, physical_block: int, view: memoryview) -> None:
        if view.nbytes % BLOCK_SIZE or view.nbytes == 0:
            raise ContractViolation(f"a transfer of {view.nbytes} bytes is not whole blocks")
        if physical_block < 0 or (physical_block * BLOCK_SIZE + view.nbytes) > len(self.image):
            raise ContractViolation(f"a transfer at physical block {physical_block} leaves the image")


class _VsicRig:
    def __init__(self, inp: Input) -> None:
        self.inp = inp
        extents: list[tuple[int, int]] = []
        for _ in range(1 + inp.below(3)):
            extents.append((inp.below(64), 1 + inp.below(16)))
        try:
            self.vsa = VirtualStorageArea(extents, 64, read_only=inp.below(4) == 0)
        except VsaError:
            self.vsa = VirtualStorageArea([(0, 8)], 64, read_only=False)
        config = VsicConfig(function_id=4, extents=list(self.vsa.extents), read_only=self.vsa.read_only, num_queues=1, max_ring_size=inp.choice((8, 16, 64)))
        self.storage: _MemoryStorage | None = None
        placeholder = _MemoryStorage(64, None)  # type: ignore[arg-type]
        self.function = VsicFunction(config, self.vsa, placeholder, 0.0)
        self.driver = Driver(inp, self.function.dma_table, self.function._bar)
        self.storage = _MemoryStorage(64, self.driver)
        self.function.storage = self.storage
        self.driver.ring_indices = [0]
        self.ring_iova: int | None = None
        self.call_start = 0  # cons when the device's current poll began
        self.fetched: list[tuple[DeviceRing, int, tuple[int, ...]]] = []
        self.translations: list[tuple[int, int, bool]] = []
        original = self.function.dma_table.translate

        def translate(iova: int, length: int, write: bool) -> tuple[mmap.mmap, int]:
            if self.driver.active:
                self.translations.append((iova, length, write))
            result = original(iova, length, write)
            self.driver.meddle(None, None)
            return result

        self.function.dma_table.translate = translate  # type: ignore[method-assign]

    def on_fetch(self, ring: DeviceRing, index: int, values: tuple[int, ...]) -> None:
        if self.ring_iova is not None and not self.driver.reachable(self.ring_iova, ring.size * ring.desc.size, False):
            raise ContractViolation("request ring fetched after its memory was unmapped")
        self.fetched.append((ring, index, values))
        self.driver.meddle(ring, index, ring.size - (index - self.call_start))

    def program(self) -> None:
        inp, driver = self.inp, self.driver
        size = inp.choice((8, 16, 64, 32, 5))
        iova = driver.a_ring_iova()
        _U64.pack_into(driver.regs, layout.ring_reg(0, layout.RING_IOVA), iova)
        driver.reg32(layout.ring_reg(0, layout.RING_SIZE), size)
        driver.reg32(layout.ring_reg(0, layout.RING_ENABLE), 1 if inp.below(8) else 0)
        driver.reg32(layout.ring_reg(0, layout.RING_PROD), 0)
        driver.reg32(layout.ring_reg(0, layout.RING_CONS), 0)
        capacity = self.vsa.capacity_blocks
        for slot in range(min(size, 64)):
            opcode = inp.choice((1, 2, 3, 1, 2, 0, 4, inp.u8()))
            flags = inp.choice((0, 0, 0, 1, 2, inp.u8()))
            block = inp.choice((0, capacity - 1, capacity, inp.below(capacity + 1), inp.interesting(64)))
            count = inp.choice((1, 2, 256, 257, 0, capacity, inp.interesting(32)))
            desc = layout.VSIC_DESC.pack(opcode, flags, 0, inp.u32(), block & (2**64 - 1), count & 0xFFFFFFFF, 0, driver.a_buffer_iova() & (2**64 - 1))
            driver.write(iova + slot * layout.VSIC_DESC_SIZE, desc)
        driver.reg32(layout.ring_reg(0, layout.RING_PROD), inp.choice((size, 1, 3, size + 1, inp.u32())))

    def sync(self) -> None:
        function = self.function
        before = function.rings[0]
        _check_no_escape("sync_rings", function.sync_rings)
        ring = function.rings[0]
        if ring is None:
            self.ring_iova = None
        elif ring is not before:
            self.ring_iova = self.driver.get64(layout.ring_reg(0, layout.RING_IOVA))
            ring.__class__ = SpyRing

    def expected_status(self, values: tuple[int, ...]) -> tuple[int, list[tuple[int, int, bool]]]:
        """Status and translations due for one fetched request, from the fetched copy only."""
        opcode, flags, _status, _tag, block, count, _reserved, buffer_iova = values
        if flags & ~layout.VSIC_KNOWN_FLAGS:
            return layout.DESC_BAD_OPCODE, []
        if opcode == layout.VSIC_OP_FLUSH:
            return (layout.DESC_BAD_OPCODE if flags else layout.DESC_OK), []
        if opcode == layout.VSIC_OP_READ:
            if flags:
                return layout.DESC_BAD_OPCODE, []
            write = False
        elif opcode == layout.VSIC_OP_WRITE:
            write = True
            if self.vsa.read_only:
                return layout.DESC_READ_ONLY, []
        else:
            return layout.DESC_BAD_OPCODE, []
        if not 1 <= count <= layout.VSIC_MAX_REQUEST_BLOCKS:
            return layout.DESC_BAD_LENGTH, []
        if not (0 <= block and block + count <= self.vsa.capacity_blocks):
            return layout.DESC_OUT_OF_RANGE, []
        if buffer_iova % BLOCK_SIZE:
            return layout.DESC_MISALIGNED, []
        nbytes = count * BLOCK_SIZE
        translation = (buffer_iova, nbytes, not write)
        if not self.driver.reachable(buffer_iova, nbytes, not write):
            return layout.DESC_IOMMU_FAULT, [translation]
        return layout.DESC_OK, [translation, translation]

    def physical(self, block: int, count: int) -> list[tuple[int, int]]:
        runs: list[tuple[int, int]] = []
        position = 0
        for physical, extent_count in self.vsa.extents:
            lo = max(block, position)
            hi = min(block + count, position + extent_count)
            if lo < hi:
                runs.append((physical + lo - position, hi - lo))
            position += extent_count
        return runs

    def process(self) -> None:
        function, driver, storage = self.function, self.driver, self.storage
        assert storage is not None
        ring = function.rings[0]
        if ring is None:
            return
        prod = driver.get32(layout.ring_reg(0, layout.RING_PROD))
        cons = ring.cons
        self.call_start = cons
        SpyRing.written.clear()
        self.fetched.clear()
        self.translations.clear()
        storage.calls.clear()
        storage.fail = self.inp.below(16) == 0
        driver.active = True
        try:
            done, _wait = _check_no_escape("process", lambda: function.process(0, 32, 0.0))
        finally:
            driver.active = False
        ahead = (prod - cons) & 0xFFFFFFFF
        if ahead > ring.size:
            if self.fetched or done:
                raise ContractViolation(f"VSIC used a ring whose prod was {ahead} ahead (size {ring.size})")
            return
        if done != len(self.fetched) or done != min(ahead, 32):
            raise ContractViolation(f"VSIC completed {done} and fetched {len(self.fetched)} of {ahead} posted")
        expected_translations: list[tuple[int, int, bool]] = []
        expected_calls: list[tuple[str, int, int]] = []
        for number, (_ring, index, values) in enumerate(self.fetched):
            if index != cons + number:
                raise ContractViolation(f"VSIC fetched request {index}, expected {cons + number}")
            status, translations = self.expected_status(values)
            expected_translations += translations
            opcode, flags, _status, tag, block, count = values[:6]
            if status == layout.DESC_OK:
                if opcode == layout.VSIC_OP_FLUSH:
                    expected_calls.append(("flush", 0, 0))
                else:
                    kind = "write" if opcode == layout.VSIC_OP_WRITE else "read"
                    runs = self.physical(block, count)
                    if storage.fail:
                        runs = runs[:1]
                    expected_calls += [(kind, physical, run) for physical, run in runs]
                    if kind == "write" and flags & layout.VSIC_FLAG_FUA and not storage.fail:
                        expected_calls.append(("flush", 0, 0))
                if storage.fail:
                    status = layout.DESC_IO_ERROR
            written_status, written_tag = SpyRing.written.get(index, (None, None))
            if written_status != status or written_tag != tag:
                raise ContractViolation(f"VSIC request {index} {values}: completed {written_status}/{written_tag}, expected {status}/{tag}")
        if self.translations != expected_translations:
            raise ContractViolation(f"VSIC translated {self.translations}, the fetched requests say {expected_translations}")
        if storage.calls != expected_calls:
            raise ContractViolation(f"VSIC did I/O {storage.calls}, the fetched requests say {expected_calls}")

    def unmap(self) -> None:
        driver = self.driver
        iova = driver.inp.choice((RW_IOVA, RO_IOVA))
        if iova not in driver.mapped:
            return
        try:
            self.function.dma_table.unmap(iova, driver.mapped[iova])
        except VfioError:
            return
        del driver.mapped[iova]

    def close(self) -> None:
        self.function.close()
        self.driver.close()


def one_input_vsic_double_fetch(data: bytes) -> None:
    inp = Input(data)
    rig = _VsicRig(inp)
    SpyRing.on_fetch = rig.on_fetch
    try:
        for step in range(1 + inp.below(12)):
            if inp.exhausted and step:
                break
            action = inp.below(6)
            if action == 0:
                rig.program()
            elif action == 1:
                rig.sync()
            elif action in (2, 3, 4):
                rig.sync()
                rig.process()
            else:
                rig.unmap()
    finally:
        SpyRing.on_fetch = None
        rig.close()


def seeds_vsic_double_fetch() -> list[bytes]:
    return [
        bytes([0, 0, 0, 0, 0, 0, 0, 2, 0]) + bytes(range(0, 250, 2)),
        bytes([1, 4, 1, 0, 0, 3, 1, 1, 0, 0, 0, 2, 3]) * 10,
        bytes([2, 8, 2, 3, 0, 0, 3, 5, 0, 5, 2]) * 12,
    ]
