"""A malicious storage application only hurts itself: error completions and counters.

The device host runs as a child process over an image of random bytes. A well-behaved
application keeps its data and its service while another one posts requests beyond its VSA,
overflowing offsets, buffers outside its DMA map, floods without reaping, a broken producer
index, and garbage on its vfio-user socket. The image outside the attacker's VSA hashes the
same before and after, and the device host is the same live process at the end.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libos.driver.vsic import IOVA_BASE, RingFull, VsicDriver
from libos.storage.vsic_blockdev import VsicBlockDevice
from tests.test_vsic import BS, FunctionRig, HostRig, digest_outside, make_image, saw_closed, wait_for
from vdev import layout
from vdev.vsic.host import _extents_field, _int_field

GOOD = [(0, 32)]
EVIL = [(64, 16), (128, 16)]
SHARED_READ_ONLY = [(200, 8)]
U64 = 2**64


@pytest.fixture
def host() -> Iterator[tuple[HostRig, str]]:
    path = make_image(256)
    rig = HostRig(path, process=True)
    try:
        yield rig, path
    finally:
        try:
            rig.stop()
        finally:
            os.unlink(path)


def post_raw(driver: VsicDriver, opcode: int, block: int, count: int, iova: int, flags: int = 0, tag: int = 0) -> None:
    """Post a descriptor as a hostile driver would, with none of VsicDriver's checks."""
    driver.ring.post(opcode, flags, 0, tag, block, count, 0, iova)


def statuses(driver: VsicDriver, count: int) -> list[int]:
    wait_for(lambda: driver.ring.completed() >= count)
    return [c.status for c in driver.poll(count)]


def test_malicious_app_gets_error_completions_only(host: tuple[HostRig, str]) -> None:
    rig, image = host
    assert rig.child is not None
    host_pid = rig.child.pid
    good_driver = VsicDriver(rig.open_function(1, GOOD), ring_size=16, slot_blocks=8)
    evil = VsicDriver(rig.open_function(2, EVIL), ring_size=32, slot_blocks=4)
    peek = VsicDriver(rig.open_function(3, SHARED_READ_ONLY, read_only=True), ring_size=8)
    try:
        good = VsicBlockDevice(good_driver)
        pattern = os.urandom(32 * BS)
        good.write(0, pattern, fua=True)
        untouchable = digest_outside(image, EVIL)

        buffer = evil.buffer_iova(0)
        end_of_map = IOVA_BASE + evil._mem_size
        attacks = [
            (layout.VSIC_OP_READ, 32, 1, buffer, 0, layout.DESC_OUT_OF_RANGE),
            (layout.VSIC_OP_WRITE, 31, 2, buffer, 0, layout.DESC_OUT_OF_RANGE),
            (layout.VSIC_OP_WRITE, U64 - 1, 2, buffer, 0, layout.DESC_OUT_OF_RANGE),  # wraps to 1
            (layout.VSIC_OP_WRITE, U64 - 16, 32, buffer, 0, layout.DESC_OUT_OF_RANGE),
            (layout.VSIC_OP_WRITE, 0, 2**32 - 1, buffer, 0, layout.DESC_BAD_LENGTH),
            (layout.VSIC_OP_WRITE, 0, 0, buffer, 0, layout.DESC_BAD_LENGTH),
            (layout.VSIC_OP_READ, 0, 1, 0x1000, 0, layout.DESC_IOMMU_FAULT),
            (layout.VSIC_OP_WRITE, 0, 2, end_of_map - BS, 0, layout.DESC_IOMMU_FAULT),
            (layout.VSIC_OP_READ, 0, 1, U64 - BS, 0, layout.DESC_IOMMU_FAULT),
            (layout.VSIC_OP_WRITE, 0, 1, buffer + 512, 0, layout.DESC_MISALIGNED),
            (0, 0, 1, buffer, 0, layout.DESC_BAD_OPCODE),
            (255, 0, 1, buffer, 0, layout.DESC_BAD_OPCODE),
            (layout.VSIC_OP_WRITE, 0, 1, buffer, 0xFE, layout.DESC_BAD_OPCODE),
            # Its own VSA, across its two extents (physical 79 and 128): that is allowed.
            (layout.VSIC_OP_WRITE, 15, 2, buffer, layout.VSIC_FLAG_FUA, layout.DESC_OK),
        ]
        for tag, (opcode, block, count, iova, flags, _status) in enumerate(attacks):
            post_raw(evil, opcode, block, count, iova, flags, tag)
        evil.publish()
        assert statuses(evil, len(attacks)) == [status for *_request, status in attacks]

        # A read-only VSA, even one shared with nobody writable, refuses writes.
        post_raw(peek, layout.VSIC_OP_WRITE, 0, 1, peek.buffer_iova(0))
        peek.publish()
        assert statuses(peek, 1) == [layout.DESC_READ_ONLY]

        # Flooding without reaping: the device completes what was posted, then the driver
        # finds its ring full; it cannot make the device hold more.
        while evil.space():
            evil.submit(layout.VSIC_OP_READ, 0, 4)
        wait_for(lambda: evil.ring.completed() == evil.ring_size)
        with pytest.raises(RingFull):
            evil.submit(layout.VSIC_OP_READ, 0, 1)
        # Lying about the producer index stops that ring, and only it.
        evil.regs.write32(layout.ring_reg(0, layout.RING_PROD), evil.ring.prod + evil.ring_size + 7)
        evil.client.region_write(layout.BAR0_INDEX, layout.doorbell_offset(0), b"\0\0\0\0", no_reply=True)
        wait_for(lambda: evil.ring.error == layout.RING_ERR_INDEX)

        assert digest_outside(image, EVIL) == untouchable
        assert good.read(0, 32) == pattern
        fresh = os.urandom(8 * BS)
        good.write(8, fresh)
        good.flush()
        assert good.read(8, 8) == fresh

        counters = rig.function_stats(2)["counters"]
        assert counters["out_of_range"] == 4
        assert counters["bad_requests"] == 5
        assert counters["iommu_faults"] == 3
        assert counters["misaligned"] == 1
        assert counters["ring_errors"] == 1
        assert counters["error_completions"] == len(attacks) - 1
        assert rig.function_stats(1)["counters"]["error_completions"] == 0
        assert rig.alive and rig.child.pid == host_pid
    finally:
        for driver in (good_driver, evil, peek):
            driver.close()


