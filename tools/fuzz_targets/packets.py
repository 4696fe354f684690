"""Packet codecs (``vdev.wire``) and the NIC's default function (``vdev.vnic.default_function``).

Contract: every parser raises only ``WireError`` (its subclasses included) on any bytes; a
packet that parses re-emits to bytes that parse to the same fields; the Internet checksum
equals a word-by-word RFC 1071 reference; the default function never raises, answers only
with frames that parse (valid checksums, from the NIC's MAC, at most one MTU), and never
sends an ICMP error about a datagram whose source is not one host (RFC 1122 3.2.2).
"""

from __future__ import annotations

from tools.fuzz_targets import ContractViolation
from tools.fuzz_targets._input import Input
from vdev.vnic.default_function import DefaultFunction
from vdev.wire import arp, checksum, ethernet, icmp, ipv4, tcp, udp
from vdev.wire.errors import WireError

NIC_MAC = b"\x02\x00\x00\x00\x00\xaa"
NIC_IPS = [b"\x0a\x00\x00\x01", b"\x0a\x00\x00\x02"]
PEER_MAC = b"\x02\x00\x00\x00\x00\xbb"
MAX_FRAME = 1514


def _reference_sum(data: bytes, initial: int) -> int:
    if len(data) % 2:
        data += b"\0"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _parsers(buf: bytes, src: bytes, dst: bytes) -> None:
    """Every parser on the same bytes, with the round-trip checks."""
    try:
        frame = ethernet.parse(buf)
        if frame.emit() != buf:
            raise ContractViolation("Ethernet frame does not re-emit to its bytes")
    except WireError:
        pass
    try:
        packet = arp.parse(buf)
        if packet.emit() != buf[: arp.PACKET_LEN]:
            raise ContractViolation("ARP packet does not re-emit to its bytes")
    except WireError:
        pass
    try:
        datagram = ipv4.parse(buf)
        again = ipv4.parse(datagram.emit())
        if again != datagram:
            raise ContractViolation(f"IPv4 round trip changed the packet: {datagram} -> {again}")
    except WireError:
        pass
    try:
        message = icmp.parse(buf)
        if icmp.parse(message.emit()) != message:
            raise ContractViolation("ICMP round trip changed the message")
    except WireError:
        pass
    try:
        datagram_udp = udp.parse(buf, src, dst)
        again_udp = udp.parse(datagram_udp.emit(src, dst), src, dst)
        if (again_udp.src_port, again_udp.dst_port, again_udp.payload) != (datagram_udp.src_port, datagram_udp.dst_port, datagram_udp.payload):
            raise ContractViolation("UDP round trip changed the datagram")
    except WireError:
        pass
    try:
        segment = tcp.TcpSegment.parse(buf, src, dst)
        again_tcp = tcp.TcpSegment.parse(segment.emit(src, dst), src, dst)
        fields = ("src_port", "dst_port", "seq", "ack", "flags", "window", "options", "urgent")
        for name in fields:
            if getattr(again_tcp, name) != getattr(segment, name):
                raise ContractViolation(f"TCP round trip changed {name}: {getattr(segment, name)} -> {getattr(again_tcp, name)}")
        if bytes(again_tcp.payload) != bytes(segment.payload):
            raise ContractViolation("TCP round trip changed the payload")
    except WireError:
        pass


