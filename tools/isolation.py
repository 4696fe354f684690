"""Performance isolation, measured: a victim's GET latency beside a neighbour that is flooded.

Two applications on one backend: the victim, the key-value server, answers GETs from one
redis-benchmark client; the neighbour, a UDP sink (``libos.apps.echo --sink``), is flooded
by a client sending 1000-byte datagrams as fast as it can. Both applications share the
application core, so every datagram the neighbour must take in is CPU the victim loses.
Three phases per backend:

* ``alone``: no flood;
* ``flood``: the flood, no rate specifier;
* ``limited``: the flood, with the neighbour held to a tenth of the bandwidth it took in the
  ``flood`` phase. On vnic that is the neighbour's rate specifier (the VNIC's token bucket,
  mirrored by kernelctl into tc on the tap, so the excess is dropped before the device host
  sees it). On linux it is what an administrator would do: an HTB class for the neighbour's
  port on the interface toward the baseline host.

The flood is bounded in time (the victim's run) and goes only to the instance's own
namespaces.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from pyroute2 import IPRoute

from kernelctl.names import Topology
from tools.benchlib import APP_CPU, CLIENT_CPU, redis_benchmark_distribution, start_app, stop
from tools.nsrun import run_in_netns

VICTIM_PORT = 6379
NEIGHBOUR_PORT = 9
DATAGRAM = 1000
PHASES = ("alone", "flood", "limited")
_HTB_ROOT = 0x10000  # 1:
_HTB_CLASS = 0x10010  # 1:10
_ETH_P_IP = 0x0800


def flood(address: tuple[str, int], seconds: float, size: int) -> int:
    """Datagrams to ``address`` as fast as one core sends them, for ``seconds``; returns how many."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"f" * size
    deadline = time.monotonic() + seconds
    sent = 0
    while True:
        for _ in range(256):  # look at the clock once per burst
            try:
                sock.sendto(payload, address)
                sent += 1
            except OSError:
                pass  # a full socket buffer: the flood goes on
        if time.monotonic() >= deadline:
            break
    sock.close()
    return sent


@contextmanager
def linux_rate(topo: Topology, bits_per_second: int) -> Iterator[None]:
    """HTB on the bridge's veth toward the baseline host: UDP to the neighbour's port at most
    ``bits_per_second``; everything else unshaped. Removed on the way out."""
    with IPRoute(netns=topo.client_netns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=topo.veth_bridge_side)[0]
        ipr.tc("add", "htb", index, _HTB_ROOT, default=0)
        try:
            rate = bits_per_second // 8
            ipr.tc("add-class", "htb", index, _HTB_CLASS, parent=_HTB_ROOT, rate=rate, ceil=rate,
                   burst=max(rate // 100, 16 * 1514), cburst=max(rate // 100, 16 * 1514))
            dst = socket.inet_aton(topo.linux_ip).hex()
            ipr.tc("add-filter", "u32", index, parent=_HTB_ROOT, prio=1, protocol=_ETH_P_IP, target=_HTB_CLASS,
                   keys=[f"0x{dst}/0xffffffff+16", "0x00110000/0x00ff0000+8", f"0x{NEIGHBOUR_PORT:08x}/0x0000ffff+20"])
            yield
        finally:
            ipr.tc("del", "htb", index, _HTB_ROOT)


class IsolationRun:
    """The three phases on both backends, on one topology instance."""

    def __init__(self, topo: Topology, requests: int, step: Callable[[str], AbstractContextManager[None]],
                 min_flood_seconds: float = 3.0) -> None:
        self.topo = topo
        self.requests = requests
        self.step = step
        self.min_flood_seconds = min_flood_seconds
        self.flood_seconds = min_flood_seconds  # set from the alone phase: the flood must cover the victim's run

    def victim(self, host: str) -> dict[str, Any]:
        return redis_benchmark_distribution(self.topo, host, VICTIM_PORT, "get", 1, self.requests)

    def flooded(self, host: str) -> dict[str, Any]:
        """The victim's run while the neighbour on ``host`` is flooded."""
        sent: list[int] = []
        flooder = threading.Thread(target=lambda: sent.append(run_in_netns(
            self.topo.client_netns, flood, (host, NEIGHBOUR_PORT), self.flood_seconds, DATAGRAM,
            timeout=self.flood_seconds + 60, cpu=CLIENT_CPU)))
        flooder.start()
        try:
            time.sleep(0.3)  # the flood is under way before the victim's first request
            victim = self.victim(host)
        finally:
            flooder.join()
        return {"victim": victim, "flood_sent": sent[0] if sent else 0, "flood_seconds": self.flood_seconds}

    def neighbour(self, backend: str, rate: int) -> subprocess.Popen[str]:
        extra = ["--sink"] + (["--rate", str(rate)] if rate else [])
        return start_app("libos.apps.echo", backend, self.topo.tag, NEIGHBOUR_PORT, name="neighbour", extra=extra)

    def backend(self, backend: str) -> dict[str, Any]:
        topo = self.topo
        host = topo.vnic_ip if backend == "vnic" else topo.linux_ip
        rows: dict[str, Any] = {}
        victim = start_app("libos.apps.kv", backend, topo.tag, VICTIM_PORT, name="victim")
        try:
            redis_benchmark_distribution(topo, host, VICTIM_PORT, "set", 1, 100)  # the GETs must hit
            neighbour = self.neighbour(backend, 0)
            try:
                with self.step(f"isolation {backend} alone"):
                    began = time.monotonic()
                    rows["alone"] = {"victim": self.victim(host)}
                    self.flood_seconds = max(self.min_flood_seconds, 3 * (time.monotonic() - began) + 1.0)
                with self.step(f"isolation {backend} flood"):
                    rows["flood"] = self.flooded(host)
            finally:
                received = _received(stop(neighbour))
            rows["flood"]["neighbour_received"] = received
            offered_bps = rows["flood"]["flood_sent"] * DATAGRAM * 8 / self.flood_seconds
            limit = max(int(offered_bps / 10), 1_000_000)
            with self.step(f"isolation {backend} limited"):
                # vnic: the neighbour's own rate specifier; linux: tc, as an administrator would.
                neighbour = self.neighbour(backend, limit if backend == "vnic" else 0)
                try:
                    with linux_rate(topo, limit) if backend == "linux" else nullcontext():
                        rows["limited"] = self.flooded(host)
                finally:
                    received = _received(stop(neighbour))
                rows["limited"]["neighbour_received"] = received
        finally:
            stop(victim)
        rows["offered_bps"] = offered_bps
        rows["limit_bps"] = limit
        alone = rows["alone"]["victim"]["p99_us"]
        rows["p99_over_alone"] = {phase: rows[phase]["victim"]["p99_us"] / alone for phase in ("flood", "limited")}
        return rows

    def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"datagram_bytes": DATAGRAM, "app_cpu": APP_CPU}
        for backend in ("vnic", "linux"):
            out[backend] = self.backend(backend)
        out["status"] = "ok"
        return out


def _received(output: str) -> int:
    """What the sink counted, from the stats line it prints when it stops."""
    for line in output.splitlines():
        if line.startswith("echo: stats "):
            try:
                return int(json.loads(line[len("echo: stats ") :]).get("received", 0))
            except ValueError:
                break
    return 0
