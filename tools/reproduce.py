"""One command reproduces the paper's evaluation beside ours: ``tools/reproduce [--quick] [--out DIR]``.

It builds a topology instance of its own and, in one run, measures against the bypass path
(vnic), the same application on the Linux backend (linux), and the real server (redis-server 7):

* ``redis_get``: GET read hits with redis-benchmark, one client for the latency distribution
  (the paper's Fig. 3, left) and 50 clients for throughput;
* ``durable_set``: SET made durable before the reply (our ``--durable`` log on a VSA or on the
  baseline's ext4 image; redis-server with ``appendfsync always``), one client for Fig. 3
  (right) and 50 for throughput;
* ``udp_echo``: one request in flight against the UDP echo app: the round-trip distribution and
  the single-core cost per packet;
* ``isolation``: a victim's GET latency alone, beside a flooded neighbour, and beside the same
  flood with the neighbour held by a rate specifier (vnic) or tc (linux): ``tools/isolation.py``;
* ``memcached_scaling``: memcaslap throughput over 1..max(2, nproc - 1) workers: the memcached
  server with ``--workers N`` on vnic (one queue pair per worker, flows spread by RSS) and on
  linux (SO_REUSEPORT), and memcached ``-t N``: ``tools/scaling.py``.

Every throughput step also records the CPU time per request of the server and of each device
host, split into user and kernel time from /proc/PID/stat, and samples the server's Python
stacks with py-spy meanwhile: the measured cost breakdown into app logic, libOS stack, runtime,
kernel and device host (``tools/costs.py``). ``--no-sampling`` leaves py-spy out.

It writes ``results.json`` (every number, every distribution), ``report.md`` (each table with
the paper's figure and the ratios beside ours) and PNG plots (``tools/report.py``) to the report
directory. ``--quick`` uses small request counts (a smoke run, not a measurement).

Placement as in every benchmark here (tools/benchlib.py): servers on CPU 1, clients and the
device hosts on CPU 0.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kernelctl.names import Topology, topology
from tools.bench_durable import KV_PORT, REDIS_PORT, start_kv, start_redis
from tools.bench_udp import latency_client, start_echo
from tools.benchlib import (
    APP_CPU,
    CLIENT_CPU,
    BenchError,
    cpu_times,
    have_root,
    in_netns,
    kernelctl,
    machine_info,
    pin_device_hosts,
    ratio,
    redis_benchmark_distribution,
    stop,
    write_json,
)
from tools.costs import Sampler
from tools.isolation import IsolationRun
from tools.latency import Distribution
from tools.nsrun import run_in_netns
from tools.scaling import planned_steps as scaling_steps
from tools.scaling import run_scaling

TARGETS = ("vnic", "linux", "real")
EXPERIMENTS = ("redis_get", "durable_set", "udp_echo", "memcached_scaling", "isolation")
NOT_BUILT: dict[str, str] = {}
PLAIN_PORT = 6390  # the not-durable key-value servers and the plain redis-server
ECHO_PORT = 7


@dataclass(frozen=True)
class Sizes:
    """Request counts of one run."""

    get_c1: int
    get_c50: int
    durable_c1: int
    durable_c50: int
    udp: int
    isolation: int

    @classmethod
    def quick(cls) -> Sizes:
        return cls(get_c1=1000, get_c50=5000, durable_c1=200, durable_c50=1000, udp=1000, isolation=500)

    @classmethod
    def full(cls) -> Sizes:
        return cls(get_c1=20000, get_c50=100000, durable_c1=3000, durable_c50=20000, udp=20000, isolation=10000)


class CpuSplit:
    """User and kernel CPU time per request of some processes over one step."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._before = {who: cpu_times(pid) for who, pid in self.pids.items()}

    def per_request_us(self, requests: int) -> dict[str, dict[str, float]]:
        out = {}
        for who, pid in self.pids.items():
            user, system = cpu_times(pid)
            user0, system0 = self._before[who]
            out[who] = {"user": (user - user0) / requests * 1e6, "kernel": (system - system0) / requests * 1e6}
        return out


class Steps:
    """The progress display: one bar over every step of the run, the current one named, an ETA."""

    def __init__(self, total: int, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )  # fmt: skip
        self.task = self.progress.add_task("starting", total=total)

    def __enter__(self) -> Steps:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.progress.update(self.task, description=name)
        started = time.monotonic()
        yield
        self.progress.advance(self.task)
        self.console.log(f"{name}: {time.monotonic() - started:.1f} s")


