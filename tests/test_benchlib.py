"""The benchmarks' shared helpers (tools/benchlib.py), without root: statistics, ratios,
reading ``redis-benchmark --csv``, cProfile reports, stopping a process."""

from __future__ import annotations

import cProfile
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tools.benchlib import (
    BenchError,
    in_netns,
    parse_redis_benchmark_csv,
    percentile,
    ratio,
    ratio_or_nan,
    report_profiles,
    stop,
    top_functions,
    write_json,
)

HEADER = '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"\n'
SET_ROW = '"SET","3355.70","0.029","0.016","0.031","0.039","0.055","0.199"\n'
GET_ROW = '"GET","5000.00","0.020","0.010","0.019","0.030","0.040","0.100"\n'


@pytest.mark.parametrize(
    ("values", "fraction", "expected"),
    [
        ([7.0], 0.0, 7.0),
        ([7.0], 0.999, 7.0),
        ([1.0, 2.0, 3.0, 4.0], 0.0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 1.0, 4.0),  # clamped to the last value
        ([float(v) for v in range(1000)], 0.999, 999.0),
        ([float(v) for v in range(1000)], 0.99, 990.0),
        ((1.0, 2.0), 0.5, 2.0),  # any sequence
    ],
)
def test_percentile(values: list[float], fraction: float, expected: float) -> None:
    assert percentile(values, fraction) == expected


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 0.5))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(6.0, 3.0, 2.0), (0.0, 3.0, 0.0), (3.0, 0.0, None), (None, 3.0, None), (3.0, None, None), (1.0, 4.0, 0.25)],
)
def test_ratio(a: float | None, b: float | None, expected: float | None) -> None:
    assert ratio(a, b) == expected
    if expected is None:
        assert math.isnan(ratio_or_nan(a, b))
    else:
        assert ratio_or_nan(a, b) == expected


@pytest.mark.parametrize(
    ("text", "test", "expected"),
    [
        (HEADER + SET_ROW, "SET", {"ops_per_s": 3355.70, "p50_us": 31.0, "p99_us": 55.0, "mean_us": 29.0}),
        (HEADER + SET_ROW + GET_ROW, "GET", {"ops_per_s": 5000.0, "p50_us": 19.0, "p99_us": 40.0, "mean_us": 20.0}),
        ("\n" + HEADER + "\n" + GET_ROW, "GET", {"ops_per_s": 5000.0, "p50_us": 19.0, "p99_us": 40.0, "mean_us": 20.0}),
    ],
)
def test_redis_benchmark_csv_rows(text: str, test: str, expected: dict[str, float]) -> None:
    assert parse_redis_benchmark_csv(text, test) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "test"),
    [
        ("", "SET"),
        (HEADER, "SET"),  # no row at all
        (HEADER + SET_ROW, "GET"),  # not the row asked for
        (SET_ROW, "SET"),  # no header
        (HEADER + '"SET","1"\n', "SET"),  # shorter than the header
        (HEADER + SET_ROW.replace('"3355.70"', '"fast"'), "SET"),  # not a number
        ('"test","rps","avg_latency_ms"\n"SET","1","2"\n', "SET"),  # Redis 6 columns
        ('"test","rps"\n"SET","1\x00"\n', "SET"),
    ],
)
def test_redis_benchmark_csv_rejects_what_it_cannot_read(text: str, test: str) -> None:
    with pytest.raises(BenchError):
        parse_redis_benchmark_csv(text, test)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from('"test,rpsGETavg_latency_ms0123456789.\n\x00\r p50p99'), max_size=300))
def test_random_output_raises_only_bench_error(text: str) -> None:
    try:
        row = parse_redis_benchmark_csv(text, "GET")
    except BenchError:
        return
    assert set(row) == {"ops_per_s", "p50_us", "p99_us", "mean_us"}


def _busy(rounds: int) -> int:
    total = 0
    for index in range(rounds):  # all of its time its own, so it tops the tottime order
        total += index * index
    return total


def _profile(path: Path) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(_busy, 20000)
    profiler.dump_stats(str(path))


def test_top_functions_lists_the_profiled_function_without_the_preamble(tmp_path: Path) -> None:
    path = tmp_path / "app.prof"
    _profile(path)
    text = top_functions(path, limit=3)
    assert text.startswith("   ncalls")
    assert "_busy" in text
    assert str(tmp_path) not in text  # the preamble names the file; it is cut off


def test_top_functions_honours_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "app.prof"
    _profile(path)
    rows = [line for line in top_functions(path, limit=1).splitlines()[1:] if line.strip()]
    assert len(rows) == 1


def test_report_profiles_by_file_stem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _profile(tmp_path / "b-host.prof")
    _profile(tmp_path / "a-app.prof")
    (tmp_path / "notes.txt").write_text("not a profile")
    profiles = report_profiles(tmp_path, limit=2)
    assert list(profiles) == ["a-app", "b-host"]
    assert all("_busy" in text for text in profiles.values())
    assert "profile a-app (top functions by own time)" in capsys.readouterr().out


def test_write_json_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(None, {"a": 1})
    assert capsys.readouterr().out == ""
    path = tmp_path / "out.json"
    write_json(path, {"a": 1, "b": None})
    assert json.loads(path.read_text()) == {"a": 1, "b": None}
    assert f"wrote {path}" in capsys.readouterr().out


def test_in_netns_pins_the_command() -> None:
    assert in_netns("arx-cli-x", 0, "redis-cli", "ping") == [
        "ip", "netns", "exec", "arx-cli-x", "taskset", "-c", "0", "redis-cli", "ping",
    ]  # fmt: skip


def test_stop_returns_what_the_process_printed() -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('bye'), sys.exit(0)))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "up\n"
    assert stop(process, timeout=10) == "bye\n"
    assert process.returncode == 0


def test_stop_kills_a_process_that_ignores_sigterm() -> None:
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "up\n"
    assert stop(process, timeout=0.2) == ""
    assert process.returncode == -9


def test_cpu_seconds_and_meter_count_this_process() -> None:
    from tools.benchlib import CpuMeter, cpu_seconds

    pid = os.getpid()
    meter = CpuMeter({"me": pid, "gone": 2**22 + 1})  # above pid_max's default: no such process
    meter.start()
    start = cpu_seconds(pid)
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:
        pass
    used = cpu_seconds(pid) - start
    assert 0.1 < used < 5.0
    per_request = meter.per_request_us(1000)
    assert per_request["gone"] == 0.0
    assert 100.0 < per_request["me"] < 5000.0  # 0.2 s over 1000 requests: about 200 us each
