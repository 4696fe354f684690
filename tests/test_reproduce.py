"""tools/reproduce: the latency-distribution reader, the report, and a --quick run end to end (root)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib import colors as mcolors
from matplotlib import image as mimage

from kernelctl.names import topology
from tests.conftest import PYTHON, REPO, require_root, unique_tag
from tools import report
from tools.latency import Distribution, DistributionError, parse_redis_benchmark
from tools.reproduce import EXPERIMENTS

# What redis-benchmark 7.0 printed for ``-t get -n 2000 -c 5`` (progress lines end in \r).
SAMPLE = (
    "GET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r"
    "GET: rps=118000.0 (overall: 118000.0) avg_msec=0.025 (overall: 0.025)\r"
    "====== GET ======\n  2000 requests completed in 0.02 seconds\n  5 parallel clients\n  3 bytes payload\n"
    "  keep alive: 1\n\nLatency by percentile distribution:\n"
    "0.000% <= 0.015 milliseconds (cumulative count 336)\n"
    "50.000% <= 0.031 milliseconds (cumulative count 1525)\n"
    "87.500% <= 0.039 milliseconds (cumulative count 1932)\n"
    "96.875% <= 0.047 milliseconds (cumulative count 1978)\n"
    "99.219% <= 0.055 milliseconds (cumulative count 1987)\n"
    "99.609% <= 0.095 milliseconds (cumulative count 1993)\n"
    "99.805% <= 0.119 milliseconds (cumulative count 1997)\n"
    "99.902% <= 0.135 milliseconds (cumulative count 2000)\n"
    "100.000% <= 0.135 milliseconds (cumulative count 2000)\n\n"
    "Cumulative distribution of latencies:\n"
    "99.700% <= 0.103 milliseconds (cumulative count 1994)\n"
    "100.000% <= 0.207 milliseconds (cumulative count 2000)\n\n"
    "Summary:\n  throughput summary: 117647.05 requests per second\n"
)


def test_redis_benchmark_report_becomes_one_distribution() -> None:
    run = parse_redis_benchmark(SAMPLE)
    assert run.rps == pytest.approx(117647.05)
    assert run.latency.total == 2000
    values = [value for value, _ in run.latency.points]
    assert values == sorted(values) and values[0] == 15.0
    assert dict(run.latency.points)[103.0] == 1994  # the second table's points are merged in
    assert run.latency.percentile(0.5) == 31.0
    assert run.latency.percentile(0.99) == 55.0  # 1987 of 2000 at or below
    ccdf = run.latency.ccdf()
    assert ccdf[0] == (15.0, pytest.approx(1 - 336 / 2000))
    assert all(0 < fraction < 1 for _, fraction in ccdf)


@pytest.mark.parametrize(
    "text",
    [
        "",
        SAMPLE.replace("throughput summary", "throughput"),  # no summary: the run failed
        SAMPLE.replace("(cumulative count 2000)", "(cumulative count 1999)"),  # never reaches every request
        SAMPLE.replace("(cumulative count 1525)", "(cumulative count 2500)"),  # above the total
        SAMPLE.replace("(cumulative count 1932)", "(cumulative count 100)"),  # not cumulative
    ],
)
def test_anything_but_a_whole_report_is_refused(text: str) -> None:
    with pytest.raises(DistributionError):
        parse_redis_benchmark(text)


@given(st.lists(st.floats(min_value=1.0, max_value=1e6, allow_nan=False), min_size=1, max_size=200))
def test_samples_give_the_exact_empirical_distribution(samples: list[float]) -> None:
    dist = Distribution.from_samples(samples)
    ordered = sorted(samples)
    assert dist.total == len(samples)
    assert dist.points[-1] == (ordered[-1], len(samples))
    assert dist.percentile(0.5) == ordered[(len(ordered) + 1) // 2 - 1]
    for value, fraction in dist.ccdf():
        assert fraction == pytest.approx(sum(1 for s in samples if s > value) / len(samples))


def _run(rps: float, p50: float, cpu: dict[str, dict[str, float]]) -> dict[str, Any]:
    latency = Distribution.from_samples([p50 * (1 + i / 50) for i in range(100)]).to_json()
    return {"rps": rps, "p50_us": p50, "p99_us": p50 * 3, "latency": latency, "cpu_us_per_request": cpu}


def synthetic_results() -> dict[str, Any]:
    cpu = {"app": {"user": 40.0, "kernel": 2.0}, "vnic_host": {"user": 20.0, "kernel": 1.0}}
    redis = {target: {"c1": _run(1e4, 50.0 * (i + 1), cpu), "c50": _run(2e4 * (i + 1), 400.0, cpu)}
             for i, target in enumerate(("vnic", "linux", "real"))}
    udp = {target: {**_run(0, 30.0, cpu), "samples": 100} for target in ("vnic", "linux")}
    return {
        "command": "tools/reproduce --quick", "mode": "quick", "started": "then", "finished": "now",
        "machine": {"cpus": 2, "kernel": "6", "python": "3.11", "cpu_model": "x"},
        "pinning": {"servers": 1, "clients": 0, "device_hosts": 0},
        "experiments": {
            "redis_get": {**redis, "status": "ok"},
            "durable_set": {**redis, "status": "ok"},
            "udp_echo": {**udp, "status": "ok"},
            "memcached_scaling": {
                "status": "ok", "workers": [1, 2], "seconds": 2, "connections": 16, "client_cpu": 0,
                "server_cpus": {"1": [1], "2": [0, 1]}, "speedup": {"vnic": 1.8, "linux": 1.5, "real": 1.9},
                **{target: [{"workers": 1, "tps": 1e4 * (i + 1), "get_misses": 0.0},
                            {"workers": 2, "tps": 1.8e4 * (i + 1), "get_misses": 0.0}]
                   for i, target in enumerate(("vnic", "linux", "real"))},
            },
            "isolation": {"status": "ok", "datagram_bytes": 1000, "app_cpu": 1, **{
                backend: {"alone": {"victim": _run(0, 50.0, cpu)}, "flood": {"victim": _run(0, 500.0, cpu)},
                          "limited": {"victim": _run(0, 60.0, cpu)}, "offered_bps": 4e8, "limit_bps": 4e7,
                          "p99_over_alone": {"flood": 10.0, "limited": 1.2}}
                for backend in ("vnic", "linux")}},
        },
    }


def assert_plotted(path: Path, colours: list[str]) -> None:
    """A PNG that decodes, with pixels of each of ``colours``: data was drawn, not an empty axis."""
    pixels = mimage.imread(str(path))[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300, path
    for colour in colours:
        rgb = mcolors.to_rgb(colour)
        close = (abs(pixels - rgb) < 0.02).all(axis=-1).sum()
        assert close > 50, f"{path.name}: nothing drawn in {colour}"


def check_report(out: Path, results: dict[str, Any]) -> None:
    text = (out / "report.md").read_text()
    for plot in report.PLOTS:
        assert f"({plot})" in text
    assert_plotted(out / "fig3_ccdf.png", list(report.COLOURS.values()))
    assert_plotted(out / "throughput.png", list(report.COLOURS.values()))
    assert_plotted(out / "cost_breakdown.png", ["#d62728", "#1f77b4"])  # server and VNIC host, user time
    assert_plotted(out / "isolation.png", [report.COLOURS["vnic"], report.COLOURS["linux"]])
    assert_plotted(out / "scaling.png", list(report.COLOURS.values()))
    for name, experiment in results["experiments"].items():
        if experiment["status"] != "ok":
            assert experiment["why"] in text, name


def test_report_from_results(tmp_path: Path) -> None:
    results = synthetic_results()
    written = report.write(results, tmp_path)
    assert {path.name for path in written} == {*report.PLOTS, "report.md"}
    check_report(tmp_path, results)
    text = (tmp_path / "report.md").read_text()
    assert "| GET | 20,000 | 40,000 | 60,000 | 0.50 | 1.75 (143,000 → 250,000) |" in text
    assert "| 2 | 18,000 | 36,000 | 54,000 |" in text
    assert "| speed-up 2/1 | 1.80 | 1.50 | 1.90 |" in text


@pytest.mark.root
def test_quick_run_writes_a_whole_report(tmp_path: Path) -> None:
    require_root()
    tag = unique_tag()
    out = tmp_path / "report"
    done = subprocess.run([PYTHON, "-m", "tools.reproduce", "--quick", "--out", str(out), "--tag", tag],
                          cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not topology(tag).run_dir.exists()  # it took its instance down
    results = json.loads((out / "results.json").read_text())
    assert set(results["experiments"]) == set(EXPERIMENTS)
    isolation = results["experiments"]["isolation"]
    for backend in ("vnic", "linux"):
        assert isolation[backend]["flood"]["flood_sent"] > 0
        assert all(isolation[backend][phase]["victim"]["p99_us"] > 0 for phase in ("alone", "flood", "limited"))
    for name in ("redis_get", "durable_set", "udp_echo"):
        experiment = results["experiments"][name]
        assert experiment["status"] == "ok", name
        for target in ("vnic", "linux"):
            run = experiment[target]["c1"] if name != "udp_echo" else experiment[target]
            assert run["latency"]["total"] > 0 and run["p50_us"] > 0
    assert results["experiments"]["redis_get"]["real"]["c50"]["rps"] > 0
    scaling = results["experiments"]["memcached_scaling"]
    assert scaling["status"] == "ok" and scaling["workers"][0] == 1 and len(scaling["workers"]) >= 2
    for target in ("vnic", "linux", "real"):
        assert [row["workers"] for row in scaling[target]] == scaling["workers"]
        assert all(row["tps"] > 0 and row["get_misses"] == 0 for row in scaling[target]), scaling[target]
    check_report(out, results)
    assert "ETA" in done.stderr  # the progress display ran
