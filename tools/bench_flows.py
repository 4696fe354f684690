"""OpenFlow flows benchmark: what installed controller flows cost the VNIC.

For 1, 100 and 10,000 controller flows, exact (eth_type, ip_proto, ipv4_src, ipv4_dst,
udp_dst all exact) and masked (ipv4_src under a /24 mask, udp_dst exact), it measures:

* **model**: the VNIC's receive path in-process (``VnicDevice.receive_from_wire`` on a fake
  wire, the pure-Python classifier): ns per frame for a frame that hits a claimed port (the
  applications' path), one that hits the last-installed controller flow, and one that
  matches no flow (to the default function);
* **end to end** (root, one throwaway instance): the FLOW_MOD rate (flow_mods pipelined
  over the UNIX socket, one barrier per 500, through kernelctl to the device host); the UDP
  echo round-trip time to a claimed port with the flows installed (the app's path must not
  care); and a burst of unclaimed UDP frames that hit a drop flow: how many of them the
  device saw (a sender in a namespace outruns the tap's queue, which drops the rest before
  the device) and the device host's CPU microseconds per frame it saw, the figure that
  shows the flows' cost. ``frames_per_s`` in the JSON is seen frames over the time until
  the device's counter stopped moving, polled through ``kernelctl status``: a lower bound.

It prints a table and writes JSON (``--json``). Figures from a small shared machine vary
from run to run; compare within one run.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from kernelctl.names import Topology, topology
from kernelctl.openflow.connection import OpenFlowConnection
from kernelctl.openflow.constants import FlowModCommand, OFPTT_ALL
from kernelctl.openflow.messages import BarrierReply, BarrierRequest, Error, FlowMod, Message
from kernelctl.openflow.oxm import Match
from tools.benchlib import (
    APP_CPU,
    CLIENT_CPU,
    cpu_seconds,
    have_root,
    kernelctl,
    machine_info,
    percentile,
    pin_device_hosts,
    start_app,
    stop,
    write_json,
)
from tools.nsrun import run_in_netns

COUNTS = (1, 100, 10_000)
KINDS = ("exact", "masked")
BASE_PORT = 10_000
CLIENT = "10.10.0.1"
VNIC = "10.10.0.2"


def flow_match(kind: str, index: int) -> Match:
    client = int(ipaddress.IPv4Address(CLIENT))
    if kind == "exact":
        return Match.of(eth_type=0x0800, ip_proto=17, ipv4_src=client, ipv4_dst=int(ipaddress.IPv4Address(VNIC)),
                        udp_dst=BASE_PORT + index)
    return Match.of(eth_type=0x0800, ip_proto=17, ipv4_src=(client & 0xFFFFFF00, 0xFFFFFF00), udp_dst=BASE_PORT + index)


# ---- in-process model ---------------------------------------------------------------------------


def _udp(src: str, dst: str, dport: int) -> bytes:
    udp = struct.pack("!HHHH", 5000, dport, 8 + 18, 0) + bytes(18)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return b"\x02" * 6 + b"\x02\xbb\x00\x00\x00\x01" + b"\x08\x00" + ip + udp


class _NullWire:
    def fds(self) -> list[int]:
        return []

    def receive(self, queue: int, budget: int) -> list[bytes]:
        return []

    def send(self, queue: int, frame: bytes) -> bool:
        return True

    def close(self) -> None:
        pass


def model(count: int, kind: str, frames: int) -> dict[str, float]:
    from vdev.vnic.device import VnicDevice
    from vdev.vnic.filters import Match as FilterMatch

    device = VnicDevice(_NullWire(), b"\x02" * 6, [socket.inet_aton(VNIC)])
    device.fast = None  # the Python model: controller flows are applied there
    device.filters.add_rx(1, 0, FilterMatch(ip_proto=17, ip=socket.inet_aton(VNIC), port=7))
    for index in range(count):
        fields = {item.name.replace("udp_dst", "l4_dst"): (item.value, item.mask if item.mask is not None else
                  (1 << {"eth_type": 16, "ip_proto": 8, "ipv4_src": 32, "ipv4_dst": 32, "udp_dst": 16}[item.name]) - 1)
                  for item in flow_match(kind, index).fields}
        device.filters.add_flow(100, fields, [])
    results = {}
    for name, frame in (("claimed", _udp(CLIENT, VNIC, 7)), ("flow_hit", _udp(CLIENT, VNIC, BASE_PORT + count - 1)),
                        ("no_flow", _udp("10.99.0.1", VNIC, 9))):
        batch = [frame] * 64
        start = time.perf_counter()
        for _ in range(frames // 64):
            device.receive_from_wire(0, 1.0, batch)
        results[f"{name}_ns_per_frame"] = (time.perf_counter() - start) / (frames // 64 * 64) * 1e9
    # What the runs hit, so that a broken classifier cannot pass for a fast one.
    flows = [entry for entry in device.filters.stats() if entry["kind"] == "flow"]
    results["flow_packets"] = sum(entry["packets"] for entry in flows)
    results["claimed_packets"] = sum(entry["packets"] + entry["drops"] for entry in device.filters.stats()
                                     if entry["kind"] == "filter")
    device.close()
    return results


# ---- end to end -------------------------------------------------------------------------------------


class Controller:
    """A blocking OpenFlow client for the benchmark, on the codec."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.conn = OpenFlowConnection()
        self.xid = 10

    def transact(self, messages: list[Message]) -> list[Error]:
        """Send ``messages`` and a barrier; the errors that came back before its reply."""
        self.xid += 1
        barrier = self.xid
        for message in messages:
            self.conn.send(message)
        self.conn.send(BarrierRequest(barrier))
        self.sock.sendall(self.conn.data_to_send())
        self.conn.sent(self.conn.pending_output)
        errors = []
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                raise RuntimeError("kernelctl closed the OpenFlow channel")
            for message in self.conn.receive_data(data, max_messages=10**6):
                if isinstance(message, Error):
                    errors.append(message)
                elif isinstance(message, BarrierReply) and message.xid == barrier:
                    return errors
            if self.conn.pending_output:  # echo replies
                self.sock.sendall(self.conn.data_to_send())
                self.conn.sent(self.conn.pending_output)

    def close(self) -> None:
        self.sock.close()


