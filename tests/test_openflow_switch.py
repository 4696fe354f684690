"""The OpenFlow switch model (kernelctl/openflow/switch.py) over a fake datapath: FLOW_MOD
semantics (add, replace, modify, strict and non-strict delete, cookies, out_port, overlap),
the control plane's protected flows, timeouts with FLOW_REMOVED, PORT_STATUS and PACKET_IN.
No root, no device: the fake keeps the device's flows and counters in dicts."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from kernelctl.openflow import constants as c
from kernelctl.openflow.access import OpenFlowConfigError, parse_access, parse_controllers
from kernelctl.openflow.actions import ApplyActions, GotoTable, Meter, Output, SetQueue
from kernelctl.openflow.connection import OpenFlowConnection
from kernelctl.openflow.messages import (
    BarrierRequest,
    Error,
    FlowMod,
    FlowRemoved,
    FlowStats,
    FlowStatsRequest,
    Hello,
    MeterBand,
    MeterMod,
    Message,
    MultipartReply,
    MultipartRequest,
    PacketIn,
    PacketOut,
    PortStatus,
    parse_message,
)
from kernelctl.openflow.oxm import Match
from kernelctl.openflow.switch import WIRE_PORT, DeviceFlow, PortInfo, Switch
from kernelctl.openflow.wire import Reader

NIC = 0x0A0A0002
CLIENT = 0x0A0A0001


class FakeDatapath:
    def __init__(self) -> None:
        self.functions = [PortInfo(1, "echo", b"\x02" * 6, 0.0)]
        self.device: dict[int, DeviceFlow] = {}
        self.counts: dict[int, tuple[int, int]] = {}
        self.next_id = 100
        self.sent: list[tuple[str, bytes, int, int]] = []
        self.meters: dict[int, tuple[int, int]] = {}
        self.revoked: list[tuple[int, str, int]] = []
        self.claimed = [{"kind": "filter", "id": 1, "direction": "rx", "function": 1, "queue": 0,
                         "match": {"ethertype": 0x800, "ip_proto": 17, "ip": "10.10.0.2", "port": 7},
                         "packets": 5, "bytes": 500, "drops": 1},
                        {"kind": "filter", "id": 2, "direction": "tx", "function": 1, "queue": 0,
                         "match": {"ethertype": 0x800, "ip_proto": 17, "ip": "10.10.0.2", "port": 7},
                         "packets": 3, "bytes": 300, "drops": 0}]

    def wall_clock(self) -> float:
        return 10.0

    def ports(self) -> list[PortInfo]:
        return [*self.functions, PortInfo(WIRE_PORT, "wire", b"\x02" * 6, 0.0), PortInfo(c.Port.LOCAL, "local", b"\x02" * 6, 0.0)]

    def device_stats(self) -> dict[str, Any]:
        flows = [{"kind": "flow", "id": fid, "packets": p, "bytes": b} for fid, (p, b) in self.counts.items() if fid in self.device]
        return {"filters": [{"kind": "table", "unmatched": 0}, *self.claimed, *flows], "functions": [], "device": {}}

    def add_flow(self, flow: DeviceFlow) -> int:
        self.next_id += 1
        self.device[self.next_id] = flow
        self.counts[self.next_id] = (0, 0)
        return self.next_id

    def packet_out(self, target: str, data: bytes, function_id: int = 0, queue: int = 0) -> None:
        self.sent.append((target, data, function_id, queue))

    def revoke_claim(self, function_id: int, proto: str, port: int) -> None:
        self.revoked.append((function_id, proto, port))
        self.claimed = []

    def set_meter(self, meter_id: int, rate_kbps: int, burst_kb: int) -> None:
        self.meters[meter_id] = (rate_kbps, burst_kb)
        if not rate_kbps:
            del self.meters[meter_id]

    def remove_flows(self, flow_ids: list[int]) -> dict[int, dict[str, int]]:
        out = {}
        for fid in flow_ids:
            if self.device.pop(fid, None) is not None:
                packets, nbytes = self.counts.pop(fid)
                out[fid] = {"packets": packets, "bytes": nbytes, "drops": 0}
        return out


def setup() -> tuple[Switch, FakeDatapath, OpenFlowConnection]:
    datapath = FakeDatapath()
    switch = Switch(datapath, 1, {"mfr": "m", "hw": "h", "sw": "s", "serial": "x", "dp": "d"})
    conn = OpenFlowConnection()
    conn.receive_data(Hello(1).emit())
    conn.sent(conn.pending_output)
    switch.attach(conn)
    return switch, datapath, conn


def out(conn: OpenFlowConnection) -> list[Message]:
    data = conn.data_to_send()
    conn.sent(len(data))
    messages = []
    while data:
        (length,) = struct.unpack_from("!H", data, 2)
        messages.append(parse_message(data[:length]))
        data = data[length:]
    return messages


def errors(conn: OpenFlowConnection) -> list[tuple[int, int]]:
    return [(m.error_type, m.code) for m in out(conn) if isinstance(m, Error)]


def dump(switch: Switch, conn: OpenFlowConnection, **request: Any) -> list[FlowStats]:
    switch.handle(conn, MultipartRequest(9, c.MultipartType.FLOW, 0, FlowStatsRequest(**request)), 0.0)
    entries = []
    for reply in out(conn):
        assert isinstance(reply, MultipartReply)
        reader = Reader(reply.data)
        while reader.remaining:
            entries.append(FlowStats.parse(reader))
    return entries


DROP_CLIENT = Match.of(eth_type=0x800, ipv4_src=CLIENT)
TO_FN = (ApplyActions((SetQueue(1), Output(1))),)


def test_add_replace_keeps_counters_and_protected_flows_are_listed() -> None:
    switch, datapath, conn = setup()
    switch.handle(conn, FlowMod(1, priority=10, match=DROP_CLIENT, cookie=7), 0.0)
    (device_id,) = datapath.device
    assert datapath.device[device_id].fields == (("eth_type", 0x800, 0xFFFF), ("ipv4_src", CLIENT, 0xFFFFFFFF))
    datapath.counts[device_id] = (4, 400)
    switch.handle(conn, FlowMod(2, priority=10, match=DROP_CLIENT, cookie=8, instructions=TO_FN), 1.0)
    assert errors(conn) == []
    entries = dump(switch, conn)
    assert [(e.table_id, e.priority, e.cookie) for e in entries] == [(0, 0xFFFF, 1), (1, 0xFFFF, 1), (0, 10, 8)]
    assert entries[0].packet_count == 6  # delivered 5 + dropped 1: what the flow matched
    assert entries[2].packet_count == 4 and entries[2].byte_count == 400  # carried over
    (device_id,) = datapath.device
    assert datapath.device[device_id].outputs == ((1, 1),)
    switch.handle(conn, FlowMod(3, priority=10, match=DROP_CLIENT, flags=c.FlowModFlags.RESET_COUNTS), 2.0)
    assert dump(switch, conn)[2].packet_count == 0


def test_modify_and_delete_select_like_the_specification() -> None:
    switch, datapath, conn = setup()
    narrow = Match.of(eth_type=0x800, ip_proto=17, udp_dst=53)
    switch.handle(conn, FlowMod(1, priority=10, match=DROP_CLIENT, cookie=0x10), 0.0)
    switch.handle(conn, FlowMod(2, priority=20, match=narrow, cookie=0x21, instructions=TO_FN), 0.0)
    # Modify non-strict with match eth_type=0x800 selects both ... and the claimed flow: EPERM.
    switch.handle(conn, FlowMod(3, command=c.FlowModCommand.MODIFY, match=Match.of(eth_type=0x800)), 0.0)
    assert errors(conn) == [(c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.EPERM)]
    # Narrowed by cookie it selects one of ours.
    switch.handle(conn, FlowMod(4, command=c.FlowModCommand.MODIFY, match=Match.of(eth_type=0x800), cookie=0x20,
                                cookie_mask=0xF0, instructions=(ApplyActions((Output(c.Port.LOCAL),)),)), 0.0)
    assert errors(conn) == []
    assert sorted(f.outputs for f in datapath.device.values()) == [(), ((0, 0),)]
    # Strict delete needs the exact match and priority.
    switch.handle(conn, FlowMod(5, command=c.FlowModCommand.DELETE_STRICT, priority=11, match=DROP_CLIENT), 0.0)
    assert len(switch.flows) == 2
    switch.handle(conn, FlowMod(6, command=c.FlowModCommand.DELETE_STRICT, priority=10, match=DROP_CLIENT), 0.0)
    assert len(switch.flows) == 1 and len(datapath.device) == 1
    # out_port filters deletes: nothing of ours outputs to port 1 any more.
    switch.handle(conn, FlowMod(7, command=c.FlowModCommand.DELETE, table_id=c.OFPTT_ALL, match=narrow, out_port=1), 0.0)
    assert errors(conn) == [] and len(switch.flows) == 1
    switch.handle(conn, FlowMod(8, command=c.FlowModCommand.DELETE, table_id=c.OFPTT_ALL, match=narrow,
                                out_port=c.Port.LOCAL), 0.0)
    assert not switch.flows and datapath.device == {}


def test_the_control_plane_flows_cannot_be_deleted_or_overridden() -> None:
    switch, datapath, conn = setup()
    claimed = Match.of(eth_type=0x800, ip_proto=17, ipv4_dst=NIC, udp_dst=7)
    for mod in (
        FlowMod(1, command=c.FlowModCommand.DELETE_STRICT, priority=0xFFFF, match=claimed),
        FlowMod(2, command=c.FlowModCommand.DELETE, match=Match.of(eth_type=0x800, ip_proto=17, udp_dst=7)),
        FlowMod(3, command=c.FlowModCommand.DELETE, table_id=1, match=Match()),
        FlowMod(4, command=c.FlowModCommand.DELETE, match=Match(), cookie=1, cookie_mask=0xFFFFFFFFFFFFFFFF),
        FlowMod(5, priority=0xFFFF, match=claimed),
        FlowMod(6, table_id=1, match=claimed),
        FlowMod(7, command=c.FlowModCommand.MODIFY_STRICT, priority=0xFFFF, match=claimed),
    ):
        switch.handle(conn, mod, 0.0)
        assert errors(conn) == [(c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.EPERM)], mod
    assert len(dump(switch, conn)) == 2


def test_a_controller_the_policy_grants_may_revoke_a_claim() -> None:
    switch, datapath, conn = setup()
    granted = OpenFlowConnection()
    granted.receive_data(Hello(1).emit())
    granted.sent(granted.pending_output)
    switch.attach(granted, may_revoke=True)
    by_port = FlowMod(1, command=c.FlowModCommand.DELETE, match=Match.of(eth_type=0x800, ip_proto=17, udp_dst=7))
    switch.handle(conn, by_port, 0.0)
    assert errors(conn) == [(c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.EPERM)] and datapath.revoked == []
    # Deleting everything never revokes, granted or not.
    switch.handle(granted, FlowMod(2, command=c.FlowModCommand.DELETE, table_id=c.OFPTT_ALL), 0.0)
    assert errors(granted) == [] and datapath.revoked == []
    # The transmit filter (table 1) names the same claim: deleting it revokes the claim.
    switch.handle(granted, FlowMod(3, command=c.FlowModCommand.DELETE, table_id=1, match=Match.of(in_port=1)), 0.0)
    assert errors(granted) == [] and datapath.revoked == [(1, "udp", 7)]
    assert dump(switch, conn) == []
    switch.detach(granted)
    assert granted not in switch.revokers


def test_refusals_carry_the_right_codes() -> None:
    switch, datapath, conn = setup()
    cases = [
        (FlowMod(1, match=DROP_CLIENT, instructions=(GotoTable(1),)), (c.ErrorType.BAD_INSTRUCTION, c.BadInstruction.UNSUP_INST)),
        (FlowMod(2, match=DROP_CLIENT, instructions=(Meter(1),)), (c.ErrorType.METER_MOD_FAILED, c.MeterModFailed.UNKNOWN_METER)),
        (FlowMod(3, match=DROP_CLIENT, instructions=(ApplyActions((Output(99),)),)), (c.ErrorType.BAD_ACTION, c.BadAction.BAD_OUT_PORT)),
        (FlowMod(4, match=DROP_CLIENT, instructions=(ApplyActions((Output(WIRE_PORT),)),)), (c.ErrorType.BAD_ACTION, c.BadAction.BAD_OUT_PORT)),
        (FlowMod(5, match=DROP_CLIENT, table_id=7), (c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.BAD_TABLE_ID)),
        (FlowMod(6, match=DROP_CLIENT, buffer_id=3), (c.ErrorType.BAD_REQUEST, c.BadRequest.BUFFER_UNKNOWN)),
        (FlowMod(7, match=DROP_CLIENT, flags=0x80), (c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.BAD_FLAGS)),
        (FlowMod(8, match=DROP_CLIENT, command=9), (c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.BAD_COMMAND)),
    ]
    for mod, expected in cases:
        switch.handle(conn, mod, 0.0)
        assert errors(conn) == [expected], mod
    switch.handle(conn, FlowMod(9, priority=5, match=Match.of(eth_type=0x800)), 0.0)
    switch.handle(conn, FlowMod(10, priority=5, match=DROP_CLIENT, flags=c.FlowModFlags.CHECK_OVERLAP), 0.0)
    assert errors(conn) == [(c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.OVERLAP)]
    switch.handle(conn, FlowMod(11, priority=5, match=Match.of(eth_type=0x806), flags=c.FlowModFlags.CHECK_OVERLAP), 0.0)
    switch.handle(conn, BarrierRequest(12), 0.0)
    assert [type(m).__name__ for m in out(conn)] == ["BarrierReply"]
    # A flow for frames that never come from the wire is kept, not given to the device.
    switch.handle(conn, FlowMod(13, priority=5, match=Match.of(in_port=1)), 0.0)
    assert errors(conn) == [] and len(datapath.device) == 2 and len(switch.flows) == 3


def test_timeouts_remove_flows_and_say_so() -> None:
    switch, datapath, conn = setup()
    flag = c.FlowModFlags.SEND_FLOW_REM
    switch.handle(conn, FlowMod(1, priority=1, match=DROP_CLIENT, hard_timeout=5, flags=flag, cookie=1), 0.0)
    switch.handle(conn, FlowMod(2, priority=2, match=DROP_CLIENT, idle_timeout=2, flags=flag, cookie=2), 0.0)
    idle_id = max(datapath.device)
    switch.tick(1.5)
    datapath.counts[idle_id] = (1, 60)  # traffic keeps the idle flow alive
    switch.tick(3.0)
    assert len(switch.flows) == 2
    switch.tick(5.2)
    removed = [m for m in out(conn) if isinstance(m, FlowRemoved)]
    assert [(m.cookie, m.reason) for m in removed] == [(1, c.FlowRemovedReason.HARD_TIMEOUT), (2, c.FlowRemovedReason.IDLE_TIMEOUT)]
    assert removed[1].packet_count == 1
    assert not switch.flows and datapath.device == {}


def test_ports_coming_and_going_and_packet_ins() -> None:
    switch, datapath, conn = setup()
    datapath.functions.append(PortInfo(2, "kv", b"\x02" * 6, 0.0))
    switch.tick(0.0)
    del datapath.functions[0]
    switch.tick(0.1)
    statuses = [(m.reason, m.port.port_no) for m in out(conn) if isinstance(m, PortStatus)]
    assert statuses == [(c.PortReason.ADD, 2), (c.PortReason.DELETE, 1)]
    switch.handle(conn, FlowMod(1, priority=0, match=Match(), cookie=5,
                                instructions=(ApplyActions((Output(c.Port.CONTROLLER, 0xFFFF),)),)), 0.0)
    (device_id,) = datapath.device
    assert datapath.device[device_id].to_controller
    switch.packet_in(device_id, 300, bytes(300))
    (packet_in,) = [m for m in out(conn) if isinstance(m, PacketIn)]
    assert packet_in.reason == c.PacketInReason.NO_MATCH and len(packet_in.data) == 128  # miss_send_len
    assert packet_in.cookie == 5 and packet_in.match == Match.of(in_port=WIRE_PORT)


def test_policy_names_controllers() -> None:
    assert parse_controllers("[openflow]\ncontrollers = [1000, 1001]\n") == {1000, 1001}
    grants = parse_access("[openflow]\nmay_revoke = [0]\n")
    assert grants.may_revoke == {0} and grants.may_connect(0) and not grants.may_connect(5)
    assert parse_controllers("[[rule]]\nuid = 1\n") == frozenset()
    for bad in ("[openflow]\ncontrollers = 5\n", "[openflow]\nwho = [1]\n", "openflow = 3\n", "[openflow]\ncontrollers = [true]\n",
                "[openflow]\nmay_revoke = [-1]\n"):
        with pytest.raises(OpenFlowConfigError):
            parse_controllers(bad)


def test_packet_out_goes_where_the_actions_say() -> None:
    switch, datapath, conn = setup()
    frame = bytes(60)
    switch.handle(conn, PacketOut(1, in_port=c.Port.CONTROLLER, actions=(Output(WIRE_PORT), SetQueue(2), Output(1), Output(c.Port.TABLE)), data=frame), 0.0)
    assert errors(conn) == []
    assert datapath.sent == [("wire", frame, 0, 0), ("function", frame, 1, 2), ("table", frame, 0, 0)]
    for message, expected in (
        (PacketOut(2, actions=(Output(77),), data=frame), (c.ErrorType.BAD_ACTION, c.BadAction.BAD_OUT_PORT)),
        (PacketOut(3, buffer_id=5, actions=(Output(1),), data=frame), (c.ErrorType.BAD_REQUEST, c.BadRequest.BUFFER_UNKNOWN)),
        (PacketOut(4, actions=(Output(1),), data=b"short"), (c.ErrorType.BAD_REQUEST, c.BadRequest.BAD_PACKET)),
        (PacketOut(5, in_port=99, actions=(Output(1),), data=frame), (c.ErrorType.BAD_REQUEST, c.BadRequest.BAD_PORT)),
    ):
        switch.handle(conn, message, 0.0)
        assert errors(conn) == [expected]
    assert len(datapath.sent) == 3


def test_meters() -> None:
    switch, datapath, conn = setup()
    kbps = c.MeterFlags.KBPS
    switch.handle(conn, MeterMod(1, c.MeterModCommand.ADD, kbps, 1, (MeterBand(c.MeterBandType.DROP, 800),)), 0.0)
    switch.handle(conn, FlowMod(2, priority=5, match=DROP_CLIENT, instructions=(Meter(1), ApplyActions((Output(1),)))), 0.0)
    assert errors(conn) == [] and datapath.meters == {1: (800, 0)}
    (device_flow,) = datapath.device.values()
    assert device_flow.meter == 1 and device_flow.outputs == ((1, 0),)
    for message, expected in (
        (MeterMod(3, c.MeterModCommand.ADD, kbps, 1, (MeterBand(1, 5),)), c.MeterModFailed.METER_EXISTS),
        (MeterMod(4, c.MeterModCommand.ADD, c.MeterFlags.PKTPS, 2, (MeterBand(1, 5),)), c.MeterModFailed.BAD_FLAGS),
        (MeterMod(5, c.MeterModCommand.ADD, kbps, 2, (MeterBand(2, 5),)), c.MeterModFailed.BAD_BAND),
        (MeterMod(6, c.MeterModCommand.ADD, kbps, 2, (MeterBand(1, 0),)), c.MeterModFailed.BAD_RATE),
        (MeterMod(7, c.MeterModCommand.MODIFY, kbps, 9, (MeterBand(1, 5),)), c.MeterModFailed.UNKNOWN_METER),
        (MeterMod(8, c.MeterModCommand.ADD, kbps, 0, (MeterBand(1, 5),)), c.MeterModFailed.INVALID_METER),
    ):
        switch.handle(conn, message, 0.0)
        assert errors(conn) == [(c.ErrorType.METER_MOD_FAILED, expected)], message
    switch.handle(conn, MeterMod(9, c.MeterModCommand.MODIFY, kbps | c.MeterFlags.BURST, 1, (MeterBand(1, 1600, 100),)), 0.0)
    assert datapath.meters == {1: (1600, 100)}
    # Deleting the meter removes the flows that use it.
    switch.handle(conn, MeterMod(10, c.MeterModCommand.DELETE, 0, c.OFPM_ALL), 0.0)
    assert errors(conn) == [] and datapath.meters == {} and not switch.flows and datapath.device == {}


def test_mutated_requests_through_the_switch_raise_nothing() -> None:
    """Twenty thousand mutated requests through a connection and the switch: every one is
    answered or refused with an OpenFlow error; no other exception escapes (in the daemon
    it would cost the controller its session)."""
    import random

    from kernelctl.openflow.messages import FeaturesRequest, GetConfigRequest, SetConfig

    rng = random.Random(11)
    switch, datapath, conn = setup()
    switch.handle(conn, MeterMod(1, c.MeterModCommand.ADD, c.MeterFlags.KBPS, 1, (MeterBand(1, 100),)), 0.0)
    seeds = [
        FlowMod(1, priority=5, match=DROP_CLIENT, instructions=TO_FN).emit(),
        FlowMod(1, command=c.FlowModCommand.DELETE, table_id=c.OFPTT_ALL).emit(),
        FlowMod(1, priority=3, match=Match.of(eth_type=0x800, ip_proto=6, tcp_dst=80), idle_timeout=1,
                instructions=(Meter(1), ApplyActions((Output(c.Port.CONTROLLER, 100), Output(c.Port.LOCAL))))).emit(),
        MultipartRequest(1, c.MultipartType.FLOW, 0, FlowStatsRequest()).emit(),
        MultipartRequest(1, c.MultipartType.PORT_STATS, 0, c.Port.ANY).emit(),
        MultipartRequest(1, c.MultipartType.METER, 0, c.OFPM_ALL).emit(),
        MultipartRequest(1, c.MultipartType.TABLE_FEATURES).emit(),
        PacketOut(1, actions=(Output(WIRE_PORT),), data=bytes(60)).emit(),
        MeterMod(1, c.MeterModCommand.MODIFY, c.MeterFlags.KBPS, 1, (MeterBand(1, 50),)).emit(),
        SetConfig(1, 0, 200).emit(), FeaturesRequest(1).emit(), GetConfigRequest(1).emit(),
    ]
    for index in range(20_000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(0, 4)):
            raw[rng.randrange(8, len(raw)) if len(raw) > 8 else 0] = rng.randrange(256)
        raw[2:4] = len(raw).to_bytes(2, "big")
        for message in conn.receive_data(bytes(raw)):
            switch.handle(conn, message, index * 0.01)
        conn.sent(conn.pending_output)
        switch.tick(index * 0.01)
    assert not conn.closing
    assert switch.counters["refused"] > 0 and switch.counters["flow_mods"] > 0
