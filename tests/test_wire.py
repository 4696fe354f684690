"""Packet codecs in vdev.wire: golden frames from scapy, error tables, random bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet import IPOption_NOP as ScapyNop
from scapy.layers.l2 import ARP, Ether

from libos.net import fastpath
from vdev.wire import arp, ethernet, icmp, ipv4, udp
from vdev.wire.checksum import ones_complement_sum
from vdev.wire.errors import ChecksumError, IntegrityError, SanityError, TruncatedError, WireError

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
IP_A = "10.9.0.1"
IP_B = "10.9.0.2"
A_MAC = ethernet.mac_to_bytes(MAC_A)
B_MAC = ethernet.mac_to_bytes(MAC_B)
A_IP = ipv4.ip_to_bytes(IP_A)
B_IP = ipv4.ip_to_bytes(IP_B)


def flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def put16(data: bytes, offset: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("!H", out, offset, value)
    return bytes(out)




def test_address_helpers_round_trip_and_reject() -> None:
    assert ethernet.mac_to_str(A_MAC) == MAC_A
    assert ipv4.ip_to_str(A_IP) == IP_A
    assert ipv4.ip_to_bytes("255.255.255.255") == ipv4.BROADCAST
    for bad in ("1.2.3", "1.2.3.256", "a.b.c.d", ""):
        with pytest.raises(ValueError):
            ipv4.ip_to_bytes(bad)
    for bad_mac in ("02:00:00:00:00", "02:00:00:00:00:zz", "0200.0000.0001"):
        with pytest.raises(ValueError):
            ethernet.mac_to_bytes(bad_mac)
    with pytest.raises(ValueError):
        ethernet.mac_to_str(b"\x00" * 5)
    with pytest.raises(ValueError):
        ipv4.ip_to_str(b"\x00" * 3)




def test_ethernet_golden() -> None:
    golden = bytes(Ether(dst=MAC_B, src=MAC_A, type=0x88B5) / b"payload")
    assert ethernet.build(B_MAC, A_MAC, 0x88B5, b"payload") == golden
    assert ethernet.parse(golden) == ethernet.EthernetFrame(B_MAC, A_MAC, 0x88B5, b"payload")


@pytest.mark.parametrize("op", [arp.OP_REQUEST, arp.OP_REPLY])
def test_arp_golden(op: int) -> None:
    golden = bytes(ARP(op=op, hwsrc=MAC_A, psrc=IP_A, hwdst=MAC_B, pdst=IP_B))
    assert arp.build(op, A_MAC, A_IP, B_MAC, B_IP) == golden
    parsed = arp.parse(golden + b"\x00" * 18)  # Ethernet padding is ignored
    assert parsed == arp.ArpPacket(op, A_MAC, A_IP, B_MAC, B_IP)
    assert parsed.emit() == golden


@pytest.mark.parametrize(
    ("ident", "df", "ttl", "proto", "payload"),
    [(0, True, 64, 17, b""), (0x1234, False, 1, 6, b"x" * 33), (0xFFFF, True, 255, 200, b"\x00\xff" * 50)],
)
def test_ipv4_golden(ident: int, df: bool, ttl: int, proto: int, payload: bytes) -> None:
    golden = bytes(IP(src=IP_A, dst=IP_B, id=ident, flags="DF" if df else 0, ttl=ttl, proto=proto) / payload)
    ours = ipv4.build(A_IP, B_IP, proto, payload, ttl=ttl, ident=ident, dont_fragment=df)
    assert ours == golden
    assert ipv4.parse(golden) == ipv4.Ipv4Packet(
        src=A_IP, dst=B_IP, protocol=proto, payload=payload, ttl=ttl, ident=ident, dont_fragment=df
    )


def test_ipv4_options_accepted_not_interpreted() -> None:
    golden = bytes(IP(src=IP_A, dst=IP_B, proto=17, options=[ScapyNop(), ScapyNop(), ScapyNop(), ScapyNop()]) / b"hi")
    parsed = ipv4.parse(golden)
    assert parsed.header_len == 24
    assert parsed.options == b"\x01\x01\x01\x01"
    assert parsed.payload == b"hi"
    assert parsed.emit() == golden


def test_ipv4_fragments_recognised() -> None:
    first = ipv4.parse(bytes(IP(src=IP_A, dst=IP_B, flags="MF", frag=0, proto=17) / (b"a" * 16)))
    middle = ipv4.parse(bytes(IP(src=IP_A, dst=IP_B, flags="MF", frag=2, proto=17) / (b"a" * 16)))
    last = ipv4.parse(bytes(IP(src=IP_A, dst=IP_B, flags=0, frag=4, proto=17) / (b"a" * 16)))
    whole = ipv4.parse(bytes(IP(src=IP_A, dst=IP_B, proto=17) / (b"a" * 16)))
    assert (first.is_fragment, middle.is_fragment, last.is_fragment, whole.is_fragment) == (True, True, True, False)
    assert (middle.frag_offset, last.frag_offset) == (16, 32)


def test_ipv4_payload_cut_at_total_length() -> None:
    golden = bytes(IP(src=IP_A, dst=IP_B, proto=17) / b"abc")
    assert ipv4.parse(golden + b"\x00" * 20).payload == b"abc"


@pytest.mark.parametrize("data", [b"", b"ping", b"odd-length!", bytes(range(256))])
def test_icmp_echo_golden(data: bytes) -> None:
    for is_request, icmp_type in ((True, 8), (False, 0)):
        golden = bytes(ICMP(type=icmp_type, id=0xBEEF, seq=7) / data)
        assert icmp.build_echo(is_request, 0xBEEF, 7, data) == golden
        assert icmp.parse(golden) == icmp.IcmpEcho(is_request, 0xBEEF, 7, data)


def test_icmp_port_unreachable_quotes_header_and_8_bytes() -> None:
    original = bytes(IP(src=IP_B, dst=IP_A) / UDP(sport=5000, dport=9) / (b"z" * 40))
    golden = bytes(ICMP(type=3, code=3) / original[:28])
    ours = icmp.build_dest_unreachable(icmp.CODE_PORT_UNREACHABLE, original)
    assert ours == golden
    assert icmp.parse(ours) == icmp.IcmpDestUnreachable(3, original[:28], 0)


def test_icmp_unreachable_quote_follows_ihl() -> None:
    original = bytes(IP(src=IP_B, dst=IP_A, options=[ScapyNop()] * 4) / UDP(sport=1, dport=2) / b"12345678")
    message = icmp.parse(icmp.build_dest_unreachable(icmp.CODE_PORT_UNREACHABLE, original))
    assert isinstance(message, icmp.IcmpDestUnreachable)
    assert message.original == original[:32]


def test_icmp_other_types_are_passed_through() -> None:
    golden = bytes(ICMP(type=13, code=0, id=1, seq=2))  # timestamp request: 3 zero stamps
    parsed = icmp.parse(golden)
    assert parsed == icmp.IcmpOther(13, 0, b"\x00\x01\x00\x02", golden[8:])
    assert len(golden) == 20
    assert parsed.emit() == golden


@pytest.mark.parametrize("payload", [b"", b"a", b"hello", b"\xff" * 1472, bytes(range(255))])
def test_udp_golden(payload: bytes) -> None:
    golden_ip = bytes(IP(src=IP_A, dst=IP_B) / UDP(sport=40000, dport=7) / payload)
    golden = golden_ip[20:]
    assert udp.build(40000, 7, payload, A_IP, B_IP) == golden
    assert udp.parse(golden, A_IP, B_IP) == udp.UdpPacket(40000, 7, payload, True)


def test_udp_computed_zero_checksum_is_sent_as_ffff() -> None:
    # Choose the last two payload bytes so the sum comes to 0xffff: the checksum is then
    # zero, which RFC 768 transmits as all ones.
    base = b"ab"
    header_and_pseudo = ones_complement_sum(udp.build(1, 2, base + b"\x00\x00", A_IP, B_IP, checksum=False)) + (
        ones_complement_sum(A_IP + B_IP + b"\x00\x11\x00\x0c")
    )
    filler = (~ones_complement_sum(header_and_pseudo.to_bytes(4, "big"))) & 0xFFFF
    payload = base + filler.to_bytes(2, "big")
    datagram = udp.build(1, 2, payload, A_IP, B_IP)
    assert datagram[6:8] == b"\xff\xff"
    golden = bytes(IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / payload)[20:]
    assert datagram == golden
    assert udp.parse(datagram, A_IP, B_IP).payload == payload


def test_udp_zero_checksum_means_none() -> None:
    datagram = udp.build(1, 2, b"data", A_IP, B_IP, checksum=False)
    assert datagram[6:8] == b"\x00\x00"
    assert udp.parse(datagram, B_IP, A_IP) == udp.UdpPacket(1, 2, b"data", False)  # addresses not used


@pytest.mark.parametrize("payload", [b"", b"q", b"echo", bytes(range(256)) * 5 + b"!"])
@pytest.mark.parametrize("ident", [0, 0xFFFF, 0x8001])
def test_fastpath_udp_frame_golden(payload: bytes, ident: int) -> None:
    golden = bytes(
        Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B, id=ident, flags="DF") / UDP(sport=7, dport=5555) / payload
    )
    addresses = fastpath.address_sum(A_IP) + fastpath.address_sum(B_IP)
    frame = fastpath.udp_frame(
        B_MAC, A_MAC, A_IP, B_IP, addresses, 64, ident, 7, 5555, payload, fastpath.payload_sum(payload)
    )
    assert frame == golden
    assert fastpath.ipv4_header_ok(frame)
    assert fastpath.udp_checksum_ok(frame, len(payload) + 8)
    assert fastpath.payload_sum_of_verified(addresses, 7, 5555, len(payload) + 8, int.from_bytes(frame[40:42])) == (
        fastpath.payload_sum(payload)
    )


def test_fastpath_ipv4_frame_golden() -> None:
    golden = bytes(Ether(dst=MAC_B, src=MAC_A) / IP(src=IP_A, dst=IP_B, id=99, flags="DF", proto=6) / b"segment")
    addresses = fastpath.address_sum(A_IP) + fastpath.address_sum(B_IP)
    assert fastpath.ipv4_frame(B_MAC, A_MAC, A_IP, B_IP, addresses, 64, 99, 6, b"segment") == golden



GOOD_IP = bytes(IP(src=IP_A, dst=IP_B, proto=17) / b"abcdefgh")
GOOD_UDP = bytes(IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=2) / b"abc")[20:]
GOOD_ARP = bytes(ARP(op=1, hwsrc=MAC_A, psrc=IP_A, pdst=IP_B))
GOOD_ECHO = bytes(ICMP(type=8) / b"x")
GOOD_UNREACH = icmp.build_dest_unreachable(3, GOOD_IP)


def refix_ip_checksum(packet: bytes) -> bytes:
    header_len = (packet[0] & 0x0F) * 4
    zeroed = put16(packet, 10, 0)
    return put16(zeroed, 10, (~ones_complement_sum(zeroed[:header_len])) & 0xFFFF)


def refix_icmp_checksum(message: bytes) -> bytes:
    zeroed = put16(message, 2, 0)
    return put16(zeroed, 2, (~ones_complement_sum(zeroed)) & 0xFFFF)


ERROR_CASES: list[tuple[str, object, bytes, type[WireError]]] = [
    ("eth short", ethernet.parse, b"\x00" * 13, TruncatedError),
    ("eth group source", ethernet.parse, B_MAC + b"\x01" + A_MAC[1:] + b"\x08\x00", SanityError),
    ("arp short", arp.parse, GOOD_ARP[:27], TruncatedError),
    ("arp htype", arp.parse, put16(GOOD_ARP, 0, 6), SanityError),
    ("arp ptype", arp.parse, put16(GOOD_ARP, 2, 0x86DD), SanityError),
    ("arp hlen", arp.parse, flip(GOOD_ARP, 4, 0x02), SanityError),
    ("arp plen", arp.parse, flip(GOOD_ARP, 5, 0x10), SanityError),
    ("arp op", arp.parse, put16(GOOD_ARP, 6, 3), SanityError),
    ("ip short", ipv4.parse, GOOD_IP[:19], TruncatedError),
    ("ip version 6", ipv4.parse, refix_ip_checksum(flip(GOOD_IP, 0, 0x20)), SanityError),
    ("ip ihl 4", ipv4.parse, refix_ip_checksum(flip(GOOD_IP, 0, 0x01)), SanityError),
    ("ip total < header", ipv4.parse, refix_ip_checksum(put16(GOOD_IP, 2, 19)), SanityError),
    ("ip total > buffer", ipv4.parse, refix_ip_checksum(put16(GOOD_IP, 2, len(GOOD_IP) + 1)), TruncatedError),
    ("ip ihl > buffer", ipv4.parse, put16(flip(GOOD_IP, 0, 0x0A), 2, 60), TruncatedError),
    ("ip checksum", ipv4.parse, flip(GOOD_IP, 8), ChecksumError),
    ("ip reserved flag", ipv4.parse, refix_ip_checksum(flip(GOOD_IP, 6, 0x80)), SanityError),
    ("ip multicast source", ipv4.parse, refix_ip_checksum(flip(GOOD_IP, 12, 0xEA)), SanityError),
    ("ip loopback source", ipv4.parse, refix_ip_checksum(flip(GOOD_IP, 12, 0x75)), SanityError),
    ("icmp short", icmp.parse, GOOD_ECHO[:7], TruncatedError),
    ("icmp checksum", icmp.parse, flip(GOOD_ECHO, 8), ChecksumError),
    ("icmp echo code", icmp.parse, refix_icmp_checksum(flip(GOOD_ECHO, 1)), SanityError),
    ("icmp unreachable code", icmp.parse, refix_icmp_checksum(flip(GOOD_UNREACH, 1, 0x10)), SanityError),
    ("icmp short quote", icmp.parse, refix_icmp_checksum(GOOD_UNREACH[:35]), SanityError),
    ("icmp quote not ipv4", icmp.parse, refix_icmp_checksum(flip(GOOD_UNREACH, 8, 0x20)), SanityError),
    ("icmp quote ihl", icmp.parse, refix_icmp_checksum(flip(GOOD_UNREACH, 8, 0x03)), SanityError),
    ("udp short", lambda b: udp.parse(b, A_IP, B_IP), GOOD_UDP[:7], TruncatedError),
    ("udp length > data", lambda b: udp.parse(b, A_IP, B_IP), GOOD_UDP[:-1], TruncatedError),
    ("udp length < 8", lambda b: udp.parse(b, A_IP, B_IP), put16(put16(GOOD_UDP, 6, 0), 4, 7), SanityError),
    ("udp length < data", lambda b: udp.parse(b, A_IP, B_IP), put16(GOOD_UDP + b"\x00", 6, 0), SanityError),
    ("udp checksum", lambda b: udp.parse(b, A_IP, B_IP), flip(GOOD_UDP, 9), ChecksumError),
    ("udp wrong pseudo header", lambda b: udp.parse(b, A_IP, A_IP), GOOD_UDP, ChecksumError),
    ("udp port 0", lambda b: udp.parse(b, A_IP, B_IP), put16(put16(GOOD_UDP, 6, 0), 2, 0), SanityError),
]


@pytest.mark.parametrize(("name", "parse", "data", "error"), ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_parse_errors(name: str, parse: object, data: bytes, error: type[WireError]) -> None:
    assert callable(parse)
    with pytest.raises(error):
        parse(data)


def test_error_hierarchy() -> None:
    assert issubclass(TruncatedError, IntegrityError) and issubclass(ChecksumError, IntegrityError)
    assert issubclass(IntegrityError, WireError) and issubclass(SanityError, WireError)
    assert not issubclass(SanityError, IntegrityError)


def test_builders_refuse_impossible_values() -> None:
    with pytest.raises(ValueError):
        ethernet.build(b"\x00" * 5, A_MAC, 0x0800, b"")
    with pytest.raises(ValueError):
        ipv4.build(A_IP, B_IP, 17, b"", options=b"\x01")
    with pytest.raises(ValueError):
        ipv4.build(A_IP, B_IP, 17, b"", frag_offset=3)
    with pytest.raises(ValueError):
        ipv4.build(A_IP, B_IP, 17, bytes(0xFFFF))
    with pytest.raises(ValueError):
        udp.build(70000, 1, b"", A_IP, B_IP)
    with pytest.raises(ValueError):
        arp.build(1, A_MAC, A_IP, B_MAC, b"\x00")
    with pytest.raises(ValueError):
        icmp.build_dest_unreachable(16, GOOD_IP)



PARSERS = {
    "ethernet": ethernet.parse,
    "arp": arp.parse,
    "ipv4": ipv4.parse,
    "icmp": icmp.parse,
    "udp": lambda data: udp.parse(data, A_IP, B_IP),
}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=120))
def test_random_bytes_raise_only_wire_errors(layer: str, data: bytes) -> None:
    try:
        PARSERS[layer](data)
    except WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([GOOD_IP, GOOD_UDP, GOOD_ARP, GOOD_ECHO, GOOD_UNREACH]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=4),
    st.integers(0, 80),
)
def test_mutated_packets_raise_only_wire_errors(good: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(good)
    for offset, mask in flips:
        if offset < len(data):
            data[offset] ^= mask
    data = data[: max(0, len(data) - cut)] if cut % 2 else data
    for parse in PARSERS.values():
        try:
            parse(bytes(data))
        except WireError:
            pass


@settings(max_examples=150, deadline=None)
@given(
    st.binary(min_size=4, max_size=4).filter(lambda a: ipv4.is_unicast_source(a)),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 0xFFFF),
    st.integers(1, 0xFFFF),
    st.binary(max_size=300),
    st.integers(0, 0xFFFF),
)
def test_udp_ipv4_round_trip_and_fastpath_agree(
    src: bytes, dst: bytes, sport: int, dport: int, payload: bytes, ident: int
) -> None:
    datagram = udp.build(sport, dport, payload, src, dst)
    packet = ipv4.build(src, dst, 17, datagram, ident=ident)
    parsed_ip = ipv4.parse(packet)
    assert parsed_ip.payload == datagram and parsed_ip.src == src and parsed_ip.dst == dst
    assert udp.parse(parsed_ip.payload, src, dst) == udp.UdpPacket(sport, dport, payload, True)
    frame = ethernet.build(B_MAC, A_MAC, 0x0800, packet)
    addresses = fastpath.address_sum(src) + fastpath.address_sum(dst)
    data_sum = fastpath.payload_sum(payload)
    assert fastpath.udp_frame(B_MAC, A_MAC, src, dst, addresses, 64, ident, sport, dport, payload, data_sum) == frame
    checksum = int.from_bytes(datagram[6:8])
    assert fastpath.payload_sum_of_verified(addresses, sport, dport, len(datagram), checksum) == data_sum


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=42, max_size=200), st.data())
def test_fastpath_checks_agree_with_rfc1071_sum(frame: bytes, data: st.DataObject) -> None:
    # The stack calls ipv4_header_ok only after seeing version 4, IHL 5.
    frame = frame[:14] + b"\x45" + frame[15:]
    udp_length = data.draw(st.integers(8, len(frame) - 34))
    reference_ip = ones_complement_sum(frame[14:34]) == 0xFFFF
    assert fastpath.ipv4_header_ok(frame) == reference_ip
    pseudo = frame[26:34] + struct.pack("!BBH", 0, 17, udp_length)
    reference_udp = ones_complement_sum(pseudo + frame[34 : 34 + udp_length]) == 0xFFFF
    assert fastpath.udp_checksum_ok(frame, udp_length) == reference_udp
