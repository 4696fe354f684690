"""The sans-I/O network stack: two stacks back to back on a fake clock, and hostile input."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether

from libos.net.arp import ArpCache, Enqueued
from libos.net.counters import ArpCounters, EthernetCounters, IcmpCounters, Ipv4Counters, UdpCounters
from libos.net.events import ArpResolutionFailed, DestinationUnreachable, EchoReply, UdpDatagram
from libos.net.stack import MAX_UDP_PAYLOAD, NetStack
from vdev.wire import arp, ethernet, icmp, ipv4, udp
from vdev.wire.ipv4 import ip_to_bytes

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
MAC_C = "02:00:00:00:00:0c"
IP_A = "10.9.0.1"
IP_B = "10.9.0.2"
IP_C = "10.9.0.3"
A_MAC = ethernet.mac_to_bytes(MAC_A)
B_MAC = ethernet.mac_to_bytes(MAC_B)
C_MAC = ethernet.mac_to_bytes(MAC_C)
A_IP = ip_to_bytes(IP_A)
B_IP = ip_to_bytes(IP_B)
C_IP = ip_to_bytes(IP_C)
GATEWAY = ip_to_bytes("10.9.0.254")


def make_pair(**kwargs: object) -> tuple[NetStack, NetStack]:
    a = NetStack(A_MAC, A_IP, 24, **kwargs)  # type: ignore[arg-type]
    b = NetStack(B_MAC, B_IP, 24, **kwargs)  # type: ignore[arg-type]
    return a, b


def pump(a: NetStack, b: NetStack, now: float) -> int:
    """Move frames between the two outboxes until both are empty; return how many moved."""
    moved = 0
    while a.outbox or b.outbox:
        while a.outbox:
            b.receive(a.outbox.popleft(), now)
            moved += 1
        while b.outbox:
            a.receive(b.outbox.popleft(), now)
            moved += 1
    return moved


def resolved_pair() -> tuple[NetStack, NetStack]:
    a, b = make_pair()
    b.udp_bind(7)
    assert a.send_udp(4000, B_IP, 7, b"warm-up", 0.0)
    pump(a, b, 0.0)
    b.events.clear()
    return a, b


def scapy_udp(payload: bytes, *, sport: int = 4000, dport: int = 7, src: str = IP_A, dst: str = IP_B) -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload)




def test_arp_resolution_then_udp_both_ways() -> None:
    a, b = make_pair()
    b.udp_bind(7)
    a.udp_bind(4000)
    assert a.send_udp(4000, B_IP, 7, b"hello", 0.0)

    # Nothing resolved yet: only a broadcast ARP request leaves, the datagram waits.
    assert len(a.outbox) == 1
    request_frame = ethernet.parse(a.outbox[0])
    assert (request_frame.dst, request_frame.ethertype) == (ethernet.BROADCAST_MAC, ethernet.ETHERTYPE_ARP)
    assert arp.parse(request_frame.payload) == arp.ArpPacket(arp.OP_REQUEST, A_MAC, A_IP, ethernet.ZERO_MAC, B_IP)
    assert a.arp.pending(B_IP) == 1

    assert pump(a, b, 0.0) == 3  # request, reply, then the released datagram
    assert list(b.events) == [UdpDatagram(7, A_IP, 4000, b"hello")]
    # B learned A from the request aimed at it (RFC 826), so its answer needs no ARP.
    assert b.arp.lookup(A_IP, 0.0) == A_MAC
    assert b.send_udp(7, A_IP, 4000, b"world", 0.0)
    assert pump(a, b, 0.0) == 1
    assert list(a.events) == [UdpDatagram(4000, B_IP, 7, b"world")]

    assert a.counters.arp == ArpCounters(rx_replies=1, tx_requests=1)
    assert b.counters.arp == ArpCounters(rx_requests=1, tx_replies=1)
    assert a.counters.udp == UdpCounters(rx_datagrams=1, tx_datagrams=1)
    assert b.counters.udp == UdpCounters(rx_datagrams=1, tx_datagrams=1)
    assert a.counters.ethernet == EthernetCounters(rx_frames=2, tx_frames=2)
    assert b.counters.ethernet == EthernetCounters(rx_frames=2, tx_frames=2)
    assert a.counters.ipv4 == b.counters.ipv4 == Ipv4Counters(rx_packets=1, tx_packets=1)


def test_sent_datagram_is_what_scapy_expects() -> None:
    a, b = resolved_pair()
    assert a.send_udp(4000, B_IP, 7, b"odd", 1.0)
    frame = Ether(a.outbox.popleft())
    assert frame[IP].flags == "DF" and frame[IP].ttl == 64 and frame[IP].src == IP_A and frame[IP].dst == IP_B
    assert (frame[UDP].sport, frame[UDP].dport, bytes(frame[UDP].payload)) == (4000, 7, b"odd")
    # Let scapy recompute both checksums and compare with ours.
    rebuilt = frame.copy()
    del rebuilt[IP].chksum
    del rebuilt[UDP].chksum
    assert bytes(Ether(bytes(rebuilt))) == bytes(frame)


@pytest.mark.parametrize("payload", [b"", b"x", b"padded to sixty", bytes(range(256)) * 5 + b"!"])
@pytest.mark.parametrize("fast_path", [True, False])
def test_scapy_frames_delivered(payload: bytes, fast_path: bool) -> None:
    b = NetStack(B_MAC, B_IP, 24, fast_path=fast_path)
    b.udp_bind(7)
    if fast_path:
        # Well-formed frames for a bound port must never need the general path.
        b._receive_general = pytest.fail  # type: ignore[method-assign]
    frame = scapy_udp(payload)
    b.receive(frame.ljust(60, b"\x00"), 0.0)  # short frames arrive with link padding
    b.receive(memoryview(frame), 0.0)
    assert list(b.events) == [UdpDatagram(7, A_IP, 4000, payload)] * 2
    assert b.counters.udp == UdpCounters(rx_datagrams=2)


def test_echoing_a_payload_back_keeps_checksums_right() -> None:
    # The fast path reuses the received payload's checksum share when the very same
    # bytes object is sent back; the reply must still verify.
    a, b = resolved_pair()
    a.udp_bind(4000)
    for payload in (b"", b"a", b"ab", bytes(range(200)), b"\xff" * 1001):
        a.send_udp(4000, B_IP, 7, payload, 1.0)
        pump(a, b, 1.0)
        event = b.events.popleft()
        assert isinstance(event, UdpDatagram)
        b.send_udp(event.local_port, event.src_ip, event.src_port, event.payload, 1.0)
        reply = b.outbox[0]
        parsed = ipv4.parse(ethernet.parse(reply).payload)
        assert udp.parse(parsed.payload, B_IP, A_IP).payload == payload
        pump(a, b, 1.0)
        assert a.events.popleft() == UdpDatagram(4000, B_IP, 7, payload)
    assert a.counters.udp.drop_checksum == b.counters.udp.drop_checksum == 0




def test_arp_retries_then_gives_up_and_counts() -> None:
    a = NetStack(A_MAC, A_IP, 24)
    for i in range(10):
        a.send_udp(4000, C_IP, 7, bytes([i]), 0.0)
    assert len(a.outbox) == 1  # one request for all of them
    assert a.arp.pending(C_IP) == 8  # the queue is bounded
    assert a.next_deadline() == 1.0

    a.on_timer(0.5)
    assert len(a.outbox) == 1 and a.next_deadline() == 1.0
    a.on_timer(1.0)
    a.on_timer(2.0)
    assert len(a.outbox) == 3  # three tries in all
    assert all(arp.parse(ethernet.parse(f).payload).target_ip == C_IP for f in a.outbox)
    assert a.next_deadline() == 3.0
    a.on_timer(3.0)
    assert a.next_deadline() is None
    assert list(a.events) == [ArpResolutionFailed(C_IP, 8)]
    assert a.counters.arp == ArpCounters(tx_requests=3, resolution_failures=1, drop_unresolved=8, drop_queue_full=2)
    assert a.counters.udp.tx_datagrams == 10


def test_arp_reply_on_second_try_releases_queue() -> None:
    a = NetStack(A_MAC, A_IP, 24)
    c = NetStack(C_MAC, C_IP, 24)
    c.udp_bind(9)
    a.send_udp(1, C_IP, 9, b"one", 0.0)
    a.send_udp(1, C_IP, 9, b"two", 0.2)
    a.outbox.clear()  # the first request is lost
    a.on_timer(1.0)
    pump(a, c, 1.0)
    assert [e.payload for e in c.events if isinstance(e, UdpDatagram)] == [b"one", b"two"]
    assert a.next_deadline() is None
    assert a.counters.arp == ArpCounters(rx_replies=1, tx_requests=2)


def test_arp_entries_expire_and_are_refreshed() -> None:
    a, b = resolved_pair()
    # Unused, the entry expires after 60 s: the next send must resolve again.
    assert a.arp.lookup(B_IP, 59.9) == B_MAC
    a2, b2 = resolved_pair()
    assert a2.send_udp(4000, B_IP, 7, b"late", 61.0)
    assert ethernet.parse(a2.outbox[0]).ethertype == ethernet.ETHERTYPE_ARP
    assert a2.arp.pending(B_IP) == 1

    # In use near the end of its life, it is refreshed with a unicast request and the
    # traffic never waits.
    a.outbox.clear()
    assert a.send_udp(4000, B_IP, 7, b"near the end", 56.0)
    refresh, data_frame = (ethernet.parse(f) for f in a.outbox)
    assert data_frame.ethertype == ethernet.ETHERTYPE_IPV4
    assert (refresh.dst, refresh.ethertype) == (B_MAC, ethernet.ETHERTYPE_ARP)
    pump(a, b, 56.0)
    assert a.send_udp(4000, B_IP, 7, b"after", 100.0)  # alive until 116 now
    assert [ethernet.parse(f).ethertype for f in a.outbox] == [ethernet.ETHERTYPE_IPV4]
    assert a.counters.arp.tx_requests == 2


def test_arp_learning_follows_rfc826() -> None:
    b = NetStack(B_MAC, B_IP, 24)

    def arp_frame(op: int, sender_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
        body = arp.build(op, sender_mac, sender_ip, ethernet.ZERO_MAC, target_ip)
        return ethernet.build(ethernet.BROADCAST_MAC, A_MAC, ethernet.ETHERTYPE_ARP, body)

    # A request for someone else: neither answered nor learned.
    b.receive(arp_frame(arp.OP_REQUEST, C_MAC, C_IP, A_IP), 0.0)
    assert not b.outbox and b.arp.lookup(C_IP, 0.0) is None
    # Aimed at us: learned and answered.
    b.receive(arp_frame(arp.OP_REQUEST, C_MAC, C_IP, B_IP), 0.0)
    reply = arp.parse(ethernet.parse(b.outbox.popleft()).payload)
    assert reply == arp.ArpPacket(arp.OP_REPLY, B_MAC, B_IP, C_MAC, C_IP)
    # An existing entry is merged from any packet, gratuitous ARP included.
    b.receive(arp_frame(arp.OP_REQUEST, A_MAC, C_IP, C_IP), 1.0)
    assert b.arp.lookup(C_IP, 1.0) == A_MAC and not b.outbox
    # Someone claiming our own address is counted, not learned.
    b.receive(arp_frame(arp.OP_REPLY, A_MAC, B_IP, B_IP), 1.0)
    # An RFC 5227 probe for our address is answered but never learned from.
    b.receive(arp_frame(arp.OP_REQUEST, A_MAC, ipv4.ANY, B_IP), 1.0)
    probe_reply = arp.parse(ethernet.parse(b.outbox.popleft()).payload)
    assert probe_reply.target_ip == ipv4.ANY and b.arp.lookup(ipv4.ANY, 1.0) is None
    # Off-subnet and group senders are refused.
    b.receive(arp_frame(arp.OP_REQUEST, A_MAC, ip_to_bytes("192.0.2.1"), B_IP), 1.0)
    b.receive(arp_frame(arp.OP_REQUEST, b"\x01" + A_MAC[1:], A_IP, B_IP), 1.0)
    assert not b.outbox
    assert b.counters.arp == ArpCounters(
        rx_requests=6, rx_replies=1, tx_replies=2, drop_bad_sender=2, address_conflicts=1
    )


def test_arp_table_is_bounded() -> None:
    cache: ArpCache[bytearray] = ArpCache(max_entries=4, max_pending=2)
    for i in range(10):
        cache.update(bytes([10, 0, 0, i]), A_MAC, float(i), create=True)
    assert len(cache) == 4
    assert cache.lookup(bytes([10, 0, 0, 9]), 10.0) == A_MAC
    assert cache.lookup(bytes([10, 0, 0, 0]), 10.0) is None
    assert cache.enqueue(b"\x0a\x00\x01\x01", bytearray(), 0.0) is Enqueued.NEW
    assert cache.enqueue(b"\x0a\x00\x01\x01", bytearray(), 0.0) is Enqueued.QUEUED
    assert cache.enqueue(b"\x0a\x00\x01\x02", bytearray(), 0.0) is Enqueued.NEW
    assert cache.enqueue(b"\x0a\x00\x01\x03", bytearray(), 0.0) is Enqueued.FULL




def test_icmp_echo_between_stacks() -> None:
    a, b = resolved_pair()
    assert a.send_echo_request(B_IP, 0x77, 3, b"are you there", 5.0)
    pump(a, b, 5.0)
    assert list(a.events) == [EchoReply(B_IP, 0x77, 3, b"are you there")]
    assert b.counters.icmp == IcmpCounters(rx_messages=1, rx_echo_requests=1, tx_echo_replies=1)
    assert a.counters.icmp == IcmpCounters(rx_messages=1, rx_echo_replies=1, tx_echo_requests=1)


def test_answers_a_scapy_ping_and_ignores_broadcast_ping() -> None:
    a, b = resolved_pair()
    ping = Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B, id=5) / ICMP(type=8, id=9, seq=1) / b"abcdefgh"
    b.receive(bytes(ping), 1.0)
    reply = Ether(b.outbox.popleft())
    assert (reply[IP].src, reply[IP].dst) == (IP_B, IP_A)
    assert (reply[ICMP].type, reply[ICMP].id, reply[ICMP].seq, bytes(reply[ICMP].payload)) == (0, 9, 1, b"abcdefgh")
    jumbo_ping = Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / ICMP(type=8) / (b"j" * 2000)
    b.receive(bytes(jumbo_ping), 1.0)
    assert not b.outbox and b.counters.icmp.drop_oversized == 1
    broadcast_ping = Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / IP(src=IP_A, dst="10.9.0.255") / ICMP(type=8)
    b.receive(bytes(broadcast_ping), 1.0)
    assert not b.outbox
    assert b.counters.icmp.drop_broadcast_echo == 1


def test_port_unreachable_for_unbound_port() -> None:
    a, b = resolved_pair()
    a.send_udp(4000, B_IP, 9999, b"anyone?", 1.0)
    sent = a.outbox[0][14:]
    pump(a, b, 1.0)
    assert b.counters.udp == UdpCounters(rx_datagrams=2, drop_no_port=1)
    assert b.counters.icmp.tx_dest_unreachable == 1
    assert list(a.events) == [DestinationUnreachable(B_IP, icmp.CODE_PORT_UNREACHABLE, sent[:28])]
    # After unbind the bound port behaves the same way.
    b.udp_unbind(7)
    a.send_udp(4000, B_IP, 7, b"gone", 1.0)
    pump(a, b, 1.0)
    assert b.counters.icmp.tx_dest_unreachable == 2


def test_no_icmp_error_for_broadcast_datagrams() -> None:
    b = NetStack(B_MAC, B_IP, 24)
    frame = Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / IP(src=IP_A, dst="255.255.255.255") / UDP(dport=9) / b"x"
    b.receive(bytes(frame), 0.0)
    assert not b.outbox
    assert b.counters.udp.drop_no_port == 1


def test_icmp_errors_are_rate_limited() -> None:
    a, b = resolved_pair()
    b.outbox.clear()
    frame = scapy_udp(b"x", dport=9)
    for _ in range(60):
        b.receive(frame, 2.0)
    assert len(b.outbox) == 50
    assert b.counters.icmp.drop_rate_limited == 10
    b.receive(frame, 2.01)  # 10 ms later, ten tokens are back
    assert len(b.outbox) == 51


def test_protocol_hook_and_protocol_unreachable() -> None:
    a, b = resolved_pair()
    segment = b"\x00\x01\x00\x02" + b"\x00" * 16
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B, proto=6) / segment)
    b.receive(frame, 1.0)
    unreachable = icmp.parse(ipv4.parse(ethernet.parse(b.outbox.popleft()).payload).payload)
    assert isinstance(unreachable, icmp.IcmpDestUnreachable) and unreachable.code == icmp.CODE_PROTOCOL_UNREACHABLE
    assert b.counters.ipv4.drop_unknown_protocol == 1

    seen: list[tuple[bytes, bytes, int]] = []
    b.register_ip_protocol(ipv4.PROTO_TCP, lambda packet, raw, now: seen.append((packet.src, packet.payload, len(raw))))
    b.receive(frame + b"\x00" * 6, 2.0)
    assert seen == [(A_IP, segment, 40)] and not b.outbox
    assert b.send_ip(A_IP, ipv4.PROTO_TCP, segment, 2.0)
    sent = ipv4.parse(ethernet.parse(b.outbox.popleft()).payload)
    assert (sent.protocol, sent.dst, sent.payload) == (6, A_IP, segment)
    with pytest.raises(ValueError):
        b.register_ip_protocol(ipv4.PROTO_UDP, lambda packet, raw, now: None)




def test_routing_gateway_broadcast_and_limits() -> None:
    a = NetStack(A_MAC, A_IP, 24)
    assert not a.send_udp(1, ip_to_bytes("192.0.2.7"), 9, b"x", 0.0)
    assert not a.send_udp(1, ip_to_bytes("224.0.0.9"), 9, b"x", 0.0)
    assert a.counters.ipv4.drop_no_route == 2 and not a.outbox

    routed = NetStack(A_MAC, A_IP, 24, gateway=GATEWAY)
    assert routed.send_udp(1, ip_to_bytes("192.0.2.7"), 9, b"x", 0.0)
    assert arp.parse(ethernet.parse(routed.outbox[0]).payload).target_ip == GATEWAY
    for nowhere in ("0.0.0.0", "127.0.0.1", "240.0.0.1", "224.0.0.9", IP_A):
        assert not routed.send_udp(1, ip_to_bytes(nowhere), 9, b"x", 0.0)
    assert routed.counters.ipv4.drop_no_route == 5 and len(routed.outbox) == 1

    assert a.send_udp(1, ip_to_bytes("10.9.0.255"), 9, b"all", 0.0)
    assert a.send_udp(1, ipv4.BROADCAST, 9, b"all", 0.0)
    assert [ethernet.parse(f).dst for f in a.outbox] == [ethernet.BROADCAST_MAC] * 2

    for bad in ((70000, B_IP, 9, b""), (1, B_IP, 0, b""), (1, B_IP, 9, bytes(MAX_UDP_PAYLOAD + 1)), (1, b"\x0a", 9, b"")):
        with pytest.raises(ValueError):
            a.send_udp(*bad, now=0.0)
    with pytest.raises(ValueError):
        a.udp_bind(0)
    a.udp_bind(5)
    with pytest.raises(ValueError):
        a.udp_bind(5)


def test_broadcast_datagram_reaches_bound_port() -> None:
    a, b = make_pair()
    b.udp_bind(67)
    a.send_udp(68, ip_to_bytes("10.9.0.255"), 67, b"hello all", 0.0)
    pump(a, b, 0.0)
    assert list(b.events) == [UdpDatagram(67, A_IP, 68, b"hello all")]


@pytest.mark.parametrize(
    ("frame", "layer", "counter"),
    [
        (scapy_udp(b"x")[:13], "ethernet", "drop_malformed"),
        (bytes(Ether(src=MAC_A, dst=MAC_C) / IP(src=IP_A, dst=IP_B) / UDP(dport=7)), "ethernet", "drop_not_for_us"),
        (bytes(Ether(src=MAC_A, dst=MAC_B, type=0x86DD) / (b"\x60" + b"\x00" * 39)), "ethernet", "drop_unknown_ethertype"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_C) / UDP(dport=7)), "ipv4", "drop_not_for_us"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_B, dst=IP_B) / UDP(dport=7)), "ipv4", "drop_bad_source"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="0.0.0.0", dst=IP_B) / ICMP(type=8)), "ipv4", "drop_bad_source"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="10.9.0.255", dst=IP_B) / UDP(dport=7)), "ipv4", "drop_bad_source"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src="224.0.0.1", dst=IP_B) / UDP(dport=7)), "ipv4", "drop_malformed"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B, flags="MF") / UDP(dport=7)), "ipv4", "drop_fragment"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B, frag=3) / (b"\x00" * 8)), "ipv4", "drop_fragment"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B, chksum=1) / UDP(dport=7)), "ipv4", "drop_checksum"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B, ihl=4) / UDP(dport=7)), "ipv4", "drop_malformed"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / UDP(dport=7, chksum=1)), "udp", "drop_checksum"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / UDP(dport=7, len=7)), "udp", "drop_malformed"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / ICMP(chksum=1)), "icmp", "drop_checksum"),
        (bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / ICMP(type=8, code=1)), "icmp", "drop_malformed"),
        (bytes(Ether(src=MAC_A, dst=MAC_B, type=0x0806) / (b"\x00" * 27)), "arp", "drop_malformed"),
    ],
)
@pytest.mark.parametrize("fast_path", [True, False])
def test_drops_are_counted_by_reason(frame: bytes, layer: str, counter: str, fast_path: bool) -> None:
    b = NetStack(B_MAC, B_IP, 24, fast_path=fast_path)
    b.udp_bind(7)
    b.receive(frame, 0.0)
    assert getattr(getattr(b.counters, layer), counter) == 1
    assert not b.events and not b.outbox




@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_receive_never_raises_on_random_bytes(frame: bytes) -> None:
    b = NetStack(B_MAC, B_IP, 24)
    b.udp_bind(7)
    b.receive(frame, 0.0)
    b.receive(B_MAC + A_MAC + frame, 0.0)  # past the MAC filter, into the parsers
    assert b.counters.ethernet.rx_frames == 2


GOOD_FRAMES = [
    scapy_udp(b"payload!"),
    scapy_udp(b"odd"),
    bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=7, chksum=0) / b"no sum"),
    bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / UDP(sport=1, dport=9) / b"closed"),
    bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=IP_A, dst=IP_B) / ICMP(type=8) / b"ping"),
    bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC_A, psrc=IP_A, pdst=IP_B)),
]


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(GOOD_FRAMES),
    st.lists(st.tuples(st.integers(0, 60), st.integers(1, 255)), max_size=3),
    st.integers(-20, 20),
)
def test_fast_path_agrees_with_general_path(good: bytes, flips: list[tuple[int, int]], resize: int) -> None:
    """Mutated frames: both paths deliver, answer and count exactly the same."""
    frame = bytearray(good)
    for offset, mask in flips:
        if offset < len(frame):
            frame[offset] ^= mask
    frame = frame[:resize] if resize < 0 else frame + bytes(resize)
    stacks = [NetStack(B_MAC, B_IP, 24, fast_path=fast) for fast in (True, False)]
    for stack in stacks:
        stack.udp_bind(7)
        stack.receive(bytes(frame), 0.0)
    fast, general = stacks
    assert list(fast.events) == list(general.events)
    assert list(fast.outbox) == list(general.outbox)
    assert dataclasses.asdict(fast.counters) == dataclasses.asdict(general.counters)


def test_constructor_refuses_bad_interfaces() -> None:
    for args in (
        (b"\x01" + A_MAC[1:], A_IP, 24),
        (A_MAC, ipv4.BROADCAST, 24),
        (A_MAC, ip_to_bytes("10.9.0.255"), 24),
        (A_MAC, A_IP, 31),
        (A_MAC, b"\x0a\x00", 24),
    ):
        with pytest.raises(ValueError):
            NetStack(*args)
    with pytest.raises(ValueError):
        NetStack(A_MAC, A_IP, 24, gateway=ip_to_bytes("192.0.2.1"))
