"""A lossy wire for tests: loss, duplication and reordering around any ``WireBackend``.

Like smoltcp's fault-injecting phy, it sits between the device and its wire, so every
protocol above it (the libOS's TCP, the Linux peer's TCP) sees an imperfect link without
a line of test code in either. It acts on both directions: frames the wire hands up to
the device (``receive``) and frames the device puts on the wire (``send``).

    --faults loss=0.05,dup=0.05,reorder=0.05,seed=1

* ``loss``: each frame is dropped with this probability;
* ``dup``: each surviving frame is delivered twice with this probability;
* ``reorder``: each surviving frame is held back with this probability and goes out right
  after the next frame in the same direction (the two swap places), or after
  ``MAX_HOLD`` seconds if no frame follows. The bound matters: a hold that waits for "the
  next frame" can keep a lone retransmission (or the last ACK of a transfer) back for as
  long as the sender's backed-off RTO, which is a pathological wire, not a reordering one.

The time bound needs the device host to call back while a frame is held, and the host only
calls a backend when one of its ``fds()`` is readable. So, on a wire that has descriptors,
the fault layer adds one of its own: an eventfd that is readable exactly while a frame is
held. The host sees it as one more wire queue and calls ``receive`` on it; that call
releases the frames whose time is up (frames held on the way out go to the inner wire).

Decisions come from a seeded generator, so a given sequence of frames meets the same
faults on every run. This kernel has no ``netem`` qdisc, which is why the faults live here.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from vdev.vnic.backend import WireBackend

ENV_VAR = "ARRAKIS_VNIC_FAULTS"
# How long a reordered frame may wait for a frame to overtake it: long against the
# microseconds between the frames of a burst, short against any RTO (Linux's floor is 200 ms).
MAX_HOLD: Final = 0.001
_ONE: Final = (1).to_bytes(8, "little")


class FaultSpecError(ValueError):
    """A ``--faults`` specification that cannot be used."""


@dataclass(frozen=True)
class FaultSpec:
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("loss", "dup", "reorder"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise FaultSpecError(f"{name} must be a probability in [0, 1), got {value}")

    @property
    def active(self) -> bool:
        return bool(self.loss or self.dup or self.reorder)

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """``"loss=0.05,dup=0.05,reorder=0.05,seed=1"``; every key optional."""
        values: dict[str, float | int] = {}
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in ("loss", "dup", "reorder", "seed"):
                raise FaultSpecError(f"bad fault item {item!r}: use loss=, dup=, reorder=, seed=")
            if key in values:
                raise FaultSpecError(f"{key} given twice")
            try:
                values[key] = int(raw) if key == "seed" else float(raw)
            except ValueError:
                raise FaultSpecError(f"bad value in {item!r}") from None
        return cls(
            loss=float(values.get("loss", 0.0)),
            dup=float(values.get("dup", 0.0)),
            reorder=float(values.get("reorder", 0.0)),
            seed=int(values.get("seed", 1)),
        )


@dataclass
class FaultCounters:
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    released_by_timer: int = 0  # held frames that no later frame overtook within MAX_HOLD

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Direction:
    """The fault decisions for one direction of the wire."""

    def __init__(self, spec: FaultSpec, rng: random.Random, counters: FaultCounters) -> None:
        self.spec = spec
        self.rng = rng
        self.counters = counters
        self.held: bytes | None = None
        self.held_since = 0.0

    def apply(self, frame: bytes, now: float) -> list[bytes]:
        """What goes on in place of ``frame``: nothing, it, it twice; plus a held frame."""
        spec = self.spec
        rng = self.rng
        if spec.loss and rng.random() < spec.loss:
            self.counters.lost += 1
            return []
        out = [frame]
        if spec.dup and rng.random() < spec.dup:
            self.counters.duplicated += 1
            out.append(frame)
        held = self.held
        if held is not None:
            self.held = None
            out.append(held)  # after the frame that overtook it
        elif spec.reorder and rng.random() < spec.reorder:
            self.counters.reordered += 1
            self.held = out.pop()
            self.held_since = now
        return out

    def expire(self, now: float, max_hold: float) -> bytes | None:
        """The held frame if it has waited ``max_hold`` seconds; it goes out alone."""
        held = self.held
        if held is None or now - self.held_since < max_hold:
            return None
        self.held = None
        self.counters.released_by_timer += 1
        return held


class FaultyBackend:
    """A ``WireBackend`` that passes frames through ``inner`` with the faults of ``spec``.

    ``release_fd``: add the eventfd that bounds how long a reordered frame is held (see the
    module docstring); by default only when ``inner`` has descriptors to wait on, since a
    wire without any is polled by hand (tests) and keeps its exact, clock-free order.
    """

    def __init__(
        self,
        inner: WireBackend,
        spec: FaultSpec,
        *,
        release_fd: bool | None = None,
        max_hold: float = MAX_HOLD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_hold <= 0:
            raise ValueError("max_hold must be positive")
        self.inner = inner
        self.spec = spec
        self.counters = FaultCounters()
        self.max_hold = max_hold
        self._clock = clock
        rng = random.Random(spec.seed)
        self._rx = _Direction(spec, rng, self.counters)
        self._tx = _Direction(spec, rng, self.counters)
        inner_fds = inner.fds()
        self._release_queue = len(inner_fds)
        if release_fd is None:
            release_fd = bool(inner_fds)
        self._release_fd = (
            os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if release_fd else None
        )
        self._signalled = False

    def fds(self) -> list[int]:
        fds = self.inner.fds()
        if self._release_fd is not None:
            fds.append(self._release_fd)  # the host's queue number ``_release_queue``
        return fds

    def receive(self, queue: int, budget: int) -> list[bytes]:
        if self._release_fd is not None and queue == self._release_queue:
            return self._release_due()
        frames: list[bytes] = []
        apply = self._rx.apply
        now = self._clock()
        for frame in self.inner.receive(queue, budget):
            frames += apply(frame, now)
        self._update_signal()
        return frames

    def send(self, queue: int, frame: bytes) -> bool:
        sent = True
        for out in self._tx.apply(frame, self._clock()):
            sent = self.inner.send(queue, out) and sent
        self._update_signal()
        return sent

    def _release_due(self) -> list[bytes]:
        """Frames whose hold is over: received ones are returned, sent ones go out now."""
        now = self._clock()
        held_tx = self._tx.expire(now, self.max_hold)
        if held_tx is not None:
            self.inner.send(0, held_tx)
        held_rx = self._rx.expire(now, self.max_hold)
        self._update_signal()
        return [] if held_rx is None else [held_rx]

    def _update_signal(self) -> None:
        """Keep the eventfd readable exactly while a frame is held."""
        fd = self._release_fd
        if fd is None:
            return
        holding = self._rx.held is not None or self._tx.held is not None
        if holding and not self._signalled:
            os.write(fd, _ONE)
            self._signalled = True
        elif not holding and self._signalled:
            try:
                os.read(fd, 8)
            except BlockingIOError:
                pass
            self._signalled = False

    def close(self) -> None:
        if self._release_fd is not None:
            os.close(self._release_fd)
            self._release_fd = None
        self.inner.close()
