"""The OpenFlow switch model: kernelctl's view of the VNIC as OpenFlow 1.3 sees it.

* **Ports.** Each VNIC function is a port whose number is its function id; the wire (the
  tap) is port ``WIRE_PORT``; the default function, which answers ARP, ICMP and unclaimed
  ports for the control plane, is ``LOCAL``.
* **Table 0** holds, at priority ``CONTROL_PLANE_PRIORITY`` (65535), a flow for every port an
  application claimed through kernelctl (match: its protocol, the NIC's address and the
  port; action: output to its function; cookie: the function id), and below them the
  controller's flows, which see only the traffic no claim takes. Frames no flow matches go
  to ``LOCAL``, as they always did.
* **Table 1** shows the transmit (anti-spoofing) filters: what each function may send.
* **Protection.** The claimed flows and table 1 belong to the control plane: a controller
  may not add a flow at their priority, modify them or delete them one by one
  (``OFPET_FLOW_MOD_FAILED``/``OFPFMFC_EPERM``). A delete of *everything* (an empty match
  and no cookie filter, as ``ovs-ofctl del-flows`` sends) removes the controller's flows and
  leaves the control plane's, as a switch keeps its own flows. Isolation between
  applications never depends on the controller behaving: the device consults the claimed
  filters first whatever the controller installs.

The model is sans-I/O: it takes decoded requests and answers them on an
:class:`OpenFlowConnection`, and reaches the device through a :class:`Datapath` that the
daemon implements with management requests. Time is an argument.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from kernelctl.openflow.actions import (
    ApplyActions,
    ClearActions,
    GotoTable,
    Instruction,
    Meter,
    Output,
    SetQueue,
    WriteActions,
)
from kernelctl.openflow.connection import OpenFlowConnection
from kernelctl.openflow.constants import (
    FLOW_MOD_FLAGS_ALL,
    OFPM_ALL,
    OFPM_MAX,
    ActionType,
    MeterBandType,
    MeterFlags,
    MeterModCommand,
    InstructionType,
    OFP_NO_BUFFER,
    OFPTT_ALL,
    BadAction,
    BadInstruction,
    BadRequest,
    Capabilities,
    ConfigFlags,
    ErrorType,
    FlowModCommand,
    FlowModFailed,
    FlowModFlags,
    FlowRemovedReason,
    MeterModFailed,
    MultipartType,
    PacketInReason,
    Port,
    PortFeatures,
    PortReason,
    PortState,
    SwitchConfigFailed,
)
from kernelctl.openflow.messages import (
    BarrierReply,
    BarrierRequest,
    Error,
    Experimenter,
    FeaturesReply,
    FeaturesRequest,
    FlowMod,
    FlowRemoved,
    FlowStats,
    FlowStatsRequest,
    GetConfigReply,
    GetConfigRequest,
    Message,
    MeterBand,
    MeterConfig,
    MeterMod,
    MeterStats,
    MultipartRequest,
    PacketIn,
    PacketOut,
    PortDesc,
    PortStats,
    PortStatus,
    SetConfig,
    TableStats,
    aggregate_body,
    desc_body,
    meter_features_body,
    multipart_replies,
    table_features_body,
)
from kernelctl.openflow.oxm import FIELDS as OXM_FIELDS
from kernelctl.openflow.oxm import OFPXMC_OPENFLOW_BASIC
from kernelctl.openflow.oxm import Match
from kernelctl.openflow.wire import OFPError

# The wire's port number. OpenFlow 1.3 allows ordinary ports up to 0xffffff00, but Open vSwitch
# (ovs-ofctl) maps 1.3 port numbers onto 16 bits and refuses 0xff00 and above, so the wire is
# the last number below that; function ids count up from 1 and never reach it in practice.
WIRE_PORT: Final = 0xFEFF
CONTROL_PLANE_PRIORITY: Final = 0xFFFF
CLAIM_TABLE: Final = 0
TRANSMIT_TABLE: Final = 1
N_TABLES: Final = 2
MAX_CONTROLLER_FLOWS: Final = 16000  # the device holds 16384 (vdev.vnic.flows.MAX_FLOWS)
MAX_METERS: Final = 64  # as the device (vdev.vnic.device.MAX_METERS)
_PORT_SPEED_KBPS: Final = 10_000_000  # what we report: a 10 Gbit/s copper port
_DEVICE_FIELDS: Final = {
    "eth_dst": "eth_dst", "eth_src": "eth_src", "eth_type": "eth_type", "ip_proto": "ip_proto",
    "ipv4_src": "ipv4_src", "ipv4_dst": "ipv4_dst", "tcp_src": "l4_src", "udp_src": "l4_src",
    "tcp_dst": "l4_dst", "udp_dst": "l4_dst",
}
_FIELD_BITS: Final = {"eth_dst": 48, "eth_src": 48, "eth_type": 16, "ip_proto": 8, "ipv4_src": 32,
                      "ipv4_dst": 32, "tcp_src": 16, "udp_src": 16, "tcp_dst": 16, "udp_dst": 16, "in_port": 32}


def _flow_mod_error(code: FlowModFailed, why: str) -> OFPError:
    return OFPError(ErrorType.FLOW_MOD_FAILED, code, why)


@dataclass(frozen=True)
class PortInfo:
    port_no: int
    name: str
    mac: bytes
    created: float  # time.time() of its creation, for durations


@dataclass(frozen=True)
class DeviceFlow:
    """What the device is asked to do for one controller flow (``vdev.control.HostAddFlow``)."""

    priority: int
    fields: tuple[tuple[str, int, int], ...]  # device field name, value, mask
    outputs: tuple[tuple[int, int], ...]  # (function id, queue); function 0 is LOCAL
    to_controller: bool
    controller_len: int
    meter: int = 0


class DatapathError(Exception):
    """The device refused or did not answer."""


class Datapath(Protocol):
    """What the switch needs from the daemon."""

    def ports(self) -> list[PortInfo]: ...

    def device_stats(self) -> dict[str, Any]: ...

    def add_flow(self, flow: DeviceFlow) -> int: ...

    def remove_flows(self, flow_ids: list[int]) -> dict[int, dict[str, int]]: ...

    def wall_clock(self) -> float: ...

    def packet_out(self, target: str, data: bytes, function_id: int = 0, queue: int = 0) -> None: ...

    def set_meter(self, meter_id: int, rate_kbps: int, burst_kb: int) -> None: ...

    def revoke_claim(self, function_id: int, proto: str, port: int) -> None: ...


@dataclass(eq=False)
class ControllerFlow:
    priority: int
    match: Match
    instructions: tuple[Instruction, ...]
    cookie: int
    idle_timeout: int
    hard_timeout: int
    flags: int
    installed: float  # monotonic
    installed_wall: float
    device_id: int | None  # None: a flow that can never see a frame from the wire
    base_packets: int = 0  # counts carried over from a replaced entry
    base_bytes: int = 0
    seen_packets: int = -1  # for idle timeouts: the count at last_active
    last_active: float = 0.0


@dataclass
class MeterEntry:
    flags: int
    bands: tuple[MeterBand, ...]
    created: float


@dataclass
class ConnectionConfig:
    flags: int = ConfigFlags.FRAG_NORMAL
    miss_send_len: int = 128


@dataclass(frozen=True)
class FlowView:
    """One flow as a dump shows it: a controller flow, or a protected control-plane entry."""

    table_id: int
    priority: int
    match: Match
    instructions: tuple[Instruction, ...]
    cookie: int
    packets: int
    nbytes: int
    duration: float
    idle_timeout: int = 0
    hard_timeout: int = 0
    flags: int = 0
    protected: bool = False
    controller: ControllerFlow | None = None
    claim: tuple[int, str, int] | None = None  # (function, "udp"/"tcp", port) of a protected flow


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


class Switch:
    def __init__(self, datapath: Datapath, datapath_id: int, description: dict[str, str]) -> None:
        self.datapath = datapath
        self.datapath_id = datapath_id
        self.description = description
        # The controller's flows by (priority, match), in the order they were added: an ADD
        # finds the entry it replaces in O(1), whatever the number of flows.
        self.flows: dict[tuple[int, Match], ControllerFlow] = {}
        self._device_index: dict[int, ControllerFlow] | None = None  # by device flow id, rebuilt on change
        self.meters: dict[int, MeterEntry] = {}
        self.configs: dict[OpenFlowConnection, ConnectionConfig] = {}
        self.revokers: set[OpenFlowConnection] = set()  # connections the policy lets revoke claims
        self.connections: list[OpenFlowConnection] = []
        self._known_ports: dict[int, PortInfo] = {}
        self._next_stats = 0.0
        self.counters = {"flow_mods": 0, "refused": 0, "packet_ins": 0, "flows_expired": 0}

    # ---- connections -------------------------------------------------------------------------

    def attach(self, conn: OpenFlowConnection, may_revoke: bool = False) -> None:
        self.connections.append(conn)
        if may_revoke:
            self.revokers.add(conn)
        self.configs[conn] = ConnectionConfig()
        if len(self.connections) == 1:
            # Nobody watched the ports while no controller was connected: start from now
            # (a new controller learns them from PORT_DESC, not from PORT_STATUS).
            self._known_ports = {port.port_no: port for port in self.datapath.ports()}

    def detach(self, conn: OpenFlowConnection) -> None:
        self.revokers.discard(conn)
        if conn in self.configs:
            del self.configs[conn]
            self.connections.remove(conn)

    def handle(self, conn: OpenFlowConnection, message: Message, now: float) -> None:
        """Answer one request on ``conn``; a refusal becomes an OpenFlow error, a failure of
        the device an ``OFPET_BAD_REQUEST``-free ``FLOW_MOD_FAILED``/``UNKNOWN`` (never a crash)."""
        try:
            self._dispatch(conn, message, now)
        except OFPError as exc:
            self.counters["refused"] += 1
            conn.refuse(exc, message)
        except DatapathError as exc:
            self.counters["refused"] += 1
            conn.refuse(_flow_mod_error(FlowModFailed.UNKNOWN, f"device: {exc}"), message)

    def _dispatch(self, conn: OpenFlowConnection, message: Message, now: float) -> None:
        if isinstance(message, FeaturesRequest):
            conn.send(FeaturesReply(message.xid, self.datapath_id, 0, N_TABLES, 0,
                                    Capabilities.FLOW_STATS | Capabilities.TABLE_STATS | Capabilities.PORT_STATS))
        elif isinstance(message, GetConfigRequest):
            config = self.configs.get(conn, ConnectionConfig())
            conn.send(GetConfigReply(message.xid, config.flags, config.miss_send_len))
        elif isinstance(message, SetConfig):
            if message.flags & ~ConfigFlags.FRAG_MASK or message.flags not in (ConfigFlags.FRAG_NORMAL, ConfigFlags.FRAG_DROP):
                # The device never reassembles (no OFPC_IP_REASM in our capabilities).
                raise OFPError(ErrorType.SWITCH_CONFIG_FAILED, SwitchConfigFailed.BAD_FLAGS, f"flags {message.flags:#x}")
            self.configs[conn] = ConnectionConfig(message.flags, message.miss_send_len)
        elif isinstance(message, BarrierRequest):
            # Every request is carried out before the next is read: a barrier has nothing to wait for.
            conn.send(BarrierReply(message.xid))
        elif isinstance(message, FlowMod):
            self.counters["flow_mods"] += 1
            self.flow_mod(message, now, may_revoke=conn in self.revokers)
        elif isinstance(message, MultipartRequest):
            self.multipart(conn, message, now)
        elif isinstance(message, MeterMod):
            self.meter_mod(message, now)
        elif isinstance(message, PacketOut):
            self.packet_out(message)
        elif isinstance(message, Experimenter):
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_EXPERIMENTER, f"experimenter {message.experimenter:#x}")
        elif isinstance(message, Error):
            pass  # a controller's complaint about something we sent: nothing to answer
        else:
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_TYPE, f"{type(message).__name__} is not a request")

    # ---- the control plane's entries -------------------------------------------------------

    def _protected(self, stats: dict[str, Any], now_wall: float) -> list[FlowView]:
        """The claimed filters (table 0) and transmit filters (table 1) as flows."""
        created = {port.port_no: port.created for port in self.datapath.ports()}
        views = []
        for entry in stats.get("filters", []):
            if not isinstance(entry, dict) or entry.get("kind") != "filter":
                continue
            function_id = int(entry["function"])
            match_dict = entry.get("match", {})
            proto = match_dict.get("ip_proto")
            values: dict[str, int | tuple[int, int]] = {"eth_type": int(match_dict.get("ethertype", 0x0800))}
            if proto is not None:
                values["ip_proto"] = int(proto)
            transmit = entry.get("direction") == "tx"
            if match_dict.get("ip") is not None:
                values["ipv4_src" if transmit else "ipv4_dst"] = _ip(match_dict["ip"])
            if match_dict.get("port") is not None and proto in (6, 17):
                name = ("tcp" if proto == 6 else "udp") + ("_src" if transmit else "_dst")
                values[name] = int(match_dict["port"])
            if transmit:
                values["in_port"] = function_id
            try:
                match = Match.of(**values)
            except OFPError:
                continue  # a filter OpenFlow cannot express (none today): not shown
            if transmit:
                actions: tuple[Output | SetQueue, ...] = (Output(WIRE_PORT),)
            else:
                queue = int(entry.get("queue", 0))
                actions = ((SetQueue(queue),) if queue else ()) + (Output(function_id),)
            packets = int(entry.get("packets", 0)) + int(entry.get("drops", 0))
            port = match_dict.get("port")
            claim = (function_id, "tcp" if proto == 6 else "udp", int(port)) if proto in (6, 17) and port is not None else None
            views.append(FlowView(
                TRANSMIT_TABLE if transmit else CLAIM_TABLE, CONTROL_PLANE_PRIORITY, match,
                (ApplyActions(actions),), function_id, packets, int(entry.get("bytes", 0)),
                max(0.0, now_wall - created.get(function_id, now_wall)), protected=True, claim=claim,
            ))
        return views

    def _controller_views(self, stats: dict[str, Any], now: float) -> list[FlowView]:
        counts = _flow_counts(stats)
        views = []
        for flow in self.flows.values():
            packets, nbytes = counts.get(flow.device_id, (0, 0)) if flow.device_id is not None else (0, 0)
            views.append(FlowView(
                CLAIM_TABLE, flow.priority, flow.match, flow.instructions, flow.cookie,
                flow.base_packets + packets, flow.base_bytes + nbytes, max(0.0, now - flow.installed),
                flow.idle_timeout, flow.hard_timeout, flow.flags, controller=flow,
            ))
        return views

    def all_flows(self, now: float) -> list[FlowView]:
        stats = self._stats()
        return self._protected(stats, self.datapath.wall_clock()) + self._controller_views(stats, now)

    def _stats(self) -> dict[str, Any]:
        stats = self.datapath.device_stats()
        return stats if isinstance(stats, dict) else {}

    # ---- FLOW_MOD (6.4, 7.3.4.1) -----------------------------------------------------------------

    def flow_mod(self, mod: FlowMod, now: float, may_revoke: bool = False) -> None:
        if mod.flags & ~FLOW_MOD_FLAGS_ALL:
            raise _flow_mod_error(FlowModFailed.BAD_FLAGS, f"flags {mod.flags:#x}")
        if mod.command in (FlowModCommand.DELETE, FlowModCommand.DELETE_STRICT):
            self._delete(mod, now, strict=mod.command == FlowModCommand.DELETE_STRICT, may_revoke=may_revoke)
            return
        if mod.command not in (FlowModCommand.ADD, FlowModCommand.MODIFY, FlowModCommand.MODIFY_STRICT):
            raise _flow_mod_error(FlowModFailed.BAD_COMMAND, f"command {mod.command}")
        if mod.table_id == TRANSMIT_TABLE:
            raise _flow_mod_error(FlowModFailed.EPERM, "table 1 holds the control plane's transmit filters")
        if mod.table_id != CLAIM_TABLE:
            raise _flow_mod_error(FlowModFailed.BAD_TABLE_ID, f"table {mod.table_id} (this switch has tables 0 and 1)")
        if mod.buffer_id != OFP_NO_BUFFER:
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BUFFER_UNKNOWN, "this switch buffers no packets")
        actions = self._check_instructions(mod.instructions)
        if mod.command == FlowModCommand.ADD:
            self._add(mod, actions, now)
        else:
            self._modify(mod, actions, now, strict=mod.command == FlowModCommand.MODIFY_STRICT)

    def _meter_of(self, instructions: tuple[Instruction, ...]) -> int:
        return next((item.meter_id for item in instructions if isinstance(item, Meter)), 0)

    def _check_instructions(self, instructions: tuple[Instruction, ...]) -> tuple[Output | SetQueue, ...]:
        """The actions the flow's instructions come to (one table, so apply and write are the
        same thing here); what this switch cannot do is refused with the right error."""
        actions: tuple[Output | SetQueue, ...] = ()
        kinds = set()
        for item in instructions:
            if type(item) in kinds:
                raise OFPError(ErrorType.BAD_INSTRUCTION, BadInstruction.UNSUP_INST, f"{type(item).__name__} twice")
            kinds.add(type(item))
            if isinstance(item, GotoTable):
                raise OFPError(ErrorType.BAD_INSTRUCTION, BadInstruction.UNSUP_INST, "goto-table: table 0 is the only one a controller programs")
            if isinstance(item, Meter) and item.meter_id not in self.meters:
                raise OFPError(ErrorType.METER_MOD_FAILED, MeterModFailed.UNKNOWN_METER, f"no meter {item.meter_id}")
            if isinstance(item, (ApplyActions, WriteActions)):
                if actions:
                    raise OFPError(ErrorType.BAD_INSTRUCTION, BadInstruction.UNSUP_INST, "apply-actions and write-actions together")
                actions = item.actions
            elif not isinstance(item, (ClearActions, Meter)):
                raise OFPError(ErrorType.BAD_INSTRUCTION, BadInstruction.UNKNOWN_INST, type(item).__name__)
        return actions

    def _device_flow(
        self, priority: int, match: Match, actions: tuple[Output | SetQueue, ...], meter: int = 0
    ) -> DeviceFlow | None:
        """The device's form of a controller flow; None when no frame from the wire can match it."""
        ports = {port.port_no for port in self.datapath.ports()}
        queue = 0
        outputs: list[tuple[int, int]] = []
        to_controller = False
        controller_len = 0
        for action in actions:
            if isinstance(action, SetQueue):
                if action.queue_id >= 30:
                    raise OFPError(ErrorType.BAD_ACTION, BadAction.BAD_QUEUE, f"queue {action.queue_id}")
                queue = action.queue_id
                continue
            port = action.port
            if port == Port.CONTROLLER:
                to_controller = True
                controller_len = min(action.max_len, 1514) if action.max_len != 0xFFFF else 1514
            elif port == Port.LOCAL:
                outputs.append((0, 0))
            elif port in ports and port != WIRE_PORT:
                outputs.append((port, queue))
            else:
                # The wire, IN_PORT, FLOOD, ALL, NORMAL, TABLE or a port that does not exist.
                raise OFPError(ErrorType.BAD_ACTION, BadAction.BAD_OUT_PORT, f"output to port {port:#x} is not possible here")
            if len(outputs) > 8:
                raise OFPError(ErrorType.BAD_ACTION, BadAction.TOO_MANY, "at most 8 outputs")
        if len(set(outputs)) != len(outputs):
            raise OFPError(ErrorType.BAD_ACTION, BadAction.BAD_ARGUMENT, "the same output twice")
        fields = []
        for item in match.fields:
            if item.name == "in_port":
                if item.value != WIRE_PORT:
                    return None  # the device's table sees frames from the wire only
                continue
            bits = _FIELD_BITS[item.name]
            mask = (1 << bits) - 1 if item.mask is None else item.mask
            fields.append((_DEVICE_FIELDS[item.name], item.value, mask))
        return DeviceFlow(priority, tuple(fields), tuple(outputs), to_controller, controller_len, meter)

    def _add(self, mod: FlowMod, actions: tuple[Output | SetQueue, ...], now: float) -> None:
        if mod.priority >= CONTROL_PLANE_PRIORITY:
            raise _flow_mod_error(FlowModFailed.EPERM, "priority 65535 belongs to the control plane's claimed flows")
        key = (mod.priority, mod.match)
        existing = self.flows.get(key)
        if mod.flags & FlowModFlags.CHECK_OVERLAP:
            for flow in self.flows.values():
                if flow is not existing and flow.priority == mod.priority and _overlap(flow.match, mod.match):
                    raise _flow_mod_error(FlowModFailed.OVERLAP, "overlaps a flow of the same priority")
        if existing is None and len(self.flows) >= MAX_CONTROLLER_FLOWS:
            raise _flow_mod_error(FlowModFailed.TABLE_FULL, f"table 0 holds {MAX_CONTROLLER_FLOWS} controller flows")
        device_flow = self._device_flow(mod.priority, mod.match, actions, self._meter_of(mod.instructions))
        flow = ControllerFlow(mod.priority, mod.match, mod.instructions, mod.cookie, mod.idle_timeout,
                              mod.hard_timeout, mod.flags, now, self.datapath.wall_clock(), None, last_active=now)
        if device_flow is not None:
            flow.device_id = self.datapath.add_flow(device_flow)
        if existing is not None:
            # 6.4: the new entry replaces the old one; its counters carry over unless
            # OFPFF_RESET_COUNTS says otherwise.
            final = self._remove_from_device([existing]).get(existing.device_id or -1, {})
            if not mod.flags & FlowModFlags.RESET_COUNTS:
                flow.base_packets = existing.base_packets + final.get("packets", 0)
                flow.base_bytes = existing.base_bytes + final.get("bytes", 0)
        self.flows[key] = flow
        self._device_index = None

    def _select(self, table_id: int, match: Match, priority: int, strict: bool, cookie: int,
                cookie_mask: int, out_port: int, views: list[FlowView]) -> list[FlowView]:
        chosen = []
        for view in views:
            if table_id != OFPTT_ALL and view.table_id != table_id:
                continue
            if (view.cookie ^ cookie) & cookie_mask:
                continue
            if strict:
                if view.priority != priority or view.match != match:
                    continue
            elif not match.covers(view.match):
                continue
            if out_port != Port.ANY and not _outputs_to(view.instructions, out_port):
                continue
            chosen.append(view)
        return chosen

    def _modify(self, mod: FlowMod, actions: tuple[Output | SetQueue, ...], now: float, strict: bool) -> None:
        views = self._select(mod.table_id, mod.match, mod.priority, strict, mod.cookie, mod.cookie_mask,
                             Port.ANY, self._protected(self._stats(), self.datapath.wall_clock()) + self._controller_views({}, now))
        if any(view.protected for view in views):
            raise _flow_mod_error(FlowModFailed.EPERM, "the request selects flows of the control plane")
        for view in views:
            old = view.controller
            if old is None:
                continue
            device_flow = self._device_flow(old.priority, old.match, actions, self._meter_of(mod.instructions))
            new_id = self.datapath.add_flow(device_flow) if device_flow is not None else None
            final = self._remove_from_device([old]).get(old.device_id or -1, {})
            if mod.flags & FlowModFlags.RESET_COUNTS:
                old.base_packets = old.base_bytes = 0
            else:
                old.base_packets += final.get("packets", 0)
                old.base_bytes += final.get("bytes", 0)
            old.device_id = new_id
            old.instructions = mod.instructions
            self._device_index = None

    def _delete(self, mod: FlowMod, now: float, strict: bool, may_revoke: bool = False) -> None:
        if mod.table_id not in (CLAIM_TABLE, TRANSMIT_TABLE, OFPTT_ALL):
            raise _flow_mod_error(FlowModFailed.BAD_TABLE_ID, f"table {mod.table_id}")
        stats = self._stats()
        views = self._select(mod.table_id, mod.match, mod.priority, strict, mod.cookie, mod.cookie_mask,
                             mod.out_port, self._protected(stats, self.datapath.wall_clock()) + self._controller_views(stats, now))
        everything = (
            not strict and mod.table_id == OFPTT_ALL and not mod.match.fields and not mod.cookie_mask and mod.out_port == Port.ANY
        )
        protected = [view for view in views if view.protected]
        if not everything and protected:
            if not may_revoke or any(view.claim is None for view in protected):
                raise _flow_mod_error(FlowModFailed.EPERM, "the request selects flows of the control plane (claimed ports, transmit filters)")
            # The policy lets this controller take claims away: each selected claimed flow
            # (or its transmit filter) costs its function that port, receive and transmit.
            for claim in sorted({view.claim for view in protected if view.claim is not None}):
                self.datapath.revoke_claim(*claim)
        doomed = [view for view in views if view.controller is not None]
        self._remove([(view, FlowRemovedReason.DELETE) for view in doomed], now)

    def _remove(self, removals: list[tuple[FlowView, int]], now: float) -> None:
        flows = [view.controller for view, _ in removals if view.controller is not None]
        finals = self._remove_from_device(flows)
        for gone in flows:
            if self.flows.get((gone.priority, gone.match)) is gone:
                del self.flows[(gone.priority, gone.match)]
        self._device_index = None
        for view, reason in removals:
            flow = view.controller
            if flow is None or not flow.flags & FlowModFlags.SEND_FLOW_REM:
                continue
            final = finals.get(flow.device_id or -1, {})
            duration = now - flow.installed
            self.broadcast(FlowRemoved(
                0, flow.cookie, flow.priority, reason, CLAIM_TABLE, int(duration), int(duration % 1 * 1e9),
                flow.idle_timeout, flow.hard_timeout, flow.base_packets + final.get("packets", 0),
                flow.base_bytes + final.get("bytes", 0), flow.match,
            ))

    def _remove_from_device(self, flows: Iterable[ControllerFlow]) -> dict[int, dict[str, int]]:
        ids = [flow.device_id for flow in flows if flow.device_id is not None]
        finals: dict[int, dict[str, int]] = {}
        for start in range(0, len(ids), 1024):
            finals.update(self.datapath.remove_flows(ids[start:start + 1024]))
        return finals

    def reinstall(self) -> None:
        """Program a fresh device (its host was restarted) with the meters and flows the
        controller set up; counts the old device had are lost, and are not pretended."""
        self._device_index = None
        for flow in self.flows.values():
            flow.device_id = None
        try:
            for meter_id, meter in self.meters.items():
                band = meter.bands[0]
                self.datapath.set_meter(meter_id, band.rate, band.burst_size if meter.flags & MeterFlags.BURST else 0)
            for flow in self.flows.values():
                try:
                    actions = self._check_instructions(flow.instructions)
                    device_flow = self._device_flow(flow.priority, flow.match, actions, self._meter_of(flow.instructions))
                except OFPError:
                    continue  # e.g. its output port went with the old device: the flow stays, inert
                if device_flow is not None:
                    flow.device_id = self.datapath.add_flow(device_flow)
        except DatapathError:
            # A new host that does not answer: stop here rather than wait once per flow; the
            # flows not reinstalled stay listed, inert (device_flow None in kernelctl status).
            pass

    # ---- time: idle and hard timeouts, port changes ---------------------------------------------

    def tick(self, now: float) -> None:
        """Expire flows (6.5) and announce ports that came or went (7.4.3). Cheap when there
        is nothing to do: the device is asked for counters only while a flow has an idle
        timeout, at most once a second."""
        self._announce_ports()
        timed = [f for f in self.flows.values() if f.idle_timeout or f.hard_timeout]
        if not timed:
            return
        counts: dict[int | None, tuple[int, int]] = {}
        if any(f.idle_timeout for f in timed) and now >= self._next_stats:
            self._next_stats = now + 1.0
            counts = dict(_flow_counts(self._stats()))
        removals: list[tuple[FlowView, int]] = []
        for flow in timed:
            if flow.device_id in counts:
                packets = counts[flow.device_id][0]
                if packets != flow.seen_packets:
                    flow.seen_packets = packets
                    flow.last_active = now
            if flow.hard_timeout and now - flow.installed >= flow.hard_timeout:
                removals.append((self._view_of(flow, now), FlowRemovedReason.HARD_TIMEOUT))
            elif flow.idle_timeout and now - flow.last_active >= flow.idle_timeout:
                removals.append((self._view_of(flow, now), FlowRemovedReason.IDLE_TIMEOUT))
        if removals:
            self.counters["flows_expired"] += len(removals)
            self._remove(removals, now)

    def _view_of(self, flow: ControllerFlow, now: float) -> FlowView:
        return FlowView(CLAIM_TABLE, flow.priority, flow.match, flow.instructions, flow.cookie, 0, 0,
                        now - flow.installed, controller=flow)

    def _announce_ports(self) -> None:
        if not self.connections:
            return
        current = {port.port_no: port for port in self.datapath.ports()}
        for port_no, port in current.items():
            if port_no not in self._known_ports:
                self.broadcast(PortStatus(0, PortReason.ADD, self._port_desc(port)))
        for port_no, port in self._known_ports.items():
            if port_no not in current:
                self.broadcast(PortStatus(0, PortReason.DELETE, self._port_desc(port)))
        self._known_ports = current

    def broadcast(self, message: Message) -> None:
        for conn in self.connections:
            conn.send_async(message)

    # ---- PACKET_IN (7.4.1) ---------------------------------------------------------------------

    def packet_in(self, device_flow_id: int, total_len: int, data: bytes) -> None:
        if self._device_index is None:
            self._device_index = {f.device_id: f for f in self.flows.values() if f.device_id is not None}
        flow = self._device_index.get(device_flow_id)
        if flow is None:
            return
        # The table-miss entry (priority 0, empty match) sends with reason NO_MATCH (5.4).
        reason = PacketInReason.NO_MATCH if flow.priority == 0 and not flow.match.fields else PacketInReason.ACTION
        self.counters["packet_ins"] += 1
        for conn in self.connections:
            config = self.configs.get(conn, ConnectionConfig())
            body = data if reason == PacketInReason.ACTION else data[: config.miss_send_len]
            conn.send_async(PacketIn(0, OFP_NO_BUFFER, total_len, reason, CLAIM_TABLE, flow.cookie,
                                     Match.of(in_port=WIRE_PORT), body))

    # ---- METER_MOD (7.3.4.4) ---------------------------------------------------------------------

    def meter_mod(self, mod: MeterMod, now: float) -> None:
        """Meters are token buckets in the device with one drop band, in kilobits per
        second; a flow's meter instruction puts its frames through one."""
        def fail(code: MeterModFailed, why: str) -> OFPError:
            return OFPError(ErrorType.METER_MOD_FAILED, code, why)

        if mod.command == MeterModCommand.DELETE:
            doomed = list(self.meters) if mod.meter_id == OFPM_ALL else [mod.meter_id]
            if mod.meter_id != OFPM_ALL and mod.meter_id not in self.meters:
                return  # deleting a meter that is not there is no error (as for flows)
            for meter_id in doomed:
                # 7.3.4.4: the flows that use a deleted meter are removed with it.
                users = [v for v in self._controller_views({}, now) if v.controller is not None
                         and self._meter_of(v.controller.instructions) == meter_id]
                self._remove([(view, FlowRemovedReason.DELETE) for view in users], now)
                self.datapath.set_meter(meter_id, 0, 0)
                del self.meters[meter_id]
            return
        if mod.command not in (MeterModCommand.ADD, MeterModCommand.MODIFY):
            raise fail(MeterModFailed.BAD_COMMAND, f"command {mod.command}")
        if not 1 <= mod.meter_id <= OFPM_MAX:
            raise fail(MeterModFailed.INVALID_METER, f"meter {mod.meter_id:#x}")
        if mod.flags & ~(MeterFlags.KBPS | MeterFlags.BURST | MeterFlags.STATS) or not mod.flags & MeterFlags.KBPS:
            raise fail(MeterModFailed.BAD_FLAGS, "only kbps meters (with burst and stats) are supported")
        if len(mod.bands) != 1 or mod.bands[0].band_type != MeterBandType.DROP:
            raise fail(MeterModFailed.BAD_BAND, "one drop band")
        band = mod.bands[0]
        if not 0 < band.rate <= 100_000_000:
            raise fail(MeterModFailed.BAD_RATE, f"rate {band.rate} kbps")
        burst = band.burst_size if mod.flags & MeterFlags.BURST else 0
        if mod.command == MeterModCommand.ADD:
            if mod.meter_id in self.meters:
                raise fail(MeterModFailed.METER_EXISTS, f"meter {mod.meter_id}")
            if len(self.meters) >= MAX_METERS:
                raise fail(MeterModFailed.OUT_OF_METERS, f"at most {MAX_METERS} meters")
        elif mod.meter_id not in self.meters:
            raise fail(MeterModFailed.UNKNOWN_METER, f"meter {mod.meter_id}")
        self.datapath.set_meter(mod.meter_id, band.rate, burst)
        created = self.meters[mod.meter_id].created if mod.meter_id in self.meters else now
        self.meters[mod.meter_id] = MeterEntry(mod.flags, mod.bands, created)

    def _meter_entries(self, kind: int, meter_id: int, now: float) -> list[bytes]:
        chosen = sorted(self.meters) if meter_id == OFPM_ALL else [meter_id] if meter_id in self.meters else []
        if kind == MultipartType.METER_CONFIG:
            return [MeterConfig(self.meters[m].flags, m, self.meters[m].bands).emit() for m in chosen]
        device = {int(e["meter_id"]): e for e in self._stats().get("meters", []) if isinstance(e, dict)}
        entries = []
        for meter in chosen:
            counts = device.get(meter, {})
            age = max(0.0, now - self.meters[meter].created)
            entries.append(MeterStats(
                meter, int(counts.get("flows", 0)), int(counts.get("packets_in", 0)), int(counts.get("bytes_in", 0)),
                int(age), int(age % 1 * 1e9), ((int(counts.get("band_packets", 0)), int(counts.get("band_bytes", 0))),),
            ).emit())
        return entries

    # ---- PACKET_OUT (7.3.7) ---------------------------------------------------------------------

    def packet_out(self, message: PacketOut) -> None:
        """Send the controller's frame: to the wire, through table 0 (``OFPP_TABLE``: as if
        it came from the wire), to ``LOCAL`` or into a function's queue."""
        if message.buffer_id != OFP_NO_BUFFER:
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BUFFER_UNKNOWN, "this switch buffers no packets")
        if not 14 <= len(message.data) <= 1514:
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_PACKET, f"a frame of {len(message.data)} bytes")
        ports = {port.port_no for port in self.datapath.ports()}
        if message.in_port not in ports and message.in_port not in (Port.CONTROLLER, Port.ANY):
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_PORT, f"in_port {message.in_port:#x}")
        targets: list[tuple[str, int, int]] = []
        queue = 0
        for action in message.actions:
            if isinstance(action, SetQueue):
                queue = action.queue_id
            elif action.port == WIRE_PORT:
                targets.append(("wire", 0, 0))
            elif action.port == Port.TABLE:
                targets.append(("table", 0, 0))
            elif action.port == Port.LOCAL:
                targets.append(("local", 0, 0))
            elif action.port in ports:
                targets.append(("function", action.port, queue))
            else:
                raise OFPError(ErrorType.BAD_ACTION, BadAction.BAD_OUT_PORT, f"output to port {action.port:#x}")
        if len(targets) > 8:
            raise OFPError(ErrorType.BAD_ACTION, BadAction.TOO_MANY, "at most 8 outputs")
        for target, function_id, function_queue in targets:
            self.datapath.packet_out(target, message.data, function_id, function_queue)

    # ---- MULTIPART (7.3.5) -----------------------------------------------------------------------

    def multipart(self, conn: OpenFlowConnection, request: MultipartRequest, now: float) -> None:
        kind = request.mp_type
        if request.flags & 1:
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.MULTIPART_BUFFER_OVERFLOW, "requests in several parts are not supported")
        entries: list[bytes]
        if kind == MultipartType.DESC:
            d = self.description
            entries = [desc_body(d["mfr"], d["hw"], d["sw"], d["serial"], d["dp"])]
        elif kind in (MultipartType.FLOW, MultipartType.AGGREGATE):
            body = request.request
            if not isinstance(body, FlowStatsRequest):
                raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_LEN, "flow stats request without a body")
            if body.table_id not in (CLAIM_TABLE, TRANSMIT_TABLE, OFPTT_ALL):
                raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_TABLE_ID, f"table {body.table_id}")
            views = self._select(body.table_id, body.match, 0, False, body.cookie, body.cookie_mask,
                                 body.out_port, self.all_flows(now))
            if kind == MultipartType.AGGREGATE:
                entries = [aggregate_body(sum(v.packets for v in views), sum(v.nbytes for v in views), len(views))]
            else:
                entries = [
                    FlowStats(v.table_id, int(v.duration), int(v.duration % 1 * 1e9), v.priority, v.idle_timeout,
                              v.hard_timeout, v.flags, v.cookie, v.packets, v.nbytes, v.match, v.instructions).emit()
                    for v in views
                ]
        elif kind == MultipartType.TABLE:
            entries = self._table_stats(now)
        elif kind == MultipartType.PORT_STATS:
            port_no = request.request
            entries = [stats.emit() for stats in self._port_stats() if port_no in (Port.ANY, stats.port_no)]
            if not entries:
                raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_PORT, f"no port {port_no}")
        elif kind == MultipartType.PORT_DESC:
            entries = [self._port_desc(port).emit() for port in self._all_ports()]
        elif kind in (MultipartType.METER, MultipartType.METER_CONFIG):
            meter_id = request.request
            entries = self._meter_entries(kind, meter_id if isinstance(meter_id, int) else OFPM_ALL, now)
        elif kind == MultipartType.TABLE_FEATURES:
            headers = [OFPXMC_OPENFLOW_BASIC << 16 | spec.number << 9 | spec.size for spec in OXM_FIELDS]
            instructions: list[int] = [InstructionType.APPLY_ACTIONS, InstructionType.WRITE_ACTIONS, InstructionType.CLEAR_ACTIONS]
            actions: list[int] = [ActionType.OUTPUT, ActionType.SET_QUEUE]
            entries = [
                table_features_body(CLAIM_TABLE, "claims", MAX_CONTROLLER_FLOWS, instructions, actions, headers),
                table_features_body(TRANSMIT_TABLE, "transmit", 0, [], [], headers),
            ]
        elif kind == MultipartType.METER_FEATURES:
            entries = [meter_features_body(MAX_METERS, 1 << MeterBandType.DROP,
                                           MeterFlags.KBPS | MeterFlags.BURST | MeterFlags.STATS, 1)]
        else:
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_MULTIPART, f"multipart type {kind} is not supported")
        for part in multipart_replies(request.xid, kind, entries):
            conn.send(part)

    def _table_stats(self, now: float) -> list[bytes]:
        stats = self._stats()
        views = self.all_flows(now)
        device = stats.get("device", {}) if isinstance(stats.get("device"), dict) else {}
        table = next((e for e in stats.get("filters", []) if isinstance(e, dict) and e.get("kind") == "table"), {})
        looked_up = int(device.get("wire_rx_packets", 0))
        functions = [f for f in stats.get("functions", []) if isinstance(f, dict)]
        sent = sum(int(f.get("counters", {}).get("tx_packets", 0)) + int(f.get("counters", {}).get("tx_spoofed", 0)) for f in functions)
        spoofed = sum(int(f.get("counters", {}).get("tx_spoofed", 0)) for f in functions)
        return [
            TableStats(CLAIM_TABLE, sum(1 for v in views if v.table_id == CLAIM_TABLE), looked_up,
                       max(0, looked_up - int(table.get("unmatched", 0)))).emit(),
            TableStats(TRANSMIT_TABLE, sum(1 for v in views if v.table_id == TRANSMIT_TABLE), sent, sent - spoofed).emit(),
        ]

    def _all_ports(self) -> list[PortInfo]:
        return sorted(self.datapath.ports(), key=lambda p: p.port_no)

    def _port_desc(self, port: PortInfo) -> PortDesc:
        features = PortFeatures.F_10GB_FD | PortFeatures.F_COPPER
        return PortDesc(port.port_no, port.mac, port.name[:15], 0, PortState.LIVE, features, features, features, 0,
                        _PORT_SPEED_KBPS, _PORT_SPEED_KBPS)

    def _port_stats(self) -> list[PortStats]:
        stats = self._stats()
        now_wall = self.datapath.wall_clock()
        functions = {int(f["function_id"]): f.get("counters", {}) for f in stats.get("functions", [])
                     if isinstance(f, dict) and "function_id" in f}
        device = stats.get("device", {}) if isinstance(stats.get("device"), dict) else {}
        default = stats.get("default_function", {}) if isinstance(stats.get("default_function"), dict) else {}
        out = []
        for port in self._all_ports():
            duration = max(0.0, now_wall - port.created)
            sec, nsec = int(duration), int(duration % 1 * 1e9)
            if port.port_no == WIRE_PORT:
                out.append(PortStats(port.port_no, int(device.get("wire_rx_packets", 0)), int(device.get("wire_tx_packets", 0)),
                                     int(device.get("wire_rx_bytes", 0)), int(device.get("wire_tx_bytes", 0)), 0,
                                     int(device.get("wire_tx_dropped", 0)), duration_sec=sec, duration_nsec=nsec))
            elif port.port_no == Port.LOCAL:
                out.append(PortStats(port.port_no, _sum_keys(default, "received", "rx"), _sum_keys(default, "sent", "tx"),
                                     duration_sec=sec, duration_nsec=nsec))
            else:
                c = functions.get(port.port_no, {})
                out.append(PortStats(
                    port.port_no, int(c.get("rx_packets", 0)), int(c.get("tx_packets", 0)), int(c.get("rx_bytes", 0)),
                    int(c.get("tx_bytes", 0)), int(c.get("rx_no_buffer", 0)) + int(c.get("rx_rate_dropped", 0)),
                    int(c.get("tx_spoofed", 0)), int(c.get("rx_errors", 0)), int(c.get("tx_errors", 0)),
                    duration_sec=sec, duration_nsec=nsec,
                ))
        return out

    def status(self, now: float) -> list[dict[str, Any]]:
        """The controller's flows for ``kernelctl status`` (without asking the device)."""
        return [
            {"priority": f.priority, "cookie": f.cookie, "match": describe_match(f.match),
             "actions": describe_instructions(f.instructions), "device_flow": f.device_id,
             "idle_timeout": f.idle_timeout, "hard_timeout": f.hard_timeout, "age": round(now - f.installed, 3),
             "base_packets": f.base_packets, "base_bytes": f.base_bytes}
            for f in self.flows.values()
        ]