def _wait_for_redis(topo: Topology, host: str, port: int, process: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 15
    probe = ["ip", "netns", "exec", topo.client_netns, "redis-cli", "-h", host, "-p", str(port), "PING"]
    while subprocess.run(probe, capture_output=True, text=True).stdout.strip() != "PONG":
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"the server on {host}:{port} did not answer PING")
        time.sleep(0.1)


@contextlib.contextmanager
def server(topo: Topology, target: str, durable: bool, workdir: Path) -> Iterator[tuple[subprocess.Popen[Any], str, int]]:
    """The server of ``target`` for the redis experiments: (process, address, port)."""
    process: subprocess.Popen[Any]
    if target == "real" and durable:
        # Its append-only file on the baseline's ext4 image, where the linux backend's log is.
        process, host, port = start_redis(topo, topo.baseline_mount / "redis-repro"), topo.linux_ip, REDIS_PORT
    elif target == "real":
        argv = in_netns(topo.linux_netns, APP_CPU, "redis-server", "--port", str(PLAIN_PORT), "--bind", topo.linux_ip,
                        "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", str(workdir))
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        host, port = topo.linux_ip, PLAIN_PORT
    else:
        port = KV_PORT if durable else PLAIN_PORT
        process = start_kv(target, topo.tag, port, durable, None)
        host = topo.vnic_ip if target == "vnic" else topo.linux_ip
    try:
        _wait_for_redis(topo, host, port, process)
        yield process, host, port
    finally:
        stop(process)


def sampler(process: subprocess.Popen[Any], target: str, sampling: Path | None, name: str) -> Sampler:
    """py-spy on our server's process, its stacks kept in ``sampling/NAME-TARGET.txt``; nothing
    to sample in redis-server (C) or with --no-sampling (``sampling`` None)."""
    if target == "real":
        return Sampler(None, "redis-server has no Python: user and kernel time only")
    if sampling is None:
        return Sampler(None, "not sampled (--no-sampling)")
    return Sampler(process.pid, keep=sampling / f"{name}-{target}.txt")


def run_redis(topo: Topology, steps: Steps, sizes: Sizes, hosts: dict[str, int], durable: bool,
              workdir: Path, sampling: Path | None) -> dict[str, Any]:
    test = "set" if durable else "get"
    name = "durable_set" if durable else "redis_get"
    small, large = (sizes.durable_c1, sizes.durable_c50) if durable else (sizes.get_c1, sizes.get_c50)
    out: dict[str, Any] = {}
    for target in TARGETS:
        with server(topo, target, durable, workdir) as (process, host, port):
            if not durable:  # the GETs must hit: redis-benchmark's SET writes the key its GET reads
                redis_benchmark_distribution(topo, host, port, "set", 50, 1000)
            with steps.step(f"{name} {target} c=1"):
                one = redis_benchmark_distribution(topo, host, port, test, 1, small)
            with steps.step(f"{name} {target} c=50"):
                pids = {"app": process.pid}
                if target == "vnic":
                    pids.update({f"{kind}_host": pid for kind, pid in hosts.items()})
                with sampler(process, target, sampling, name) as sampled:
                    meter = CpuSplit(pids)
                    fifty = redis_benchmark_distribution(topo, host, port, test, 50, large)
                    fifty["cpu_us_per_request"] = meter.per_request_us(large)
                sampled.record(fifty)
        out[target] = {"c1": one, "c50": fifty}
    out["ratios"] = {
        "throughput_c50_vnic_over_linux": ratio(out["vnic"]["c50"]["rps"], out["linux"]["c50"]["rps"]),
        "p50_c1_vnic_over_linux": ratio(out["vnic"]["c1"]["p50_us"], out["linux"]["c1"]["p50_us"]),
        "throughput_c50_vnic_over_real": ratio(out["vnic"]["c50"]["rps"], out["real"]["c50"]["rps"]),
    }
    out["status"] = "ok"
    return out


