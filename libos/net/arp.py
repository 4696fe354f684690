"""The ARP cache (RFC 826), sans-I/O: a table, the packets waiting on it, and timers.

The cache knows nothing about frames: the stack asks ``lookup`` on every send, hands
``enqueue`` what it cannot send yet, and gets the waiting items back from ``update``
when a reply arrives. Time comes in as ``now``; ``next_deadline`` and ``poll`` drive the
request retries.

Entries live ``lifetime`` seconds from the last ARP packet heard from that host. A
little before that (``refresh_margin``), the first lookup asks the stack to refresh the
entry with a unicast request to the known address, the "unicast poll" of RFC 1122
2.3.2.1, so busy flows never stall on an expired entry. Unused entries simply expire.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import Generic, TypeVar

QueuedT = TypeVar("QueuedT")


class Enqueued(enum.Enum):
    NEW = "new"  # first packet for this address: send an ARP request now
    QUEUED = "queued"  # a request is already outstanding
    FULL = "full"  # refused: the address's queue or the pending table is full


class _Entry:
    __slots__ = ("mac", "expires", "refresh_at")

    def __init__(self, mac: bytes, expires: float, refresh_at: float) -> None:
        self.mac = mac
        self.expires = expires
        self.refresh_at = refresh_at


class _Pending(Generic[QueuedT]):
    __slots__ = ("tries", "deadline", "queue")

    def __init__(self, deadline: float) -> None:
        self.tries = 1
        self.deadline = deadline
        self.queue: deque[QueuedT] = deque()


class ArpCache(Generic[QueuedT]):
    def __init__(
        self,
        *,
        lifetime: float = 60.0,
        refresh_margin: float = 5.0,
        retry_interval: float = 1.0,
        max_tries: int = 3,
        max_queued: int = 8,
        max_entries: int = 512,
        max_pending: int = 64,
    ) -> None:
        if not (lifetime > 0 and 0 <= refresh_margin < lifetime and retry_interval > 0):
            raise ValueError("ARP cache times must be positive, the refresh margin below the lifetime")
        if min(max_tries, max_queued, max_entries, max_pending) < 1:
            raise ValueError("ARP cache limits must be at least 1")
        self.lifetime = lifetime
        self.refresh_margin = refresh_margin
        self.retry_interval = retry_interval
        self.max_tries = max_tries
        self.max_queued = max_queued
        self.max_entries = max_entries
        self.max_pending = max_pending
        self._table: dict[bytes, _Entry] = {}
        self._pending: dict[bytes, _Pending[QueuedT]] = {}
        # (ip, mac) pairs whose entry is about to expire; the stack drains this list and
        # sends a unicast request to each.
        self.refresh_wanted: list[tuple[bytes, bytes]] = []

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, ip: bytes, now: float) -> bytes | None:
        """The MAC for ``ip``, or None when unknown or expired."""
        entry = self._table.get(ip)
        if entry is None:
            return None
        if now >= entry.refresh_at:
            if now >= entry.expires:
                del self._table[ip]
                return None
            entry.refresh_at = math.inf  # ask once; update() re-arms it
            self.refresh_wanted.append((ip, entry.mac))
        return entry.mac

    def pending(self, ip: bytes) -> int:
        """How many items wait on a resolution of ``ip`` (0 when none is outstanding)."""
        waiting = self._pending.get(ip)
        return len(waiting.queue) if waiting is not None else 0

    def update(self, ip: bytes, mac: bytes, now: float, *, create: bool) -> list[QueuedT]:
        """Merge what an ARP packet says about ``ip``; return the items that waited on it.

        RFC 826 "Packet Reception": an existing entry is always updated (the merge flag);
        a new one is created only when the packet was aimed at us (``create``) or when we
        are resolving that address ourselves.
        """
        expires = now + self.lifetime
        entry = self._table.get(ip)
        waiting = self._pending.pop(ip, None)
        if entry is not None:
            entry.mac = mac
            entry.expires = expires
            entry.refresh_at = expires - self.refresh_margin
        elif create or waiting is not None:
            self._make_room(now)
            self._table[ip] = _Entry(mac, expires, expires - self.refresh_margin)
        return list(waiting.queue) if waiting is not None else []

    def enqueue(self, ip: bytes, item: QueuedT, now: float) -> Enqueued:
        """Hold ``item`` until ``ip`` resolves; say whether to send a request now."""
        waiting = self._pending.get(ip)
        if waiting is None:
            if len(self._pending) >= self.max_pending:
                return Enqueued.FULL
            waiting = _Pending(now + self.retry_interval)
            waiting.queue.append(item)
            self._pending[ip] = waiting
            return Enqueued.NEW
        if len(waiting.queue) >= self.max_queued:
            return Enqueued.FULL
        waiting.queue.append(item)
        return Enqueued.QUEUED

    def next_deadline(self) -> float | None:
        if not self._pending:
            return None
        return min(waiting.deadline for waiting in self._pending.values())

    def poll(self, now: float) -> tuple[list[bytes], list[tuple[bytes, int]]]:
        """Run due timers: (addresses to ask again, [(address, items dropped)] given up)."""
        retry: list[bytes] = []
        failed: list[tuple[bytes, int]] = []
        for ip, waiting in list(self._pending.items()):
            if now < waiting.deadline:
                continue
            if waiting.tries < self.max_tries:
                waiting.tries += 1
                waiting.deadline = now + self.retry_interval
                retry.append(ip)
            else:
                del self._pending[ip]
                failed.append((ip, len(waiting.queue)))
        return retry, failed

    def _make_room(self, now: float) -> None:
        if len(self._table) < self.max_entries:
            return
        for ip in [ip for ip, entry in self._table.items() if now >= entry.expires]:
            del self._table[ip]
        if len(self._table) >= self.max_entries:
            # Still full: drop the oldest entry (dicts keep insertion order). Entries
            # are created only for hosts that talk to us, so this bounds what a flood
            # of requests from forged addresses can cost.
            del self._table[next(iter(self._table))]
