"""UDP echo benchmark: the bypass path (vnic) against the Linux baseline, in one run.

Both echo servers run at the same time, each pinned to the same core (CPU 1); the client,
a plain Linux UDP socket in the client namespace, is pinned to CPU 0, and so is the VNIC
device host: it plays the NIC, and on a 2-core machine the only core not running the
application is the client's (the Linux path's own network processing also runs on both cores,
in the kernel). For each backend the client measures:

* round-trip time, one request in flight (p50, p99, p99.9);
* the highest request rate sustained: open-loop load at rising rates, each for a few
  seconds; a rate is sustained when at least 99% of requests come back (the RTT percentiles
  under load are reported beside it);
* the CPU time per request of the echo app and (vnic) of the VNIC device host, in each phase
  (from /proc/PID/stat before and after it).

It prints a table with vnic/linux ratios and writes the numbers to JSON. With ``--profile``
the device host and the vnic echo app run under cProfile and their top functions are reported.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kernelctl.names import Topology, topology
from tools.benchlib import (
    APP_CPU,
    CLIENT_CPU,
    CpuMeter,
    format_cpu,
    have_root,
    kernelctl,
    machine_info,
    percentile,
    pin_device_hosts,
    ratio,
    ratio_or_nan,
    report_profiles,
    start_app,
    stop,
    write_json,
)
from tools.nsrun import run_in_netns

RATES = (1000, 2000, 5000, 10000, 15000, 20000, 30000, 40000, 60000)
_STAMP = struct.Struct("!dI")


def latency_client(address: tuple[str, int], count: int, size: int) -> list[float]:
    """One request in flight; RTTs in microseconds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    sock.connect(address)
    payload = b"p" * size
    rtts = []
    for index in range(count + count // 10):
        start = time.perf_counter()
        sock.send(payload)
        try:
            sock.recv(2048)
        except TimeoutError:
            continue
        if index >= count // 10:  # the first tenth warms caches and the ARP entry
            rtts.append((time.perf_counter() - start) * 1e6)
    sock.close()
    return rtts


def rate_client(address: tuple[str, int], rate: float, seconds: float, size: int) -> dict[str, float]:
    """Open-loop load at ``rate`` requests/s; each request carries its send time."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.connect(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    padding = b"r" * max(0, size - _STAMP.size)
    start = time.perf_counter()
    end = start + seconds
    sent = 0
    rtts: list[float] = []
    perf = time.perf_counter
    while True:
        now = perf()
        if now >= end:
            break
        due = int((now - start) * rate) + 1
        while sent < due:
            try:
                sock.send(_STAMP.pack(perf(), sent) + padding)
            except BlockingIOError:
                break
            sent += 1
        readable, _, _ = select.select([sock], [], [], 0.0005)
        if readable:
            while True:
                try:
                    data = sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                rtts.append((perf() - _STAMP.unpack_from(data)[0]) * 1e6)
    drain_end = perf() + 0.5
    while perf() < drain_end:
        if select.select([sock], [], [], 0.05)[0]:
            try:
                data = sock.recv(2048)
                rtts.append((perf() - _STAMP.unpack_from(data)[0]) * 1e6)
            except (BlockingIOError, ConnectionRefusedError):
                pass
    sock.close()
    rtts.sort()
    return {
        "offered": rate,
        "sent": sent,
        "received": len(rtts),
        "achieved": len(rtts) / seconds,
        "p50_us": percentile(rtts, 0.5),
        "p99_us": percentile(rtts, 0.99),
    }


def start_echo(backend: str, tag: str, port: int, profile_dir: str | None) -> subprocess.Popen[str]:
    profile = Path(profile_dir) / "echo-vnic.prof" if profile_dir and backend == "vnic" else None
    return start_app("libos.apps.echo", backend, tag, port, name="echo", profile=profile)


def measure(topo: Topology, backend: str, ip: str, args: argparse.Namespace, meter: CpuMeter) -> dict[str, Any]:
    address = (ip, args.port)
    meter.start()
    rtts = run_in_netns(topo.client_netns, latency_client, address, args.count, args.size, timeout=600, cpu=CLIENT_CPU)
    latency_cpu = meter.per_request_us(args.count + args.count // 10)
    rtts.sort()
    result: dict[str, Any] = {
        "rtt_us": {
            "p50": percentile(rtts, 0.5),
            "p99": percentile(rtts, 0.99),
            "p99.9": percentile(rtts, 0.999),
            "samples": len(rtts),
        },
        "cpu_us_per_request": latency_cpu,
        "rates": [],
    }
    best = 0.0
    for rate in RATES:
        if rate > args.max_rate:
            break
        meter.start()
        step = run_in_netns(
            topo.client_netns, rate_client, address, float(rate), args.seconds, args.size, timeout=120, cpu=CLIENT_CPU
        )
        step["cpu_us_per_request"] = meter.per_request_us(step["sent"])
        step["sustained"] = step["received"] >= 0.99 * step["sent"]
        result["rates"].append(step)
        print(
            f"  {backend:5s} offered {rate:6d}/s: achieved {step['achieved']:8.0f}/s "
            f"p50 {step['p50_us']:7.0f} us p99 {step['p99_us']:7.0f} us {'ok' if step['sustained'] else 'NOT sustained'}"
            f"  cpu us/req: {format_cpu(step['cpu_us_per_request'])}",
            flush=True,
        )
        if not step["sustained"]:
            break
        best = step["achieved"]
        result["cpu_us_per_request_at_max_rate"] = step["cpu_us_per_request"]
    result["max_sustained_rate"] = best
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench udp", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--count", type=int, default=5000, help="ping-pong samples per backend")
    parser.add_argument("--size", type=int, default=64, help="payload bytes")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each rate step")
    parser.add_argument("--max-rate", type=int, default=RATES[-1])
    parser.add_argument("--port", type=int, default=7)
    parser.add_argument("--tag", default="bench", help="topology instance to build for the run")
    parser.add_argument("--profile", action="store_true", help="cProfile the device host and the vnic app")
    args = parser.parse_args(argv)
    if not have_root():
        return 1
    topo = topology(args.tag)
    profile_dir = tempfile.mkdtemp(prefix="arx-bench-prof-") if args.profile else None
    env = dict(os.environ)
    if profile_dir:
        env["ARRAKIS_PROFILE_DIR"] = profile_dir
    results: dict[str, Any] = {
        "benchmark": "udp-echo",
        "machine": machine_info(),
        "pinning": {"apps": APP_CPU, "client": CLIENT_CPU, "device_host": CLIENT_CPU},
        "payload_bytes": args.size,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    kernelctl(args.tag, "up", env=env)
    apps = []
    try:
        hosts = pin_device_hosts(topo, CLIENT_CPU, kinds=("vnic",))
        apps = [start_echo("vnic", args.tag, args.port, profile_dir), start_echo("linux", args.tag, args.port, profile_dir)]
        meters = {
            "vnic": CpuMeter({"app": apps[0].pid, **{f"{kind}_host": pid for kind, pid in hosts.items()}}),
            "linux": CpuMeter({"app": apps[1].pid}),
        }
        for backend, ip in (("vnic", topo.vnic_ip), ("linux", topo.linux_ip)):
            print(f"measuring {backend} ({ip})", flush=True)
            results[backend] = measure(topo, backend, ip, args, meters[backend])
    finally:
        for process in apps:
            stop(process, timeout=15)
        kernelctl(args.tag, "down", "--purge", env=env)
    vnic, linux = results["vnic"], results["linux"]
    results["ratios"] = {
        "rtt_p50_vnic_over_linux": vnic["rtt_us"]["p50"] / linux["rtt_us"]["p50"],
        "rtt_p99_vnic_over_linux": vnic["rtt_us"]["p99"] / linux["rtt_us"]["p99"],
        "max_rate_vnic_over_linux": ratio(vnic["max_sustained_rate"], linux["max_sustained_rate"]),
    }
    rows = [
        ("RTT p50 (us)", vnic["rtt_us"]["p50"], linux["rtt_us"]["p50"]),
        ("RTT p99 (us)", vnic["rtt_us"]["p99"], linux["rtt_us"]["p99"]),
        ("RTT p99.9 (us)", vnic["rtt_us"]["p99.9"], linux["rtt_us"]["p99.9"]),
        ("max sustained req/s", vnic["max_sustained_rate"], linux["max_sustained_rate"]),
    ]
    print(f"\nUDP echo, {args.size}-byte payload ({os.cpu_count()} CPUs; apps on CPU {APP_CPU}, client on CPU {CLIENT_CPU})")
    print(f"{'':22s}{'vnic':>12s}{'linux':>12s}{'vnic/linux':>12s}")
    for name, a, b in rows:
        print(f"{name:22s}{a:12.1f}{b:12.1f}{ratio_or_nan(a, b):12.2f}")
    # CPU time per request: the app, plus the VNIC device host for vnic (us).
    for label, key in (("cpu us/req, ping-pong", "cpu_us_per_request"),
                       ("cpu us/req, max rate", "cpu_us_per_request_at_max_rate")):
        cells = []
        for side in (vnic, linux):
            cpu = side.get(key) or {}
            parts = [f"{cpu['app']:.1f}"] if "app" in cpu else ["-"]
            parts += [f"{value:.1f}" for who, value in cpu.items() if who != "app"]
            cells.append("+".join(parts))
        print(f"{label:22s}{cells[0]:>12s}{cells[1]:>12s}")
    if profile_dir:
        results["profiles"] = report_profiles(Path(profile_dir), limit=12)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