def _sum_keys(counters: dict[str, Any], *prefixes: str) -> int:
    return sum(int(v) for k, v in counters.items() if isinstance(v, int) and any(k.startswith(p) for p in prefixes))


def _flow_counts(stats: dict[str, Any]) -> dict[int | None, tuple[int, int]]:
    return {
        int(entry["id"]): (int(entry.get("packets", 0)), int(entry.get("bytes", 0)))
        for entry in stats.get("filters", [])
        if isinstance(entry, dict) and entry.get("kind") == "flow" and "id" in entry
    }


def _outputs_to(instructions: tuple[Instruction, ...], port: int) -> bool:
    for item in instructions:
        if isinstance(item, (ApplyActions, WriteActions)):
            if any(isinstance(a, Output) and a.port == port for a in item.actions):
                return True
    return False


def _overlap(a: Match, b: Match) -> bool:
    """Whether some packet could match both (6.4, OFPFF_CHECK_OVERLAP)."""
    theirs = b.as_dict()
    for item in a.fields:
        if item.name not in theirs:
            continue
        value, mask = theirs[item.name]
        full = (1 << _FIELD_BITS[item.name]) - 1
        common = (full if item.mask is None else item.mask) & (full if mask is None else mask)
        if (item.value ^ value) & common:
            return False
    return True


