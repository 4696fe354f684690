"""Durable-write benchmark: the bypass path's storage (a VSA through the VSIC) against ext4.

One run builds its own kernelctl instance (``--tag``) and measures, in order:

1. **redis-benchmark SET** (1 and 50 clients by default) against three durable servers:
   the key-value server on ``vnic`` (command log on a VSA), the same server on ``linux``
   (command log on a file of the baseline's ext4 image, pwrite + fdatasync), and a real
   ``redis-server`` with ``appendonly yes`` and ``appendfsync always`` in the baseline
   namespace with its ``--dir`` on the same ext4 mount. The two key-value servers are run
   without ``--durable`` too (``--no-reference`` skips that), which prices the network path
   alone, so the cost of durability can be told apart from the cost of the TCP stack.
2. **The raw log**: ``PersistentLog.append`` of ``--record-bytes`` records, with 1 writer
   and with 16 writer threads all calling ``append`` (the log's leader/follower group
   commit), on a VSA (``open_vsa``) and on a ``FileBlockDevice`` on the ext4 mount; both
   logs commit the way the key-value server does (``use_fua=True``).
3. **The device's limit**: 4 KiB ``O_DIRECT | O_DSYNC`` writes on the raw image's loop
   device (1 and 16 threads), in the blocks of a VSA created for the purpose and deleted
   after, so no other VSA is touched.
4. **Stages** (``--no-stages`` skips): the system calls a commit comes down to, timed one
   by one: the VSIC device host's FUA (pwrite on the loop device opened with O_DIRECT, then
   fdatasync), the loop device's O_DSYNC write, a flush alone, ext4's pwrite + fdatasync,
   and the same write on a file of the host file system under the images; each on fresh
   (never written, sparse) blocks and again on the same blocks once allocated.

The apps and the raw-log writers run on CPU 1, redis-benchmark on CPU 0, and the device
hosts on ``--device-cpu`` (default 0, as in ``tools/bench udp``: they play the hardware).
It prints tables with ratios and writes JSON. ``--trace`` attaches ``strace -T`` to the VSIC
device host during an extra 1-writer VSA run and reports its per-call times (strace slows
every call it sees: read the shares, not the totals). ``--profile`` runs the durable vnic
server under cProfile and reports its top functions.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kernelctl.client import ControlClient
from kernelctl.names import Topology, topology
from libos.storage.blockdev import FileBlockDevice
from libos.storage.log import PersistentLog
from libos.storage.vsa import open_vsa
from tools.benchlib import (
    APP_CPU,
    CLIENT_CPU,
    BenchError,
    device_host_pids,
    have_root,
    in_netns,
    kernelctl,
    machine_info,
    parse_redis_benchmark_csv,
    percentile,
    pin_device_hosts,
    ratio_or_nan,
    report_profiles,
    start_app,
    stop,
    write_json,
)

BLOCK = 4096
KV_PORT = 6379
REDIS_PORT = 6380
KV_PLAIN_PORT = 6381
LOG_VSA = "bdlog"
RAW_VSA = "bdraw"
RAW_VSA_BYTES = 32 << 20
RAW_LOG_BYTES = 64 << 20
KV_LOG_BYTES = 256 << 20
MANY_WRITERS = 16


def summarize(latencies_s: list[float], elapsed_s: float) -> dict[str, Any]:
    """Throughput and latency percentiles (microseconds) of one measured run."""
    ordered = sorted(latencies_s)
    return {
        "ops": len(ordered),
        "ops_per_s": len(ordered) / elapsed_s if elapsed_s > 0 else float("nan"),
        "p50_us": percentile(ordered, 0.5) * 1e6,
        "p99_us": percentile(ordered, 0.99) * 1e6,
        "mean_us": (sum(ordered) / len(ordered) * 1e6) if ordered else float("nan"),
    }


def run_writers(writers: int, total: int, op: Callable[[int, int], object]) -> dict[str, Any]:
    """``op(writer, index)`` ``total`` times over ``writers`` threads, each call timed.

    One writer runs in this thread. Threads start together at a barrier; throughput is the
    operations over the time from the barrier to the last thread's end.
    """
    per_writer = max(1, total // writers)
    results: list[list[float]] = [[] for _ in range(writers)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(writers + 1)
    perf = time.perf_counter

    def one(writer: int) -> None:
        samples = results[writer]
        try:
            barrier.wait()
            for index in range(per_writer):
                start = perf()
                op(writer, index)
                samples.append(perf() - start)
        except BaseException as exc:  # reported below: a failed writer fails the run
            errors.append(exc)

    if writers == 1:
        barrier = threading.Barrier(1)
        start = perf()
        one(0)
    else:
        threads = [threading.Thread(target=one, args=(w,), daemon=True) for w in range(writers)]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = perf()
        for thread in threads:
            thread.join()
    elapsed = perf() - start
    if errors:
        raise BenchError(f"a writer failed: {errors[0]!r}") from errors[0]
    result = summarize([s for samples in results for s in samples], elapsed)
    result["writers"] = writers
    return result


class AlignedBuffers:
    """Page-aligned 4 KiB buffers, one per writer: O_DIRECT wants aligned memory."""

    def __init__(self, count: int) -> None:
        self._map = mmap.mmap(-1, count * BLOCK)
        for writer in range(count):
            self._map[writer * BLOCK : (writer + 1) * BLOCK] = bytes([0x41 + writer % 26]) * BLOCK
        self.views = [memoryview(self._map)[w * BLOCK : (w + 1) * BLOCK] for w in range(count)]

    def close(self) -> None:
        for view in self.views:
            view.release()
        self._map.close()


def vsa_blocks(extents: list[list[int]]) -> list[int]:
    """Every physical block of a VSA, in VSA order."""
    blocks: list[int] = []
    for physical, count in extents:
        blocks.extend(range(physical, physical + count))
    return blocks


def direct_dsync_writes(device: str, blocks: Sequence[int], writers: int, total: int) -> dict[str, Any]:
    """4 KiB O_DIRECT|O_DSYNC writes on ``blocks`` of ``device``; each writer has its own share."""
    share = len(blocks) // writers
    if share < 1:
        raise BenchError(f"{len(blocks)} blocks cannot be shared by {writers} writers")
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
    buffers = AlignedBuffers(writers)
    try:

        def op(writer: int, index: int) -> None:
            block = blocks[writer * share + index % share]
            if os.pwrite(fd, buffers.views[writer], block * BLOCK) != BLOCK:
                raise BenchError(f"short write on {device}")

        return run_writers(writers, total, op)
    finally:
        buffers.close()
        os.close(fd)


def log_appends(log: PersistentLog, writers: int, total: int, record_bytes: int) -> dict[str, Any]:
    record = b"r" * record_bytes
    return run_writers(writers, total, lambda _w, _i: log.append(record))


def timed_calls(count: int, call: Callable[[int], None]) -> dict[str, Any]:
    samples = []
    perf = time.perf_counter
    start = perf()
    for index in range(count):
        began = perf()
        call(index)
        samples.append(perf() - began)
    return summarize(samples, perf() - start)


def stage_probes(loop_device: str, loop_blocks: Sequence[int], ext4_dir: Path, host_dir: Path, count: int) -> dict[str, Any]:
    """The system calls under one commit, each timed alone, on fresh blocks and then again.

    Fresh blocks are holes in a sparse file somewhere below (the raw image on the host file
    system, the log file on the ext4 image): the first write there allocates, and a flush
    after it must commit that allocation; the second pass writes the same, now allocated,
    blocks.
    """
    if len(loop_blocks) < 3 * count:
        raise BenchError("the probe region is too small")
    buffers = AlignedBuffers(1)
    data = buffers.views[0]
    results: dict[str, Any] = {}
    loop_direct = os.open(loop_device, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    loop_dsync = os.open(loop_device, os.O_RDWR | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
    ext4_path = ext4_dir / "bench-stages.dat"
    host_path = host_dir / "bench-stages.dat"
    ext4_fd = os.open(ext4_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    host_fd = os.open(host_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    host_direct = os.open(host_path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC | os.O_CLOEXEC)
    try:
        os.ftruncate(ext4_fd, 2 * count * BLOCK)
        os.ftruncate(host_fd, 2 * count * BLOCK)
        fua_blocks = loop_blocks[:count]
        dsync_blocks = loop_blocks[count : 2 * count]
        plain_blocks = loop_blocks[2 * count : 3 * count]

        def fua(index: int) -> None:
            # What the VSIC device host does for a write with FUA (vdev/vsic/function.py).
            os.pwrite(loop_direct, data, fua_blocks[index] * BLOCK)
            os.fdatasync(loop_direct)

        def loop_pwrite(index: int) -> None:
            os.pwrite(loop_direct, data, plain_blocks[index] * BLOCK)

        def loop_dsync_write(index: int) -> None:
            os.pwrite(loop_dsync, data, dsync_blocks[index] * BLOCK)

        def ext4_commit(index: int) -> None:
            # What the linux backend's log does (FileBlockDevice.write with fua=True).
            os.pwrite(ext4_fd, data, index * BLOCK)
            os.fdatasync(ext4_fd)

        def host_commit(index: int) -> None:
            os.pwrite(host_fd, data, index * BLOCK)
            os.fdatasync(host_fd)

        def host_dsync(index: int) -> None:
            os.pwrite(host_direct, data, (count + index) * BLOCK)

        probes: list[tuple[str, Callable[[int], None]]] = [
            ("loop O_DIRECT pwrite + fdatasync (VSIC FUA)", fua),
            ("loop O_DIRECT|O_DSYNC pwrite", loop_dsync_write),
            ("loop O_DIRECT pwrite, no flush", loop_pwrite),
            ("loop fdatasync, nothing written", lambda _i: os.fdatasync(loop_direct)),
            ("ext4 image file pwrite + fdatasync (linux log)", ext4_commit),
            ("host file pwrite + fdatasync", host_commit),
            ("host file O_DIRECT|O_DSYNC pwrite", host_dsync),
        ]
        for phase in ("fresh", "allocated"):
            results[phase] = {name: timed_calls(count, call) for name, call in probes}
    finally:
        for fd in (loop_direct, loop_dsync, ext4_fd, host_fd, host_direct):
            os.close(fd)
        buffers.close()
        for path in (ext4_path, host_path):
            path.unlink(missing_ok=True)
    return results


_STRACE_LINE = re.compile(
    r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(?:\d+:\d+:\d+\.\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+).*<(\d+\.\d+)>\s*$"
)


def parse_strace(text: str) -> dict[str, Any]:
    """Per-call counts and times from ``strace -T`` output; epoll_wait split by its timeout."""
    calls: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _STRACE_LINE.match(line)
        if match is None:
            continue
        name, args, _result, seconds = match.groups()
        if name == "epoll_wait":
            timeout = args.rsplit(",", 1)[-1].strip()
            name = "epoll_wait(poll, timeout 0)" if timeout == "0" else "epoll_wait(sleep)"
        calls.setdefault(name, []).append(float(seconds))
    out: dict[str, Any] = {}
    for name, samples in sorted(calls.items()):
        samples.sort()
        out[name] = {
            "count": len(samples),
            "total_ms": sum(samples) * 1e3,
            "p50_us": percentile(samples, 0.5) * 1e6,
            "p99_us": percentile(samples, 0.99) * 1e6,
        }
    return out


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of every thread of ``pid``.

    /proc/PID/task/TID/schedstat holds both in nanoseconds (Documentation/scheduler/
    sched-stats.rst); the second is the scheduler's wakeup latency, summed.
    """
    on_cpu = waiting = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for task in tasks:
        try:
            fields = Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()
        except OSError:
            continue  # the thread ended
        if len(fields) >= 2:
            on_cpu += int(fields[0])
            waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


