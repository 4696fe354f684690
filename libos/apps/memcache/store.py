"""The item store of the memcached-compatible server: bounded memory, LRU eviction.

No I/O and no wall clock: every operation takes ``now`` (unix time, seconds), so tests
drive expiry with a fake clock. The store knows nothing of the wire protocol; it gets
checked, typed arguments from ``protocol.py`` and still refuses what would break its
invariants (oversized keys, flags outside u32), raising ``StoreError``.

Expiry follows memcached's rules (protocol.txt, "Storage commands", exptime): 0 never
expires; a value up to 30 days is a number of seconds from now; a larger value is an
absolute unix time; a negative value means the item is expired as soon as it is stored.
Expired and flushed items are removed lazily, when a lookup or the LRU walk meets them.

Memory is a byte budget: each item is charged ``ITEM_HEADER_BYTES`` plus its key and
value with the terminators memcached keeps beside them, so the ``bytes`` statistic is
comparable to memcached's. When a store would exceed the budget, least recently used items
are evicted first.
"""

from __future__ import annotations

import enum
import re
from collections import OrderedDict
from dataclasses import dataclass

KEY_MAX_LENGTH = 250
FLAGS_MAX = 0xFFFF_FFFF
U64_MASK = 0xFFFF_FFFF_FFFF_FFFF
# memcached's REALTIME_MAXDELTA: an exptime above 30 days is an absolute unix time.
REALTIME_MAXDELTA = 60 * 60 * 24 * 30
# Per-item bookkeeping charged against the budget, close to memcached's item header
# (links, times, cas, sizes) so that "bytes" and the too-large threshold feel familiar.
ITEM_HEADER_BYTES = 48
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_ITEM_SIZE_MAX = 1024 * 1024

# strtoull as memcached's safe_strtoull applies it to a stored value: leading C
# whitespace, an optional plus, decimal digits, then the end or a whitespace byte.
_NUMERIC_VALUE = re.compile(rb"[ \t\n\v\f\r]*\+?([0-9]+)(?:[ \t\n\v\f\r]|\Z)")
_DIGITS_IN_U64_MAX = 20


class StoreError(ValueError):
    """An argument the store refuses (the protocol layer should have caught it)."""


class NonNumericValue(Exception):
    """incr/decr met a value that is not a decimal 64-bit unsigned number."""


class StoreResult(enum.Enum):
    STORED = "STORED"
    NOT_STORED = "NOT_STORED"
    EXISTS = "EXISTS"
    NOT_FOUND = "NOT_FOUND"
    TOO_LARGE = "TOO_LARGE"


@dataclass(slots=True)
class Item:
    key: bytes
    value: bytes
    flags: int
    # Absolute unix time at which the item stops existing; 0.0 means never.
    expires_at: float
    cas: int
    # When the item was last written: flush_all with a delay invalidates by this.
    updated_at: float


@dataclass(slots=True)
class StoreCounters:
    total_items: int = 0
    evictions: int = 0
    reclaimed: int = 0
    expired_unfetched: int = 0


def item_size(key_length: int, value_length: int) -> int:
    """Bytes charged for an item: header, key plus NUL, value plus CRLF (as memcached)."""
    return ITEM_HEADER_BYTES + key_length + 1 + value_length + 2


def parse_numeric_value(value: bytes) -> int | None:
    """The u64 that incr/decr sees in a stored value, or None when it is not numeric."""
    match = _NUMERIC_VALUE.match(value)
    if match is None:
        return None
    # Leading zeros are legal and unbounded; strip them before the length check so a
    # megabyte of "0" neither fails nor reaches int() (which caps digit strings).
    digits = match.group(1).lstrip(b"0") or b"0"
    if len(digits) > _DIGITS_IN_U64_MAX:
        return None
    number = int(digits)
    return number if number <= U64_MASK else None


