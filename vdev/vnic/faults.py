"""A lossy wire for tests: loss, duplication and reordering around any ``WireBackend``.

Like smoltcp's fault-injecting phy, it sits between the device and its wire, so every
protocol above it (the libOS's TCP, the Linux peer's TCP) sees an imperfect link without
a line of test code in either. It acts on both directions: frames the wire hands up to
the device (``receive``) and frames the device puts on the wire (``send``).

    --faults loss=0.05,dup=0.05,reorder=0.05,seed=1

* ``loss``: each frame is dropped with this probability;
* ``dup``: each surviving frame is delivered twice with this probability;
* ``reorder``: each surviving frame is held back with this probability and goes out right
  after the next frame in the same direction (the two swap places). A held frame waits
  for that next frame; on a TCP path one always comes, if only the sender's
  retransmission.

Decisions come from a seeded generator, so a given sequence of frames meets the same
faults on every run. This kernel has no ``netem`` qdisc, which is why the faults live here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vdev.vnic.backend import WireBackend

ENV_VAR = "ARRAKIS_VNIC_FAULTS"


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

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Direction:
    """The fault decisions for one direction of the wire."""

    def __init__(self, spec: FaultSpec, rng: random.Random, counters: FaultCounters) -> None:
        self.spec = spec
        self.rng = rng
        self.counters = counters
        self.held: bytes | None = None

    def apply(self, frame: bytes) -> list[bytes]:
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
        return out


class FaultyBackend:
    """A ``WireBackend`` that passes frames through ``inner`` with the faults of ``spec``."""

    def __init__(self, inner: WireBackend, spec: FaultSpec) -> None:
        self.inner = inner
        self.spec = spec
        self.counters = FaultCounters()
        rng = random.Random(spec.seed)
        self._rx = _Direction(spec, rng, self.counters)
        self._tx = _Direction(spec, rng, self.counters)

    def fds(self) -> list[int]:
        return self.inner.fds()

    def receive(self, queue: int, budget: int) -> list[bytes]:
        frames: list[bytes] = []
        apply = self._rx.apply
        for frame in self.inner.receive(queue, budget):
            frames += apply(frame)
        return frames

    def send(self, queue: int, frame: bytes) -> bool:
        sent = True
        for out in self._tx.apply(frame):
            sent = self.inner.send(queue, out) and sent
        return sent

    def close(self) -> None:
        self.inner.close()