def run_udp(topo: Topology, steps: Steps, sizes: Sizes, hosts: dict[str, int], sampling: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for target in ("vnic", "linux"):
        process = start_echo(target, topo.tag, ECHO_PORT, None)
        try:
            with steps.step(f"udp_echo {target}"):
                pids = {"app": process.pid}
                if target == "vnic":
                    pids["vnic_host"] = hosts["vnic"]
                ip = topo.vnic_ip if target == "vnic" else topo.linux_ip
                with sampler(process, target, sampling, "udp_echo") as sampled:
                    meter = CpuSplit(pids)
                    rtts = run_in_netns(topo.client_netns, latency_client, (ip, ECHO_PORT), sizes.udp, 64,
                                        timeout=600, cpu=CLIENT_CPU)
                    cpu = meter.per_request_us(sizes.udp + sizes.udp // 10)  # the client warms up with a tenth more
                if len(rtts) < sizes.udp // 2:
                    raise BenchError(f"udp echo on {target}: only {len(rtts)} of {sizes.udp} replies")
                latency = Distribution.from_samples(rtts)
                out[target] = {"p50_us": latency.percentile(0.5), "p99_us": latency.percentile(0.99),
                               "samples": len(rtts), "cpu_us_per_request": cpu, "latency": latency.to_json()}
                sampled.record(out[target])
        finally:
            stop(process, timeout=15)
    out["ratios"] = {"p50_vnic_over_linux": ratio(out["vnic"]["p50_us"], out["linux"]["p50_us"])}
    out["status"] = "ok"
    return out


def machine() -> dict[str, Any]:
    info = machine_info()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    info["cpu_model"] = model
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small request counts: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=Path("report"), help="the report directory (default ./report)")
    parser.add_argument("--tag", default="repro", help="topology instance to build for the run")
    parser.add_argument("--only", type=lambda text: text.split(","), default=list(EXPERIMENTS),
                        help=f"experiments to run, comma-separated (default all: {','.join(EXPERIMENTS)})")
    parser.add_argument("--no-sampling", dest="sampling", action="store_false",
                        help="no py-spy: the cost breakdown is only user and kernel time")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(EXPERIMENTS)
    if unknown:
        parser.error(f"unknown experiments: {', '.join(sorted(unknown))}")
    if not have_root():
        return 1
    tools = ["redis-benchmark", "redis-cli", "redis-server", "taskset"]
    if "memcached_scaling" in args.only:
        tools += ["memcached", "memcaslap"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        print(f"reproduce: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 1
    from tools import report  # matplotlib is slow to import: only once the arguments are good

    sizes = Sizes.quick() if args.quick else Sizes.full()
    topo = topology(args.tag)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="arx-repro-"))
    results: dict[str, Any] = {
        "command": "tools/reproduce" + (" --quick" if args.quick else ""),
        "mode": "quick" if args.quick else "full",
        "machine": machine(),
        "pinning": {"servers": APP_CPU, "clients": CLIENT_CPU, "device_hosts": CLIENT_CPU},
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sizes": sizes.__dict__,
        "experiments": {},
    }
    planned = {"redis_get": 2 * len(TARGETS), "durable_set": 2 * len(TARGETS), "udp_echo": 2, "isolation": 6,
               "memcached_scaling": scaling_steps()}
    console = Console(stderr=True)
    stacks = args.out / "stacks" if args.sampling else None  # py-spy's raw stacks, beside the report
    kernelctl(args.tag, "up")
    try:
        hosts = pin_device_hosts(topo, CLIENT_CPU)
        runs: dict[str, Callable[[Steps], dict[str, Any]]] = {
            "redis_get": lambda steps: run_redis(topo, steps, sizes, hosts, False, workdir, stacks),
            "durable_set": lambda steps: run_redis(topo, steps, sizes, hosts, True, workdir, stacks),
            "udp_echo": lambda steps: run_udp(topo, steps, sizes, hosts, stacks),
            "memcached_scaling": lambda steps: run_scaling(topo, steps.step, 2 if args.quick else 8),
            "isolation": lambda steps: IsolationRun(topo, sizes.isolation, steps.step, 1.5 if args.quick else 3.0).run(),
        }
        with Steps(sum(planned.get(name, 0) for name in args.only), console) as steps:
            for name in EXPERIMENTS:
                if name not in args.only:
                    continue
                if name in NOT_BUILT:
                    results["experiments"][name] = {"status": "not run", "why": NOT_BUILT[name]}
                    continue
                results["experiments"][name] = runs[name](steps)
    except BenchError as exc:
        print(f"reproduce: {exc}", file=sys.stderr)
        return 1
    finally:
        kernelctl(args.tag, "down", "--purge", check=False)  # its images are throwaway
        shutil.rmtree(workdir, ignore_errors=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write_json(args.out / "results.json", results)
    written = report.write(results, args.out)
    print(f"report: {', '.join(str(path) for path in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
