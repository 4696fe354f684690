"""The device host's lossy test wire (``vdev.vnic.faults``): a reordered frame is held for a
bounded time, never until some later frame happens to come (which on a quiet TCP path can be
a backed-off retransmission seconds away)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vdev.vnic.faults import MAX_HOLD, FaultSpec, FaultyBackend


class PipeWire:
    """A wire with one real descriptor (so the fault layer adds its release eventfd)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.pending: list[bytes] = []
        self.sent: list[bytes] = []

    def fds(self) -> list[int]:
        return [self.read_fd]

    def receive(self, queue: int, budget: int) -> list[bytes]:
        assert queue == 0
        taken, self.pending = self.pending[:budget], self.pending[budget:]
        return taken

    def send(self, queue: int, frame: bytes) -> bool:
        self.sent.append(frame)
        return True

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts() -> Iterator[tuple[PipeWire, FaultyBackend, Clock]]:
    inner = PipeWire()
    clock = Clock()
    # Every frame is held (reorder just under 1): what matters is when it comes out.
    wire = FaultyBackend(inner, FaultSpec(reorder=0.999999, seed=1), clock=clock)
    try:
        yield inner, wire, clock
    finally:
        wire.close()


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_a_lone_held_frame_is_released_after_max_hold(parts: tuple[PipeWire, FaultyBackend, Clock]) -> None:
    inner, wire, clock = parts
    fds = wire.fds()
    assert fds[0] == inner.read_fd and len(fds) == 2
    release_fd, release_queue = fds[1], 1
    assert not _readable(release_fd)
    inner.pending = [b"only"]
    assert wire.receive(0, 8) == []  # held
    assert _readable(release_fd)  # the host will call back
    clock.now += MAX_HOLD / 2
    assert wire.receive(release_queue, 8) == []  # not yet
    clock.now += MAX_HOLD
    assert wire.receive(release_queue, 8) == [b"only"]
    assert not _readable(release_fd)
    assert wire.counters.released_by_timer == 1


def test_a_held_outgoing_frame_goes_to_the_wire_on_release(parts: tuple[PipeWire, FaultyBackend, Clock]) -> None:
    inner, wire, clock = parts
    assert wire.send(0, b"ack")
    assert inner.sent == []
    clock.now += 2 * MAX_HOLD
    assert wire.receive(1, 8) == []  # nothing inbound; the outbound frame left
    assert inner.sent == [b"ack"]


def test_a_following_frame_still_overtakes_a_held_one(parts: tuple[PipeWire, FaultyBackend, Clock]) -> None:
    inner, wire, clock = parts
    inner.pending = [b"first", b"second"]
    # "first" is held, "second" overtakes it and releases it; "second" is not held itself.
    assert wire.receive(0, 8) == [b"second", b"first"]
    assert wire.counters.reordered == 1 and wire.counters.released_by_timer == 0
    assert not _readable(wire.fds()[1])


def test_a_wire_without_descriptors_gets_no_release_fd() -> None:
    inner = PipeWire()
    try:
        plain = FaultyBackend(inner, FaultSpec(loss=0.1), release_fd=False)
        assert plain.fds() == [inner.read_fd]
        with pytest.raises(ValueError):
            FaultyBackend(inner, FaultSpec(), max_hold=0)
    finally:
        inner.close()