class McStore:
    """Items keyed by bytes, bounded by ``max_bytes``, evicted least recently used first."""

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        item_size_max: int = DEFAULT_ITEM_SIZE_MAX,
        started_at: float = 0.0,
    ) -> None:
        if max_bytes <= 0 or item_size_max <= 0:
            raise StoreError("max_bytes and item_size_max must be positive")
        self.max_bytes = max_bytes
        self.item_size_max = min(item_size_max, max_bytes)
        # memcached treats an absolute exptime before its own start as already past.
        self.started_at = started_at
        self.counters = StoreCounters()
        self._items: OrderedDict[bytes, Item] = OrderedDict()
        self._bytes = 0
        self._last_cas = 0
        self._flush_before: float | None = None

    @property
    def curr_items(self) -> int:
        return len(self._items)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def expiry_deadline(self, exptime: int, now: float) -> float:
        """Turn a protocol exptime into an absolute deadline (0.0: never)."""
        if exptime == 0:
            return 0.0
        if exptime < 0:
            return now
        if exptime > REALTIME_MAXDELTA:
            # Absolute time; one already past (or before our start) is due at once.
            return float(exptime) if exptime > self.started_at else now
        return now + exptime

    def too_large(self, key_length: int, value_length: int) -> bool:
        return item_size(key_length, value_length) > self.item_size_max

    def get(self, key: bytes, now: float) -> Item | None:
        """A live item (moved to the most recently used end), or None."""
        item = self._live(key, now)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def peek(self, key: bytes, now: float) -> Item | None:
        """A live item without touching its LRU position."""
        return self._live(key, now)

    def store(
        self,
        mode: str,
        key: bytes,
        value: bytes,
        flags: int,
        exptime: int,
        now: float,
        cas_unique: int = 0,
    ) -> StoreResult:
        """set/add/replace/append/prepend/cas, with memcached's result for each."""
        self._check_key(key)
        if not 0 <= flags <= FLAGS_MAX:
            raise StoreError(f"flags {flags} outside u32")
        existing = self._live(key, now)
        if mode == "set":
            pass
        elif mode == "add":
            if existing is not None:
                # memcached bumps the existing item on a failed add (it was just wanted).
                self._items.move_to_end(key)
                return StoreResult.NOT_STORED
        elif mode == "replace":
            if existing is None:
                return StoreResult.NOT_STORED
        elif mode in ("append", "prepend"):
            if existing is None:
                return StoreResult.NOT_STORED
            # protocol.txt: append/prepend ignore the new flags and exptime.
            value = existing.value + value if mode == "append" else value + existing.value
            flags = existing.flags
            if self.too_large(len(key), len(value)):
                return StoreResult.TOO_LARGE
            self._put(key, value, flags, existing.expires_at, now)
            return StoreResult.STORED
        elif mode == "cas":
            if existing is None:
                return StoreResult.NOT_FOUND
            if existing.cas != cas_unique:
                return StoreResult.EXISTS
        else:
            raise StoreError(f"unknown store mode {mode!r}")
        if self.too_large(len(key), len(value)):
            if mode == "set":
                # memcached drops the old value rather than leave it stale.
                self._remove(key)
            return StoreResult.TOO_LARGE
        self._put(key, value, flags, self.expiry_deadline(exptime, now), now)
        return StoreResult.STORED

    def delete(self, key: bytes, now: float) -> bool:
        self._check_key(key)
        if self._live(key, now) is None:
            return False
        self._remove(key)
        return True

    def touch(self, key: bytes, exptime: int, now: float) -> bool:
        self._check_key(key)
        item = self._live(key, now)
        if item is None:
            return False
        item.expires_at = self.expiry_deadline(exptime, now)
        self._items.move_to_end(key)
        return True

    def incr_decr(self, key: bytes, delta: int, incr: bool, now: float) -> int | None:
        """The new value, None when the key is missing; NonNumericValue when not a number.

        Increment wraps modulo 2**64; decrement stops at 0 (protocol.txt, incr/decr). As
        memcached does, a result shorter than the old text is padded with spaces to the old
        length (it rewrites the value in place), a longer one makes the value grow.
        """
        self._check_key(key)
        if not 0 <= delta <= U64_MASK:
            raise StoreError("delta outside u64")
        item = self._live(key, now)
        if item is None:
            return None
        current = parse_numeric_value(item.value)
        if current is None:
            raise NonNumericValue(key)
        result = (current + delta) & U64_MASK if incr else max(current - delta, 0)
        text = b"%d" % result
        if len(text) < len(item.value):
            text = text.ljust(len(item.value), b" ")
        self._put(key, text, item.flags, item.expires_at, now)
        return result

    def flush_all(self, delay: int, now: float) -> None:
        """Invalidate every item written before now + delay, once that time has come."""
        if delay <= 0:
            self._items.clear()
            self._bytes = 0
            self._flush_before = None
            return
        self._flush_before = now + delay

    def _check_key(self, key: bytes) -> None:
        if not 0 < len(key) <= KEY_MAX_LENGTH:
            raise StoreError(f"key length {len(key)} outside 1..{KEY_MAX_LENGTH}")

    def _next_cas(self) -> int:
        # cas uniques are u64 and never 0 (0 is "no cas" in memcached).
        self._last_cas = self._last_cas + 1 if self._last_cas < U64_MASK else 1
        return self._last_cas

    def _live(self, key: bytes, now: float) -> Item | None:
        item = self._items.get(key)
        if item is None:
            return None
        if self._is_dead(item, now):
            self._remove(key)
            self.counters.reclaimed += 1
            return None
        return item

    def _is_dead(self, item: Item, now: float) -> bool:
        if item.expires_at and item.expires_at <= now:
            return True
        flush_before = self._flush_before
        return flush_before is not None and now >= flush_before and item.updated_at <= flush_before

    def _put(self, key: bytes, value: bytes, flags: int, expires_at: float, now: float) -> None:
        self._remove(key)
        size = item_size(len(key), len(value))
        self._make_room(size, now)
        self._items[key] = Item(key, value, flags, expires_at, self._next_cas(), now)
        self._bytes += size
        self.counters.total_items += 1

    def _make_room(self, size: int, now: float) -> None:
        while self._items and self._bytes + size > self.max_bytes:
            _, victim = self._items.popitem(last=False)
            self._bytes -= item_size(len(victim.key), len(victim.value))
            if self._is_dead(victim, now):
                self.counters.reclaimed += 1
            else:
                self.counters.evictions += 1

    def _remove(self, key: bytes) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item_size(len(key), len(item.value))
