"""Token buckets: the device's rate limiters. Pure logic on an injected clock.

One bucket per function and direction. The receive path *polices* (``try_consume``: a frame
that finds too few tokens is dropped and counted), the transmit path *shapes*
(``time_until``: the device leaves the descriptor posted and comes back when the tokens are
there, so the application sees back-pressure rather than loss).

Tokens are bytes (or requests, for :class:`RequestLimiter`'s IOPS side). The bucket holds
at most ``burst`` tokens and refills at the configured rate. A request larger than the
burst is allowed once the bucket is full and leaves the bucket in debt, so an oversize
frame or I/O is slowed to the rate instead of being refused forever, and the long-run rate
stays exact.

Time is always an argument (seconds, any monotonic base); nothing here reads a clock.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Final

from vdev.layout import MIN_RING_SIZE, VNIC_MAX_FRAME

UNLIMITED: Final = 0

# How much traffic a default burst holds. The device host is a Python poll loop: it may
# sleep a few milliseconds between polls (scheduler ticks, other device work), and tokens
# that would overflow a smaller bucket while it sleeps are lost, so a bucket shorter than
# that gap would throttle below the configured rate. Linux's tbf asks for a burst of at
# least rate / HZ for the same reason.
DEFAULT_BURST_SECONDS: Final = 0.005
# Never less than two full frames: a TCP sender's pair of back-to-back segments (RFC 5681
# 4.2 acknowledges every second segment) passes a slow link without a drop.
MIN_NET_BURST_BYTES: Final = 2 * VNIC_MAX_FRAME
# Storage: one minimum ring's worth of requests, so a driver's batch is not cut mid-ring,
# and 128 KiB of data, so a typical large direct I/O passes without first waiting.
MIN_STORAGE_BURST_REQUESTS: Final = MIN_RING_SIZE
MIN_STORAGE_BURST_BYTES: Final = 128 * 1024

# Credit granted to float rounding: one microsecond's worth of tokens. A caller that waits
# exactly time_until() computes now + wait in floating point, and (now + wait) - last can
# come out a few ulps short (the ulp of a monotonic clock reading of 1e8 s is 1.5e-8 s);
# without this slack that caller would be refused and wait again for nothing. The slack is
# not cumulative: a consume may take the bucket that far below zero, and it is repaid.
_SLACK_SECONDS: Final = 1e-6


def default_burst_bytes(rate_bps: int) -> int:
    """The network burst used when none is given: see DEFAULT_BURST_SECONDS."""
    return max(MIN_NET_BURST_BYTES, math.ceil(rate_bps / 8 * DEFAULT_BURST_SECONDS))


def _check_count(name: str, value: object, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_time(now: object) -> float:
    if not isinstance(now, (int, float)) or isinstance(now, bool) or not math.isfinite(now):
        raise ValueError(f"now must be a finite number of seconds, got {now!r}")
    return float(now)


class _Bucket:
    """A token bucket in abstract units; rate 0 means unlimited."""

    __slots__ = ("_rate", "_burst", "_tokens", "_last", "_slack")

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._last = _check_time(now)
        self._slack = 0.0
        self._configure(rate_per_s, burst, self._last, start_full=True)

    def _configure(self, rate_per_s: float, burst: float, now: float, start_full: bool) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._slack = rate_per_s * _SLACK_SECONDS
        self._tokens = burst if start_full else min(self._tokens, burst)
        self._last = now

    def _refill(self, now: float) -> None:
        # A clock that steps backwards earns nothing, rather than negative tokens.
        elapsed = now - self._last
        if elapsed > 0.0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._last = now

    def _needed(self, amount: float) -> float:
        # An amount beyond the burst can never be covered; it goes through on a full bucket.
        return amount if amount <= self._burst else self._burst

    def _ready(self, amount: float, now: float) -> bool:
        self._refill(now)
        return self._tokens + self._slack >= self._needed(amount)

    def _take(self, amount: float) -> None:
        self._tokens -= amount

    def _wait(self, amount: float, now: float) -> float:
        self._refill(now)
        deficit = self._needed(amount) - self._tokens
        return deficit / self._rate if deficit > 0.0 else 0.0

    def _available(self, now: float) -> float:
        self._refill(now)
        return self._tokens


class TokenBucket:
    """A byte-rate limiter: ``rate_bps`` bits per second, ``burst_bytes`` of burst.

    ``burst_bytes`` None or 0 picks :func:`default_burst_bytes`; ``rate_bps=0``
    (:attr:`UNLIMITED`) lets everything through.
    """

    UNLIMITED: ClassVar[int] = UNLIMITED
    __slots__ = ("_bucket", "rate_bps", "burst_bytes")

    def __init__(self, rate_bps: int, burst_bytes: int | None, now: float) -> None:
        self.rate_bps = 0
        self.burst_bytes = 0
        self._bucket = _Bucket(0.0, 0.0, now)
        self.set_rate(rate_bps, burst_bytes, now)

    @classmethod
    def unlimited(cls, now: float) -> TokenBucket:
        return cls(UNLIMITED, None, now)

    @property
    def is_unlimited(self) -> bool:
        return self.rate_bps == UNLIMITED

    def set_rate(self, rate_bps: int, burst_bytes: int | None, now: float) -> None:
        """Change the limit at ``now``: tokens earned so far at the old rate are kept (up to
        the new burst); a bucket leaving "unlimited" starts full."""
        _check_count("rate_bps", rate_bps, 0)
        if burst_bytes is None or burst_bytes == 0:
            burst_bytes = default_burst_bytes(rate_bps)
        _check_count("burst_bytes", burst_bytes, 1)
        when = _check_time(now)
        was_unlimited = self.rate_bps == UNLIMITED
        if not was_unlimited:
            self._bucket._refill(when)
        self.rate_bps = rate_bps
        self.burst_bytes = burst_bytes
        self._bucket._configure(rate_bps / 8, burst_bytes, when, start_full=was_unlimited)

    def try_consume(self, nbytes: int, now: float) -> bool:
        """Policer: take ``nbytes`` tokens if they are there (True), else take none (False)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if self.rate_bps == UNLIMITED:
            return True
        bucket = self._bucket
        if bucket._ready(nbytes, now):
            bucket._take(nbytes)
            return True
        return False

    def time_until(self, nbytes: int, now: float) -> float:
        """Shaper: seconds from ``now`` until ``try_consume(nbytes)`` would succeed (0.0 if it
        would now). Consumes nothing."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if self.rate_bps == UNLIMITED:
            return 0.0
        return self._bucket._wait(nbytes, now)

    def available(self, now: float) -> float:
        """Tokens (bytes) in the bucket at ``now``; negative while repaying an oversize
        request; infinite when unlimited."""
        if self.rate_bps == UNLIMITED:
            return math.inf
        return self._bucket._available(now)

    def stats(self) -> dict[str, Any]:
        return {"rate_bps": self.rate_bps, "burst_bytes": self.burst_bytes}


class RequestLimiter:
    """The storage limiter: at most ``iops`` requests and ``bps`` bits per second, each
    0 for unlimited (a burst of None or 0 picks the default). A request passes only when
    both budgets allow it, and then takes from both; one that is refused takes from
    neither."""

    UNLIMITED: ClassVar[int] = UNLIMITED
    __slots__ = ("_requests", "_bytes", "iops", "bps", "burst_requests", "burst_bytes")

    def __init__(
        self,
        iops: int,
        bps: int,
        now: float,
        burst_requests: int | None = None,
        burst_bytes: int | None = None,
    ) -> None:
        self.iops = 0
        self.bps = 0
        self.burst_requests = 0
        self.burst_bytes = 0
        self._requests = _Bucket(0.0, 0.0, now)
        self._bytes = _Bucket(0.0, 0.0, now)
        self.set_limits(iops, bps, now, burst_requests, burst_bytes)

    @classmethod
    def unlimited(cls, now: float) -> RequestLimiter:
        return cls(UNLIMITED, UNLIMITED, now)

    def set_limits(
        self,
        iops: int,
        bps: int,
        now: float,
        burst_requests: int | None = None,
        burst_bytes: int | None = None,
    ) -> None:
        _check_count("iops", iops, 0)
        _check_count("bps", bps, 0)
        if burst_requests is None or burst_requests == 0:
            burst_requests = max(
                MIN_STORAGE_BURST_REQUESTS, math.ceil(iops * DEFAULT_BURST_SECONDS)
            )
        if burst_bytes is None or burst_bytes == 0:
            burst_bytes = max(MIN_STORAGE_BURST_BYTES, math.ceil(bps / 8 * DEFAULT_BURST_SECONDS))
        _check_count("burst_requests", burst_requests, 1)
        _check_count("burst_bytes", burst_bytes, 1)
        when = _check_time(now)
        for bucket, old, new, burst in (
            (self._requests, self.iops, iops, burst_requests),
            (self._bytes, self.bps, bps / 8, burst_bytes),
        ):
            if old != UNLIMITED:
                bucket._refill(when)
            bucket._configure(new, burst, when, start_full=old == UNLIMITED)
        self.iops = iops
        self.bps = bps
        self.burst_requests = burst_requests
        self.burst_bytes = burst_bytes

    def try_consume(self, nbytes: int, now: float) -> bool:
        """Take one request and ``nbytes`` if both are there (True), else nothing (False)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        requests_ok = self.iops == UNLIMITED or self._requests._ready(1, now)
        bytes_ok = self.bps == UNLIMITED or self._bytes._ready(nbytes, now)
        if not (requests_ok and bytes_ok):
            return False
        if self.iops != UNLIMITED:
            self._requests._take(1)
        if self.bps != UNLIMITED:
            self._bytes._take(nbytes)
        return True

    def time_until(self, nbytes: int, now: float) -> float:
        """Seconds from ``now`` until a request of ``nbytes`` would pass. Consumes nothing."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        wait = 0.0
        if self.iops != UNLIMITED:
            wait = self._requests._wait(1, now)
        if self.bps != UNLIMITED:
            wait = max(wait, self._bytes._wait(nbytes, now))
        return wait

    def stats(self) -> dict[str, Any]:
        return {
            "iops": self.iops,
            "bps": self.bps,
            "burst_requests": self.burst_requests,
            "burst_bytes": self.burst_bytes,
        }
