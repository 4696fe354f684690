"""tools/reproduce: the latency-distribution reader, the report, and a --quick run end to end (root)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib import colors as mcolors
from matplotlib import image as mimage

from kernelctl.names import topology
from tests.conftest import PYTHON, REPO, require_root, unique_tag
from tools import costs, report
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


@pytest.mark.parametrize(
    ("path", "part"),
    [
        ("libos/apps/kv/store.py", "app"),
        ("libos/apps/memcache/server.py", "app"),
        ("libos/apps/echo.py", "app"),
        ("libos/apps/streams.py", "runtime"),  # the event loop every app shares
        ("libos/apps/common.py", "runtime"),
        ("libos/apps/workers.py", "runtime"),
        ("libos/net/tcp/sender.py", "stack"),
        ("libos/net/stack.py", "stack"),
        ("libos/driver/vnic.py", "stack"),
        ("libos/fast/__init__.py", "stack"),
        ("libos/storage/log.py", "stack"),
        ("vdev/ring.py", "stack"),
        ("libos/api/vnic.py", "runtime"),
        ("libos/api/queues.py", "runtime"),
        ("libos/files/server.py", "runtime"),
        ("selectors.py", "runtime"),
        ("asyncio/base_events.py", "runtime"),
        ("/usr/lib/python3.11/socket.py", "runtime"),
        ("<frozen importlib._bootstrap>", "runtime"),
        ("", "runtime"),
        ("/work/wt/x/libos/net/stack.py", "stack"),  # py-spy --full-filenames spells them absolute
        ("/work/wt/x/libos/apps/streams.py", "runtime"),
        ("/src/libos/libos/net/stack.py", "stack"),  # a checkout in a directory named libos
        ("/src/vdev/libos/apps/kv/store.py", "app"),
    ],
)
def test_each_file_belongs_to_one_part(path: str, part: str) -> None:
    assert costs.classify_file(path) == part


_NAME = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


@given(st.lists(_NAME, max_size=4),  # even a directory named libos or vdev above the checkout
       st.sampled_from(["libos/apps/kv/store.py", "libos/apps/streams.py", "libos/net/tcp/layer.py",
                        "vdev/ring.py", "libos/api/linux.py", "libos/storage/log.py"]))
def test_a_file_classifies_the_same_wherever_the_checkout_is(prefix: list[str], path: str) -> None:
    assert costs.classify_file("/" + "/".join([*prefix, path])) == costs.classify_file(path)


def test_frames_name_their_file() -> None:
    assert costs.frame_file("Sender._send_segment (libos/net/tcp/sender.py:210)") == "libos/net/tcp/sender.py"
    assert costs.frame_file("<module> (<frozen runpy>:88)") == "<frozen runpy>"
    assert costs.frame_file("main (libos/apps/kv/__main__.py)") == "libos/apps/kv/__main__.py"  # no line
    assert costs.frame_file("no file here") == ""


def test_stacks_are_counted_by_their_leaf_frame() -> None:
    collapsed = (
        "<module> (libos/apps/kv/__main__.py:9);StreamServer.turn (libos/apps/streams.py:80);"
        "KvSession.feed (libos/apps/kv/session.py:40) 7\n"
        "<module> (libos/apps/kv/__main__.py:9);KvSession.feed (libos/apps/kv/session.py:40);"
        "Sender._send_data (libos/net/tcp/sender.py:300) 5\n"
        "<module> (libos/apps/kv/__main__.py:9);EpollSelector.select (selectors.py:468) 3\n"
        "<module> (libos/apps/kv/__main__.py:9);DriverRing.completed (vdev/ring.py:12) 2\n"
        "\ngarbage without a count\n"
    )
    assert costs.count_samples(collapsed) == {"app": 7, "stack": 7, "runtime": 3}
    assert costs.count_samples("") == {"app": 0, "stack": 0, "runtime": 0}


@given(st.floats(min_value=0, max_value=1e4, allow_nan=False),
       st.dictionaries(st.sampled_from(costs.SAMPLED), st.integers(min_value=0, max_value=10**6)))
def test_user_time_is_split_in_proportion_to_the_samples(user: float, samples: dict[str, int]) -> None:
    parts = costs.split_user(user, samples)
    assert set(parts) == set(costs.SAMPLED) and all(value >= 0 for value in parts.values())
    total = sum(samples.values())
    if total == 0:
        assert all(value == 0 for value in parts.values())
        return
    assert sum(parts.values()) == pytest.approx(user, rel=1e-9, abs=1e-9)
    for part in costs.SAMPLED:
        assert parts[part] == pytest.approx(user * samples.get(part, 0) / total, rel=1e-9, abs=1e-9)


_CPU = st.fixed_dictionaries({"user": st.floats(min_value=0, max_value=1e4), "kernel": st.floats(min_value=0, max_value=1e4)})


@given(st.dictionaries(st.sampled_from(["app", "vnic_host", "vsic_host"]), _CPU).filter(lambda d: "app" in d),
       st.none() | st.fixed_dictionaries({part: st.integers(min_value=0, max_value=1000) for part in costs.SAMPLED}))
def test_the_breakdown_adds_up_to_the_measured_total(cpu: dict[str, dict[str, float]], samples: dict[str, int] | None) -> None:
    parts = costs.breakdown(cpu, samples)
    split = samples is not None and sum(samples.values()) > 0
    assert tuple(parts) == (costs.PARTS if split else costs.UNSPLIT)
    total = sum(p["user"] + p["kernel"] for p in cpu.values())
    assert sum(parts.values()) == pytest.approx(total, rel=1e-9, abs=1e-6)
    assert parts["kernel"] == cpu["app"]["kernel"]
    assert parts["device_host"] == pytest.approx(total - cpu["app"]["user"] - cpu["app"]["kernel"], abs=1e-6)


def test_without_py_spy_the_breakdown_falls_back_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(costs, "py_spy", lambda: None)
    run: dict[str, Any] = {"cpu_us_per_request": {"app": {"user": 10.0, "kernel": 2.0}}}
    with costs.Sampler(1) as sampler:
        pass
    sampler.record(run)
    assert run["cpu_breakdown_us"] == {"user": 10.0, "kernel": 2.0, "device_host": 0.0}
    assert run["cpu_breakdown_method"] == "user/kernel only: py-spy is not installed"
    assert "cpu_samples" not in run


def test_a_process_that_is_gone_gives_no_samples_and_no_error() -> None:
    run: dict[str, Any] = {"cpu_us_per_request": {"app": {"user": 1.0, "kernel": 1.0}}}
    with costs.Sampler(2**22 + 12345) as sampler:  # above the default pid_max: no such process
        pass
    sampler.record(run)
    assert run["cpu_breakdown_method"].startswith("user/kernel only: ")
    assert set(run["cpu_breakdown_us"]) == set(costs.UNSPLIT)


def test_the_sampler_sees_where_a_python_process_spends_its_time(tmp_path: Path) -> None:
    if costs.py_spy() is None:
        pytest.skip("py-spy is not installed")
    # A process whose CPU goes to a function in a file named like the libOS stack's.
    (tmp_path / "libos" / "net").mkdir(parents=True)
    (tmp_path / "libos" / "net" / "spin.py").write_text(
        "import time\ndef spin(until):\n    while time.monotonic() < until:\n        pass\n")
    child = subprocess.Popen([sys.executable, "-c", "import time; from libos.net.spin import spin; spin(time.monotonic() + 30)"],
                             cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    try:
        time.sleep(0.3)
        with costs.Sampler(child.pid, keep=tmp_path / "kept.txt") as sampler:
            time.sleep(1.0)
    finally:
        child.kill()
        child.wait()
    assert sampler.samples is not None, sampler.why
    assert sampler.samples["stack"] > 0.9 * sum(sampler.samples.values())
    assert "spin (" in (tmp_path / "kept.txt").read_text()


def _run(rps: float, p50: float, cpu: dict[str, dict[str, float]]) -> dict[str, Any]:
    latency = Distribution.from_samples([p50 * (1 + i / 50) for i in range(100)]).to_json()
    return {"rps": rps, "p50_us": p50, "p99_us": p50 * 3, "latency": latency, "cpu_us_per_request": cpu}


def _sampled(run: dict[str, Any], samples: dict[str, int] | None) -> dict[str, Any]:
    run["cpu_breakdown_us"] = costs.breakdown(run["cpu_us_per_request"], samples)
    if samples:
        run["cpu_samples"] = samples
    return run


def synthetic_results() -> dict[str, Any]:
    cpu = {"app": {"user": 40.0, "kernel": 2.0}, "vnic_host": {"user": 20.0, "kernel": 1.0}}
    split = {"app": 10, "stack": 20, "runtime": 10}
    redis = {target: {"c1": _run(1e4, 50.0 * (i + 1), cpu),
                      "c50": _sampled(_run(2e4 * (i + 1), 400.0, cpu), None if target == "real" else split)}
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
    # The libOS stack, the runtime and the device host are drawn whenever the vnic server was sampled.
    sampled = results["experiments"]["redis_get"]["vnic"]["c50"].get("cpu_samples")
    parts = ["stack", "runtime", "device_host"] if sampled else ["user", "device_host"]
    assert_plotted(out / "cost_breakdown.png", [colour for key, _, colour in report.COST_PARTS if key in parts])
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
    # Sampled: user 40 split 1:2:1; not sampled (redis-server, and UDP here): user unsplit.
    assert "| GET vnic | 10.0 | 20.0 | 10.0 | – | 2.0 | 21.0 | 63.0 | 40 |" in text
    assert "| GET real | – | – | – | 40.0 | 2.0 | 21.0 | 63.0 | – |" in text
    assert "| UDP echo linux | – | – | – | 40.0 | 2.0 | 21.0 | 63.0 | – |" in text


def check_breakdown(run: dict[str, Any], sampled: bool) -> None:
    """A run's cost breakdown: all its parts, none negative, adding up to the /proc total."""
    parts = run["cpu_breakdown_us"]
    total = sum(p["user"] + p["kernel"] for p in run["cpu_us_per_request"].values())
    assert total > 0 and all(value >= 0 for value in parts.values()), run
    assert sum(parts.values()) == pytest.approx(total, rel=1e-6, abs=0.05)
    if sampled:
        assert tuple(parts) == costs.PARTS, run["cpu_breakdown_method"]
        assert sum(run["cpu_samples"].values()) > 0
    else:
        assert tuple(parts) in (costs.PARTS, costs.UNSPLIT)


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
    # The cost breakdown of every throughput step. The GET step keeps a saturated server busy
    # long enough for py-spy's samples even in a quick run; the shorter steps may catch too
    # few, and then fall back to user/kernel, which is a valid answer too.
    for name in ("redis_get", "durable_set", "udp_echo"):
        for target in ("vnic", "linux"):
            experiment = results["experiments"][name]
            run = experiment[target]["c50"] if name != "udp_echo" else experiment[target]
            check_breakdown(run, sampled=name == "redis_get")
    real = results["experiments"]["redis_get"]["real"]["c50"]
    check_breakdown(real, sampled=False)
    assert tuple(real["cpu_breakdown_us"]) == costs.UNSPLIT and "no Python" in real["cpu_breakdown_method"]
    assert (out / "stacks" / "redis_get-vnic.txt").exists()
    scaling = results["experiments"]["memcached_scaling"]
    assert scaling["status"] == "ok" and scaling["workers"][0] == 1 and len(scaling["workers"]) >= 2
    for target in ("vnic", "linux", "real"):
        assert [row["workers"] for row in scaling[target]] == scaling["workers"]
        assert all(row["tps"] > 0 and row["get_misses"] == 0 for row in scaling[target]), scaling[target]
    check_report(out, results)
    assert "ETA" in done.stderr  # the progress display ran