def test_garbage_on_the_vfio_user_socket_closes_only_that_function(host: tuple[HostRig, str]) -> None:
    rig, _image = host
    good = VsicBlockDevice(VsicDriver(rig.open_function(1, GOOD), ring_size=8))
    evil_sock = rig.open_function(2, EVIL)
    try:
        evil_sock.sendall(os.urandom(64) + b"\xff" * 4096)
        wait_for(lambda: saw_closed(rig, 2))
        assert [f["function_id"] for f in rig.call("stats")["functions"]] == [1]
        good.write(0, b"g" * BS)
        assert good.read(0, 1) == b"g" * BS
        assert rig.alive
    finally:
        evil_sock.close()
        good._driver.close()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


BAD_CREATE_REQUESTS: list[dict[str, Any]] = [
    {"function_id": 9, "extents": [[250, 16]]},  # past the end of the image
    {"function_id": 9, "extents": [[20, 16]]},  # overlaps the writable GOOD VSA
    {"function_id": 9, "extents": [[100, 0]]},
    {"function_id": 9, "extents": [[100, 4], [102, 4]]},
    {"function_id": 9, "extents": []},
    {"function_id": 9, "extents": "0-16"},
    {"function_id": 9, "extents": [["100", 4]]},
    {"function_id": 9, "extents": [[100.5, 4]]},
    {"function_id": 9, "extents": [[True, 4]]},
    {"function_id": 9, "extents": [[100, 4, 1]]},
    {"function_id": 9, "extents": [[-1, 4]]},
    {"function_id": 9, "extents": [[U64, 4]]},
    {"function_id": -1, "extents": [[100, 4]]},
    {"function_id": "9", "extents": [[100, 4]]},
    {"function_id": 1, "extents": [[100, 4]]},  # exists
    {"extents": [[100, 4]]},
    {"function_id": 9, "extents": [[100, 4]], "read_only": "yes"},
    {"function_id": 9, "extents": [[100, 4]], "queues": 0},
    {"function_id": 9, "extents": [[100, 4]], "queues": 10_000},
    {"function_id": 9, "extents": [[100, 4]], "iops": -5},
    {"function_id": 9, "extents": [[100, 4]], "name": 7},
]