def start_kv(backend: str, tag: str, port: int, durable: bool, profile_dir: str | None) -> subprocess.Popen[str]:
    profile = Path(profile_dir) / "kv-vnic-durable.prof" if profile_dir and backend == "vnic" and durable else None
    extra = ["--durable", "--log-size", str(KV_LOG_BYTES)] if durable else []
    return start_app("libos.apps.kv", backend, tag, port, name="kv", extra=extra, profile=profile)


def start_redis(topo: Topology, redis_dir: Path) -> subprocess.Popen[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise BenchError("redis-server is not installed")
    redis_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        *in_netns(topo.linux_netns, APP_CPU, server),
        "--port", str(REDIS_PORT), "--bind", topo.linux_ip, "--protected-mode", "no",
        "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--dir", str(redis_dir),
    ]  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"redis-server exited: {process.communicate()[0][-2000:]}")
        probe = subprocess.run(
            ["ip", "netns", "exec", topo.client_netns, "redis-cli", "-h", topo.linux_ip, "-p", str(REDIS_PORT), "ping"],
            capture_output=True, text=True,
        )  # fmt: skip
        if probe.stdout.strip() == "PONG":
            return process
        time.sleep(0.1)
    process.kill()
    raise BenchError("redis-server did not answer PING")


def redis_benchmark(topo: Topology, host: str, port: int, clients: int, requests: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        *in_netns(topo.client_netns, CLIENT_CPU, "redis-benchmark"),
        "-h", host, "-p", str(port), "-t", "set", "-n", str(requests), "-c", str(clients),
        "-r", str(args.keyspace), "-d", str(args.value_bytes), "--csv",
    ]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise BenchError(f"redis-benchmark failed: {result.stderr[-1000:]}")
    out: dict[str, Any] = dict(parse_redis_benchmark_csv(result.stdout))
    out["clients"] = clients
    out["requests"] = requests
    return out


