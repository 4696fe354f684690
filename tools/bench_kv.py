"""Key-value benchmark: the libOS Redis and memcached servers on both backends against the real ones.

    tools/bench kv [--json PATH] [--requests N] [--seconds S] [--profile]

In one run, on a topology instance of its own:

* **redis-benchmark** GET and SET, 1 and 50 clients, pipeline 1, against the libOS key-value
  server on the VNIC, the same server on the Linux backend, two fairness anchors in the
  baseline namespace (the same ``KvSession`` engine behind a plain ``asyncio.Protocol``, on the
  stdlib loop and on uvloop: ``tools/kv_anchor.py``), and a real redis-server 7 there (no
  persistence, like ours);
* **memcaslap** (its default 90/10 get/set mix, 16 connections) over TCP and over UDP
  against the libOS memcache server on both backends and a real memcached in the baseline
  namespace.

The servers run one at a time (only the one measured is up), pinned to CPU 1; the clients
and the VNIC device host are pinned to CPU 0 (on a 2-core box the device host plays the NIC,
and the only core not running the application is the client's). It prints throughput and
p50/p99 latency (redis-benchmark's ``--csv``; memcaslap reports throughput only), the CPU time
per request of the server process and of the VNIC device host (from /proc/PID/stat before and
after each run), with the ratios vnic/linux, linux/asyncio, vnic/max(linux, asyncio) and
vnic/real, and writes everything to JSON.

With ``--profile`` it instead runs only the GET test (50 clients) against the VNIC server,
with that server and the device host under cProfile, and reports their top functions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernelctl.names import Topology, topology
from tools.benchlib import (
    APP_CPU,
    CLIENT_CPU,
    BenchError,
    CpuMeter,
    format_cpu,
    have_root,
    in_netns,
    kernelctl,
    machine_info,
    parse_redis_benchmark_csv,
    pin_device_hosts,
    pinned_to,
    ratio,
    report_profiles,
    start_app,
    stop,
    write_json,
)

KV_PORT = 6379
MC_PORT = 11211
REAL_REDIS_PORT = 6380
REAL_MEMCACHED_PORT = 11212
TARGETS = ("vnic", "linux", "real")  # memcache
KV_TARGETS = ("vnic", "linux", "asyncio", "uvloop", "real")
ANCHORS = ("asyncio", "uvloop")


def client(topo: Topology, *argv: str) -> list[str]:
    """A client command line: in the client namespace, pinned to the client CPU."""
    return in_netns(topo.client_netns, CLIENT_CPU, *argv)


@contextlib.contextmanager
def our_server(module: str, backend: str, topo: Topology, port: int,
               profile: Path | None) -> Iterator[subprocess.Popen[str]]:
    process = start_app(module, backend, topo.tag, port, profile=profile)
    try:
        yield process
    finally:
        if process.poll() is None:
            out = stop(process)
            if process.returncode != 0:
                print(f"  warning: {module} on {backend} exited {process.returncode}: {out[-2000:]}", flush=True)


@contextlib.contextmanager
def real_server(argv: list[str], topo: Topology, probe: list[str],
                workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real server in the baseline namespace, pinned like ours; ready when ``probe`` works."""
    process = subprocess.Popen(["ip", "netns", "exec", topo.linux_netns, *argv], cwd=workdir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pinned_to(APP_CPU))
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(probe, capture_output=True).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{argv[0]} did not start")
            time.sleep(0.1)
        yield process  # ``ip netns exec`` execs the server: this pid is the server's
    finally:
        stop(process)


def redis_benchmark(topo: Topology, host: str, port: int, test: str, clients: int, requests: int) -> dict[str, float]:
    done = subprocess.run(
        client(topo, "redis-benchmark", "-h", host, "-p", str(port), "-t", test, "-n", str(requests),
               "-c", str(clients), "-P", "1", "--csv"),
        capture_output=True, text=True, timeout=900,
    )
    if done.returncode != 0 or "rror" in done.stderr:
        raise BenchError(f"redis-benchmark against {host}:{port} failed: {done.stdout[-500:]}{done.stderr[-500:]}")
    row = parse_redis_benchmark_csv(done.stdout, test.upper())
    return {"rps": row["ops_per_s"], "p50_us": row["p50_us"], "p99_us": row["p99_us"]}


