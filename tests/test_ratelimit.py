"""Token buckets on a fake clock: long-run rate, burst bound, exact waits, storage limits."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.ratelimit import (
    MIN_NET_BURST_BYTES,
    MIN_STORAGE_BURST_BYTES,
    MIN_STORAGE_BURST_REQUESTS,
    RequestLimiter,
    TokenBucket,
    default_burst_bytes,
)

FRAME = 1514


@pytest.mark.parametrize(
    ("rate_bps", "burst"),
    [
        (0, MIN_NET_BURST_BYTES),
        (1_000_000, MIN_NET_BURST_BYTES),  # 5 ms at 1 Mbit/s is 625 bytes: two frames win
        (1_000_000_000, 625_000),  # 5 ms at 1 Gbit/s
        (10_000_000_000, 6_250_000),
    ],
)
def test_default_burst(rate_bps: int, burst: int) -> None:
    assert default_burst_bytes(rate_bps) == burst
    assert TokenBucket(rate_bps, None, 0.0).burst_bytes == burst
    assert TokenBucket(rate_bps, 0, 0.0).burst_bytes == burst  # 0 reads as "default" too


@pytest.mark.parametrize("rate_bps", [1_000_000, 10_000_000, 100_000_000])
def test_policer_long_run_rate_within_one_percent(rate_bps: int) -> None:
    # Offer far more than the rate, every 50 us, for 20 s of fake time.
    now = 1000.0
    bucket = TokenBucket(rate_bps, None, now)
    step = 50e-6
    passed = 0
    offered_per_step = max(1, int(rate_bps / 8 * step / FRAME * 3) + 1)
    for tick in range(1, 400_001):
        now = 1000.0 + tick * step
        for _ in range(offered_per_step):
            if bucket.try_consume(FRAME, now):
                passed += FRAME
            else:
                break
    target = rate_bps / 8 * (now - 1000.0)
    assert abs(passed - target) / target < 0.01
    # Never more than the rate plus one burst.
    assert passed <= target + bucket.burst_bytes


def test_shaper_long_run_rate_and_exact_waits() -> None:
    rate_bps = 8_000_000  # 1 MB/s
    start = 5e5  # a monotonic clock some days after boot
    bucket = TokenBucket(rate_bps, 10 * FRAME, start)
    now = start
    sent = 0
    for _ in range(20_000):
        wait = bucket.time_until(FRAME, now)
        now += wait
        assert bucket.try_consume(FRAME, now), "waiting time_until() must be enough"
        sent += FRAME
    elapsed = now - start
    # The first burst went out at once; everything after at the rate.
    expected = (sent - 10 * FRAME) / (rate_bps / 8)
    assert elapsed == pytest.approx(expected, rel=1e-6)


def test_burst_is_bounded_after_idle() -> None:
    bucket = TokenBucket(1_000_000, 5000, 0.0)
    now = 3600.0  # an hour idle earns no more than the burst
    taken = 0
    while bucket.try_consume(100, now):
        taken += 100
    assert taken == 5000
    assert not bucket.try_consume(1, now + 1e-9)


def test_time_until_exact() -> None:
    bucket = TokenBucket(8000, 3000, 10.0)  # 1000 bytes/s
    assert bucket.time_until(3000, 10.0) == 0.0
    assert bucket.try_consume(3000, 10.0)
    assert bucket.time_until(500, 10.0) == pytest.approx(0.5, rel=1e-12)
    assert bucket.time_until(500, 10.2) == pytest.approx(0.3, rel=1e-12)
    assert not bucket.try_consume(500, 10.499)
    assert bucket.try_consume(500, 10.5)
    assert bucket.available(10.5) == pytest.approx(0.0, abs=1e-3)


@settings(max_examples=300, deadline=None)
@given(
    rate_bps=st.integers(8, 10**11),
    burst=st.integers(1, 10**7),
    nbytes=st.integers(0, 10**6),
    spent=st.integers(0, 10**7),
    start=st.floats(0.0, 1e8),
)
def test_waiting_time_until_always_suffices(
    rate_bps: int, burst: int, nbytes: int, spent: int, start: float
) -> None:
    bucket = TokenBucket(rate_bps, burst, start)
    bucket.try_consume(min(spent, burst), start)
    wait = bucket.time_until(nbytes, start)
    assert wait >= 0.0 and math.isfinite(wait)
    if wait > 1e-3:
        # Well short of the wait, the tokens are not there yet.
        assert not bucket.try_consume(nbytes, start + wait * 0.9)
    assert bucket.try_consume(nbytes, start + wait)


def test_oversize_request_goes_through_on_a_full_bucket() -> None:
    bucket = TokenBucket(8000, 1000, 0.0)  # 1000 bytes/s, burst smaller than the frame
    assert bucket.try_consume(1000, 0.0)
    assert bucket.time_until(FRAME, 0.0) == pytest.approx(1.0)
    assert not bucket.try_consume(FRAME, 0.9)
    assert bucket.try_consume(FRAME, 1.0)
    # The excess is debt: the next frame waits for it to be repaid.
    assert bucket.available(1.0) == pytest.approx(1000 - FRAME)
    assert bucket.time_until(100, 1.0) == pytest.approx((FRAME - 1000 + 100) / 1000)


def test_unlimited() -> None:
    bucket = TokenBucket.unlimited(0.0)
    assert bucket.is_unlimited and bucket.rate_bps == TokenBucket.UNLIMITED == 0
    for _ in range(1000):
        assert bucket.try_consume(10**9, 0.0)
    assert bucket.time_until(10**12, 0.0) == 0.0
    assert bucket.available(0.0) == math.inf


def test_set_rate() -> None:
    bucket = TokenBucket.unlimited(0.0)
    bucket.set_rate(8000, 2000, 1.0)  # leaving unlimited: starts full
    assert bucket.try_consume(2000, 1.0)
    assert not bucket.try_consume(1, 1.0)
    bucket.set_rate(16000, 2000, 1.5)  # 500 bytes earned at the old rate are kept
    assert bucket.available(1.5) == pytest.approx(500)
    assert bucket.time_until(1000, 1.5) == pytest.approx(500 / 2000)
    bucket.set_rate(16000, 100, 3.0)  # a smaller burst caps what is there
    assert bucket.available(3.0) == pytest.approx(100)
    bucket.set_rate(0, None, 3.0)
    assert bucket.try_consume(10**9, 3.0)


def test_clock_going_backwards_earns_nothing() -> None:
    bucket = TokenBucket(8000, 1000, 100.0)
    assert bucket.try_consume(1000, 100.0)
    assert not bucket.try_consume(1, 50.0)
    assert bucket.time_until(500, 50.0) == pytest.approx(0.5)
    assert bucket.try_consume(500, 100.5)


@pytest.mark.parametrize(
    ("rate", "burst", "now"),
    [(-1, None, 0.0), (True, None, 0.0), (1.5, None, 0.0), (1000, 1.5, 0.0), (1000, -5, 0.0),
     (1000, None, math.nan), (1000, None, math.inf), (1000, None, "0")],
)
def test_bad_configuration_refused(rate: object, burst: object, now: object) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, now)  # type: ignore[arg-type]


def test_negative_size_refused() -> None:
    bucket = TokenBucket(8000, 1000, 0.0)
    with pytest.raises(ValueError):
        bucket.try_consume(-1, 0.0)
    with pytest.raises(ValueError):
        bucket.time_until(-1, 0.0)
    assert bucket.available(0.0) == 1000


def test_request_limiter_iops() -> None:
    limiter = RequestLimiter(1000, 0, 0.0)
    assert limiter.burst_requests == MIN_STORAGE_BURST_REQUESTS
    now = 0.0
    passed = 0
    for tick in range(1, 100_001):  # 10 s, offered every 100 us (10x the limit)
        now = tick * 1e-4
        passed += limiter.try_consume(1 << 20, now)
    assert abs(passed - 10_000) <= MIN_STORAGE_BURST_REQUESTS


def test_request_limiter_bandwidth_and_wait() -> None:
    limiter = RequestLimiter(0, 8 * 1_000_000, 0.0)  # 1 MB/s, any number of requests
    assert limiter.burst_bytes == MIN_STORAGE_BURST_BYTES
    assert limiter.try_consume(MIN_STORAGE_BURST_BYTES, 0.0)
    assert limiter.time_until(4096, 0.0) == pytest.approx(4096 / 1_000_000)
    assert not limiter.try_consume(4096, 0.004)
    assert limiter.try_consume(4096, 0.0041)


def test_request_limiter_refusal_takes_nothing() -> None:
    limiter = RequestLimiter(10, 8000, 0.0, burst_requests=2, burst_bytes=1000)
    assert limiter.try_consume(900, 0.0)
    # The bytes budget refuses; the request budget must not be charged for it.
    assert not limiter.try_consume(900, 0.0)
    assert not limiter.try_consume(900, 0.0)
    assert limiter.try_consume(100, 0.0)
    # Now the request budget is empty (2 used) and the bytes budget too.
    assert limiter.time_until(0, 0.0) == pytest.approx(0.1)  # 10 iops
    assert limiter.time_until(500, 0.0) == pytest.approx(0.5)  # 1000 bytes/s dominates
    assert limiter.try_consume(0, 0.1)


def test_request_limiter_unlimited_and_reconfigure() -> None:
    limiter = RequestLimiter.unlimited(0.0)
    assert all(limiter.try_consume(10**9, 0.0) for _ in range(100))
    assert limiter.time_until(10**9, 0.0) == 0.0
    limiter.set_limits(1, 0, 1.0, burst_requests=1)
    assert limiter.try_consume(10**9, 1.0)
    assert not limiter.try_consume(0, 1.5)
    assert limiter.time_until(0, 1.5) == pytest.approx(0.5)
    assert limiter.stats() == {
        "iops": 1,
        "bps": 0,
        "burst_requests": 1,
        "burst_bytes": MIN_STORAGE_BURST_BYTES,
    }
    with pytest.raises(ValueError):
        limiter.set_limits(-1, 0, 2.0)
