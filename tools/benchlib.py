"""What the three benchmarks (``tools/bench udp|kv|durable``) share.

Running kernelctl for a throwaway instance, starting our apps and stopping processes,
pinning the apps and the device hosts to CPUs, reading ``redis-benchmark --csv``, the
statistics and the report helpers. Each benchmark keeps its own measurements and tables.

CPU placement, the same in every benchmark: on a 2-core box the apps get CPU 1; the clients
get CPU 0, and so do the device hosts, which play the hardware: the only core not running
the application is the client's.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import pstats
import subprocess
import sys
from collections.abc import Callable, Collection, Sequence
from io import StringIO
from pathlib import Path
from typing import Any

from kernelctl.names import Topology
from tools.latency import DistributionError, parse_redis_benchmark

REPO = Path(__file__).resolve().parent.parent
APP_CPU = 1
CLIENT_CPU = 0


class BenchError(RuntimeError):
    """A step of a benchmark could not run (a server did not start, a tool failed or printed
    what we cannot read): the run is not valid."""


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of the (already sorted) values lie; NaN for none."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, int(fraction * len(sorted_values)))
    return sorted_values[index]


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None where either is missing or ``b`` is zero (JSON null)."""
    return a / b if a is not None and b else None


def ratio_or_nan(a: float | None, b: float | None) -> float:
    """``ratio`` for a table column: NaN instead of None, so that ``:f`` formats it."""
    value = ratio(a, b)
    return float("nan") if value is None else value


def machine_info() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}


def have_root() -> bool:
    """True as root; otherwise says why not on stderr (each benchmark builds its own topology)."""
    if os.geteuid() == 0:
        return True
    print("bench: needs root (it builds its own topology)", file=sys.stderr)
    return False


def kernelctl(tag: str, *args: str, env: dict[str, str] | None = None, check: bool = True) -> None:
    """``kernelctl --instance TAG ARGS...`` in a child process, from the repository root."""
    subprocess.run([sys.executable, "-m", "kernelctl.cli", "--instance", tag, *args], cwd=REPO, check=check, env=env)


def in_netns(netns: str, cpu: int, *argv: str) -> list[str]:
    """A command line run in ``netns`` and pinned to ``cpu``."""
    return ["ip", "netns", "exec", netns, "taskset", "-c", str(cpu), *argv]


def pinned_to(cpu: int) -> Callable[[], None]:
    """A ``preexec_fn`` that pins the child (and so all it starts) to ``cpu``."""

    def pin_child() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin_child


def pin(pid: int, cpu: int | None) -> None:
    """Pin ``pid`` and all its threads to ``cpu`` (None: leave it where the scheduler likes).

    sched_setaffinity on a pid moves only that one thread; threads started before keep their
    mask, so every task under /proc/PID/task is moved.
    """
    if cpu is None:
        return
    for task in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(task), {cpu})


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_times(pid: int) -> tuple[float, float]:
    """CPU seconds (user, system), all threads, that ``pid`` has used so far; zeros once it is gone.

    From /proc/PID/stat, fields 14 and 15 (utime, stime, in clock ticks; proc(5)). The command
    name (field 2) may hold spaces or parentheses, so the fields are counted after its last ')'.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0, 0.0
    fields = text[text.rfind(")") + 2 :].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
    return int(fields[11]) / _CLOCK_TICKS, int(fields[12]) / _CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) that ``pid`` has used so far; 0.0 once it is gone."""
    return sum(cpu_times(pid))


class CpuMeter:
    """CPU time per request of some processes over one measured step.

    ``start()`` before the step, ``per_request_us(requests)`` after it: microseconds of CPU
    each process spent per request (named as given, e.g. ``app``, ``vnic_host``).
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._before: dict[str, float] = {}

    def start(self) -> None:
        self._before = {who: cpu_seconds(pid) for who, pid in self.pids.items()}

    def per_request_us(self, requests: float) -> dict[str, float]:
        if requests <= 0:
            return {who: float("nan") for who in self.pids}
        return {who: (cpu_seconds(pid) - self._before.get(who, 0.0)) / requests * 1e6
                for who, pid in self.pids.items()}


def format_cpu(per_request: dict[str, float]) -> str:
    """``app 41.2 vnic_host 12.0`` (us of CPU per request), for a progress line or table cell."""
    return " ".join(f"{who} {value:.1f}" for who, value in per_request.items())


def device_host_pids(topo: Topology) -> dict[str, int]:
    """The instance's device hosts by kind (``vnic``, ``vsic``): children of its kernelctl daemon."""
    daemon = int(topo.pid_file.read_text().strip())
    found: dict[str, int] = {}
    listing = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(daemon)], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        pid, _, args = line.strip().partition(" ")
        for kind in ("vnic", "vsic"):
            if f"vdev.{kind}.host" in args:
                found[kind] = int(pid)
    return found


