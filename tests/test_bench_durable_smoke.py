"""The durable benchmark's own logic, without root: parsing what redis-benchmark and strace
print, the statistics, the writer harness, and one tiny raw-log run on a file.

The benchmark itself (``tools/bench durable``) needs root, redis and minutes; these tests
keep its parsing and arithmetic honest so that a run's table means what it says.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.storage.blockdev import FileBlockDevice
from libos.storage.log import PersistentLog
from tools.bench_durable import log_appends, parse_strace, run_writers, summarize, vsa_blocks
from tools.benchlib import BenchError, parse_redis_benchmark_csv, percentile

REDIS7_CSV = (
    '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"\n'
    '"SET","3355.70","0.029","0.016","0.031","0.039","0.055","0.199"\n'
)


def test_redis_benchmark_csv_gives_rate_and_microseconds() -> None:
    row = parse_redis_benchmark_csv(REDIS7_CSV)
    assert row == pytest.approx({"ops_per_s": 3355.70, "p50_us": 31.0, "p99_us": 55.0, "mean_us": 29.0})


@pytest.mark.parametrize(
    "text",
    [
        "",
        '"test","rps"\n',  # no SET row
        '"SET","100"\n',  # no header
        '"test","rps","avg_latency_ms"\n"SET","100"\n',  # row shorter than the header
        REDIS7_CSV.replace('"3355.70"', '"fast"'),  # a number that is not one
        '"test","rps","avg_latency_ms"\n"SET","1","2"\n',  # Redis 6 columns: no percentiles
    ],
)
def test_redis_benchmark_csv_rejects_what_it_cannot_read(text: str) -> None:
    with pytest.raises(BenchError):
        parse_redis_benchmark_csv(text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from('"test,rpsSETavg_latency_ms0123456789.\n\x00\r p50p99'), max_size=300))
def test_random_benchmark_output_raises_only_bench_error(text: str) -> None:
    try:
        row = parse_redis_benchmark_csv(text)
    except BenchError:
        return
    assert set(row) == {"ops_per_s", "p50_us", "p99_us", "mean_us"}


STRACE = """\
2711  epoll_wait(3, [], 8, 0) = 0 <0.000010>
2711  epoll_wait(3, [], 8, 0) = 0 <0.000030>
2711  epoll_wait(3, [{events=EPOLLIN, data={u32=9, u64=9}}], 8, 50) = 1 <0.004000>
2711  pwritev2(5, [{iov_base="x", iov_len=4096}], 1, 8192, 0) = 4096 <0.000200>
2711  fdatasync(5) = 0 <0.001000>
2711  fdatasync(5) = 0 <0.003000>
2711  write(9, "\\1\\0\\0\\0\\0\\0\\0\\0", 8) = 8 <0.000020>
2711  --- SIGINT {si_signo=SIGINT} ---
strace: Process 2711 detached
"""


def test_strace_calls_are_counted_and_epoll_split_by_timeout() -> None:
    calls = parse_strace(STRACE)
    assert {name: call["count"] for name, call in calls.items()} == {
        "epoll_wait(poll, timeout 0)": 2,
        "epoll_wait(sleep)": 1,
        "fdatasync": 2,
        "pwritev2": 1,
        "write": 1,
    }
    assert calls["fdatasync"]["total_ms"] == pytest.approx(4.0)
    assert calls["fdatasync"]["p99_us"] == pytest.approx(3000.0)
    assert calls["epoll_wait(sleep)"]["p50_us"] == pytest.approx(4000.0)


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [([1.0], 0.5, 1.0), ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0), ([1.0, 2.0, 3.0, 4.0], 0.99, 4.0), (list(range(100)), 0.99, 99)],
)
def test_percentile(values: list[float], fraction: float, expected: float) -> None:
    assert percentile(values, fraction) == expected


def test_summarize_reports_microseconds_and_rate() -> None:
    result = summarize([0.002, 0.001, 0.003, 0.004], elapsed_s=0.5)
    assert result["ops"] == 4
    assert result["ops_per_s"] == pytest.approx(8.0)
    assert result["p50_us"] == pytest.approx(3000.0)
    assert result["mean_us"] == pytest.approx(2500.0)


def test_vsa_blocks_follow_the_extent_order() -> None:
    assert vsa_blocks([[100, 2], [10, 3]]) == [100, 101, 10, 11, 12]


@pytest.mark.parametrize("writers", [1, 4])
def test_run_writers_calls_every_writer_its_share(writers: int) -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def op(writer: int, index: int) -> None:
        with lock:
            seen.append((writer, index))

    result = run_writers(writers, 8, op)
    assert sorted(seen) == [(w, i) for w in range(writers) for i in range(8 // writers)]
    assert result["ops"] == 8 and result["writers"] == writers


def test_run_writers_reports_a_failed_writer() -> None:
    def op(writer: int, index: int) -> None:
        if writer == 1:
            raise OSError("disk gone")

    with pytest.raises(BenchError, match="disk gone"):
        run_writers(2, 4, op)


def test_log_appends_on_a_file_make_every_record_durable(tmp_path: Path) -> None:
    with FileBlockDevice(tmp_path / "log.dat", 4096, 64, create=True) as device:
        log = PersistentLog(device, use_fua=True)
        result = log_appends(log, 4, 16, 100)
        assert result["ops"] == 16
        assert log.durable_seq == 16
        log.close()
    with FileBlockDevice(tmp_path / "log.dat", 4096) as device:
        reopened = PersistentLog(device, create=False)
        assert [record for _seq, record in reopened.records()] == [b"r" * 100] * 16
        reopened.close()