def run_servers(topo: Topology, args: argparse.Namespace, profile_dir: str | None, results: dict[str, Any]) -> None:
    servers: dict[str, tuple[str, int]] = {
        "vnic": (topo.vnic_ip, KV_PORT),
        "linux": (topo.linux_ip, KV_PORT),
        "redis": (topo.linux_ip, REDIS_PORT),
    }
    if args.reference:
        servers["vnic (not durable)"] = (topo.vnic_ip, KV_PLAIN_PORT)
        servers["linux (not durable)"] = (topo.linux_ip, KV_PLAIN_PORT)
    processes: dict[str, subprocess.Popen[str]] = {}
    try:
        processes["vnic"] = start_kv("vnic", topo.tag, KV_PORT, True, profile_dir)
        processes["linux"] = start_kv("linux", topo.tag, KV_PORT, True, None)
        processes["redis"] = start_redis(topo, topo.baseline_mount / "redis-bench")
        if args.reference:
            processes["vnic (not durable)"] = start_kv("vnic", topo.tag, KV_PLAIN_PORT, False, None)
            processes["linux (not durable)"] = start_kv("linux", topo.tag, KV_PLAIN_PORT, False, None)
        hosts = pin_device_hosts(topo, args.device_cpu)
        table: dict[str, dict[str, Any]] = {name: {} for name in servers}
        for clients, requests in zip(args.clients, args.requests):
            for name, (host, port) in servers.items():
                watched = {"server": processes[name].pid, **{f"{k}_host": v for k, v in hosts.items()}}
                before = {who: schedstat(pid) for who, pid in watched.items()}
                step = redis_benchmark(topo, host, port, clients, requests, args)
                step["sched_per_request_us"] = {
                    who: {
                        "on_cpu": (schedstat(pid)[0] - before[who][0]) / requests * 1e6,
                        "runqueue_wait": (schedstat(pid)[1] - before[who][1]) / requests * 1e6,
                    }
                    for who, pid in watched.items()
                }
                table[name][str(clients)] = step
                print(
                    f"  SET c={clients:3d} {name:20s} {step['ops_per_s']:9.0f}/s "
                    f"p50 {step['p50_us']:8.0f} us p99 {step['p99_us']:8.0f} us  per request (us, cpu/runq wait): "
                    + " ".join(
                        f"{who} {v['on_cpu']:.0f}/{v['runqueue_wait']:.0f}" for who, v in step["sched_per_request_us"].items()
                    ),
                    flush=True,
                )
        results["set"] = table
    finally:
        outputs = {name: stop(process) for name, process in processes.items()}
    server_stats = {}
    for name, out in outputs.items():
        for line in out.splitlines():
            if line.startswith("kv: stats "):
                try:
                    server_stats[name] = json.loads(line[len("kv: stats ") :])
                except ValueError:
                    pass
    results["server_stats"] = server_stats