def rtt_client(address: tuple[str, int], count: int) -> list[float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1.0)
    sock.connect(address)
    rtts = []
    for index in range(count + count // 10):
        start = time.perf_counter()
        sock.send(b"p" * 64)
        try:
            sock.recv(2048)
        except TimeoutError:
            continue
        if index >= count // 10:
            rtts.append((time.perf_counter() - start) * 1e6)
    return rtts


def burst_client(address: tuple[str, int], count: int) -> float:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"b" * 64
    start = time.perf_counter()
    for _ in range(count):
        sock.sendto(payload, address)
    return time.perf_counter() - start


def wire_rx(topo: Topology) -> int:
    import json
    import subprocess

    out = subprocess.run([sys.executable, "-m", "kernelctl.cli", "--instance", topo.tag, "status", "-j"],
                         capture_output=True, text=True, check=True).stdout
    return int(json.loads(out)["device"]["device"]["wire_rx_packets"])


def end_to_end(topo: Topology, controller: Controller, host_pid: int, count: int, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    controller.transact([FlowMod(1, command=FlowModCommand.DELETE, table_id=OFPTT_ALL)])
    mods = [FlowMod(2, priority=100, match=flow_match(kind, index)) for index in range(count)]
    start = time.perf_counter()
    errors = []
    for first in range(0, count, 500):
        errors += controller.transact(mods[first:first + 500])  # type: ignore[arg-type]
    install = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} flow_mods refused, the first: {errors[0]}")
    rtts = sorted(run_in_netns(topo.client_netns, rtt_client, (topo.vnic_ip, 7), args.pings, timeout=300))
    before_rx, before_cpu = wire_rx(topo), cpu_seconds(host_pid)
    sent_in = run_in_netns(topo.client_netns, burst_client, (topo.vnic_ip, BASE_PORT + count - 1), args.burst, timeout=300)
    start = time.perf_counter()
    seen, last = before_rx, -1
    while seen != last:  # until the device's counter stops moving
        last = seen
        time.sleep(0.3)
        seen = wire_rx(topo)
    took = max(sent_in, time.perf_counter() - start - 0.3)
    processed = seen - before_rx
    cpu = cpu_seconds(host_pid) - before_cpu
    return {
        "flow_mods_per_s": count / install,
        "rtt_claimed_us": {"p50": percentile(rtts, 0.5), "p99": percentile(rtts, 0.99), "samples": len(rtts)},
        "unclaimed_burst": {"sent": args.burst, "seen_by_device": processed, "frames_per_s": processed / took,
                            "host_cpu_us_per_frame": cpu / processed * 1e6 if processed else None},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/bench flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tag", default="bflow")
    parser.add_argument("--model-frames", type=int, default=64_000)
    parser.add_argument("--pings", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--model-only", action="store_true", help="skip the end-to-end part (no root needed)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"benchmark": "openflow-flows", "machine": machine_info(),
                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": {}, "end_to_end": {}}
    for kind in KINDS:
        for count in COUNTS:
            results["model"][f"{kind}/{count}"] = model(count, kind, args.model_frames)
    if not args.model_only:
        if not have_root():
            return 1
        topo = topology(args.tag)
        kernelctl(args.tag, "up")
        app = None
        try:
            hosts = pin_device_hosts(topo, CLIENT_CPU, kinds=("vnic",))
            app = start_app("libos.apps.echo", "vnic", args.tag, 7)
            controller = Controller(topo.run_dir / "openflow.sock")
            for kind in KINDS:
                for count in COUNTS:
                    print(f"end to end: {count} {kind} flows", flush=True)
                    results["end_to_end"][f"{kind}/{count}"] = end_to_end(topo, controller, hosts["vnic"], count, kind, args)
            controller.close()
        finally:
            if app is not None:
                stop(app, timeout=15)
            kernelctl(args.tag, "down", "--purge")
    print(f"\nVNIC receive path with controller flows (model: pure Python, ns/frame; apps on CPU {APP_CPU})")
    print(f"{'flows':>14s}{'claimed':>10s}{'flow hit':>10s}{'no flow':>10s}"
          + (f"{'flow_mod/s':>12s}{'RTT p50us':>11s}{'RTT p99us':>11s}{'burst seen':>11s}{'host us/f':>11s}"
             if results["end_to_end"] else ""))
    for key, row in results["model"].items():
        line = f"{key:>14s}{row['claimed_ns_per_frame']:10.0f}{row['flow_hit_ns_per_frame']:10.0f}{row['no_flow_ns_per_frame']:10.0f}"
        e2e = results["end_to_end"].get(key)
        if e2e:
            burst = e2e["unclaimed_burst"]
            cpu = burst["host_cpu_us_per_frame"]
            line += (f"{e2e['flow_mods_per_s']:12.0f}{e2e['rtt_claimed_us']['p50']:11.1f}{e2e['rtt_claimed_us']['p99']:11.1f}"
                     f"{burst['seen_by_device']:11d}{(cpu if cpu is not None else float('nan')):11.1f}")
        print(line)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
