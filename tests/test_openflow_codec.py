"""The sans-I/O OpenFlow 1.3 codec (kernelctl/openflow): round trips, the specification's
error codes for every malformed part, the HELLO negotiation, and fuzzing (random and mutated
messages raise only OFPError, and a connection fed garbage never grows without bound)."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelctl.openflow import constants as c
from kernelctl.openflow.actions import ApplyActions, ClearActions, GotoTable, Meter, Output, SetQueue, WriteActions
from kernelctl.openflow.connection import OpenFlowConnection
from kernelctl.openflow.messages import (
    EchoReply,
    EchoRequest,
    Error,
    FeaturesRequest,
    FlowMod,
    FlowRemoved,
    FlowStats,
    FlowStatsRequest,
    Hello,
    MeterBand,
    MeterMod,
    Message,
    MultipartRequest,
    PacketIn,
    PacketOut,
    PortDesc,
    PortStatus,
    SetConfig,
    multipart_replies,
    parse_message,
)
from kernelctl.openflow.oxm import FIELDS, Match
from kernelctl.openflow.wire import OFPError, Reader

UDP_MATCH = Match.of(eth_type=0x0800, ip_proto=17, ipv4_src=(0x0A0A0000, 0xFFFFFF00), udp_dst=53)


def roundtrip(message: Message) -> Message:
    return parse_message(message.emit())


# ---- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Hello(1),
        Hello(2, frozenset({1, 4, 5})),
        EchoRequest(3, b"ping"),
        EchoReply(4, b""),
        FeaturesRequest(5),
        SetConfig(6, 1, 200),
        FlowMod(7, cookie=5, cookie_mask=0xFF, priority=100, idle_timeout=3, hard_timeout=9, flags=1,
                match=UDP_MATCH, instructions=(ApplyActions((SetQueue(1), Output(3))),)),
        FlowMod(8, command=c.FlowModCommand.DELETE, match=Match(), instructions=()),
        FlowMod(9, instructions=(WriteActions((Output(c.Port.CONTROLLER, 0xFFFF),)), Meter(2), ClearActions(), GotoTable(1))),
        MultipartRequest(10, c.MultipartType.FLOW, 0, FlowStatsRequest(match=UDP_MATCH, cookie=1, cookie_mask=1)),
        MultipartRequest(11, c.MultipartType.PORT_STATS, 0, c.Port.ANY),
        MultipartRequest(12, c.MultipartType.METER_CONFIG, 0, c.OFPM_ALL),
        MultipartRequest(13, c.MultipartType.DESC, 0, None),
        PacketOut(14, in_port=c.Port.CONTROLLER, actions=(Output(2),), data=b"\x01" * 60),
        MeterMod(15, 0, 1, 7, (MeterBand(1, 1000, 10),)),
        PacketIn(16, total_len=60, reason=1, cookie=9, match=Match.of(in_port=5), data=b"x" * 60),
        FlowRemoved(17, cookie=3, priority=9, reason=2, match=UDP_MATCH, packet_count=4, byte_count=400),
        PortStatus(18, 0, PortDesc(3, b"\x02" * 6, "fn3", state=4)),
        Error(19, 1, 5, b"abc"),
    ],
)
def test_messages_round_trip(message: Message) -> None:
    assert roundtrip(message) == message


def test_flow_stats_entry_round_trips() -> None:
    entry = FlowStats(0, 1, 2, 100, 0, 0, 1, 0x55, 10, 1000, UDP_MATCH, (ApplyActions((Output(3),)),))
    assert FlowStats.parse(Reader(entry.emit())) == entry


def test_multipart_replies_are_cut_under_64_kib_with_the_more_flag() -> None:
    entries = [bytes(100)] * 2000  # 200 kB
    parts = multipart_replies(1, c.MultipartType.FLOW, entries)
    assert len(parts) == 4
    assert all(len(p.emit()) <= 0xFFFF for p in parts)
    assert [p.flags for p in parts] == [1, 1, 1, 0]
    assert sum(len(p.data) for p in parts) == 200_000


@pytest.mark.skipif(shutil.which("ovs-ofctl") is None, reason="openvswitch-common is not installed (tools/run setup installs it)")
def test_open_vswitch_reads_what_we_emit() -> None:
    message = FlowMod(7, cookie=5, priority=100, match=UDP_MATCH, instructions=(ApplyActions((SetQueue(1), Output(3))),))
    printed = subprocess.run(["ovs-ofctl", "ofp-print", message.emit().hex()], capture_output=True, text=True, check=True).stdout
    assert "ADD priority=100,udp,nw_src=10.10.0.0/24,tp_dst=53 cookie:0x5 actions=set_queue:1,output:3" in printed
    removed = FlowRemoved(0, cookie=3, priority=9, reason=2, match=Match.of(in_port=5))
    printed = subprocess.run(["ovs-ofctl", "ofp-print", removed.emit().hex()], capture_output=True, text=True, check=True).stdout
    assert "priority=9,in_port=5 reason=delete" in printed


# ---- the specification's errors ----------------------------------------------------------------


def code_of(data: bytes) -> tuple[int, int]:
    with pytest.raises(OFPError) as caught:
        parse_message(data)
    return caught.value.error_type, caught.value.code


def with_length(data: bytes, length: int) -> bytes:
    return data[:2] + struct.pack("!H", length) + data[4:]


FLOW_MOD = FlowMod(1, match=UDP_MATCH, instructions=(ApplyActions((Output(3),)),)).emit()
MATCH_AT = 8 + 40  # ofp_match starts after the header and the fixed flow_mod fields


def test_errors_carry_the_specification_codes() -> None:
    bad_len = (c.ErrorType.BAD_REQUEST, c.BadRequest.BAD_LEN)
    assert code_of(b"\x04\x05\x00") == bad_len  # truncated header
    assert code_of(with_length(FLOW_MOD, len(FLOW_MOD) + 8)) == bad_len  # header claims more
    assert code_of(FeaturesRequest(1).emit() + b"\0" * 8) == bad_len  # length says 8, 16 given
    assert code_of(with_length(FeaturesRequest(1).emit() + bytes(8), 16)) == bad_len  # body on a bodiless request
    assert code_of(b"\x04\x63\x00\x08\x00\x00\x00\x01") == (c.ErrorType.BAD_REQUEST, c.BadRequest.BAD_TYPE)
    assert code_of(b"\x01\x05\x00\x08\x00\x00\x00\x01") == (c.ErrorType.BAD_REQUEST, c.BadRequest.BAD_VERSION)
    assert code_of(MultipartRequest(1, 99).emit()) == (c.ErrorType.BAD_REQUEST, c.BadRequest.BAD_MULTIPART)


def mutate(data: bytes, offset: int, raw: bytes) -> bytes:
    return data[:offset] + raw + data[offset + len(raw):]


def test_match_errors() -> None:
    # Match type 0 (the 1.0 standard match) does not exist in 1.3.
    assert code_of(mutate(FLOW_MOD, MATCH_AT, b"\x00\x00")) == (c.ErrorType.BAD_MATCH, c.BadMatch.BAD_TYPE)
    # A match length past the message.
    assert code_of(mutate(FLOW_MOD, MATCH_AT + 2, b"\x7f\xf0"))[0] in (c.ErrorType.BAD_MATCH, c.ErrorType.BAD_REQUEST)
    # An OXM TLV whose payload length overruns the match.
    overrun = mutate(FLOW_MOD, MATCH_AT + 4 + 3, b"\xf0")
    assert code_of(overrun) == (c.ErrorType.BAD_MATCH, c.BadMatch.BAD_LEN)
    # The first OXM (eth_type, 2 bytes) announced with 4.
    assert code_of(mutate(FLOW_MOD, MATCH_AT + 4 + 3, b"\x04")) == (c.ErrorType.BAD_MATCH, c.BadMatch.BAD_LEN)
    # A field we do not know (field 40) and a class we do not know.
    assert code_of(mutate(FLOW_MOD, MATCH_AT + 4 + 2, bytes([40 << 1])))[1] in (c.BadMatch.BAD_FIELD, c.BadMatch.BAD_LEN)
    assert code_of(mutate(FLOW_MOD, MATCH_AT + 4, b"\x00\x01")) == (c.ErrorType.BAD_MATCH, c.BadMatch.BAD_FIELD)
    with pytest.raises(OFPError) as caught:
        Match.of(ip_proto=17)
    assert caught.value.code == c.BadMatch.BAD_PREREQ
    with pytest.raises(OFPError) as caught:
        Match.of(eth_type=0x800, ip_proto=6, udp_dst=1)
    assert caught.value.code == c.BadMatch.BAD_PREREQ
    with pytest.raises(OFPError) as caught:
        Match.of(eth_type=0x800, ip_proto=17, udp_dst=(1, 0xFF))
    assert caught.value.code == c.BadMatch.BAD_MASK
    with pytest.raises(OFPError) as caught:
        Match.of(eth_type=0x800, ipv4_dst=(0x0A000001, 0xFFFFFF00))
    assert caught.value.code == c.BadMatch.BAD_WILDCARDS


def test_duplicate_fields_are_refused() -> None:
    oxm = b"\x80\x00\x0a\x02\x08\x00"  # eth_type=0x0800
    match = struct.pack("!HH", 1, 4 + 2 * len(oxm)) + oxm * 2
    match += bytes((8 - len(match) % 8) % 8)
    body = FLOW_MOD[8:MATCH_AT] + match
    data = struct.pack("!BBHI", 4, c.MsgType.FLOW_MOD, 8 + len(body), 1) + body
    assert code_of(data) == (c.ErrorType.BAD_MATCH, c.BadMatch.DUP_FIELD)


def test_instruction_and_action_errors() -> None:
    instructions_at = len(FlowMod(1, match=UDP_MATCH).emit())  # the flow_mod without instructions
    # Instruction type 77, an instruction length that is not a multiple of 8, one that
    # overruns, and an output action of the wrong size.
    assert code_of(mutate(FLOW_MOD, instructions_at, b"\x00\x4d"))[1] == c.BadInstruction.UNKNOWN_INST
    assert code_of(mutate(FLOW_MOD, instructions_at + 2, b"\x00\x0c")) == (c.ErrorType.BAD_INSTRUCTION, c.BadInstruction.BAD_LEN)
    assert code_of(mutate(FLOW_MOD, instructions_at + 2, b"\x01\x00")) == (c.ErrorType.BAD_INSTRUCTION, c.BadInstruction.BAD_LEN)
    assert code_of(mutate(FLOW_MOD, instructions_at + 8 + 2, b"\x00\x08")) == (c.ErrorType.BAD_ACTION, c.BadAction.BAD_LEN)
    assert code_of(mutate(FLOW_MOD, instructions_at + 8, b"\x00\x63")) == (c.ErrorType.BAD_ACTION, c.BadAction.BAD_TYPE)
    assert code_of(mutate(FLOW_MOD, instructions_at + 8 + 2, b"\x00\x30")) == (c.ErrorType.BAD_ACTION, c.BadAction.BAD_LEN)


def test_non_strict_selection_covers_more_specific_flows() -> None:
    wide = Match.of(eth_type=0x800, ipv4_src=(0x0A000000, 0xFF000000))
    assert wide.covers(UDP_MATCH)
    assert not UDP_MATCH.covers(wide)
    assert Match().covers(UDP_MATCH)
    assert not Match.of(eth_type=0x806).covers(UDP_MATCH)


# ---- the connection -------------------------------------------------------------------------------


def connected() -> OpenFlowConnection:
    conn = OpenFlowConnection()
    conn.sent(conn.pending_output)  # our HELLO
    assert conn.receive_data(Hello(1).emit()) == []
    assert conn.version == 4
    return conn


def replies(conn: OpenFlowConnection) -> list[Message]:
    data = conn.data_to_send()
    conn.sent(len(data))
    out = []
    while data:
        length = struct.unpack_from("!H", data, 2)[0]
        out.append(parse_message(data[:length]))
        data = data[length:]
    return out


def test_hello_negotiation() -> None:
    ours = OpenFlowConnection()
    assert parse_message(ours.data_to_send()) == Hello(0, frozenset({4}))
    # A 1.0-only peer by bitmap: HELLO_FAILED / INCOMPATIBLE, then close.
    conn = OpenFlowConnection()
    conn.sent(conn.pending_output)
    conn.receive_data(Hello(1, frozenset({1})).emit())
    (error,) = replies(conn)
    assert isinstance(error, Error) and (error.error_type, error.code) == (0, 0)
    assert conn.closing
    # A peer whose header says 1.5 and sends no bitmap: 1.3 is agreed (the lower one).
    conn = OpenFlowConnection()
    raw = bytearray(Hello(1, frozenset()).emit())
    raw[0] = 6
    conn.receive_data(bytes(raw))
    assert conn.version == 4 and not conn.closing
    # Anything but HELLO first closes the connection.
    conn = OpenFlowConnection()
    conn.receive_data(FeaturesRequest(1).emit())
    assert conn.closing


def test_echo_is_answered_and_errors_carry_the_request() -> None:
    conn = connected()
    assert conn.receive_data(EchoRequest(9, b"abc").emit()) == []
    assert replies(conn) == [EchoReply(9, b"abc")]
    bad = b"\x04\x63\x00\x48\x00\x00\x00\x05" + bytes(64)
    conn.receive_data(bad)
    (error,) = replies(conn)
    assert isinstance(error, Error) and error.xid == 5 and error.data == bad[:64]


def test_byte_at_a_time_and_pipelined_input() -> None:
    conn = connected()
    stream = FeaturesRequest(1).emit() + SetConfig(2, 0, 64).emit() + EchoRequest(3, b"z").emit()
    got: list[Message] = []
    for index in range(len(stream)):
        got += conn.receive_data(stream[index:index + 1])
    assert got == [FeaturesRequest(1), SetConfig(2, 0, 64)]
    assert replies(conn) == [EchoReply(3, b"z")]


def test_a_header_shorter_than_itself_closes() -> None:
    conn = connected()
    conn.receive_data(b"\x04\x05\x00\x04\x00\x00\x00\x01")
    assert conn.closing
    (error,) = replies(conn)
    assert isinstance(error, Error) and error.error_type == c.ErrorType.BAD_REQUEST


def test_unsolicited_messages_are_dropped_when_the_output_is_full() -> None:
    conn = OpenFlowConnection(max_output=4096)
    conn.receive_data(Hello(1).emit())
    queued = sum(conn.send_async(PacketIn(0, data=bytes(1000))) for _ in range(100))
    assert queued < 10 and conn.counters.async_dropped == 100 - queued
    assert conn.pending_output < 4096 + 2000


# ---- fuzzing ---------------------------------------------------------------------------------------


def seeds() -> list[bytes]:
    return [
        FLOW_MOD,
        FlowMod(1, instructions=(WriteActions((Output(1),)), Meter(3), GotoTable(1))).emit(),
        MultipartRequest(1, c.MultipartType.FLOW, 0, FlowStatsRequest(match=UDP_MATCH)).emit(),
        MultipartRequest(1, c.MultipartType.METER, 0, 1).emit(),
        PacketOut(1, actions=(Output(2), SetQueue(1)), data=bytes(20)).emit(),
        MeterMod(1, 0, 1, 1, (MeterBand(1, 10, 1), MeterBand(2, 5, 1))).emit(),
        Hello(1, frozenset({1, 4})).emit(),
        SetConfig(1).emit(),
        PacketIn(1, match=UDP_MATCH, data=bytes(10)).emit(),
        FlowRemoved(1, match=UDP_MATCH).emit(),
        PortStatus(1).emit(),
    ]


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 10), st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6), st.integers(0, 400))
def test_mutated_messages_raise_only_ofperror(seed_index: int, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seeds()[seed_index])
    for offset, value in flips:
        if offset < len(data):
            data[offset] = value
    data = data[: max(8, len(data) - cut)] if cut % 3 == 0 else data
    try:
        parse_message(bytes(data))
    except OFPError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 29), st.binary(max_size=300))
def test_random_bodies_raise_only_ofperror(msg_type: int, body: bytes) -> None:
    data = struct.pack("!BBHI", 4, msg_type, 8 + len(body), 1) + body
    try:
        parse_message(data)
    except OFPError:
        pass


def test_a_hundred_thousand_random_messages() -> None:
    """10^5 messages, valid headers with random or mutated bodies, through one connection:
    no exception escapes, every message gets at most one answer, nothing piles up."""
    rng = random.Random(9)
    conn = connected()
    pool = seeds()
    taken = 0
    for index in range(100_000):
        if index % 2:
            body = rng.randbytes(rng.randrange(0, 120))
            msg_type = rng.randrange(0, 32)
        else:
            raw = bytearray(rng.choice(pool)[8:])
            for _ in range(rng.randrange(1, 4)):
                if raw:
                    raw[rng.randrange(len(raw))] = rng.randrange(256)
            body, msg_type = bytes(raw), rng.choice(pool)[1]
        data = struct.pack("!BBHI", 4, msg_type, 8 + len(body), index) + body
        taken += len(conn.receive_data(data))
        conn.sent(conn.pending_output)
        assert conn.buffered_input == 0
    assert not conn.closing
    assert conn.counters.received == 100_001  # and the HELLO
    assert 0 < taken < 100_000


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_garbage_streams_never_grow_the_input_past_one_message(data: bytes) -> None:
    conn = connected()
    conn.receive_data(data, max_messages=10**6)
    assert conn.buffered_input < 0x10000


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from([f for f in FIELDS if f.name in ("eth_src", "eth_dst", "ipv4_src", "ipv4_dst")]), unique=True, max_size=4
    ),
    st.integers(0, 2**48 - 1),
    st.integers(0, 2**48 - 1),
)
def test_masked_matches_round_trip(fields: list, value: int, mask: int) -> None:
    values: dict[str, int | tuple[int, int]] = {"eth_type": 0x0800}
    for spec in fields:
        full = (1 << (8 * spec.size)) - 1
        values[spec.name] = ((value & mask) & full, mask & full)
    match = Match.of(**values)
    message = FlowMod(1, match=match)
    assert roundtrip(message) == message


def test_a_refusal_carries_the_request_as_it_came() -> None:
    conn = connected()
    # An all-ones mask: the codec keeps the field exact, so the message re-encodes differently.
    oxm = b"\x80\x00\x17\x08" + bytes([10, 0, 0, 1]) + b"\xff\xff\xff\xff"  # ipv4_src, masked
    match = struct.pack("!HH", 1, 4 + 6 + len(oxm)) + b"\x80\x00\x0a\x02\x08\x00" + oxm
    match += bytes((8 - len(match) % 8) % 8)
    body = FLOW_MOD[8:MATCH_AT] + match
    raw = struct.pack("!BBHI", 4, c.MsgType.FLOW_MOD, 8 + len(body), 77) + body
    (message,) = conn.receive_data(raw)
    assert message.emit() != raw
    conn.refuse(OFPError(c.ErrorType.FLOW_MOD_FAILED, c.FlowModFailed.EPERM, "no"), message)
    (error,) = replies(conn)
    assert isinstance(error, Error) and error.data == raw[:64] and error.xid == 77