def memcaslap(topo: Topology, host: str, port: int, seconds: float, udp: bool) -> dict[str, float]:
    argv = client(topo, "memcaslap", "-s", f"{host}:{port}", "-t", f"{int(seconds)}s", "-c", "16")
    if udp:
        argv.append("-U")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    output = done.stdout + done.stderr
    counters = {name: int(value) for name, value in re.findall(r"^(\w+): (\d+)$", output, re.MULTILINE)}
    tps = re.search(r"TPS: (\d+)", output)
    if done.returncode != 0 or tps is None:
        raise BenchError(f"memcaslap against {host}:{port} failed ({done.returncode}): {output[-1000:]}")
    errors = sum(counters.get(name, 0) for name in ("get_misses", "packet_disorder", "packet_drop", "udp_timeout"))
    return {"tps": float(tps.group(1)), "ops": counters.get("cmd_get", 0) + counters.get("cmd_set", 0),
            "misses_drops_timeouts": errors}


def _redis_probe(topo: Topology, host: str, port: int) -> list[str]:
    return ["ip", "netns", "exec", topo.client_netns, "redis-cli", "-h", host, "-p", str(port), "PING"]


def _memcached_probe(topo: Topology, host: str, port: int) -> list[str]:
    return ["ip", "netns", "exec", topo.client_netns, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]


def _meter(process: subprocess.Popen[Any], hosts: dict[str, int], target: str) -> CpuMeter:
    """The server and, where it is on the path (vnic), the VNIC device host."""
    pids = {"app": process.pid}
    if target == "vnic":
        pids.update({f"{kind}_host": pid for kind, pid in hosts.items()})
    return CpuMeter(pids)


def run_redis(topo: Topology, args: argparse.Namespace, workdir: Path, hosts: dict[str, int],
              results: dict[str, Any]) -> None:
    addresses = {"vnic": topo.vnic_ip, "linux": topo.linux_ip, "real": topo.linux_ip,
                 "asyncio": topo.linux_ip, "uvloop": topo.linux_ip}
    server: contextlib.AbstractContextManager[subprocess.Popen[Any]]
    for target in args.targets:
        port = REAL_REDIS_PORT if target == "real" else KV_PORT
        if target == "real":
            server = real_server(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                  "--protected-mode", "no", "--dir", str(workdir)],
                                 topo, _redis_probe(topo, addresses[target], port), workdir)
        elif target in ANCHORS:
            server = our_server("tools.kv_anchor", target, topo, port, None)
        else:
            server = our_server("libos.apps.kv", target, topo, port, None)
        with server as process:
            meter = _meter(process, hosts, target)
            for clients in args.clients:
                for test in ("set", "get"):  # SET first, so the GETs find the key
                    meter.start()
                    row: dict[str, Any] = dict(redis_benchmark(topo, addresses[target], port, test, clients,
                                                               args.requests))
                    row["cpu_us_per_request"] = meter.per_request_us(args.requests)
                    results["redis"].setdefault(f"{test.upper()} c={clients}", {})[target] = row
                    print(f"  redis {target:7s} {test.upper():3s} c={clients:<3d} {row['rps']:9.0f} req/s "
                          f"p50 {row['p50_us']:8.0f} us p99 {row['p99_us']:8.0f} us  "
                          f"cpu us/req: {format_cpu(row['cpu_us_per_request'])}", flush=True)


