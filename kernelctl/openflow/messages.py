"""OpenFlow 1.3 messages (section 7 of the specification): small frozen dataclasses, each
with ``emit`` (bytes for the wire) and a parser, and one entry point, :func:`parse_message`,
that turns one whole message into a dataclass or raises :class:`OFPError` with the
specification's type and code.

Parsing goes in one order: the header (version, length equal to the bytes given), the type,
the fixed part of the body, then the variable parts (match, instructions, actions, bands),
each inside the length its parent gave it; bytes left over after a fixed-size body are a
``BAD_LEN`` too. No I/O here: the connection (``connection.py``) cuts the byte stream into
messages and the switch (``switch.py``) acts on them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

from kernelctl.openflow.actions import (
    Action,
    Instruction,
    emit_actions,
    emit_instructions,
    parse_actions,
    parse_instructions,
)
from kernelctl.openflow.constants import (
    MULTIPART_MORE,
    OFP_HEADER_LEN,
    OFP_MAX_LEN,
    OFP_VERSION,
    BadRequest,
    ErrorType,
    HelloElemType,
    MeterModFailed,
    MsgType,
    MultipartType,
)
from kernelctl.openflow.oxm import Match, emit_match, parse_match
from kernelctl.openflow.wire import HEADER, OFPError, Reader, bad_len, pad8, parse_header

_HELLO_ELEM: Final = struct.Struct("!HH")
_ERROR: Final = struct.Struct("!HH")
_FEATURES_REPLY: Final = struct.Struct("!QIBB2xII")
_SWITCH_CONFIG: Final = struct.Struct("!HH")
# cookie, cookie_mask, table_id, command, idle, hard, priority, buffer_id, out_port,
# out_group, flags, pad: the 40 bytes of ofp_flow_mod between the header and the match.
_FLOW_MOD: Final = struct.Struct("!QQBBHHHIIIH2x")
_MULTIPART: Final = struct.Struct("!HH4x")
_FLOW_STATS_REQUEST: Final = struct.Struct("!B3xII4xQQ")
_PORT_STATS_REQUEST: Final = struct.Struct("!I4x")
_METER_REQUEST: Final = struct.Struct("!I4x")
_DESC_STRING: Final = 256
_SERIAL: Final = 32
_FLOW_STATS: Final = struct.Struct("!HBxIIHHHH4xQQQ")
_AGGREGATE: Final = struct.Struct("!QQI4x")
_TABLE_STATS: Final = struct.Struct("!B3xIQQ")
_PORT_STATS: Final = struct.Struct("!I4x12QII")
_PORT: Final = struct.Struct("!I4x6s2x16sIIIIIIII")
_PORT_STATUS: Final = struct.Struct("!B7x")
_PACKET_IN: Final = struct.Struct("!IHBBQ")
_PACKET_OUT: Final = struct.Struct("!IIH6x")
_FLOW_REMOVED: Final = struct.Struct("!QHBBIIHHQQ")
_METER_MOD: Final = struct.Struct("!HHI")
_METER_BAND: Final = struct.Struct("!HHII4x")
_METER_STATS: Final = struct.Struct("!IH6xIQQII")
_METER_BAND_STATS: Final = struct.Struct("!QQ")
_METER_CONFIG: Final = struct.Struct("!HHI")
_METER_FEATURES: Final = struct.Struct("!IIIBB2x")
MAX_METER_BANDS: Final = 8
MAX_VERSION_BITMAPS: Final = 8  # a bitmap word covers 32 versions; 8 are more than plenty


def _header(msg_type: int, xid: int, body_len: int) -> bytes:
    length = OFP_HEADER_LEN + body_len
    if length > OFP_MAX_LEN:
        raise ValueError(f"an OpenFlow message is at most {OFP_MAX_LEN} bytes, this one {length}")
    return HEADER.pack(OFP_VERSION, msg_type, length, xid)


def _cstring(text: str, size: int) -> bytes:
    raw = text.encode("ascii", "replace")[: size - 1]
    return raw + bytes(size - len(raw))


def _uncstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[int] = -1
    xid: int

    def body(self) -> bytes:
        return b""

    def emit(self) -> bytes:
        payload = self.body()
        return _header(self.TYPE, self.xid, len(payload)) + payload


def _empty(reader: Reader) -> None:
    if reader.remaining:
        raise bad_len(f"{reader.remaining} bytes after a body of fixed size")


# ---- symmetric messages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """7.5.1. ``versions`` is the version bitmap (bit n: version n), empty if none was sent."""

    TYPE = MsgType.HELLO
    versions: frozenset[int] = frozenset({OFP_VERSION})

    def body(self) -> bytes:
        if not self.versions:
            return b""
        words = [0] * (max(self.versions) // 32 + 1)
        for version in self.versions:
            words[version // 32] |= 1 << (version % 32)
        length = _HELLO_ELEM.size + 4 * len(words)
        element = _HELLO_ELEM.pack(HelloElemType.VERSIONBITMAP, length) + struct.pack(f"!{len(words)}I", *words)
        return element + bytes(pad8(length))

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> Hello:
        versions: set[int] = set()
        # 7.5.1: elements are TLVs padded to 8 bytes; unknown ones are ignored.
        while reader.remaining >= _HELLO_ELEM.size:
            kind, length = reader.unpack(_HELLO_ELEM, "hello element")
            if length < _HELLO_ELEM.size:
                raise bad_len(f"hello element length {length}")
            element = reader.sub(length - _HELLO_ELEM.size, "hello element")
            reader.skip(min(pad8(length), reader.remaining), "hello element padding")
            if kind == HelloElemType.VERSIONBITMAP:
                words = element.remaining // 4
                if words > MAX_VERSION_BITMAPS:
                    raise bad_len(f"a version bitmap of {words} words")
                for index in range(words):
                    (word,) = element.unpack(struct.Struct("!I"), "bitmap")
                    versions.update(32 * index + bit for bit in range(32) if word >> bit & 1)
        return cls(xid, frozenset(versions))


@dataclass(frozen=True)
class Error(Message):
    TYPE = MsgType.ERROR
    error_type: int = 0
    code: int = 0
    data: bytes = b""

    def body(self) -> bytes:
        return _ERROR.pack(self.error_type, self.code) + self.data

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> Error:
        error_type, code = reader.unpack(_ERROR, "error")
        return cls(xid, error_type, code, reader.rest())


@dataclass(frozen=True)
class EchoRequest(Message):
    TYPE = MsgType.ECHO_REQUEST
    data: bytes = b""

    def body(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> EchoRequest:
        return cls(xid, reader.rest())


@dataclass(frozen=True)
class EchoReply(Message):
    TYPE = MsgType.ECHO_REPLY
    data: bytes = b""

    def body(self) -> bytes:
        return self.data

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> EchoReply:
        return cls(xid, reader.rest())


@dataclass(frozen=True)
class Experimenter(Message):
    """Any experimenter message: refused, but parsed far enough to say so politely."""

    TYPE = MsgType.EXPERIMENTER
    experimenter: int = 0
    exp_type: int = 0

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> Experimenter:
        experimenter, exp_type = reader.unpack(struct.Struct("!II"), "experimenter")
        reader.rest()
        return cls(xid, experimenter, exp_type)


# ---- controller to switch ---------------------------------------------------------------------


@dataclass(frozen=True)
class FeaturesRequest(Message):
    TYPE = MsgType.FEATURES_REQUEST

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> FeaturesRequest:
        _empty(reader)
        return cls(xid)


@dataclass(frozen=True)
class GetConfigRequest(Message):
    TYPE = MsgType.GET_CONFIG_REQUEST

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> GetConfigRequest:
        _empty(reader)
        return cls(xid)


@dataclass(frozen=True)
class SetConfig(Message):
    TYPE = MsgType.SET_CONFIG
    flags: int = 0
    miss_send_len: int = 128

    def body(self) -> bytes:
        return _SWITCH_CONFIG.pack(self.flags, self.miss_send_len)

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> SetConfig:
        flags, miss_send_len = reader.unpack(_SWITCH_CONFIG, "switch config")
        _empty(reader)
        return cls(xid, flags, miss_send_len)


@dataclass(frozen=True)
class BarrierRequest(Message):
    TYPE = MsgType.BARRIER_REQUEST

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> BarrierRequest:
        _empty(reader)
        return cls(xid)


@dataclass(frozen=True)
class FlowMod(Message):
    """7.3.4.1 ``ofp_flow_mod``."""

    TYPE = MsgType.FLOW_MOD
    cookie: int = 0
    cookie_mask: int = 0
    table_id: int = 0
    command: int = 0
    idle_timeout: int = 0
    hard_timeout: int = 0
    priority: int = 0x8000
    buffer_id: int = 0xFFFFFFFF
    out_port: int = 0xFFFFFFFF
    out_group: int = 0xFFFFFFFF
    flags: int = 0
    match: Match = field(default_factory=Match)
    instructions: tuple[Instruction, ...] = ()

    def body(self) -> bytes:
        fixed = _FLOW_MOD.pack(
            self.cookie, self.cookie_mask, self.table_id, self.command, self.idle_timeout,
            self.hard_timeout, self.priority, self.buffer_id, self.out_port, self.out_group, self.flags,
        )
        return fixed + emit_match(self.match) + emit_instructions(self.instructions)

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> FlowMod:
        (cookie, cookie_mask, table_id, command, idle, hard, priority, buffer_id, out_port,
         out_group, flags) = reader.unpack(_FLOW_MOD, "flow_mod")
        match = parse_match(reader)
        instructions = parse_instructions(reader)
        return cls(xid, cookie, cookie_mask, table_id, command, idle, hard, priority, buffer_id,
                   out_port, out_group, flags, match, instructions)


@dataclass(frozen=True)
class PacketOut(Message):
    """7.3.7 ``ofp_packet_out``: a frame the controller wants sent, with actions."""

    TYPE = MsgType.PACKET_OUT
    buffer_id: int = 0xFFFFFFFF
    in_port: int = 0xFFFFFFFD
    actions: tuple[Action, ...] = ()
    data: bytes = b""

    def body(self) -> bytes:
        actions = emit_actions(self.actions)
        return _PACKET_OUT.pack(self.buffer_id, self.in_port, len(actions)) + actions + self.data

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> PacketOut:
        buffer_id, in_port, actions_len = reader.unpack(_PACKET_OUT, "packet_out")
        actions = parse_actions(reader.sub(actions_len, "packet_out actions"))
        return cls(xid, buffer_id, in_port, actions, reader.rest())


@dataclass(frozen=True)
class MeterBand:
    band_type: int
    rate: int
    burst_size: int = 0


def _parse_bands(reader: Reader) -> tuple[MeterBand, ...]:
    bands: list[MeterBand] = []
    while reader.remaining:
        start = reader.pos
        band_type, length = reader.unpack(_HELLO_ELEM, "meter band")
        if length != _METER_BAND.size:
            raise OFPError(ErrorType.METER_MOD_FAILED, MeterModFailed.BAD_BAND, f"meter band of {length} bytes")
        reader.pos = start
        _t, _l, rate, burst = reader.unpack(_METER_BAND, "meter band")
        if len(bands) >= MAX_METER_BANDS:
            raise OFPError(ErrorType.METER_MOD_FAILED, MeterModFailed.OUT_OF_BANDS, "too many bands")
        bands.append(MeterBand(band_type, rate, burst))
    return tuple(bands)


def _emit_bands(bands: tuple[MeterBand, ...]) -> bytes:
    return b"".join(_METER_BAND.pack(b.band_type, _METER_BAND.size, b.rate, b.burst_size) for b in bands)


@dataclass(frozen=True)
class MeterMod(Message):
    """7.3.4.4 ``ofp_meter_mod``."""

    TYPE = MsgType.METER_MOD
    command: int = 0
    flags: int = 0
    meter_id: int = 0
    bands: tuple[MeterBand, ...] = ()

    def body(self) -> bytes:
        return _METER_MOD.pack(self.command, self.flags, self.meter_id) + _emit_bands(self.bands)

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> MeterMod:
        command, flags, meter_id = reader.unpack(_METER_MOD, "meter_mod")
        return cls(xid, command, flags, meter_id, _parse_bands(reader))


@dataclass(frozen=True)
class FlowStatsRequest:
    """The body of a FLOW or AGGREGATE multipart request (7.3.5.2, 7.3.5.3)."""

    table_id: int = 0xFF
    out_port: int = 0xFFFFFFFF
    out_group: int = 0xFFFFFFFF
    cookie: int = 0
    cookie_mask: int = 0
    match: Match = field(default_factory=Match)


MultipartBody = FlowStatsRequest | int | None  # int: a port or meter id


@dataclass(frozen=True)
class MultipartRequest(Message):
    """7.3.5. ``body`` is a FlowStatsRequest (FLOW, AGGREGATE), a port number
    (PORT_STATS), a meter id (METER, METER_CONFIG) or None (the bodiless ones)."""

    TYPE = MsgType.MULTIPART_REQUEST
    mp_type: int = 0
    flags: int = 0
    request: MultipartBody = None

    def body(self) -> bytes:
        head = _MULTIPART.pack(self.mp_type, self.flags)
        item = self.request
        if isinstance(item, FlowStatsRequest):
            return head + _FLOW_STATS_REQUEST.pack(
                item.table_id, item.out_port, item.out_group, item.cookie, item.cookie_mask
            ) + emit_match(item.match)
        if isinstance(item, int):
            return head + _PORT_STATS_REQUEST.pack(item)
        return head

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> MultipartRequest:
        mp_type, flags = reader.unpack(_MULTIPART, "multipart header")
        request: MultipartBody = None
        if mp_type in (MultipartType.FLOW, MultipartType.AGGREGATE):
            table_id, out_port, out_group, cookie, cookie_mask = reader.unpack(_FLOW_STATS_REQUEST, "flow stats request")
            request = FlowStatsRequest(table_id, out_port, out_group, cookie, cookie_mask, parse_match(reader))
            _empty(reader)
        elif mp_type in (MultipartType.PORT_STATS, MultipartType.QUEUE):
            (request,) = reader.unpack(_PORT_STATS_REQUEST, "port stats request")
            if mp_type == MultipartType.QUEUE:
                reader.rest()  # the queue id that follows; queue stats are refused anyway
            _empty(reader)
        elif mp_type in (MultipartType.METER, MultipartType.METER_CONFIG):
            (request,) = reader.unpack(_METER_REQUEST, "meter request")
            _empty(reader)
        elif mp_type in (
            MultipartType.DESC, MultipartType.TABLE, MultipartType.PORT_DESC,
            MultipartType.METER_FEATURES, MultipartType.GROUP_DESC, MultipartType.GROUP_FEATURES,
        ):
            _empty(reader)
        elif mp_type == MultipartType.TABLE_FEATURES:
            if reader.remaining:
                # A body asks to reconfigure the tables (7.3.5.18): OFPTFFC_EPERM.
                raise OFPError(ErrorType.TABLE_FEATURES_FAILED, 5, "the tables cannot be reconfigured")
        elif mp_type == MultipartType.GROUP:
            reader.rest()
        else:
            raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_MULTIPART, f"multipart type {mp_type}")
        return cls(xid, mp_type, flags, request)


# ---- switch to controller -----------------------------------------------------------------------


@dataclass(frozen=True)
class FeaturesReply(Message):
    TYPE = MsgType.FEATURES_REPLY
    datapath_id: int = 0
    n_buffers: int = 0
    n_tables: int = 0
    auxiliary_id: int = 0
    capabilities: int = 0

    def body(self) -> bytes:
        return _FEATURES_REPLY.pack(self.datapath_id, self.n_buffers, self.n_tables, self.auxiliary_id, self.capabilities, 0)

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> FeaturesReply:
        dpid, n_buffers, n_tables, aux, caps, _reserved = reader.unpack(_FEATURES_REPLY, "features reply")
        _empty(reader)
        return cls(xid, dpid, n_buffers, n_tables, aux, caps)


@dataclass(frozen=True)
class GetConfigReply(Message):
    TYPE = MsgType.GET_CONFIG_REPLY
    flags: int = 0
    miss_send_len: int = 128

    def body(self) -> bytes:
        return _SWITCH_CONFIG.pack(self.flags, self.miss_send_len)

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> GetConfigReply:
        flags, miss_send_len = reader.unpack(_SWITCH_CONFIG, "switch config")
        _empty(reader)
        return cls(xid, flags, miss_send_len)


@dataclass(frozen=True)
class BarrierReply(Message):
    TYPE = MsgType.BARRIER_REPLY

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> BarrierReply:
        _empty(reader)
        return cls(xid)


@dataclass(frozen=True)
class PacketIn(Message):
    """7.4.1 ``ofp_packet_in``."""

    TYPE = MsgType.PACKET_IN
    buffer_id: int = 0xFFFFFFFF
    total_len: int = 0
    reason: int = 0
    table_id: int = 0
    cookie: int = 0
    match: Match = field(default_factory=Match)
    data: bytes = b""

    def body(self) -> bytes:
        head = _PACKET_IN.pack(self.buffer_id, self.total_len, self.reason, self.table_id, self.cookie)
        return head + emit_match(self.match) + bytes(2) + self.data

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> PacketIn:
        buffer_id, total_len, reason, table_id, cookie = reader.unpack(_PACKET_IN, "packet_in")
        match = parse_match(reader)
        reader.skip(2, "packet_in padding")
        return cls(xid, buffer_id, total_len, reason, table_id, cookie, match, reader.rest())


@dataclass(frozen=True)
class FlowRemoved(Message):
    """7.4.2 ``ofp_flow_removed``."""

    TYPE = MsgType.FLOW_REMOVED
    cookie: int = 0
    priority: int = 0
    reason: int = 0
    table_id: int = 0
    duration_sec: int = 0
    duration_nsec: int = 0
    idle_timeout: int = 0
    hard_timeout: int = 0
    packet_count: int = 0
    byte_count: int = 0
    match: Match = field(default_factory=Match)

    def body(self) -> bytes:
        return _FLOW_REMOVED.pack(
            self.cookie, self.priority, self.reason, self.table_id, self.duration_sec, self.duration_nsec,
            self.idle_timeout, self.hard_timeout, self.packet_count, self.byte_count,
        ) + emit_match(self.match)

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> FlowRemoved:
        cookie, priority, reason, table_id, dsec, dnsec, idle, hard, packets, nbytes = reader.unpack(
            _FLOW_REMOVED, "flow_removed"
        )
        match = parse_match(reader)
        _empty(reader)
        return cls(xid, cookie, priority, reason, table_id, dsec, dnsec, idle, hard, packets, nbytes, match)


@dataclass(frozen=True)
class PortDesc:
    """7.2.1 ``ofp_port`` (64 bytes)."""

    port_no: int
    hw_addr: bytes
    name: str
    config: int = 0
    state: int = 0
    curr: int = 0
    advertised: int = 0
    supported: int = 0
    peer: int = 0
    curr_speed: int = 0
    max_speed: int = 0

    def emit(self) -> bytes:
        return _PORT.pack(
            self.port_no, self.hw_addr, _cstring(self.name, 16), self.config, self.state, self.curr,
            self.advertised, self.supported, self.peer, self.curr_speed, self.max_speed,
        )

    @classmethod
    def parse(cls, reader: Reader) -> PortDesc:
        port_no, hw_addr, name, *rest = reader.unpack(_PORT, "port")
        return cls(port_no, hw_addr, _uncstring(name), *rest)


@dataclass(frozen=True)
class PortStatus(Message):
    TYPE = MsgType.PORT_STATUS
    reason: int = 0
    port: PortDesc = field(default_factory=lambda: PortDesc(0, bytes(6), ""))

    def body(self) -> bytes:
        return _PORT_STATUS.pack(self.reason) + self.port.emit()

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> PortStatus:
        (reason,) = reader.unpack(_PORT_STATUS, "port_status")
        port = PortDesc.parse(reader)
        _empty(reader)
        return cls(xid, reason, port)


@dataclass(frozen=True)
class FlowStats:
    """7.3.5.2 ``ofp_flow_stats``: one entry of a FLOW multipart reply."""

    table_id: int
    duration_sec: int
    duration_nsec: int
    priority: int
    idle_timeout: int
    hard_timeout: int
    flags: int
    cookie: int
    packet_count: int
    byte_count: int
    match: Match
    instructions: tuple[Instruction, ...]

    def emit(self) -> bytes:
        tail = emit_match(self.match) + emit_instructions(self.instructions)
        return _FLOW_STATS.pack(
            _FLOW_STATS.size + len(tail), self.table_id, self.duration_sec, self.duration_nsec, self.priority,
            self.idle_timeout, self.hard_timeout, self.flags, self.cookie, self.packet_count, self.byte_count,
        ) + tail

    @classmethod
    def parse(cls, reader: Reader) -> FlowStats:
        start = reader.pos
        (length, table_id, dsec, dnsec, priority, idle, hard, flags, cookie, packets,
         nbytes) = reader.unpack(_FLOW_STATS, "flow stats")
        if length < _FLOW_STATS.size:
            raise bad_len(f"flow stats entry of {length} bytes")
        reader.pos = start
        entry = reader.sub(length, "flow stats entry")
        entry.skip(_FLOW_STATS.size, "flow stats")
        match = parse_match(entry)
        return cls(table_id, dsec, dnsec, priority, idle, hard, flags, cookie, packets, nbytes, match,
                   parse_instructions(entry))


@dataclass(frozen=True)
class TableStats:
    table_id: int
    active_count: int
    lookup_count: int
    matched_count: int

    def emit(self) -> bytes:
        return _TABLE_STATS.pack(self.table_id, self.active_count, self.lookup_count, self.matched_count)


@dataclass(frozen=True)
class PortStats:
    """7.3.5.5 ``ofp_port_stats``."""

    port_no: int
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_dropped: int = 0
    tx_dropped: int = 0
    rx_errors: int = 0
    tx_errors: int = 0
    duration_sec: int = 0
    duration_nsec: int = 0

    def emit(self) -> bytes:
        return _PORT_STATS.pack(
            self.port_no, self.rx_packets, self.tx_packets, self.rx_bytes, self.tx_bytes, self.rx_dropped,
            self.tx_dropped, self.rx_errors, self.tx_errors, 0, 0, 0, 0, self.duration_sec, self.duration_nsec,
        )


@dataclass(frozen=True)
class MeterStats:
    meter_id: int
    flow_count: int
    packet_in_count: int
    byte_in_count: int
    duration_sec: int
    duration_nsec: int
    band_stats: tuple[tuple[int, int], ...]

    def emit(self) -> bytes:
        bands = b"".join(_METER_BAND_STATS.pack(p, b) for p, b in self.band_stats)
        return _METER_STATS.pack(
            self.meter_id, _METER_STATS.size + len(bands), self.flow_count, self.packet_in_count,
            self.byte_in_count, self.duration_sec, self.duration_nsec,
        ) + bands


@dataclass(frozen=True)
class MeterConfig:
    flags: int
    meter_id: int
    bands: tuple[MeterBand, ...]

    def emit(self) -> bytes:
        bands = _emit_bands(self.bands)
        return _METER_CONFIG.pack(_METER_CONFIG.size + len(bands), self.flags, self.meter_id) + bands


_TABLE_FEATURES: Final = struct.Struct("!HB5x32sQQII")
_PROP: Final = struct.Struct("!HH")
# 7.3.5.18.2: table feature property types (the non-experimenter ones).
PROP_INSTRUCTIONS, PROP_INSTRUCTIONS_MISS = 0, 1
PROP_NEXT_TABLES, PROP_NEXT_TABLES_MISS = 2, 3
PROP_WRITE_ACTIONS, PROP_WRITE_ACTIONS_MISS = 4, 5
PROP_APPLY_ACTIONS, PROP_APPLY_ACTIONS_MISS = 6, 7
PROP_MATCH, PROP_WILDCARDS = 8, 10
PROP_WRITE_SETFIELD, PROP_WRITE_SETFIELD_MISS = 12, 13
PROP_APPLY_SETFIELD, PROP_APPLY_SETFIELD_MISS = 14, 15


def _prop(kind: int, body: bytes) -> bytes:
    length = _PROP.size + len(body)
    return _PROP.pack(kind, length) + body + bytes(pad8(length))


def table_features_body(
    table_id: int, name: str, max_entries: int, instructions: list[int], actions: list[int], oxm_headers: list[int]
) -> bytes:
    """7.3.5.18 ``ofp_table_features``: what one table can do. Instruction and action ids
    are 4 bytes (type, length 4), OXM ids their 32-bit headers."""
    instruction_ids = b"".join(struct.pack("!HH", kind, 4) for kind in instructions)
    action_ids = b"".join(struct.pack("!HH", kind, 4) for kind in actions)
    oxm_ids = b"".join(struct.pack("!I", header) for header in oxm_headers)
    props = b"".join([
        _prop(PROP_INSTRUCTIONS, instruction_ids), _prop(PROP_INSTRUCTIONS_MISS, instruction_ids),
        _prop(PROP_NEXT_TABLES, b""), _prop(PROP_NEXT_TABLES_MISS, b""),
        _prop(PROP_WRITE_ACTIONS, action_ids), _prop(PROP_WRITE_ACTIONS_MISS, action_ids),
        _prop(PROP_APPLY_ACTIONS, action_ids), _prop(PROP_APPLY_ACTIONS_MISS, action_ids),
        _prop(PROP_MATCH, oxm_ids), _prop(PROP_WILDCARDS, oxm_ids),
        _prop(PROP_WRITE_SETFIELD, b""), _prop(PROP_WRITE_SETFIELD_MISS, b""),
        _prop(PROP_APPLY_SETFIELD, b""), _prop(PROP_APPLY_SETFIELD_MISS, b""),
    ])
    return _TABLE_FEATURES.pack(
        _TABLE_FEATURES.size + len(props), table_id, _cstring(name, 32), 0, 0, 0, max_entries
    ) + props


def desc_body(mfr: str, hw: str, sw: str, serial: str, dp: str) -> bytes:
    """7.3.5.1 ``ofp_desc``: four 256-byte strings and a 32-byte serial number."""
    return (_cstring(mfr, _DESC_STRING) + _cstring(hw, _DESC_STRING) + _cstring(sw, _DESC_STRING)
            + _cstring(serial, _SERIAL) + _cstring(dp, _DESC_STRING))


def aggregate_body(packets: int, nbytes: int, flows: int) -> bytes:
    return _AGGREGATE.pack(packets, nbytes, flows)


def meter_features_body(max_meter: int, band_types: int, capabilities: int, max_bands: int) -> bytes:
    return _METER_FEATURES.pack(max_meter, band_types, capabilities, max_bands, 0)


@dataclass(frozen=True)
class MultipartReply(Message):
    """One part of a multipart reply; ``data`` is the already encoded body."""

    TYPE = MsgType.MULTIPART_REPLY
    mp_type: int = 0
    flags: int = 0
    data: bytes = b""

    def body(self) -> bytes:
        return _MULTIPART.pack(self.mp_type, self.flags) + self.data

    @classmethod
    def parse(cls, xid: int, reader: Reader) -> MultipartReply:
        mp_type, flags = reader.unpack(_MULTIPART, "multipart header")
        return cls(xid, mp_type, flags, reader.rest())


_REPLY_ROOM: Final = OFP_MAX_LEN - OFP_HEADER_LEN - _MULTIPART.size


def multipart_replies(xid: int, mp_type: int, entries: list[bytes]) -> list[MultipartReply]:
    """Entries packed into as few replies as fit the 64 KiB message limit; all but the last
    carry ``OFPMPF_REPLY_MORE`` (7.3.5)."""
    parts: list[MultipartReply] = []
    chunk: list[bytes] = []
    size = 0
    for entry in entries:
        if chunk and size + len(entry) > _REPLY_ROOM:
            parts.append(MultipartReply(xid, mp_type, MULTIPART_MORE, b"".join(chunk)))
            chunk, size = [], 0
        chunk.append(entry)
        size += len(entry)
    parts.append(MultipartReply(xid, mp_type, 0, b"".join(chunk)))
    return parts


_PARSERS: Final[dict[int, Callable[[int, Reader], Message]]] = {
    MsgType.HELLO: Hello.parse,
    MsgType.ERROR: Error.parse,
    MsgType.ECHO_REQUEST: EchoRequest.parse,
    MsgType.ECHO_REPLY: EchoReply.parse,
    MsgType.EXPERIMENTER: Experimenter.parse,
    MsgType.FEATURES_REQUEST: FeaturesRequest.parse,
    MsgType.FEATURES_REPLY: FeaturesReply.parse,
    MsgType.GET_CONFIG_REQUEST: GetConfigRequest.parse,
    MsgType.SET_CONFIG: SetConfig.parse,
    MsgType.PACKET_IN: PacketIn.parse,
    MsgType.FLOW_REMOVED: FlowRemoved.parse,
    MsgType.PORT_STATUS: PortStatus.parse,
    MsgType.PACKET_OUT: PacketOut.parse,
    MsgType.FLOW_MOD: FlowMod.parse,
    MsgType.MULTIPART_REQUEST: MultipartRequest.parse,
    MsgType.MULTIPART_REPLY: MultipartReply.parse,
    MsgType.BARRIER_REQUEST: BarrierRequest.parse,
    MsgType.BARRIER_REPLY: BarrierReply.parse,
    MsgType.GET_CONFIG_REPLY: GetConfigReply.parse,
    MsgType.METER_MOD: MeterMod.parse,
}


def parse_message(data: bytes | memoryview) -> Message:
    """One whole message (exactly the bytes its header's length names)."""
    header = parse_header(data)
    if header.length != len(data):
        raise bad_len(f"header says {header.length} bytes, the message has {len(data)}")
    if header.version != OFP_VERSION and header.type != MsgType.HELLO:
        raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_VERSION, f"version {header.version}")
    parser = _PARSERS.get(header.type)
    if parser is None:
        raise OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_TYPE, f"message type {header.type} is not supported")
    return parser(header.xid, Reader(data, OFP_HEADER_LEN, header.length))
