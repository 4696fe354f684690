"""The keyspace: bytes keys to bytes values with optional expiry deadlines.

Deadlines are absolute Unix times in integer milliseconds, as Redis keeps them, so a
durable log can record them and replay gives the same answer whenever it runs. The
clock is injected: every call that may look at a deadline takes ``now`` (seconds, Unix
time, a float). A key is expired once ``now`` is strictly past its deadline (Redis
compares ``now > when``).

Expiry is lazy (an access to an expired key deletes it first) plus an active sweep,
``sweep(now, budget)``, that the server calls from its loop so keys nobody reads still
go away, with bounded work per call. Unlike Redis's random sampling the sweep walks a
min-heap of deadlines, so it finds every expired key in deadline order; entries made
stale by a later SET or EXPIRE are skipped and counted against the budget.
"""

from __future__ import annotations

import heapq
from typing import Iterator

# Rebuild the heap when stale entries outnumber live deadlines by this factor, so a
# client that re-expires one key forever cannot grow it without bound.
_STALE_FACTOR = 2
_MIN_REBUILD = 64


def to_ms(now: float) -> int:
    return int(now * 1000)


class Keyspace:
    """One database. Not thread-safe: one event loop owns it."""

    def __init__(self) -> None:
        self._data: dict[bytes, bytes] = {}
        self._deadlines: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        self.data_bytes = 0
        self.expired_keys = 0

    def __len__(self) -> int:
        # Like DBSIZE in Redis, keys that expired but were not yet removed still count.
        return len(self._data)

    @property
    def volatile_count(self) -> int:
        return len(self._deadlines)

    def keys(self) -> Iterator[bytes]:
        return iter(self._data)

    def _expire_if_needed(self, key: bytes, now_ms: int) -> bool:
        """Delete ``key`` if its deadline passed; True when it was deleted."""
        deadline = self._deadlines.get(key)
        if deadline is None or now_ms <= deadline:
            return False
        self._remove(key)
        self.expired_keys += 1
        return True

    def _remove(self, key: bytes) -> None:
        value = self._data.pop(key)
        self.data_bytes -= len(key) + len(value)
        self._deadlines.pop(key, None)

    def get(self, key: bytes, now: float) -> bytes | None:
        self._expire_if_needed(key, to_ms(now))
        return self._data.get(key)

    def exists(self, key: bytes, now: float) -> bool:
        self._expire_if_needed(key, to_ms(now))
        return key in self._data

    def set(self, key: bytes, value: bytes, now: float, deadline_ms: int | None = None,
            keep_ttl: bool = False) -> None:
        """Store ``value``; the deadline is replaced by ``deadline_ms`` (None: no expiry)
        unless ``keep_ttl`` keeps the one the live key had."""
        self._expire_if_needed(key, to_ms(now))
        old = self._data.get(key)
        if old is not None:
            self.data_bytes -= len(key) + len(old)
        self._data[key] = value
        self.data_bytes += len(key) + len(value)
        if keep_ttl:
            return
        if deadline_ms is None:
            self._deadlines.pop(key, None)
        else:
            self._set_deadline(key, deadline_ms)

    def delete(self, key: bytes, now: float) -> bool:
        if self._expire_if_needed(key, to_ms(now)) or key not in self._data:
            return False
        self._remove(key)
        return True

    def deadline(self, key: bytes, now: float) -> int | None:
        """The live key's deadline in ms; None when it has none (or does not exist)."""
        self._expire_if_needed(key, to_ms(now))
        return self._deadlines.get(key)

    def expire_at(self, key: bytes, deadline_ms: int, now: float) -> bool:
        """Give a live key a deadline; False when the key does not exist."""
        if not self.exists(key, now):
            return False
        self._set_deadline(key, deadline_ms)
        return True

    def persist(self, key: bytes, now: float) -> bool:
        """Drop the live key's deadline; True when it had one."""
        self._expire_if_needed(key, to_ms(now))
        return self._deadlines.pop(key, None) is not None

    def _set_deadline(self, key: bytes, deadline_ms: int) -> None:
        self._deadlines[key] = deadline_ms
        heapq.heappush(self._heap, (deadline_ms, key))
        if len(self._heap) > max(_MIN_REBUILD, _STALE_FACTOR * len(self._deadlines)):
            self._heap = [(when, k) for k, when in self._deadlines.items()]
            heapq.heapify(self._heap)

    def flush(self) -> None:
        self._data.clear()
        self._deadlines.clear()
        self._heap.clear()
        self.data_bytes = 0

    def sweep(self, now: float, budget: int) -> int:
        """Delete expired keys, looking at no more than ``budget`` heap entries; the
        number of keys deleted."""
        now_ms = to_ms(now)
        heap = self._heap
        removed = 0
        examined = 0
        while heap and examined < budget and heap[0][0] < now_ms:
            when, key = heapq.heappop(heap)
            examined += 1
            if self._deadlines.get(key) == when:
                self._remove(key)
                self.expired_keys += 1
                removed += 1
        return removed

    def next_deadline(self) -> int | None:
        """The earliest deadline in ms the sweep would act on (may be stale), so a
        server knows when to call ``sweep`` next; None when nothing may expire."""
        return self._heap[0][0] if self._heap else None
