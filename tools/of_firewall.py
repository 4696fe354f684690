"""An example OpenFlow controller built on kernelctl's codec: a learning firewall.

It installs a table-miss flow that sends unclaimed traffic both to the default function
(``LOCAL``, so ARP, ping and port-unreachables keep working) and to the controller. Every
PACKET_IN teaches it which unclaimed UDP/TCP ports each IPv4 source has tried; a source
that tries more than ``--ports`` distinct ones (a port scan) gets a drop flow with an idle
timeout and ``send_flow_rem``. When the flow idles out, the FLOW_REMOVED makes the firewall
forget the source, which may then try again. Claimed ports are never affected: the switch
consults applications' claims before any controller flow.

    python -m tools.of_firewall --instance TAG [--ports 3] [--idle 2] [--seconds 60]

The logic (``LearningFirewall``) is sans-I/O: PACKET_IN and FLOW_REMOVED in, FLOW_MODs out;
``run`` is the only part that touches the socket.
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from kernelctl.names import topology
from kernelctl.openflow.actions import ApplyActions, Output
from kernelctl.openflow.connection import OpenFlowConnection
from kernelctl.openflow.constants import FlowModFlags, Port
from kernelctl.openflow.messages import FlowMod, FlowRemoved, Message, PacketIn, SetConfig
from kernelctl.openflow.oxm import Match

BLOCK_PRIORITY = 1000
_ETH_IPV4 = struct.Struct("!12xH")
_IPV4 = struct.Struct("!BxH5xB2x4s4s")


@dataclass
class LearningFirewall:
    max_ports: int = 3
    idle_timeout: int = 2
    tried: dict[bytes, set[tuple[int, int]]] = field(default_factory=dict)
    blocked: set[bytes] = field(default_factory=set)
    events: list[dict[str, object]] = field(default_factory=list)

    def start(self) -> list[Message]:
        table_miss = FlowMod(1, priority=0, match=Match(),
                             instructions=(ApplyActions((Output(Port.CONTROLLER, 0xFFFF), Output(Port.LOCAL))),))
        return [SetConfig(2, 0, 0xFFFF), table_miss]

    def on_message(self, message: Message) -> list[Message]:
        if isinstance(message, PacketIn):
            return self._packet_in(message.data)
        if isinstance(message, FlowRemoved) and message.priority == BLOCK_PRIORITY:
            source = message.match.get("ipv4_src")
            if source is not None:
                address = source.value.to_bytes(4, "big")
                self.blocked.discard(address)
                self.tried.pop(address, None)
                self.events.append({"event": "unblocked", "source": socket.inet_ntoa(address)})
        return []

    def _packet_in(self, frame: bytes) -> list[Message]:
        if len(frame) < 14 + 20 + 4 or _ETH_IPV4.unpack_from(frame)[0] != 0x0800:
            return []
        version_ihl, _total, proto, source, _dest = _IPV4.unpack_from(frame, 14)
        header = (version_ihl & 0x0F) * 4
        if proto not in (6, 17) or len(frame) < 14 + header + 4 or source in self.blocked:
            return []
        (port,) = struct.unpack_from("!H", frame, 14 + header + 2)
        ports = self.tried.setdefault(source, set())
        ports.add((proto, port))
        if len(ports) <= self.max_ports:
            return []
        self.blocked.add(source)
        self.events.append({"event": "blocked", "source": socket.inet_ntoa(source), "ports": len(ports)})
        return [FlowMod(0, priority=BLOCK_PRIORITY, idle_timeout=self.idle_timeout, flags=FlowModFlags.SEND_FLOW_REM,
                        match=Match.of(eth_type=0x0800, ipv4_src=int.from_bytes(source, "big")))]


def run(path: str, firewall: LearningFirewall, seconds: float) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.settimeout(0.2)
    conn = OpenFlowConnection()
    for message in firewall.start():
        conn.send(message)
    print(json.dumps({"event": "ready"}), flush=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not conn.closing:
        if conn.pending_output:
            conn.sent(sock.send(conn.data_to_send()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            break
        for message in conn.receive_data(data, max_messages=10**6):
            for reply in firewall.on_message(message):
                conn.send(reply)
        while firewall.events:
            print(json.dumps(firewall.events.pop(0)), flush=True)
    sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance", default="")
    parser.add_argument("--ports", type=int, default=3, help="distinct unclaimed ports a source may try")
    parser.add_argument("--idle", type=int, default=2, help="idle timeout of a block, seconds")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    path = topology(args.instance).run_dir / "openflow.sock"
    run(str(path), LearningFirewall(args.ports, args.idle), args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
