"""Where the VNIC's "wire" is: the physical side of the device model.

The device host talks to its wire only through ``WireBackend``, so another backend
(AF_PACKET on a real interface, later AF_XDP; DESIGN section 8) is a new class here, not a
rewrite of the device. ``TapBackend`` attaches to a persistent multi-queue tap that the control
plane created: one file descriptor per hardware queue.

Some facts about taps this code relies on:

* With IFF_MULTI_QUEUE each TUNSETIFF on a fresh ``/dev/net/tun`` fd attaches one more
  queue to the same interface; the kernel spreads frames it sends to the tap over the
  queues by flow hash, so each fd sees whole flows.
* With IFF_NO_PI a read returns exactly one Ethernet frame, and a write sends exactly one.
* A write to a tap is the tap *receiving* a frame: it enters the tap's ingress path (and so
  the ingress qdisc, where the control plane redirects it to an ifb for shaping).
"""

from __future__ import annotations

import fcntl
import os
import struct
from typing import Protocol

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_MULTI_QUEUE = 0x0100
_IFNAMSIZ = 16
_READ_SIZE = 65536  # a tap may hand up frames larger than the MTU (GSO off, but be safe)


class WireBackend(Protocol):
    def fds(self) -> list[int]:
        """File descriptors to wait on for received frames, one per hardware queue."""
        ...

    def receive(self, queue: int, budget: int) -> list[bytes]:
        """Up to ``budget`` frames that arrived on ``queue``; never blocks."""
        ...

    def send(self, queue: int, frame: bytes) -> bool:
        """Put one frame on the wire; False if the wire had no room (the frame is dropped)."""
        ...

    def close(self) -> None: ...


class TapBackend:
    """A multi-queue tap interface, attached by name in the current network namespace."""

    def __init__(self, ifname: str, queues: int = 1) -> None:
        if not 1 <= queues <= 16:
            raise ValueError("1..16 tap queues")
        if not ifname or len(ifname) >= _IFNAMSIZ:
            raise ValueError(f"bad interface name {ifname!r}")
        self.ifname = ifname
        self._fds: list[int] = []
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self._fds.append(fd)
                request = struct.pack("16sH22x", ifname.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_MULTI_QUEUE)
                fcntl.ioctl(fd, _TUNSETIFF, request)
        except OSError:
            self.close()
            raise

    def fds(self) -> list[int]:
        return list(self._fds)

    def receive(self, queue: int, budget: int) -> list[bytes]:
        fd = self._fds[queue]
        frames: list[bytes] = []
        read = os.read
        for _ in range(budget):
            try:
                frames.append(read(fd, _READ_SIZE))
            except BlockingIOError:
                break
        return frames

    def send(self, queue: int, frame: bytes) -> bool:
        try:
            os.write(self._fds[queue % len(self._fds)], frame)
        except (BlockingIOError, OSError):
            # EIO when the interface is down, ENOBUFS/EAGAIN under pressure: the wire
            # lost the frame, as a real one would; the caller counts it.
            return False
        return True

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
