"""The shared-memory rings: a two-process stress test and property tests of the invariants."""

from __future__ import annotations

import mmap
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vdev import layout
from vdev.ring import U32_MASK, DeviceRing, DriverRing, Registers

DESC = layout.VNIC_DESC
WRITEBACK = struct.Struct("<HHH")


def make_shared(ring_size: int) -> tuple[mmap.mmap, Registers, memoryview]:
    size = layout.PAGE_SIZE + ring_size * DESC.size
    fd = os.memfd_create("test-ring")
    os.ftruncate(fd, size)
    mem = mmap.mmap(fd, size)
    os.close(fd)
    regs = Registers(memoryview(mem)[: layout.PAGE_SIZE])
    descs = memoryview(mem)[layout.PAGE_SIZE : layout.PAGE_SIZE + ring_size * DESC.size]
    return mem, regs, descs


def test_two_process_stress_loses_nothing_duplicates_nothing_keeps_order() -> None:
    total = 2_000_000
    ring_size = 1024
    mem, regs, descs = make_shared(ring_size)
    driver = DriverRing(regs, 1, descs, ring_size, DESC)
    driver.enable(0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the driver: posts sequence numbers, reaps completions, checks write-backs
        os.close(read_end)
        code = 0
        try:
            posted = 0
            reaped = 0
            while reaped < total:
                room = min(driver.space(), total - posted)
                for _ in range(room):
                    driver.post(posted, posted & 0xFFFF, 0, 0, 0)
                    posted += 1
                if room:
                    driver.publish()
                done = driver.completed()
                for offset in range(done):
                    iova, length, _flags, status, _ = driver.peek(driver.reaped + offset)
                    if status != 7 or iova != reaped + offset:
                        code = 3
                driver.reap(done)
                reaped += done
        except BaseException:
            code = 2
        os.write(write_end, bytes([code]))
        os._exit(code)
    os.close(write_end)
    device = DeviceRing(regs, 1, descs, ring_size, DESC)
    expected = 0
    bad = 0
    while expected < total:
        pending = device.pending()
        assert pending >= 0, "the driver never runs more than a ring ahead"
        for offset in range(pending):
            iova, length, _flags, _status, _ = device.fetch(device.cons + offset)
            if iova != expected or length != expected & 0xFFFF:
                bad += 1
            device.write_back(device.cons + offset, layout.VNIC_DESC_LENGTH_OFFSET, WRITEBACK, length, 0, 7)
            expected += 1
        if pending:
            device.advance(pending)
    _, status = os.waitpid(pid, 0)
    verdict = os.read(read_end, 1)
    os.close(read_end)
    assert bad == 0
    assert verdict == b"\x00" and os.waitstatus_to_exitcode(status) == 0
    descs.release()
    regs.release()
    mem.close()


def test_prod_beyond_the_ring_is_detected() -> None:
    mem, regs, descs = make_shared(8)
    device = DeviceRing(regs, 0, descs, 8, DESC)
    regs.write32(layout.ring_reg(0, layout.RING_PROD), 9)
    assert device.pending() == -1
    regs.write32(layout.ring_reg(0, layout.RING_PROD), 0xFFFFFFFF)  # "behind" cons: also impossible
    assert device.pending() == -1
    regs.write32(layout.ring_reg(0, layout.RING_PROD), 8)
    assert device.pending() == 8
    descs.release()
    regs.release()
    mem.close()


class RingMachine(RuleBasedStateMachine):
    """Driver and device interleaved in any order; the counters stay consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 8
        self.mem, self.regs, self.descs = make_shared(self.size)
        self.driver = DriverRing(self.regs, 0, self.descs, self.size, DESC)
        self.driver.enable(0)
        # Start near the wrap of the 32-bit counters so wrap-around is always exercised.
        start = U32_MASK - 5
        self.driver.prod = self.driver.reaped = start
        self.regs.write32(layout.ring_reg(0, layout.RING_PROD), start)
        self.regs.write32(layout.ring_reg(0, layout.RING_CONS), start)
        self.device = DeviceRing(self.regs, 0, self.descs, self.size, DESC)
        self.next_value = 0
        self.posted: list[int] = []  # values posted, in order, not yet fetched by the device
        self.completed: list[int] = []  # values completed, not yet reaped
        self.unpublished = 0

    @precondition(lambda self: self.driver.space() > 0)
    @rule()
    def post(self) -> None:
        self.driver.post(self.next_value, 0, 0, 0, 0)
        self.posted.append(self.next_value)
        self.next_value += 1
        self.unpublished += 1

    @rule()
    def publish(self) -> None:
        self.driver.publish()
        self.unpublished = 0

    @rule(count=st.integers(1, 8))
    def device_completes(self, count: int) -> None:
        pending = self.device.pending()
        assert 0 <= pending <= self.size
        visible = len(self.posted) - self.unpublished
        assert pending == visible
        count = min(count, pending)
        for offset in range(count):
            value = self.device.fetch(self.device.cons + offset)[0]
            assert value == self.posted[offset]
        self.completed += self.posted[:count]
        del self.posted[:count]
        if count:
            self.device.advance(count)

    @rule()
    def driver_reaps(self) -> None:
        done = self.driver.completed()
        assert done == len(self.completed)
        for offset in range(done):
            assert self.driver.peek(self.driver.reaped + offset)[0] == self.completed[offset]
        self.driver.reap(done)
        self.completed.clear()

    @invariant()
    def space_is_consistent(self) -> None:
        in_flight = len(self.posted) + len(self.completed)
        assert self.driver.space() == self.size - in_flight
        assert 0 <= self.driver.space() <= self.size

    def teardown(self) -> None:
        self.descs.release()
        self.regs.release()
        self.mem.close()


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)


@given(st.integers(0, U32_MASK), st.integers(0, U32_MASK), st.sampled_from([8, 64, 1024]))
@settings(max_examples=200, deadline=None)
def test_device_ring_survives_any_counter_values(prod: int, cons: int, size: int) -> None:
    mem, regs, descs = make_shared(size)
    regs.write32(layout.ring_reg(0, layout.RING_PROD), prod)
    regs.write32(layout.ring_reg(0, layout.RING_CONS), cons)
    device = DeviceRing(regs, 0, descs, size, DESC)
    pending = device.pending()
    assert pending == ((prod - cons) & U32_MASK if (prod - cons) & U32_MASK <= size else -1)
    for offset in range(max(pending, 0)):
        device.fetch(device.cons + offset)  # any counter value stays inside the ring
    descs.release()
    regs.release()
    mem.close()