def run_memcache(topo: Topology, args: argparse.Namespace, workdir: Path, hosts: dict[str, int],
                 results: dict[str, Any]) -> None:
    addresses = {"vnic": topo.vnic_ip, "linux": topo.linux_ip, "real": topo.linux_ip}
    server: contextlib.AbstractContextManager[subprocess.Popen[Any]]
    for target in TARGETS:
        port = REAL_MEMCACHED_PORT if target == "real" else MC_PORT
        if target == "real":
            server = real_server(["memcached", "-u", "nobody", "-t", "1", "-l", addresses[target], "-p", str(port),
                                  "-U", str(port)], topo, _memcached_probe(topo, addresses[target], port), workdir)
        else:
            server = our_server("libos.apps.memcache", target, topo, port, None)
        with server as process:
            meter = _meter(process, hosts, target)
            for udp in (False, True):
                meter.start()
                row: dict[str, Any] = dict(memcaslap(topo, addresses[target], port, args.seconds, udp))
                row["cpu_us_per_request"] = meter.per_request_us(row["ops"])
                name = "memcaslap UDP" if udp else "memcaslap TCP"
                results["memcache"].setdefault(name, {})[target] = row
                print(f"  memcache {target:5s} {name}: {row['tps']:9.0f} ops/s "
                      f"(misses/drops/timeouts {row['misses_drops_timeouts']:.0f})  "
                      f"cpu us/req: {format_cpu(row['cpu_us_per_request'])}", flush=True)


def _fmt(value: float | None, width: int = 10, digits: int = 0) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}.{digits}f}"


