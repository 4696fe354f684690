"""The VSIC: VSA translation, the function's request path on a fake clock, and the device
host with the libOS driver, block device and persistent log on top of it.

The device host runs in a thread of the test process (``HostRig``), over an image file under
/var/tmp named ``arx-h10b-*``; ``FunctionRig`` drives one function directly, with no host,
socket or thread, so limits and request checks run on a fake clock.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.driver.vsic import IOVA_BASE, Completion, RingFull, VsicDriver, VsicDriverError
from libos.storage.blockdev import BlockDeviceError
from libos.storage.log import PersistentLog
from libos.storage.vsic_blockdev import VsicBlockDevice, VsicIoError
from tests.helpers import scattered_extents
from vdev import layout, mgmt
from vdev.ring import DriverRing
from vdev.vsic.device import BackingStore, VsicDevice
from vdev.vsic.function import FunctionConfig, VirtualStorageArea, VsaError, VsicFunction
from vdev.vsic.host import DeviceHost

TAG = "arx-h10b-"
BS = layout.VSIC_BLOCK_SIZE
REPO = Path(__file__).resolve().parent.parent


def make_image(blocks: int, directory: str = "/var/tmp", fill: bytes | None = None) -> str:
    fd, path = tempfile.mkstemp(prefix=TAG, suffix=".img", dir=directory)
    try:
        os.write(fd, fill if fill is not None else os.urandom(blocks * BS))
    finally:
        os.close(fd)
    return path


def image_blocks(path: str, first: int, count: int) -> bytes:
    with open(path, "rb") as image:
        image.seek(first * BS)
        return image.read(count * BS)


def digest_outside(path: str, extents: list[tuple[int, int]]) -> str:
    """sha256 of the image with the given extents' blocks left out."""
    data = bytearray(Path(path).read_bytes())
    for first, count in extents:
        data[first * BS : (first + count) * BS] = bytes(count * BS)
    return hashlib.sha256(data).hexdigest()


# ---- the device host with its management channel --------------------------------------


class HostRig:
    """A VSIC device host over ``image``: in a thread, or as a child process (``process``)."""

    def __init__(self, image: str, *, process: bool = False, direct: bool = True) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.settimeout(10)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self.thread: threading.Thread | None = None
        self.child: subprocess.Popen[bytes] | None = None
        if process:
            argv = [sys.executable, "-m", "vdev.vsic.host", "--image", image, "--mgmt-fd", str(theirs.fileno())]
            if not direct:
                argv.append("--no-direct")
            self.child = subprocess.Popen(argv, pass_fds=[theirs.fileno()], cwd=REPO)
            theirs.close()
        else:
            host = DeviceHost(VsicDevice(BackingStore(image, direct=direct)), theirs)

            def run() -> None:
                try:
                    host.run()
                finally:
                    host.close()
                    theirs.close()

            self.thread = threading.Thread(target=run, name="vsic-host", daemon=True)
            self.thread.start()

    def request(self, op: str, fds: list[int] | None = None, **fields: Any) -> dict[str, Any]:
        self._next_id += 1
        mgmt.send_message(self.ours, {"id": self._next_id, "op": op, **fields}, fds)
        while True:
            received = mgmt.recv_message(self.ours)
            assert received is not None, "the device host closed the management channel"
            message, _fds = received
            if "event" in message:
                self.events.append(message)
                continue
            assert message["id"] == self._next_id
            return message

    def call(self, op: str, fds: list[int] | None = None, **fields: Any) -> Any:
        reply = self.request(op, fds, **fields)
        assert reply["ok"], reply
        return reply["result"]

    def open_function(self, function_id: int, extents: list[tuple[int, int]], **fields: Any) -> socket.socket:
        app_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.call("create_function", [device_end.fileno()], function_id=function_id, extents=[list(e) for e in extents], **fields)
        finally:
            device_end.close()
        return app_end

    def function_stats(self, function_id: int) -> dict[str, Any]:
        for function in self.call("stats")["functions"]:
            if function["function_id"] == function_id:
                return dict(function)
        raise AssertionError(f"no function {function_id}")

    @property
    def alive(self) -> bool:
        if self.child is not None:
            return self.child.poll() is None
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        try:
            if self.alive:
                self.call("shutdown")
        finally:
            self.ours.close()
            if self.child is not None:
                try:
                    self.child.wait(10)
                except subprocess.TimeoutExpired:
                    self.child.kill()
                    self.child.wait()
            if self.thread is not None:
                self.thread.join(10)