def pin_device_hosts(topo: Topology, cpu: int | None, kinds: Collection[str] = ("vnic", "vsic")) -> dict[str, int]:
    """Pin the instance's device hosts of ``kinds`` to ``cpu``; returns their pids by kind."""
    hosts = {kind: pid for kind, pid in device_host_pids(topo).items() if kind in kinds}
    for pid in hosts.values():
        pin(pid, cpu)
    return hosts


def start_app(
    module: str,
    backend: str,
    tag: str,
    port: int,
    *,
    name: str | None = None,
    extra: Sequence[str] = (),
    profile: Path | None = None,
) -> subprocess.Popen[str]:
    """``python -m MODULE`` on ``backend`` of instance ``tag``, pinned to APP_CPU, once it says ready.

    With ``profile`` it runs under cProfile, which writes its statistics there at exit.
    Raises BenchError (with what the app printed) when its first line is not the ready line.
    """
    argv = [sys.executable, "-u"]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", module, "--backend", backend, "--instance", tag, "--port", str(port), *extra]
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=pinned_to(APP_CPU)
    )
    line = process.stdout.readline() if process.stdout is not None else ""
    if "ready" not in line:
        process.kill()
        rest, _ = process.communicate()
        raise BenchError(f"{name or module} on {backend} did not start: {line}{rest or ''}")
    return process


def stop(process: subprocess.Popen[Any], timeout: float = 20.0) -> str:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns what it printed (text pipes)."""
    process.terminate()
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
    return out if isinstance(out, str) else ""


def parse_redis_benchmark_csv(text: str, test: str = "SET") -> dict[str, float]:
    """The ``test`` row of ``redis-benchmark --csv`` (Redis 7 columns), latencies in microseconds.

    Keys: ops_per_s, p50_us, p99_us, mean_us. Anything else (no header, no such row, a row
    not as long as the header, Redis 6 columns, a number that is not one) raises BenchError.
    """
    try:
        rows = [row for row in csv.reader(StringIO(text)) if row]
    except csv.Error as exc:
        raise BenchError(f"unreadable redis-benchmark output: {exc}") from None
    header = next((row for row in rows if row[0] == "test"), None)
    data = next((row for row in rows if row[0] == test), None)
    if header is None or data is None or len(header) != len(data):
        raise BenchError(f"unexpected redis-benchmark output (no {test} row?): {text[-500:]!r}")
    fields = dict(zip(header[1:], data[1:]))
    try:
        return {
            "ops_per_s": float(fields["rps"]),
            "p50_us": float(fields["p50_latency_ms"]) * 1e3,
            "p99_us": float(fields["p99_latency_ms"]) * 1e3,
            "mean_us": float(fields["avg_latency_ms"]) * 1e3,
        }
    except (KeyError, ValueError) as exc:
        raise BenchError(f"unexpected redis-benchmark columns: {header}") from exc


def redis_benchmark_distribution(topo: Topology, host: str, port: int, test: str, clients: int, requests: int) -> dict[str, Any]:
    """redis-benchmark with its whole latency distribution (no ``-q``, no ``--csv``)."""
    argv = in_netns(topo.client_netns, CLIENT_CPU, "redis-benchmark", "-h", host, "-p", str(port), "-t", test,
                    "-n", str(requests), "-c", str(clients), "-P", "1")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or "rror" in done.stderr:
        raise BenchError(f"redis-benchmark against {host}:{port} failed: {done.stdout[-300:]}{done.stderr[-300:]}")
    try:
        run = parse_redis_benchmark(done.stdout)
    except DistributionError as exc:
        raise BenchError(str(exc)) from None
    return {"rps": run.rps, "p50_us": run.latency.percentile(0.5), "p99_us": run.latency.percentile(0.99),
            "requests": requests, "clients": clients, "latency": run.latency.to_json()}


def top_functions(path: Path, limit: int = 15) -> str:
    """The ``limit`` functions of a cProfile file with the most time of their own, as text."""
    out = StringIO()
    pstats.Stats(str(path), stream=out).strip_dirs().sort_stats("tottime").print_stats(limit)
    text = out.getvalue()
    start = text.find("   ncalls")  # drop pstats' preamble (file name, totals)
    return text[start:] if start >= 0 else text


def report_profiles(profile_dir: Path, limit: int = 15) -> dict[str, str]:
    """Print the top functions of every ``*.prof`` in ``profile_dir``; returns them by file stem."""
    profiles: dict[str, str] = {}
    for path in sorted(profile_dir.glob("*.prof")):
        profiles[path.stem] = top_functions(path, limit)
        print(f"\nprofile {path.stem} (top functions by own time)\n{profiles[path.stem]}")
    return profiles


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    """Write ``results`` to ``path`` (the ``--json`` option), if one was given."""
    if path:
        path.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {path}")
