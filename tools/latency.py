"""Whole latency distributions, for CCDFs: what redis-benchmark prints, and our own samples.

redis-benchmark 7 run without ``-q`` and ``--csv`` prints, after each test, the two tables
of its internal HDR histogram:

    Latency by percentile distribution:
    50.000% <= 0.231 milliseconds (cumulative count 51234)
    ...
    Cumulative distribution of latencies:
    99.700% <= 0.103 milliseconds (cumulative count 1994)

and a summary with ``throughput summary: N requests per second``. Every line of both tables
is a point (latency, requests at or below it) of the cumulative distribution; together they
are enough for a CCDF from the median out to the largest sample. Progress lines are written
with carriage returns between them and are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_POINT = re.compile(r"^\s*(\d+(?:\.\d+)?)% <= (\d+(?:\.\d+)?) milliseconds \(cumulative count (\d+)\)\s*$")
_THROUGHPUT = re.compile(r"throughput summary: (\d+(?:\.\d+)?) requests per second")
_COMPLETED = re.compile(r"(\d+) requests completed in")


class DistributionError(ValueError):
    """The text is not a whole redis-benchmark report (a failed run, another version's format)."""


@dataclass(frozen=True)
class Distribution:
    """A latency distribution as points of its CDF: (microseconds, requests at or below)."""

    total: int
    points: tuple[tuple[float, int], ...]  # ascending in both coordinates

    @classmethod
    def from_samples(cls, samples_us: Iterable[float]) -> Distribution:
        """Every sample a point: the exact empirical distribution (for our own clients)."""
        ordered = sorted(samples_us)
        points: list[tuple[float, int]] = []
        for count, value in enumerate(ordered, 1):
            if points and points[-1][0] == value:
                points[-1] = (value, count)
            else:
                points.append((value, count))
        return cls(len(ordered), tuple(points))

    def ccdf(self) -> list[tuple[float, float]]:
        """(latency in µs, fraction of requests slower than it), with the last point, where
        that fraction is 0, left out: a log axis cannot show it."""
        return [(value, 1.0 - count / self.total) for value, count in self.points if count < self.total]

    def percentile(self, fraction: float) -> float:
        """The smallest recorded latency with at least ``fraction`` of requests at or below it."""
        need = fraction * self.total
        for value, count in self.points:
            if count >= need:
                return value
        return self.points[-1][0] if self.points else float("nan")

    def to_json(self) -> dict[str, object]:
        return {"total": self.total, "points_us_count": [list(point) for point in self.points]}


@dataclass(frozen=True)
class RedisBenchmarkRun:
    """One redis-benchmark test: its throughput and its whole latency distribution."""

    rps: float
    latency: Distribution


def parse_redis_benchmark(text: str) -> RedisBenchmarkRun:
    """The single test in ``text`` (run with one ``-t``), or DistributionError."""
    throughput = _THROUGHPUT.search(text)
    completed = _COMPLETED.search(text)
    if throughput is None or completed is None:
        raise DistributionError(f"no redis-benchmark summary in: {text[-300:]!r}")
    total = int(completed.group(1))
    merged: dict[float, int] = {}
    for line in text.replace("\r", "\n").splitlines():
        match = _POINT.match(line)
        if match is not None:
            value_us = round(float(match.group(2)) * 1000.0, 3)
            count = int(match.group(3))
            if count > total:
                raise DistributionError(f"a cumulative count above the {total} requests: {line!r}")
            merged[value_us] = max(merged.get(value_us, 0), count)
    if not merged or max(merged.values()) != total:
        raise DistributionError("the latency tables do not reach every request")
    points = sorted(merged.items())
    for (_, earlier), (_, later) in zip(points, points[1:]):
        if later < earlier:
            raise DistributionError("the latency tables are not one cumulative distribution")
    return RedisBenchmarkRun(float(throughput.group(1)), Distribution(total, tuple(points)))
