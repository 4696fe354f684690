"""The memcached scaling experiment of ``tools/reproduce``: memcaslap throughput over workers.

For each worker count from 1 to ``max(2, nproc - 1)``, memcaslap (its default 90/10
get/set mix over TCP, 16 connections, one client thread) runs against:

* ``vnic``: ``libos.apps.memcache --workers N`` on the bypass path, one VNIC queue pair per
  worker, flows spread by the device's receive-side scaling;
* ``linux``: the same server on the Linux backend, one SO_REUSEPORT socket per worker;
* ``real``: memcached with ``-t N`` (N worker threads), in the baseline namespace.

Placement: the clients and the device hosts stay on CPU 0 as in every experiment; the
server, all its workers, may use CPUs 1..N when the machine has them, else every CPU (on a
2-core machine, 2 workers share CPU 0 with the client and the device host: the curve then
shows contention as much as scaling, and the report says so).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from kernelctl.names import Topology
from tools.benchlib import CLIENT_CPU, REPO, BenchError, in_netns, stop

MC_PORT = 11221
TARGETS = ("vnic", "linux", "real")
StepFn = Callable[[str], contextlib.AbstractContextManager[None]]


def worker_counts() -> list[int]:
    return list(range(1, max(2, (os.cpu_count() or 1) - 1) + 1))


def server_cpus(workers: int) -> list[int]:
    """CPUs 1..workers when there are that many besides the client's, else all of them."""
    count = os.cpu_count() or 1
    if workers <= count - 1:
        return list(range(1, workers + 1))
    return list(range(count))


def _pinned(cpus: list[int]) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, cpus)


def _wait_port(topo: Topology, host: str, port: int, process: subprocess.Popen[Any]) -> None:
    probe = ["ip", "netns", "exec", topo.client_netns, "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]
    deadline = time.monotonic() + 30
    while subprocess.run(probe, capture_output=True).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"the server on {host}:{port} did not start")
        time.sleep(0.1)


@contextlib.contextmanager
def scaled_server(topo: Topology, target: str, workers: int) -> Iterator[str]:
    """The ``target`` server with ``workers`` workers; yields the address clients use."""
    cpus = server_cpus(workers)
    if target == "real":
        argv = ["ip", "netns", "exec", topo.linux_netns, "memcached", "-u", "nobody", "-t", str(workers),
                "-l", topo.linux_ip, "-p", str(MC_PORT), "-U", "0", "-m", "1024"]  # our store has no cap: no evictions
        host = topo.linux_ip
    else:
        argv = [sys.executable, "-u", "-m", "libos.apps.memcache", "--backend", target, "--instance", topo.tag,
                "--port", str(MC_PORT), "--workers", str(workers), "--no-udp"]
        host = topo.vnic_ip if target == "vnic" else topo.linux_ip
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               preexec_fn=_pinned(cpus))
    try:
        _wait_port(topo, host, MC_PORT, process)
        yield host
    finally:
        stop(process, timeout=30)


def memcaslap_tps(topo: Topology, host: str, seconds: int) -> dict[str, float]:
    argv = in_netns(topo.client_netns, CLIENT_CPU, "memcaslap", "-s", f"{host}:{MC_PORT}", "-t", f"{seconds}s",
                    "-c", "16")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120)
    output = done.stdout + done.stderr
    tps = re.search(r"TPS: (\d+)", output)
    if done.returncode != 0 or tps is None:
        raise BenchError(f"memcaslap against {host}:{MC_PORT} failed ({done.returncode}): {output[-1000:]}")
    counters = {name: int(value) for name, value in re.findall(r"^(\w+): (\d+)$", output, re.MULTILINE)}
    return {"tps": float(tps.group(1)), "get_misses": float(counters.get("get_misses", 0))}


def run_scaling(topo: Topology, step: StepFn, seconds: int) -> dict[str, Any]:
    counts = worker_counts()
    out: dict[str, Any] = {"workers": counts, "seconds": seconds, "connections": 16,
                           "server_cpus": {str(n): server_cpus(n) for n in counts}, "client_cpu": CLIENT_CPU}
    for target in TARGETS:
        rows = []
        for workers in counts:
            with step(f"memcached_scaling {target} workers={workers}"):
                with scaled_server(topo, target, workers) as host:
                    row: dict[str, Any] = dict(memcaslap_tps(topo, host, seconds))
            row["workers"] = workers
            rows.append(row)
        out[target] = rows
        first = rows[0]["tps"]
        out.setdefault("speedup", {})[target] = rows[-1]["tps"] / first if first else None
    out["status"] = "ok"
    return out


def planned_steps() -> int:
    return len(TARGETS) * len(worker_counts())