def _a_frame(inp: Input) -> bytes:
    """A frame for the default function: mostly well-formed, with hostile fields."""
    dst_ip = NIC_IPS[inp.below(2)] if inp.below(4) else inp.take(4).ljust(4, b"\0")
    src_ip = inp.choice((0x0A000063, 0, 0xFFFFFFFF, 0xE0000001, 0x7F000001, inp.u32())).to_bytes(4, "big")
    dst_mac = (NIC_MAC, ethernet.BROADCAST_MAC, b"\x01\x00\x5e\x00\x00\x01", PEER_MAC)[inp.below(4)]
    kind = inp.below(5)
    if kind == 0:
        body = arp.build(inp.choice((1, 2, 3)), PEER_MAC, src_ip, bytes(6), dst_ip)
        return ethernet.build(dst_mac, PEER_MAC, ethernet.ETHERTYPE_ARP, body + inp.blob(20))
    if kind == 1:
        payload = icmp.build_echo(inp.below(4) != 0, inp.u16(), inp.u16(), inp.blob(64))
        if inp.below(4) == 0:
            payload = icmp._build(inp.u8(), inp.u8(), inp.u16(), inp.u16(), inp.blob(40))
        protocol = ipv4.PROTO_ICMP
    elif kind == 2:
        payload = udp.build(inp.u16(), inp.u16() or 1, inp.blob(64), src_ip, dst_ip) if inp.below(4) else inp.blob(30)
        protocol = ipv4.PROTO_UDP
    elif kind == 3:
        options = tcp.TcpOptions(mss=inp.u16() if inp.flag() else None, sack_permitted=inp.flag())
        segment = tcp.TcpSegment(inp.u16() or 1, inp.u16() or 1, inp.u32(), inp.u32(), inp.u8(), inp.u16(), inp.blob(40), options)
        payload = segment.emit(src_ip, dst_ip)
        protocol = ipv4.PROTO_TCP
    else:
        return inp.blob(MAX_FRAME)
    ip_options = inp.blob(40)
    ip_options = ip_options[: len(ip_options) - len(ip_options) % 4]
    frag = inp.choice((0, 0, 0, 8, 1480))
    datagram = ipv4.build(
        src_ip, dst_ip, protocol, payload, ttl=inp.u8(), ident=inp.u16(),
        dont_fragment=inp.flag(), more_fragments=inp.below(8) == 0, frag_offset=frag, options=ip_options,
    )
    if inp.below(8) == 0:
        spot = inp.below(len(datagram))
        datagram = datagram[:spot] + bytes([datagram[spot] ^ (1 + inp.below(255))]) + datagram[spot + 1 :]
    return ethernet.build(dst_mac, PEER_MAC, ethernet.ETHERTYPE_IPV4, datagram + bytes(inp.below(20)))


def _check_reply(request: bytes, reply: bytes) -> None:
    if len(reply) > MAX_FRAME:
        raise ContractViolation(f"default function sent a {len(reply)}-byte frame")
    frame = ethernet.parse(reply)
    if frame.src != NIC_MAC:
        raise ContractViolation("default function sent from a MAC that is not the NIC's")
    if frame.ethertype == ethernet.ETHERTYPE_ARP:
        arp.parse(frame.payload)
        return
    packet = ipv4.parse(frame.payload)
    if packet.src not in NIC_IPS:
        raise ContractViolation(f"default function sent from {ipv4.ip_to_str(packet.src)}")
    if packet.protocol == ipv4.PROTO_ICMP:
        message = icmp.parse(packet.payload)
        if isinstance(message, icmp.IcmpDestUnreachable):
            original = ipv4.parse(ethernet.parse(request).payload)
            if not ipv4.is_unicast_source(original.src) or ipv4.is_multicast(original.dst):
                raise ContractViolation(f"ICMP error sent about a datagram from {ipv4.ip_to_str(original.src)}")
    elif packet.protocol == ipv4.PROTO_TCP:
        tcp.TcpSegment.parse(packet.payload, packet.src, packet.dst)
    else:
        raise ContractViolation(f"default function sent IP protocol {packet.protocol}")


def one_input_packets(data: bytes) -> None:
    inp = Input(data)
    mode = inp.below(4)
    if mode == 0:
        src, dst = inp.take(4).ljust(4, b"\0"), inp.take(4).ljust(4, b"\0")
        _parsers(inp.rest(), src, dst)
        return
    if mode == 1:
        initial = inp.below(0x20000)
        buf = inp.rest()
        if checksum.ones_complement_sum(buf, initial) != _reference_sum(buf, initial):
            raise ContractViolation(f"checksum of {len(buf)} bytes from {initial:#x} differs from the reference")
        return
    function = DefaultFunction(NIC_MAC, list(NIC_IPS))
    now = 0.0
    while not inp.exhausted:
        frame = _a_frame(inp)[:MAX_FRAME]
        now += inp.below(100) / 1000
        for reply in function.handle(frame, now):
            try:
                _check_reply(frame, reply)
            except WireError as exc:
                raise ContractViolation(f"default function sent a malformed frame ({type(exc).__name__}): {exc}") from exc
        _parsers(frame, frame[26:30], frame[30:34])


def seeds_packets() -> list[bytes]:
    request = ethernet.build(NIC_MAC, PEER_MAC, ethernet.ETHERTYPE_IPV4, ipv4.build(b"\x0a\0\0\x63", NIC_IPS[0], ipv4.PROTO_ICMP, icmp.build_echo(True, 1, 1, b"ping")))
    return [
        b"\x00" + NIC_IPS[0] + NIC_IPS[1] + request,
        b"\x01\x00\x01" + bytes(range(256)) * 2,
        b"\x02\x01\x00\x00\x01" + bytes(range(7, 200, 3)),
        b"\x03\x01\x00\x00\x02\x03" + bytes(range(3, 250, 5)),
        b"\x02\x01\x00\x00\x03\x02" + bytes(range(9, 250, 7)),
    ]
