"""A server in N worker processes: one per queue pair on ``vnic``, one per SO_REUSEPORT
socket on ``linux``. Threads would share one interpreter lock; processes do not.

How the workers share what they serve:

* ``vnic``: the parent opens the function with N queue pairs (``VnicLibOS(queues=N)``),
  sets up DMA memory and rings for each (one region per queue), programs receive-side
  scaling (a random Toeplitz key, the indirection table over all queues), binds and
  listens, and only then forks. Worker q calls ``become_worker(q)`` and from then on polls
  queue pair q alone, with its own network stack and TCP connections: the device keeps
  every frame of a flow on one queue, so a connection lives in exactly one worker. ARP
  reaches queue 0 only (its worker answers the peers' requests for everyone); the other
  workers learn a peer's MAC from the frames it sends them, so a server worker can always
  answer whoever reached it. Workers never make a request/reply call on the shared
  vfio-user session (only posted doorbells), so no worker can take another's reply.
* ``linux``: each worker opens its own libOS after the fork and binds with SO_REUSEPORT,
  so the kernel spreads connections and datagrams over the workers' sockets by a hash of
  the 4-tuple: the same shape as the vnic side, and the fair baseline for it.

A worker that dies takes only its queue down: the parent steers flows to the live queues
(a new indirection table) and stops the dead queue's rings; connections that were in the
dead worker are lost, the others go on, new ones land on the live workers. The parent holds
the function (its control connection and vfio-user session) until the last worker is gone;
when the application exits, the socket closes and kernelctl reclaims the function.

The parent prints ``NAME: ready backend=B port=P workers=N pids=...`` once every worker is
serving, and after SIGTERM or SIGINT (forwarded to the workers) one ``NAME: stats {json}``
line: the workers' counters summed, and each worker's own under ``workers``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from libos.api import LibOS
from libos.apps.common import ServedApp, open_server_libos, stop_on_signals

READY_TIMEOUT = 60.0  # seconds for every worker to come up
MAX_WORKERS = 16


@dataclass
class _Worker:
    index: int
    pid: int
    stats_fd: int
    stats: bytearray = field(default_factory=bytearray)
    status: int | None = None  # os.waitpid's status, once it exited


def add_workers_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1,
                        help=f"worker processes (1..{MAX_WORKERS}): one per VNIC queue pair, or per SO_REUSEPORT socket")


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers summed key by key (nested dicts too); anything else taken from the first."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
                merged.setdefault(key, value)
            elif isinstance(value, dict):
                previous = merged.get(key, {})
                if isinstance(previous, dict):
                    merged[key] = merge_stats([previous, value])
            else:
                previous = merged.get(key, 0)
                merged[key] = previous + value if isinstance(previous, (int, float)) else previous
    return merged


def serve_workers(name: str, args: argparse.Namespace, make_server: Callable[[LibOS], ServedApp]) -> int:
    """Run ``make_server`` in ``args.workers`` processes (see the module docstring)."""
    count = args.workers
    if not 1 <= count <= MAX_WORKERS:
        print(f"{name}: --workers must be in 1..{MAX_WORKERS}", file=sys.stderr)
        return 1
    stopping = False
    workers: dict[int, _Worker] = {}

    def forward(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers.values():
            if worker.status is None:
                try:
                    os.kill(worker.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    shared_los: LibOS | None = None
    shared_server: ServedApp | None = None
    if args.backend == "vnic":
        # The function, its queues, DMA memory, RSS and the listening queues: made once,
        # here, before the fork; every worker inherits them.
        try:
            shared_los = open_server_libos(args, name, queues=count)
            shared_server = make_server(shared_los)
        except Exception as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            if shared_los is not None:
                shared_los.shutdown()
            return 1

    ready_r, ready_w = os.pipe()
    for index in range(count):
        stats_r, stats_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            os.close(stats_r)
            for worker in workers.values():
                os.close(worker.stats_fd)
            code = 1
            try:
                code = _run_worker(name, args, index, make_server, shared_los, shared_server, ready_w, stats_w)
            except BaseException as exc:  # the worker must never return into the parent's code
                print(f"{name}: worker {index}: {exc!r}", file=sys.stderr, flush=True)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(stats_w)
        workers[pid] = _Worker(index, pid, stats_r)
    os.close(ready_w)

    ready = _supervise(name, args, workers, shared_los, ready_r, lambda: stopping)
    os.close(ready_r)
    stats = []
    for worker in sorted(workers.values(), key=lambda w: w.index):
        try:
            stats.append(json.loads(bytes(worker.stats)))
        except ValueError:
            stats.append({"worker": worker.index, "died": True, "status": worker.status})
    if ready:
        merged = merge_stats([part for part in stats if "died" not in part])
        merged["workers"] = stats
        print(f"{name}: stats " + json.dumps(merged), flush=True)
    if shared_server is not None:
        shared_server.server.close_all()
    if shared_los is not None:
        shared_los.shutdown()  # every worker is gone: the session is the parent's again
    return 0 if ready else 1


def _run_worker(name: str, args: argparse.Namespace, index: int, make_server: Callable[[LibOS], ServedApp],
                los: LibOS | None, server: ServedApp | None, ready_w: int, stats_w: int) -> int:
    should_stop = stop_on_signals()
    if los is None or server is None:
        los = open_server_libos(args, name, reuse_port=True)
        server = make_server(los)
    else:
        los.become_worker(index)  # type: ignore[attr-defined]  # VnicLibOS, made above
    os.write(ready_w, b"r")
    os.close(ready_w)
    server.serve(should_stop)
    stats = dict(server.stats())
    stats["worker"] = index
    data = json.dumps(stats).encode()
    view = memoryview(data)
    while view:
        view = view[os.write(stats_w, view) :]
    os.close(stats_w)
    server.server.close_all()
    los.shutdown()
    return 0


def _supervise(name: str, args: argparse.Namespace, workers: dict[int, _Worker], los: LibOS | None,
               ready_r: int, stopping: Callable[[], bool]) -> bool:
    """Until every worker exited: collect readiness and stats, print the ready line, take
    a dead worker's queue down. Returns whether the ready line was printed."""
    count = len(workers)
    readied = 0
    ready_open = True
    printed = False
    deadline = time.monotonic() + READY_TIMEOUT
    open_fds = {worker.stats_fd: worker for worker in workers.values()}
    while any(worker.status is None for worker in workers.values()) or open_fds:
        fds = list(open_fds) + ([ready_r] if ready_open and readied < count else [])
        try:
            readable, _, _ = select.select(fds, [], [], 0.1)
        except InterruptedError:
            readable = []
        for fd in readable:
            chunk = os.read(fd, 65536)
            if fd == ready_r:
                readied += len(chunk)
                ready_open = bool(chunk)  # EOF: every worker wrote or died
                continue
            if chunk:
                open_fds[fd].stats += chunk
            else:
                os.close(fd)
                del open_fds[fd]
        if not printed and readied >= count:
            pids = ",".join(str(w.pid) for w in sorted(workers.values(), key=lambda w: w.index))
            print(f"{name}: ready backend={args.backend} port={args.port} workers={count} pids={pids}", flush=True)
            printed = True
        if not printed and time.monotonic() > deadline and not stopping():
            print(f"{name}: workers not ready within {READY_TIMEOUT} s", file=sys.stderr, flush=True)
            _terminate(workers)
        _reap(name, workers, los, stopping, printed)
    return printed


def _reap(name: str, workers: dict[int, _Worker], los: LibOS | None, stopping: Callable[[], bool], printed: bool) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        worker = workers.get(pid)
        if worker is None:
            continue
        worker.status = status
        if stopping() and os.waitstatus_to_exitcode(status) == 0:
            continue
        live = [w.index for w in workers.values() if w.status is None]
        print(f"{name}: worker {worker.index} (pid {pid}) exited with {os.waitstatus_to_exitcode(status)}; "
              f"its queue is down, {len(live)} left", file=sys.stderr, flush=True)
        if not printed:
            _terminate(workers)  # a worker that fails at start-up fails the server
        elif los is not None and hasattr(los, "queue_down"):
            los.queue_down(worker.index, live)


def _terminate(workers: dict[int, _Worker]) -> None:
    for worker in workers.values():
        if worker.status is None:
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
