"""The OpenFlow channel's codec, connection and switch model, over a fake datapath.

Contract: for any byte stream, cut anyhow, ``OpenFlowConnection.receive_data`` never raises
and never holds more than one message of input; every request it hands out goes to
``Switch.handle``, which never raises (a refusal is an OpenFlow ERROR on the connection),
and the switch's own checks hold: the control plane's flows are still listed after
whatever the stream asked, and no device flow outlives its controller flow.
"""

from __future__ import annotations

from typing import Any

from kernelctl.openflow import constants as c
from kernelctl.openflow.actions import ApplyActions, Meter, Output, SetQueue
from kernelctl.openflow.connection import OpenFlowConnection
from kernelctl.openflow.messages import (
    EchoRequest,
    FlowMod,
    FlowStatsRequest,
    Hello,
    MeterBand,
    MeterMod,
    MultipartRequest,
    PacketOut,
    SetConfig,
)
from kernelctl.openflow.oxm import Match
from kernelctl.openflow.switch import WIRE_PORT, DeviceFlow, PortInfo, Switch
from tools.fuzz_targets import ContractViolation
from tools.fuzz_targets._input import Input

_CLAIMED = [
    {"kind": "filter", "id": 1, "direction": "rx", "function": 1, "queue": 0,
     "match": {"ethertype": 0x800, "ip_proto": 17, "ip": "10.10.0.2", "port": 7}, "packets": 1, "bytes": 60, "drops": 0},
    {"kind": "filter", "id": 2, "direction": "tx", "function": 1, "queue": 0,
     "match": {"ethertype": 0x800, "ip_proto": 17, "ip": "10.10.0.2", "port": 7}, "packets": 1, "bytes": 60, "drops": 0},
]


class _Datapath:
    def __init__(self) -> None:
        self.device: dict[int, DeviceFlow] = {}
        self.meters: dict[int, int] = {}
        self.next_id = 1

    def ports(self) -> list[PortInfo]:
        mac = b"\x02" * 6
        return [PortInfo(1, "fn", mac, 0.0), PortInfo(WIRE_PORT, "wire", mac, 0.0), PortInfo(c.Port.LOCAL, "local", mac, 0.0)]

    def device_stats(self) -> dict[str, Any]:
        flows = [{"kind": "flow", "id": fid, "packets": 1, "bytes": 60} for fid in self.device]
        return {"filters": [{"kind": "table", "unmatched": 0}, *_CLAIMED, *flows], "functions": [], "device": {},
                "meters": [{"meter_id": m, "packets_in": 1} for m in self.meters]}

    def add_flow(self, flow: DeviceFlow) -> int:
        if flow.meter and flow.meter not in self.meters:
            raise ContractViolation(f"a flow for meter {flow.meter}, which the device does not have")
        self.next_id += 1
        self.device[self.next_id] = flow
        return self.next_id

    def remove_flows(self, flow_ids: list[int]) -> dict[int, dict[str, int]]:
        return {fid: {"packets": 1, "bytes": 60} for fid in flow_ids if self.device.pop(fid, None) is not None}

    def wall_clock(self) -> float:
        return 100.0

    def packet_out(self, target: str, data: bytes, function_id: int = 0, queue: int = 0) -> None:
        if not 14 <= len(data) <= 1514:
            raise ContractViolation(f"a packet-out of {len(data)} bytes reached the device")

    def set_meter(self, meter_id: int, rate_kbps: int, burst_kb: int) -> None:
        if rate_kbps:
            self.meters[meter_id] = rate_kbps
        else:
            self.meters.pop(meter_id, None)

    def revoke_claim(self, function_id: int, proto: str, port: int) -> None:
        raise ContractViolation("a controller without the grant revoked a claim")


def _stream() -> list[bytes]:
    match = Match.of(eth_type=0x800, ip_proto=17, ipv4_src=(0x0A0A0000, 0xFFFFFF00), udp_dst=53)
    return [
        Hello(1).emit(),
        SetConfig(2, 0, 200).emit(),
        MeterMod(3, c.MeterModCommand.ADD, c.MeterFlags.KBPS, 1, (MeterBand(1, 100),)).emit(),
        FlowMod(4, priority=9, match=match, idle_timeout=1, flags=1,
                instructions=(Meter(1), ApplyActions((SetQueue(0), Output(1), Output(c.Port.CONTROLLER, 64))))).emit(),
        FlowMod(5, command=c.FlowModCommand.DELETE, table_id=c.OFPTT_ALL, match=Match.of(eth_type=0x800)).emit(),
        MultipartRequest(6, c.MultipartType.FLOW, 0, FlowStatsRequest()).emit(),
        PacketOut(7, actions=(Output(WIRE_PORT),), data=bytes(60)).emit(),
        EchoRequest(8, b"x").emit(),
    ]


def seeds_openflow() -> list[bytes]:
    stream = b"".join(_stream())
    return [b"\x00" + stream, b"\x01" + stream[:40], b"\x02" + bytes(64)]


def one_input_openflow(data: bytes) -> None:
    inp = Input(data)
    mode = inp.u8() % 3
    datapath = _Datapath()
    switch = Switch(datapath, 1, {"mfr": "m", "hw": "h", "sw": "s", "serial": "x", "dp": "d"})
    conn = OpenFlowConnection(max_output=1 << 16)
    switch.attach(conn)
    body = inp.rest()
    if mode == 1:
        body = b"".join(_stream()[:2]) + body  # past the HELLO, straight into requests
    now = 0.0
    position = 0
    while position < len(body):
        step = 1 + (body[position] % 97 if mode == 2 else len(body))
        chunk = body[position:position + step]
        position += step
        for message in conn.receive_data(chunk, max_messages=1 << 20):
            switch.handle(conn, message, now)
        if conn.buffered_input >= 0x10000 + step:
            raise ContractViolation(f"{conn.buffered_input} bytes of input held")
        conn.sent(conn.pending_output)
        now += 0.7
        switch.tick(now)
    live = {flow.device_id for flow in switch.flows.values() if flow.device_id is not None}
    if set(datapath.device) != live:
        raise ContractViolation(f"device flows {sorted(datapath.device)} but the switch knows {sorted(live)}")
    if sum(1 for view in switch.all_flows(now) if view.protected) != 2:
        raise ContractViolation("a control-plane flow disappeared")