def describe_match(match: Match) -> str:
    parts = []
    for item in match.fields:
        if item.name in ("ipv4_src", "ipv4_dst"):
            text = str(ipaddress.IPv4Address(item.value))
            if item.mask is not None:
                text += f"/{ipaddress.IPv4Address(item.mask)}"
        elif item.name in ("eth_src", "eth_dst"):
            text = ":".join(f"{b:02x}" for b in item.value.to_bytes(6, "big"))
            if item.mask is not None:
                text += "/" + ":".join(f"{b:02x}" for b in item.mask.to_bytes(6, "big"))
        elif item.name == "eth_type":
            text = f"{item.value:#06x}"
        else:
            text = str(item.value)
        parts.append(f"{item.name}={text}")
    return ",".join(parts) or "*"


def describe_instructions(instructions: tuple[Instruction, ...]) -> str:
    words = []
    for item in instructions:
        if isinstance(item, (ApplyActions, WriteActions)):
            for action in item.actions:
                if isinstance(action, SetQueue):
                    words.append(f"set_queue:{action.queue_id}")
                elif action.port == Port.CONTROLLER:
                    words.append("CONTROLLER")
                elif action.port == Port.LOCAL:
                    words.append("LOCAL")
                else:
                    words.append(f"output:{action.port}")
    return ",".join(words) or "drop"