def _best(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _kv_ratios(by_target: dict[str, Any], key: str) -> dict[str, float | None]:
    """vnic/linux, linux/asyncio, vnic/max(linux, asyncio), vnic/real of one metric."""

    def get(target: str) -> float | None:
        row = by_target.get(target)
        return None if row is None else row.get(key)

    vnic, linux, aio = get("vnic"), get("linux"), get("asyncio")
    if key == "rps":
        fair = _best(linux, aio)
    else:  # a latency: the better baseline is the lower one
        present = [v for v in (linux, aio) if v is not None]
        fair = min(present) if present else None
    return {"vnic/linux": ratio(vnic, linux), "linux/asyncio": ratio(linux, aio),
            "vnic/fair": ratio(vnic, fair), "vnic/real": ratio(vnic, get("real"))}


def _cpu_cell(row: dict[str, Any] | None) -> str:
    if row is None or "cpu_us_per_request" not in row:
        return "-"
    cpu = row["cpu_us_per_request"]
    text = f"{cpu.get('app', float('nan')):.0f}"
    host = cpu.get("vnic_host")
    return text if host is None else f"{text}+{host:.0f}"


def print_tables(results: dict[str, Any]) -> None:
    print(f"\nkey-value servers ({os.cpu_count()} CPUs; servers on CPU {APP_CPU}, clients and device host on "
          f"CPU {CLIENT_CPU}); latencies in microseconds; cpu: us of CPU per request, server (+ VNIC "
          "device host); vnic/fair = vnic / max(linux, asyncio) (latency: / min)")
    ratio_names = ("vnic/linux", "linux/asyncio", "vnic/fair", "vnic/real")
    print(f"{'':26s}" + "".join(f"{t:>10s}" for t in KV_TARGETS) + "".join(f"{r:>14s}" for r in ratio_names))
    for name, by_target in results["redis"].items():
        for metric, label in (("rps", "req/s"), ("p50_us", "p50"), ("p99_us", "p99")):
            values = [by_target.get(target, {}).get(metric) for target in KV_TARGETS]
            ratios = _kv_ratios(by_target, metric)
            print(f"{'redis ' + name + ' ' + label:26s}" + "".join(_fmt(v) for v in values)
                  + "".join(_fmt(ratios[r], 14, 2) for r in ratio_names))
        print(f"{'redis ' + name + ' cpu':26s}" + "".join(f"{_cpu_cell(by_target.get(t)):>10s}" for t in KV_TARGETS))
    print(f"\n{'':26s}" + "".join(f"{t:>10s}" for t in TARGETS) + f"{'vnic/linux':>14s}{'vnic/real':>14s}")
    for name, by_target in results["memcache"].items():
        values = [by_target.get(target, {}).get("tps") for target in TARGETS]
        print(f"{name + ' ops/s':26s}" + "".join(_fmt(v) for v in values)
              + _fmt(ratio(values[0], values[1]), 14, 2) + _fmt(ratio(values[0], values[2]), 14, 2))
        print(f"{name + ' cpu':26s}" + "".join(f"{_cpu_cell(by_target.get(t)):>10s}" for t in TARGETS))


def run_profile(topo: Topology, args: argparse.Namespace, profile_dir: Path, results: dict[str, Any]) -> None:
    """GET, 50 clients, against the VNIC server with it and the device host under cProfile."""
    with our_server("libos.apps.kv", "vnic", topo, KV_PORT, profile_dir / "kv-vnic.prof"):
        subprocess.run(client(topo, "redis-cli", "-h", topo.vnic_ip, "-p", str(KV_PORT), "SET", "key:__rand_int__",
                              "x" * 3), capture_output=True, check=True, timeout=30)
        row = redis_benchmark(topo, topo.vnic_ip, KV_PORT, "get", 50, args.requests)
        results["profiled_get"] = row
        print(f"  profiled GET c=50: {row['rps']:.0f} req/s (under cProfile: slower than a plain run)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench kv", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--requests", type=int, default=20000, help="redis-benchmark requests per test")
    parser.add_argument("--clients", type=lambda text: [int(c) for c in text.split(",")], default=[1, 50],
                        help="redis-benchmark client counts, comma-separated (default 1,50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each memcaslap run")
    parser.add_argument("--tag", default="benchk", help="topology instance to build for the run")
    parser.add_argument("--profile", action="store_true",
                        help="only a GET run against the vnic server, profiling it and the device host")
    parser.add_argument("--targets", type=lambda text: text.split(","), default=list(KV_TARGETS),
                        help=f"redis-benchmark servers to measure, comma-separated (default {','.join(KV_TARGETS)})")
    parser.add_argument("--no-memcache", action="store_true", help="skip the memcaslap runs")
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(KV_TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if not have_root():
        return 1
    missing = [tool for tool in ("redis-benchmark", "redis-cli", "redis-server", "memcaslap", "memcached", "taskset")
               if shutil.which(tool) is None]
    if missing:
        print(f"bench: missing tools: {', '.join(missing)}", file=sys.stderr)
        return 1
    topo = topology(args.tag)
    workdir = Path(tempfile.mkdtemp(prefix="arx-bench-kv-"))
    profile_dir = workdir / "profiles" if args.profile else None
    env = dict(os.environ)
    if profile_dir is not None:
        profile_dir.mkdir()
        env["ARRAKIS_PROFILE_DIR"] = str(profile_dir)
    results: dict[str, Any] = {
        "benchmark": "kv",
        "machine": machine_info(),
        "pinning": {"servers": APP_CPU, "clients": CLIENT_CPU, "device_host": CLIENT_CPU},
        "redis_benchmark": {"requests": args.requests, "pipeline": 1},
        "memcaslap": {"seconds": args.seconds, "concurrency": 16},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "redis": {},
        "memcache": {},
    }
    kernelctl(args.tag, "up", env=env)
    try:
        hosts = pin_device_hosts(topo, CLIENT_CPU, kinds=("vnic",))
        if profile_dir is not None:
            run_profile(topo, args, profile_dir, results)
        else:
            run_redis(topo, args, workdir, hosts, results)
            if not args.no_memcache:
                run_memcache(topo, args, workdir, hosts, results)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        kernelctl(args.tag, "down", "--purge", env=env, check=False)  # its images are throwaway
    if profile_dir is not None:
        results["profiles"] = report_profiles(profile_dir)
    else:
        print_tables(results)
        for by_target in results["redis"].values():
            by_target["ratios"] = {metric: _kv_ratios(by_target, metric) for metric in ("rps", "p50_us", "p99_us")}
        for by_target in results["memcache"].values():
            tps = {target: by_target.get(target, {}).get("tps") for target in TARGETS}
            by_target["vnic_over_linux"] = ratio(tps["vnic"], tps["linux"])
            by_target["vnic_over_real"] = ratio(tps["vnic"], tps["real"])
    shutil.rmtree(workdir, ignore_errors=True)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