def run_raw(topo: Topology, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The raw log on a VSA and on ext4, the device's limit, the stages; on APP_CPU."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {APP_CPU})
    with ControlClient(topo.control_socket) as control:
        control.request("vsa_create", name=LOG_VSA, size_bytes=RAW_LOG_BYTES)
        raw_info, _fds = control.request("vsa_create", name=RAW_VSA, size_bytes=RAW_VSA_BYTES)
        loop_device = control.status()["storage"]["raw_device"]
    if not isinstance(loop_device, str) or not isinstance(raw_info, dict):
        raise BenchError("kernelctl did not say where the raw image is")
    try:
        raw: dict[str, Any] = {"record_bytes": args.record_bytes, "many_writers_mode": "threads calling append"}
        handle = open_vsa(LOG_VSA, instance=topo.tag)
        try:
            vsa_log = PersistentLog(handle.device, use_fua=True)
            driver = handle.driver
            for writers in (1, MANY_WRITERS):
                before = driver.counters.as_dict()
                step = log_appends(vsa_log, writers, args.appends, args.record_bytes)
                after = driver.counters.as_dict()
                step["driver"] = {key: after[key] - before[key] for key in ("submitted", "doorbells", "sleeps")}
                raw[f"vsa_{writers}"] = step
                print(f"  log append vsa  {writers:2d} writers {_row(step)}  {step['driver']}", flush=True)
            if args.trace:
                raw["vsa_trace"] = trace_vsic_host(topo, vsa_log, args)
            vsa_log.close()
        finally:
            handle.close()
        device = FileBlockDevice(topo.baseline_mount / "bench-log.dat", BLOCK, RAW_LOG_BYTES // BLOCK, create=True)
        try:
            file_log = PersistentLog(device, use_fua=True)
            for writers in (1, MANY_WRITERS):
                step = log_appends(file_log, writers, args.appends, args.record_bytes)
                raw[f"ext4_{writers}"] = step
                print(f"  log append ext4 {writers:2d} writers {_row(step)}", flush=True)
            file_log.close()
        finally:
            device.close()
            (topo.baseline_mount / "bench-log.dat").unlink(missing_ok=True)
        blocks = vsa_blocks(raw_info["extents"])
        half = len(blocks) // 2
        for writers in (1, MANY_WRITERS):
            step = direct_dsync_writes(loop_device, blocks[:half], writers, args.appends)
            raw[f"device_{writers}"] = step
            print(f"  device O_DIRECT|O_DSYNC {writers:2d} writers {_row(step)}", flush=True)
        raw["loop_device"] = loop_device
        results["raw_log"] = raw
        if args.stages:
            results["stages"] = stage_probes(loop_device, blocks[half:], topo.baseline_mount, topo.state_dir, args.stage_count)
    finally:
        with ControlClient(topo.control_socket) as control:
            for name in (LOG_VSA, RAW_VSA):
                try:
                    control.request("vsa_delete", name=name)
                except Exception as exc:  # the instance is purged anyway; say what happened
                    print(f"  could not delete VSA {name}: {exc}", file=sys.stderr)
        os.sched_setaffinity(0, saved)


def trace_vsic_host(topo: Topology, log: PersistentLog, args: argparse.Namespace) -> dict[str, Any]:
    """``strace -T`` on the VSIC device host while one writer appends."""
    if shutil.which("strace") is None:
        return {"error": "strace is not installed"}
    pid = device_host_pids(topo).get("vsic")
    if pid is None:
        return {"error": "no VSIC device host found"}
    with tempfile.NamedTemporaryFile(prefix="arx-bench-strace-", suffix=".txt", delete=False) as out:
        path = out.name
    tracer = subprocess.Popen(["strace", "-f", "-T", "-p", str(pid), "-o", path], stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # strace attaches asynchronously
        step = log_appends(log, 1, min(args.appends, 500), args.record_bytes)
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=20)
    text = Path(path).read_text(errors="replace")
    os.unlink(path)
    calls = parse_strace(text)
    print(f"  strace on the VSIC host, 1 writer {_row(step)}", flush=True)
    for name, call in calls.items():
        print(f"    {name:28s} {call['count']:6d} calls  p50 {call['p50_us']:8.0f} us  p99 {call['p99_us']:8.0f} us", flush=True)
    return {"appends_under_trace": step, "calls": calls}


def _row(step: dict[str, Any]) -> str:
    return f"{step['ops_per_s']:9.0f}/s p50 {step['p50_us']:8.0f} us p99 {step['p99_us']:8.0f} us"


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    ratios: dict[str, float] = {}
    table = results.get("set")
    if table:
        print(f"\nredis-benchmark SET, durable ({os.cpu_count()} CPUs; apps on CPU {APP_CPU}, clients on CPU {CLIENT_CPU});"
              " cpu us/req: the server, then each device host (named in the JSON)")
        names = list(table)
        print(f"{'':18s}" + "".join(f"{name[:20]:>21s}" for name in names) + f"{'vnic/linux':>12s}{'vnic/redis':>12s}")
        for clients in map(str, args.clients):
            for metric, label in (("ops_per_s", "ops/s"), ("p50_us", "p50 us"), ("p99_us", "p99 us")):
                values = [table[name][clients][metric] for name in names]
                vnic, linux, redis = (table[n][clients][metric] for n in ("vnic", "linux", "redis"))
                ratios[f"set_c{clients}_{metric}_vnic_over_linux"] = ratio_or_nan(vnic, linux)
                ratios[f"set_c{clients}_{metric}_vnic_over_redis"] = ratio_or_nan(vnic, redis)
                print(
                    f"c={clients:>3s} {label:12s} " + "".join(f"{v:21.0f}" for v in values)
                    + f"{ratio_or_nan(vnic, linux):12.2f}{ratio_or_nan(vnic, redis):12.2f}"
                )  # fmt: skip
            # CPU time per request (us, from schedstat): the server, then each device host.
            cells = []
            for name in names:
                sched = table[name][clients].get("sched_per_request_us", {})
                cells.append("+".join(f"{v['on_cpu']:.0f}" for v in sched.values()) or "-")
            print(f"c={clients:>3s} {'cpu us/req':12s} " + "".join(f"{c:>21s}" for c in cells))
    raw = results.get("raw_log")
    if raw:
        print(f"\nraw log append ({raw['record_bytes']}-byte records; 16 writers = threads calling append)")
        print(f"{'':24s}{'vsa':>12s}{'ext4':>12s}{'device':>12s}{'vsa/ext4':>10s}{'vsa/device':>12s}")
        for writers in (1, MANY_WRITERS):
            for metric, label in (("ops_per_s", "ops/s"), ("p50_us", "p50 us"), ("p99_us", "p99 us")):
                vsa, ext4, dev = (raw[f"{kind}_{writers}"][metric] for kind in ("vsa", "ext4", "device"))
                ratios[f"log_w{writers}_{metric}_vsa_over_ext4"] = ratio_or_nan(vsa, ext4)
                ratios[f"log_w{writers}_{metric}_vsa_over_device"] = ratio_or_nan(vsa, dev)
                print(
                    f"{writers:2d} writers {label:13s}{vsa:12.0f}{ext4:12.0f}{dev:12.0f}"
                    f"{ratio_or_nan(vsa, ext4):10.2f}{ratio_or_nan(vsa, dev):12.2f}"
                )
    stages = results.get("stages")
    if stages:
        print("\nstages: one system call sequence at a time, 4 KiB (p50 / p99 us)")
        print(f"{'':50s}{'fresh blocks':>22s}{'allocated blocks':>22s}")
        for name in stages["fresh"]:
            fresh, again = stages["fresh"][name], stages["allocated"][name]
            print(
                f"{name:50s}{fresh['p50_us']:11.0f} /{fresh['p99_us']:8.0f}"
                f"{again['p50_us']:13.0f} /{again['p99_us']:8.0f}"
            )
    results["ratios"] = ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench durable", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--tag", default="bdur", help="topology instance to build for the run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 50], help="redis-benchmark -c values")
    parser.add_argument("--requests", type=int, nargs="+", default=[2000, 20000], help="redis-benchmark -n, one per --clients")
    parser.add_argument("--keyspace", type=int, default=100000, help="redis-benchmark -r")
    parser.add_argument("--value-bytes", type=int, default=3, help="redis-benchmark -d")
    parser.add_argument("--appends", type=int, default=1000, help="raw log appends (and device writes) per run")
    parser.add_argument("--record-bytes", type=int, default=100, help="raw log record size")
    parser.add_argument("--stage-count", type=int, default=200, help="calls per stage probe")
    parser.add_argument("--device-cpu", default="0", help="CPU for the device hosts, or 'any'")
    parser.add_argument("--spin", type=float, default=None, help="kernelctl up --spin: device hosts' polling window")
    parser.add_argument("--no-servers", dest="servers", action="store_false", help="skip the redis-benchmark part")
    parser.add_argument("--no-raw", dest="raw", action="store_false", help="skip the raw log and device part")
    parser.add_argument("--no-stages", dest="stages", action="store_false", help="skip the stage probes")
    parser.add_argument("--no-reference", dest="reference", action="store_false", help="skip the non-durable servers")
    parser.add_argument("--trace", action="store_true", help="strace -T the VSIC device host during a VSA run")
    parser.add_argument("--profile", action="store_true", help="cProfile the durable vnic server")
    args = parser.parse_args(argv)
    if len(args.requests) != len(args.clients):
        parser.error("give one --requests value per --clients value")
    if min(args.clients + args.requests) < 1 or args.appends < MANY_WRITERS or args.stage_count < 1:
        parser.error("clients, requests, stage counts must be positive, appends at least 16")
    if not 0 < args.record_bytes <= 64 << 10:
        parser.error("--record-bytes must be in 1..65536")
    if args.device_cpu == "any":
        args.device_cpu = None
    elif args.device_cpu in ("0", "1"):
        args.device_cpu = int(args.device_cpu)
    else:
        parser.error("--device-cpu is 0, 1 or any")
    if not have_root():
        return 1
    if args.servers and (shutil.which("redis-benchmark") is None or shutil.which("redis-server") is None):
        print("bench: redis-benchmark and redis-server are needed (or --no-servers)", file=sys.stderr)
        return 1
    topo = topology(args.tag)
    profile_dir = tempfile.mkdtemp(prefix="arx-bench-prof-") if args.profile else None
    results: dict[str, Any] = {
        "benchmark": "durable",
        "machine": machine_info(),
        "pinning": {"apps": APP_CPU, "clients": CLIENT_CPU, "device_hosts": args.device_cpu},
        "device_host_spin_s": args.spin,
        "redis_benchmark": {"keyspace": args.keyspace, "value_bytes": args.value_bytes},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    kernelctl(args.tag, "up", *(["--spin", str(args.spin)] if args.spin is not None else []))
    try:
        pin_device_hosts(topo, args.device_cpu)
        loops = subprocess.run(["losetup", "-l", "-J"], capture_output=True, text=True).stdout
        results["loop_devices"] = [
            entry for entry in json.loads(loops or '{"loopdevices": []}').get("loopdevices", [])
            if str(topo.state_dir) in str(entry.get("back-file", ""))
        ]  # fmt: skip
        if args.servers:
            print("redis-benchmark SET", flush=True)
            run_servers(topo, args, profile_dir, results)
        if args.raw:
            print("raw log and device", flush=True)
            run_raw(topo, args, results)
    finally:
        kernelctl(args.tag, "down", "--purge", check=False)
    print_tables(results, args)
    if profile_dir:
        results["profiles"] = report_profiles(Path(profile_dir))
        shutil.rmtree(profile_dir, ignore_errors=True)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