def test_bad_management_requests_are_refused_without_leaks(host: tuple[HostRig, str]) -> None:
    rig, _image = host
    assert rig.child is not None
    good_driver = VsicDriver(rig.open_function(1, GOOD), ring_size=8)
    try:
        baseline = _open_fds(rig.child.pid)
        for fields in BAD_CREATE_REQUESTS:
            app_end, device_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                reply = rig.request("create_function", [device_end.fileno()], **fields)
            finally:
                app_end.close()
                device_end.close()
            assert not reply["ok"], fields
        read_end, write_end = os.pipe()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for fd in (read_end, udp.fileno()):
                reply = rig.request("create_function", [fd], function_id=9, extents=[[100, 4]])
                assert not reply["ok"]
        finally:
            os.close(read_end)
            os.close(write_end)
            udp.close()
        other_ops: list[tuple[str, dict[str, Any]]] = [
            ("no_such_op", {}),
            ("destroy_function", {"function_id": "x"}),
            ("stats", {"x": 1}),
        ]
        for op, fields in other_ops:
            reply = rig.request(op, [], **fields)
            assert reply["ok"] == (op == "stats")
        rig.ours.send(b"{not json")
        received = rig.ours.recv(1 << 16)
        assert json.loads(received)["ok"] is False
        assert _open_fds(rig.child.pid) == baseline
        assert [f["function_id"] for f in rig.call("stats")["functions"]] == [1]
        dev = VsicBlockDevice(good_driver)
        dev.write(0, b"k" * BS)
        assert dev.read(0, 1) == b"k" * BS
        assert rig.alive
    finally:
        good_driver.close()


_DESCRIPTOR = st.tuples(
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFFFFFF),
    st.one_of(st.integers(0, 40), st.integers(0, U64 - 1)),
    st.one_of(st.integers(0, 20), st.integers(0, 0xFFFFFFFF)),
    st.integers(0, 0xFFFFFFFF),
    st.one_of(
        st.integers(0, 70).map(lambda page: IOVA_BASE + page * BS),
        st.integers(IOVA_BASE - BS, IOVA_BASE + 70 * BS),
        st.integers(0, U64 - 1),
    ),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_DESCRIPTOR, min_size=1, max_size=FunctionRig.RING))
def test_random_descriptors_complete_with_a_status_and_stay_inside_the_vsa(descriptors: list[tuple[int, ...]]) -> None:
    frig = FunctionRig([(100, 8), (10, 8)])
    try:
        for descriptor in descriptors:
            frig.ring.post(*descriptor)
        frig.ring.publish()
        assert frig.process(budget=len(descriptors)) == (len(descriptors), 0.0)
        completions = frig.reap()
        assert [tag for _status, tag in completions] == [d[3] for d in descriptors]
        assert all(status in layout.VSIC_STATUS_NAMES for status, _tag in completions)
        assert frig.storage.written <= set(range(100, 108)) | set(range(10, 18))
        assert frig.function.counters.error_completions == sum(1 for s, _t in completions if s)
    finally:
        frig.close()


@given(st.dictionaries(st.sampled_from(["extents", "function_id", "iops"]), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)))
def test_management_field_checks_raise_only_value_or_key_errors(message: dict[str, Any]) -> None:
    for check in (_extents_field, lambda m: _int_field(m, "function_id"), lambda m: _int_field(m, "iops", 0)):
        try:
            check(message)
        except (ValueError, KeyError):
            pass


@pytest.mark.parametrize("ring_size, ring_iova", [(0, IOVA_BASE), (7, IOVA_BASE), (2**31, IOVA_BASE), (16, 0x1000), (16, U64 - BS)])
def test_bad_ring_setup_stops_only_that_ring(ring_size: int, ring_iova: int) -> None:
    frig = FunctionRig([(0, 8)])
    try:
        frig.ring.disable()
        frig.function.sync_rings()
        regs = frig.function.regs
        regs.write64(layout.ring_reg(0, layout.RING_IOVA), ring_iova)
        regs.write32(layout.ring_reg(0, layout.RING_SIZE), ring_size)
        regs.write32(layout.ring_reg(0, layout.RING_ENABLE), 1)
        frig.function.sync_rings()
        assert frig.function.rings[0] is None
        assert regs.read32(layout.ring_reg(0, layout.RING_ERROR)) == layout.RING_ERR_SETUP
        # Disabling clears the error; a good set-up works again.
        frig.ring.disable()
        frig.function.sync_rings()
        frig.ring.enable(IOVA_BASE)
        frig.function.sync_rings()
        frig.post(layout.VSIC_OP_READ, 0, 1, tag=3)
        frig.process()
        assert frig.reap() == [(layout.DESC_OK, 3)]
    finally:
        frig.close()


def test_a_slow_consumer_never_grows_device_memory() -> None:
    """Requests are done in place: whatever the driver posts, the device queues nothing."""
    frig = FunctionRig([(0, 8)])
    try:
        for _ in range(3):
            for tag in range(FunctionRig.RING):
                frig.ring.post(layout.VSIC_OP_READ, 0, 0, tag, 0, 1, 0, frig.buffer)
            frig.ring.publish()
            assert frig.process(budget=1000)[0] == FunctionRig.RING
            assert frig.ring.space() == 0  # full until the driver reaps
            assert frig.process()[0] == 0
            frig.reap()
        assert frig.function.counters.reads == 3 * FunctionRig.RING
    finally:
        frig.close()
