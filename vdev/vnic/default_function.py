"""The default function: what the NIC does with traffic no application claimed.

In Arrakis unmatched traffic goes to the control plane. Here kernelctl programs the NIC's
addresses into the device host, which answers on its behalf the way a Linux host would:

* ARP requests for a NIC address get a reply with the NIC's MAC (RFC 826);
* ICMP echo requests to a NIC address get an echo reply (RFC 792);
* a UDP datagram to an unclaimed port gets ICMP port unreachable (RFC 1122 4.1.3.1), which a
  client's connected socket reports as ECONNREFUSED;
* a TCP segment to an unclaimed port gets a RST (RFC 9293 3.10.7.1), unless it is a RST.

ICMP errors are rate-limited (RFC 1812 4.3.2.8), and nothing is ever sent in answer to a
broadcast, a multicast, an ICMP error or a malformed frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from vdev.ratelimit import TokenBucket
from vdev.wire import arp, ethernet, icmp, ipv4, tcp, udp
from vdev.wire.errors import WireError

ICMP_ERRORS_PER_SECOND = 1000


@dataclass
class DefaultCounters:
    arp_replies: int = 0
    echo_replies: int = 0
    port_unreachable: int = 0
    resets: int = 0
    rate_limited: int = 0
    ignored: int = 0
    malformed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class DefaultFunction:
    def __init__(self, mac: bytes, addresses: list[bytes]) -> None:
        self.mac = mac
        self.addresses = set(addresses)
        self.counters = DefaultCounters()
        # Packets per second, one "byte" per packet: a token bucket counts anything.
        self._icmp_budget = TokenBucket(ICMP_ERRORS_PER_SECOND * 8, 100, 0.0)

    def handle(self, frame: bytes, now: float) -> list[bytes]:
        """Replies to put on the wire for one unclaimed frame."""
        try:
            eth = ethernet.parse(frame)
            if eth.ethertype == ethernet.ETHERTYPE_ARP:
                return self._arp(eth.src, eth.payload)
            if eth.ethertype == ethernet.ETHERTYPE_IPV4 and eth.dst == self.mac:
                return self._ipv4(eth.src, eth.payload, now)
        except WireError:
            self.counters.malformed += 1
            return []
        self.counters.ignored += 1
        return []

    def _arp(self, src_mac: bytes, payload: bytes) -> list[bytes]:
        packet = arp.parse(payload)
        if packet.operation != arp.OP_REQUEST or packet.target_ip not in self.addresses:
            self.counters.ignored += 1
            return []
        reply = arp.build(arp.OP_REPLY, self.mac, packet.target_ip, packet.sender_mac, packet.sender_ip)
        self.counters.arp_replies += 1
        return [ethernet.build(packet.sender_mac, self.mac, ethernet.ETHERTYPE_ARP, reply)]

    def _ipv4(self, src_mac: bytes, payload: bytes, now: float) -> list[bytes]:
        packet = ipv4.parse(payload)
        if packet.dst not in self.addresses or packet.is_fragment and packet.frag_offset:
            self.counters.ignored += 1
            return []
        if packet.protocol == ipv4.PROTO_ICMP:
            message = icmp.parse(packet.payload)
            if isinstance(message, icmp.IcmpEcho) and message.is_request:
                reply = icmp.build_echo(False, message.ident, message.sequence, message.data)
                self.counters.echo_replies += 1
                return [self._ip_frame(src_mac, packet.dst, packet.src, ipv4.PROTO_ICMP, reply)]
            self.counters.ignored += 1
            return []
        if packet.protocol == ipv4.PROTO_UDP:
            # A truncated datagram is malformed, not a port nobody claimed (the error would quote
            # less than the header + 8 bytes RFC 792 asks for); and no ICMP error goes about a
            # datagram whose source is not one host (RFC 1122 3.2.2).
            if len(packet.payload) < udp.HEADER_LEN or not _single_host(packet.src):
                self.counters.ignored += 1
                return []
            if not self._icmp_budget.try_consume(1, now):
                self.counters.rate_limited += 1
                return []
            quoted = ipv4.build(
                packet.src,
                packet.dst,
                packet.protocol,
                packet.payload,
                ttl=packet.ttl,
                ident=packet.ident,
                dont_fragment=packet.dont_fragment,
                options=packet.options,
            )
            message_bytes = icmp.build_dest_unreachable(icmp.CODE_PORT_UNREACHABLE, quoted)
            self.counters.port_unreachable += 1
            return [self._ip_frame(src_mac, packet.dst, packet.src, ipv4.PROTO_ICMP, message_bytes)]
        if packet.protocol == ipv4.PROTO_TCP:
            segment = tcp.TcpSegment.parse(packet.payload, packet.src, packet.dst)
            if segment.flags & tcp.RST:
                self.counters.ignored += 1
                return []
            # RFC 9293 3.10.7.1: if the ACK bit is off, <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>;
            # if it is on, <SEQ=SEG.ACK><CTL=RST>.
            if segment.flags & tcp.ACK:
                reset = tcp.TcpSegment(segment.dst_port, segment.src_port, segment.ack, 0, tcp.RST, 0)
            else:
                ack = (segment.seq + segment.seg_len) & 0xFFFFFFFF
                reset = tcp.TcpSegment(segment.dst_port, segment.src_port, 0, ack, tcp.RST | tcp.ACK, 0)
            self.counters.resets += 1
            return [self._ip_frame(src_mac, packet.dst, packet.src, ipv4.PROTO_TCP, reset.emit(packet.dst, packet.src))]
        self.counters.ignored += 1
        return []

    def _ip_frame(self, dst_mac: bytes, src_ip: bytes, dst_ip: bytes, protocol: int, payload: bytes) -> bytes:
        datagram = ipv4.build(src_ip, dst_ip, protocol, payload)
        return ethernet.build(dst_mac, self.mac, ethernet.ETHERTYPE_IPV4, datagram)


def _single_host(address: bytes) -> bool:
    """Whether an IPv4 source names one host: not 0/8 (this network), 127/8 (loopback),
    224/4 (multicast), 240/4 (reserved and the limited broadcast)."""
    first = address[0]
    return first != 0 and first != 127 and first < 224