@pytest.fixture
def image() -> Iterator[str]:
    path = make_image(256)
    try:
        yield path
    finally:
        os.unlink(path)


@pytest.fixture
def rig(image: str) -> Iterator[HostRig]:
    host = HostRig(image)
    try:
        yield host
    finally:
        host.stop()
    assert host.thread is not None and not host.thread.is_alive()


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.001)


def saw_closed(rig: HostRig, function_id: int) -> bool:
    rig.request("stats")  # events arrive between replies
    return {"event": "function_closed", "function_id": function_id} in rig.events


# ---- one function without a host: fake storage, fake clock ----------------------------


class RamStorage:
    """A Storage in memory that remembers which physical blocks were written."""

    def __init__(self, blocks: int) -> None:
        self.data = bytearray(os.urandom(blocks * BS))
        self.written: set[int] = set()
        self.flushes = 0
        self.fail = False

    def read_into(self, physical_block: int, view: memoryview) -> None:
        if self.fail:
            raise OSError(5, "injected")
        view[:] = self.data[physical_block * BS : physical_block * BS + view.nbytes]

    def write_from(self, physical_block: int, view: memoryview) -> None:
        if self.fail:
            raise OSError(5, "injected")
        self.data[physical_block * BS : physical_block * BS + view.nbytes] = view
        self.written.update(range(physical_block, physical_block + view.nbytes // BS))

    def flush(self) -> None:
        self.flushes += 1


class FunctionRig:
    """A VsicFunction with a mapped memfd and a DriverRing on its register page."""

    RING = 16
    MEM = 64 * BS

    def __init__(
        self,
        extents: list[tuple[int, int]],
        storage_blocks: int = 256,
        read_only: bool = False,
        iops: int = 0,
        bps: int = 0,
        function: VsicFunction | None = None,
    ) -> None:
        self.storage = RamStorage(storage_blocks)
        if function is None:
            config = FunctionConfig(function_id=1, extents=extents, read_only=read_only, iops=iops, bps=bps)
            function = VsicFunction(config, VirtualStorageArea(extents, storage_blocks, read_only), self.storage, 0.0)
        self.function = function
        self.fd = os.memfd_create(TAG + "rig", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.MEM)
        import fcntl
        import mmap

        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        self.mem = mmap.mmap(self.fd, self.MEM)
        self.function.dma_table.map(IOVA_BASE, self.MEM, self.fd, 0, True, True)
        ring_bytes = self.RING * layout.VSIC_DESC_SIZE
        self.ring = DriverRing(self.function.regs, 0, memoryview(self.mem)[:ring_bytes], self.RING, layout.VSIC_DESC)
        self.ring.enable(IOVA_BASE)
        self.function.sync_rings()
        self.buffer = IOVA_BASE + BS  # the first page after the ring

    def post(self, opcode: int, block: int, count: int, iova: int | None = None, flags: int = 0, tag: int = 7) -> None:
        self.ring.post(opcode, flags, 0, tag, block, count, 0, self.buffer if iova is None else iova)
        self.ring.publish()

    def process(self, now: float = 0.0, budget: int = 64) -> tuple[int, float]:
        return self.function.process(0, budget, now)

    def reap(self) -> list[tuple[int, int]]:
        """(status, tag) of every completion not yet reaped."""
        done = self.ring.completed()
        out = []
        for i in range(done):
            fields = self.ring.peek(self.ring.reaped + i)
            out.append((fields[2], fields[3]))
        self.ring.reap(done)
        return out

    def close(self) -> None:
        self.ring.descs.release()
        self.function.close()
        self.mem.close()
        os.close(self.fd)


@pytest.fixture
def frig() -> Iterator[FunctionRig]:
    r = FunctionRig([(100, 8), (10, 8)])
    try:
        yield r
    finally:
        r.close()


# ---- VSA translation -------------------------------------------------------------------


@pytest.mark.parametrize(
    "extents, image_blocks, message",
    [
        ([], 100, "1.."),
        ([(0, 0)], 100, "inside"),
        ([(-1, 4)], 100, "inside"),
        ([(98, 4)], 100, "inside"),
        ([(0, 101)], 100, "inside"),
        ([(0, 10), (5, 10)], 100, "overlap"),
        ([(20, 10), (0, 21)], 100, "overlap"),
        ([(True, 4)], 100, "integers"),
        ([(0, 4.0)], 100, "integers"),
        ([(0, 4, 5)], 100, "extent is"),
        ([(2**64 - 1, 2)], 2**64, "inside"),
    ],
)
def test_vsa_refuses_bad_extents(extents: Any, image_blocks: int, message: str) -> None:
    with pytest.raises(VsaError, match=message):
        VirtualStorageArea(extents, image_blocks)


@pytest.mark.parametrize(
    "vsa_block, count, inside",
    [
        (0, 1, True),
        (0, 16, True),
        (15, 1, True),
        (16, 0, True),
        (16, 1, False),
        (15, 2, False),
        (0, 17, False),
        (2**64 - 1, 1, False),
        (2**64 - 1, 2, False),  # wraps to 0 in 64-bit arithmetic
        (1, 2**64 - 1, False),
        (-1, 1, False),
        (0, -1, False),
    ],
)
def test_vsa_range_check_is_overflow_safe(vsa_block: int, count: int, inside: bool) -> None:
    vsa = VirtualStorageArea([(100, 8), (10, 8)], 256)
    assert vsa.capacity_blocks == 16
    assert vsa.in_range(vsa_block, count) is inside


def test_vsa_translates_across_extents() -> None:
    vsa = VirtualStorageArea([(100, 8), (10, 8), (50, 1)], 256)
    assert vsa.physical_runs(0, 8) == [(100, 8)]
    assert vsa.physical_runs(6, 4) == [(106, 2), (10, 2)]
    assert vsa.physical_runs(7, 10) == [(107, 1), (10, 8), (50, 1)]
    assert vsa.physical_runs(16, 1) == [(50, 1)]


@st.composite
def _extents_and_range(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, int]:
    extents = scattered_extents(draw, 6, 4)
    capacity = sum(size for _, size in extents)
    start = draw(st.integers(0, capacity - 1))
    count = draw(st.integers(1, capacity - start))
    return list(extents), start, count


@given(_extents_and_range())
def test_vsa_runs_match_a_block_by_block_map(case: tuple[list[tuple[int, int]], int, int]) -> None:
    extents, start, count = case
    vsa = VirtualStorageArea(extents, 10_000)
    naive = [physical + i for physical, size in extents for i in range(size)]
    got = [physical + i for physical, run in vsa.physical_runs(start, count) for i in range(run)]
    assert got == naive[start : start + count]


# ---- the request path of one function ----------------------------------------------------


def test_function_reads_and_writes_through_the_extents(frig: FunctionRig) -> None:
    payload = os.urandom(4 * BS)
    frig.mem[BS : 5 * BS] = payload
    frig.post(layout.VSIC_OP_WRITE, 6, 4, flags=layout.VSIC_FLAG_FUA, tag=41)
    frig.post(layout.VSIC_OP_FLUSH, 0, 0, iova=0, tag=42)
    assert frig.process() == (2, 0.0)
    assert frig.reap() == [(layout.DESC_OK, 41), (layout.DESC_OK, 42)]
    # VSA blocks 6..9 are physical 106, 107, 10, 11.
    assert frig.storage.written == {106, 107, 10, 11}
    assert frig.storage.data[106 * BS : 108 * BS] == payload[: 2 * BS]
    assert frig.storage.data[10 * BS : 12 * BS] == payload[2 * BS :]
    assert frig.storage.flushes == 2  # the FUA write-through and the flush
    frig.mem[BS : 5 * BS] = bytes(4 * BS)
    frig.post(layout.VSIC_OP_READ, 6, 4, tag=43)
    frig.process()
    assert frig.reap() == [(layout.DESC_OK, 43)]
    assert frig.mem[BS : 5 * BS] == payload
    counters = frig.function.counters
    assert (counters.reads, counters.writes, counters.fua_writes, counters.flushes) == (1, 1, 1, 1)
    assert (counters.read_bytes, counters.write_bytes) == (4 * BS, 4 * BS)


@pytest.mark.parametrize(
    "opcode, block, count, iova_delta, flags, status",
    [
        (layout.VSIC_OP_READ, 16, 1, 0, 0, layout.DESC_OUT_OF_RANGE),
        (layout.VSIC_OP_WRITE, 15, 2, 0, 0, layout.DESC_OUT_OF_RANGE),
        (layout.VSIC_OP_WRITE, 2**64 - 1, 2, 0, 0, layout.DESC_OUT_OF_RANGE),
        (layout.VSIC_OP_READ, 0, 0, 0, 0, layout.DESC_BAD_LENGTH),
        (layout.VSIC_OP_READ, 0, layout.VSIC_MAX_REQUEST_BLOCKS + 1, 0, 0, layout.DESC_BAD_LENGTH),
        (layout.VSIC_OP_READ, 0, 2**32 - 1, 0, 0, layout.DESC_BAD_LENGTH),
        (layout.VSIC_OP_READ, 0, 1, 512, 0, layout.DESC_MISALIGNED),
        (layout.VSIC_OP_WRITE, 0, 1, 62 * BS, 0, layout.DESC_IOMMU_FAULT),  # past the map
        (layout.VSIC_OP_WRITE, 0, 2, 61 * BS, 0, layout.DESC_IOMMU_FAULT),  # straddles its end
        (layout.VSIC_OP_READ, 0, 1, -IOVA_BASE, 0, layout.DESC_IOMMU_FAULT),
        (0, 0, 1, 0, 0, layout.DESC_BAD_OPCODE),
        (200, 0, 1, 0, 0, layout.DESC_BAD_OPCODE),
        (layout.VSIC_OP_WRITE, 0, 1, 0, 0x80, layout.DESC_BAD_OPCODE),
        (layout.VSIC_OP_READ, 0, 1, 0, layout.VSIC_FLAG_FUA, layout.DESC_BAD_OPCODE),
        (layout.VSIC_OP_FLUSH, 0, 0, 0, layout.VSIC_FLAG_FUA, layout.DESC_BAD_OPCODE),
    ],
)
def test_function_refuses_bad_requests(
    frig: FunctionRig, opcode: int, block: int, count: int, iova_delta: int, flags: int, status: int
) -> None:
    before = bytes(frig.storage.data)
    frig.post(opcode, block, count, iova=IOVA_BASE + 2 * BS + iova_delta, flags=flags, tag=99)
    frig.process()
    assert frig.reap() == [(status, 99)]
    assert bytes(frig.storage.data) == before
    assert frig.function.counters.error_completions == 1
    assert frig.function.regs.read64(layout.ring_reg(0, layout.RING_ERROR_COMPLETIONS)) == 1


def test_read_only_vsa_refuses_writes_and_serves_reads() -> None:
    frig = FunctionRig([(0, 8)], read_only=True)
    try:
        assert frig.function.regs.read32(layout.REG_STATUS) & layout.STATUS_READ_ONLY
        frig.post(layout.VSIC_OP_WRITE, 0, 1, tag=1)
        frig.post(layout.VSIC_OP_READ, 0, 1, tag=2)
        frig.process()
        assert frig.reap() == [(layout.DESC_READ_ONLY, 1), (layout.DESC_OK, 2)]
        assert frig.storage.written == set()
    finally:
        frig.close()


def test_storage_failure_completes_with_io_error(frig: FunctionRig) -> None:
    frig.storage.fail = True
    frig.post(layout.VSIC_OP_READ, 0, 1, tag=5)
    frig.process()
    assert frig.reap() == [(layout.DESC_IO_ERROR, 5)]
    assert frig.function.counters.io_errors == 1


def test_poll_work_is_bounded_by_the_budget(frig: FunctionRig) -> None:
    for tag in range(12):
        frig.ring.post(layout.VSIC_OP_FLUSH, 0, 0, tag, 0, 0, 0, 0)
    frig.ring.publish()
    assert frig.process(budget=5) == (5, 0.0)
    assert frig.process(budget=5) == (5, 0.0)
    assert frig.process(budget=5) == (2, 0.0)
    assert [tag for _status, tag in frig.reap()] == list(range(12))


def test_unmapping_the_ring_stops_it(frig: FunctionRig) -> None:
    frig.function.dma_table.unmap(IOVA_BASE, FunctionRig.MEM)
    assert frig.ring.error == layout.RING_ERR_UNMAPPED
    assert frig.function.rings[0] is None
    assert frig.process() == (0, 0.0)


def test_iops_limit_shapes_on_a_fake_clock() -> None:
    frig = FunctionRig([(0, 64)], iops=100)
    try:
        burst = frig.function.limiter.burst_requests
        for tag in range(burst + 4):
            frig.ring.post(layout.VSIC_OP_READ, 0, 0, tag, 0, 1, 0, frig.buffer)
        frig.ring.publish()
        done, wait = frig.process(now=0.0)
        assert done == burst and wait > 0
        assert frig.function.counters.rate_delayed == 1
        assert frig.process(now=0.001) == (0, pytest.approx(0.009))  # 1 ms earns 0.1 request
        done, _ = frig.process(now=0.0101)  # 10 ms earns one
        assert done == 1
        done, _ = frig.process(now=1.0)  # the rest: the bucket is full again
        assert done == 3
        assert all(status == layout.DESC_OK for status, _tag in frig.reap())
    finally:
        frig.close()


def test_bandwidth_limit_shapes_on_a_fake_clock() -> None:
    rate = 8 * 1024 * 1024  # 1 MiB/s in bits
    frig = FunctionRig([(0, 64)], bps=rate)
    try:
        burst_blocks = frig.function.limiter.burst_bytes // BS
        for tag in range(burst_blocks // 8 + 2):
            frig.ring.post(layout.VSIC_OP_READ, 0, 0, tag, 0, 8, 0, frig.buffer)
        frig.ring.publish()
        done, wait = frig.process(now=0.0)
        assert done == burst_blocks // 8
        assert wait == pytest.approx(8 * BS / (rate / 8))
        assert frig.process(now=wait / 2)[0] == 0
        assert frig.process(now=wait + 1e-6)[0] == 1
        # Changing the limits takes effect at once: unlimited lets the rest through.
        frig.function.set_limits(0, 0, wait + 1e-6)
        assert frig.process(now=wait + 1e-6)[0] == 1
    finally:
        frig.close()


# ---- the device host, the driver and the block device ---------------------------------


def test_driver_round_trip_with_flush_and_fua(rig: HostRig, image: str) -> None:
    driver = VsicDriver(rig.open_function(1, [(200, 16), (40, 16)]), ring_size=16, slot_blocks=8)
    try:
        assert (driver.capacity_blocks, driver.read_only) == (32, False)
        first, second = os.urandom(8 * BS), os.urandom(2 * BS)
        tags = [
            driver.submit(layout.VSIC_OP_WRITE, 12, 8, first),  # straddles both extents
            driver.submit(layout.VSIC_OP_WRITE, 30, 2, second, fua=True),
            driver.submit(layout.VSIC_OP_FLUSH, 0, 0),
            driver.submit(layout.VSIC_OP_READ, 12, 8),
        ]
        completions: list[Completion] = []
        deadline = time.monotonic() + 10
        while len(completions) < 4 and time.monotonic() < deadline:
            completions += driver.poll()
            if len(completions) < 4:
                driver.wait(0.05)
        assert [c.tag for c in completions] == tags
        assert all(c.ok for c in completions), completions
        assert completions[3].data == first
        assert image_blocks(image, 212, 4) == first[: 4 * BS]
        assert image_blocks(image, 40, 4) == first[4 * BS :]
        assert image_blocks(image, 54, 2) == second
        stats = rig.function_stats(1)
        counters = stats["counters"]
        assert (counters["writes"], counters["fua_writes"], counters["flushes"], counters["reads"]) == (2, 1, 1, 1)
        assert counters["error_completions"] == 0
        store = rig.call("stats")["store"]
        assert store["counters"]["flushes"] == 2
        # The test image lives on the filesystem under /var/tmp; say which path it took.
        assert store["direct_io"] is _supports_o_direct(image)
    finally:
        driver.close()


def _supports_o_direct(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_driver_refuses_what_it_cannot_post(rig: HostRig) -> None:
    driver = VsicDriver(rig.open_function(1, [(0, 32)]), ring_size=8, slot_blocks=4)
    try:
        with pytest.raises(VsicDriverError):
            driver.submit(layout.VSIC_OP_READ, 0, 5)  # more than a slot
        with pytest.raises(VsicDriverError):
            driver.submit(layout.VSIC_OP_WRITE, 0, 1, b"short")
        with pytest.raises(VsicDriverError):
            driver.submit(layout.VSIC_OP_READ, 0, 1, fua=True)
        with pytest.raises(VsicDriverError):
            driver.submit(9, 0, 1)
        for _ in range(8):
            driver.submit(layout.VSIC_OP_READ, 0, 1)
        with pytest.raises(RingFull):
            driver.submit(layout.VSIC_OP_READ, 0, 1)
        wait_for(lambda: driver.ring.completed() == 8)
        assert len(driver.poll()) == 8
        assert driver.space() == 8
    finally:
        driver.close()


def test_block_device_round_trip_and_errors(rig: HostRig) -> None:
    driver = VsicDriver(rig.open_function(1, [(64, 100)]), ring_size=8, slot_blocks=4)
    try:
        dev = VsicBlockDevice(driver, timeout=10)
        assert (dev.block_size, dev.num_blocks) == (BS, 100)
        big = os.urandom(50 * BS)  # 13 requests through an 8-slot ring
        dev.write(10, big)
        dev.write(99, b"z" * BS, fua=True)
        dev.flush()
        assert dev.read(10, 50) == big
        assert dev.read(99, 1) == b"z" * BS
        assert dev.read(0, 0) == b""
        with pytest.raises(BlockDeviceError):
            dev.write(99, bytes(2 * BS))
        with pytest.raises(BlockDeviceError):
            dev.write(0, b"x")
        with pytest.raises(BlockDeviceError):
            dev.read(-1, 1)
        assert dev.read(10, 1) == big[:BS]  # still usable after refused calls
    finally:
        driver.close()


def test_block_device_reports_error_completions(rig: HostRig) -> None:
    driver = VsicDriver(rig.open_function(1, [(0, 8)], read_only=True), ring_size=8)
    try:
        dev = VsicBlockDevice(driver, timeout=10)
        with pytest.raises(VsicIoError, match="read-only") as failure:
            dev.write(0, bytes(BS))
        assert failure.value.status == layout.DESC_READ_ONLY
        assert len(dev.read(0, 8)) == 8 * BS
    finally:
        driver.close()


@pytest.mark.parametrize("use_fua", [False, True])
def test_persistent_log_runs_on_a_vsa(rig: HostRig, use_fua: bool) -> None:
    records = [os.urandom(n) for n in (1, 100, 5000, 20_000, 0, 4096)] + [b"r%d" % i for i in range(40)]
    driver = VsicDriver(rig.open_function(1, [(100, 60), (20, 60)]), ring_size=16, slot_blocks=8)
    try:
        with PersistentLog(VsicBlockDevice(driver), use_fua=use_fua) as log:
            seqs = [log.append(record) for record in records[:6]]
            for record in records[6:]:
                log.submit(record)
            log.commit()
        assert seqs == list(range(6))
    finally:
        driver.close()
    wait_for(lambda: saw_closed(rig, 1))
    # A new session on the same extents finds every record.
    driver = VsicDriver(rig.open_function(2, [(100, 60), (20, 60)]), ring_size=16)
    try:
        with PersistentLog(VsicBlockDevice(driver), create=False) as log:
            assert [payload for _seq, payload in log.records()] == records
        counters = rig.function_stats(2)["counters"]
        assert counters["reads"] > 0 and counters["error_completions"] == 0
    finally:
        driver.close()


def test_two_functions_are_isolated(rig: HostRig, image: str) -> None:
    one = VsicDriver(rig.open_function(1, [(0, 16)]), ring_size=8)
    two = VsicDriver(rig.open_function(2, [(16, 16)]), ring_size=8)
    try:
        dev_one, dev_two = VsicBlockDevice(one), VsicBlockDevice(two)
        dev_one.write(0, b"1" * 16 * BS)
        dev_two.write(0, b"2" * 16 * BS)
        assert dev_one.read(0, 16) == b"1" * 16 * BS
        assert dev_two.read(0, 16) == b"2" * 16 * BS
        assert image_blocks(image, 0, 32) == b"1" * 16 * BS + b"2" * 16 * BS
        with pytest.raises(BlockDeviceError):
            dev_one.read(16, 1)  # function one's VSA ends where two's begins
        # Two functions of one VSA (same name, same extents) may share: the shared VSA
        # mapping. The same extents under another name, or other extents under the name, may not.
        for fields, shares in (({"name": "v", "extents": [[40, 8]]}, True),
                               ({"name": "w", "extents": [[40, 8]]}, False),
                               ({"name": "v", "extents": [[40, 4]]}, False)):
            socks = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                first = rig.request("create_function", [socks[1].fileno()], function_id=10, name="v",
                                    extents=[[40, 8]])
                assert first["ok"], first
                other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                reply = rig.request("create_function", [other[1].fileno()], function_id=11, **fields)
                assert reply["ok"] is shares, (fields, reply)
                for sock in other:
                    sock.close()
                if shares:
                    assert rig.request("destroy_function", function_id=11)["ok"]
                assert rig.request("destroy_function", function_id=10)["ok"]
            finally:
                for sock in socks:
                    sock.close()
        # A VSA that would overlap a writable one is refused; read-only ones may share.
        reply = rig.request("create_function", [], function_id=3, extents=[[8, 16]])
        assert not reply["ok"]
        socks = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            reply = rig.request("create_function", [socks[1].fileno()], function_id=3, extents=[[8, 16]])
            assert not reply["ok"] and "overlaps" in reply["error"]
        finally:
            for sock in socks:
                sock.close()
    finally:
        one.close()
        two.close()


def test_set_limits_through_management(rig: HostRig) -> None:
    driver = VsicDriver(rig.open_function(1, [(0, 32)], iops=200), ring_size=32)
    try:
        limits = rig.function_stats(1)["limits"]
        assert limits["iops"] == 200
        # One batch: the device judges it within one poll, at one ``now``, so whatever the
        # machine's speed, the requests past the burst must wait for tokens.
        tags = [driver.submit(layout.VSIC_OP_READ, block, 1, publish=False) for block in range(24)]
        driver.publish()
        completions: list[Completion] = []
        deadline = time.monotonic() + 10
        while len(completions) < 24 and time.monotonic() < deadline:
            completions += driver.poll()
            driver.wait(0.01)
        assert [c.tag for c in completions] == tags and all(c.ok for c in completions)
        counters = rig.function_stats(1)["counters"]
        assert counters["reads"] == 24 and counters["rate_delayed"] > 0
        assert 24 > limits["burst_requests"]
        assert rig.call("set_limits", function_id=1, iops=0, bps=8_000_000) is None
        assert rig.function_stats(1)["limits"]["bps"] == 8_000_000
        assert not rig.request("set_limits", function_id=1, iops=-1)["ok"]
        assert not rig.request("set_limits", function_id=1, iops=True)["ok"]
        assert not rig.request("set_limits", function_id=9, iops=1)["ok"]
    finally:
        driver.close()


def test_closing_the_app_removes_the_function(rig: HostRig) -> None:
    driver = VsicDriver(rig.open_function(5, [(0, 8)]), ring_size=8)
    driver.close()
    wait_for(lambda: saw_closed(rig, 5))
    assert rig.call("stats")["functions"] == []
    rig.call("destroy_function", function_id=5)  # already gone: not an error


def test_buffered_fallback_when_o_direct_is_refused(image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def tmpfs_like_open(path: str, flags: int, *args: Any) -> int:
        # What a filesystem without direct I/O answers (tmpfs before Linux 6.6).
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", tmpfs_like_open)
    store = BackingStore(image)
    monkeypatch.undo()
    try:
        assert not store.direct_io and "EINVAL" in store.direct_io_note
        assert store.snapshot()["direct_io"] is False
        assert store.num_blocks == 256
        page = memoryview(bytearray(BS))
        store.read_into(3, page)
        assert bytes(page) == image_blocks(image, 3, 1)
    finally:
        store.close()


def test_store_refuses_other_open_errors() -> None:
    with pytest.raises(FileNotFoundError):
        BackingStore(f"/var/tmp/{TAG}missing-{os.urandom(4).hex()}")


def test_device_host_process_serves_and_shuts_down(image: str) -> None:
    host = HostRig(image, process=True)
    try:
        driver = VsicDriver(host.open_function(1, [(0, 4)]), ring_size=8)
        try:
            dev = VsicBlockDevice(driver)
            dev.write(0, b"p" * BS, fua=True)
            assert dev.read(0, 1) == b"p" * BS
        finally:
            driver.close()
    finally:
        host.stop()
    assert host.child is not None and host.child.returncode == 0


def test_a_device_bug_stops_one_ring_not_the_device(image: str) -> None:
    device = VsicDevice(BackingStore(image))
    rigs = [
        FunctionRig([], function=device.add_function(FunctionConfig(function_id=fid, extents=[(fid * 16, 16)]), 0.0))
        for fid in (1, 2)
    ]
    try:

        class Broken(RamStorage):
            def read_into(self, physical_block: int, view: memoryview) -> None:
                raise RuntimeError("a bug in the device")

        rigs[0].function.storage = Broken(1)
        for rig_ in rigs:
            rig_.post(layout.VSIC_OP_READ, 0, 1, tag=8)
        assert device.poll(0.0) == 1
        assert rigs[0].ring.error == layout.RING_ERR_DEVICE
        assert rigs[1].reap() == [(layout.DESC_OK, 8)]
        assert bytes(rigs[1].mem[BS : 2 * BS]) == image_blocks(image, 32, 1)
    finally:
        for rig_ in rigs:
            rig_.ring.descs.release()
            rig_.mem.close()
            os.close(rig_.fd)
        device.close()
