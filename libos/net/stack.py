"""The libOS network stack up to UDP, sans-I/O: frames and ``now`` in, frames out.

``NetStack`` owns one interface (a MAC, an IPv4 address and prefix, an optional
gateway). The driver feeds it received frames with ``receive`` and drains ``outbox``;
the application reads ``events`` and calls ``send_udp``; whoever runs the loop calls
``on_timer`` when ``next_deadline`` passes. Nothing here blocks, reads a clock or
raises on bad input: a frame the stack cannot use is dropped and counted in
``counters``.

Transport protocols plug in through ``ip_handlers`` (IP protocol number -> handler); the
stack registers ICMP and UDP there itself, and TCP registers with
``register_ip_protocol(PROTO_TCP, handler)`` and sends with ``send_ip``.

The receive path has a fast lane for the common case, a well-formed unicast IPv4/UDP
frame without options or fragmentation for a bound port: one ``unpack_from`` over the
42 bytes of fixed headers and one big-integer checksum (see ``libos.net.fastpath``).
Everything else, or anything doubtful, takes the general path through the codecs,
which makes the same decision and counts the reason when it drops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from libos.net import fastpath
from libos.net.arp import ArpCache, Enqueued
from libos.net.counters import StackCounters
from libos.net.events import ArpResolutionFailed, DestinationUnreachable, EchoReply, NetEvent, UdpDatagram
from libos import fast
from vdev.wire import arp, ethernet, icmp, ipv4, udp
from vdev.wire.errors import ChecksumError, WireError
from vdev.wire.tcp import NO_OPTIONS, TcpSegment

# Builds one TCP frame in C into a TX buffer and posts it (``VnicDriver.transmit_tcp``):
# (dst MAC + src MAC + src IP + dst IP, ttl, ident, src port, dst port, seq, ack, flags,
# window, option bytes, payload) -> taken.
TcpWriter = Callable[
    [bytes, int, int, int, int, int, int, int, int, bytes, "bytes | bytearray | memoryview"], bool
]
# A frame carrying a TCP segment whose IPv4 and TCP checksums C has verified, with a 20-byte
# IPv4 header: (src IP, dst IP, frame, end of the segment in the frame, now).
VerifiedTcpInput = Callable[[bytes, bytes, bytes, int, float], None]
_TCP_HEADERS_RX = fastpath.IPV4_HEADERS_RX

IpHandler = Callable[[ipv4.Ipv4Packet, bytes, float], None]
"""Called with the parsed datagram, the raw datagram (for quoting in ICMP errors) and now."""

MTU = 1500
MAX_UDP_PAYLOAD = MTU - ipv4.HEADER_LEN - udp.HEADER_LEN  # 1472: we never fragment
MAX_ECHO_DATA = MTU - ipv4.HEADER_LEN - icmp.HEADER_LEN

_IPV4 = ethernet.ETHERTYPE_IPV4
_UDP = ipv4.PROTO_UDP


class NetStack:
    def __init__(
        self,
        mac: bytes,
        ip: bytes,
        prefix_len: int,
        *,
        gateway: bytes | None = None,
        ttl: int = ipv4.DEFAULT_TTL,
        arp_cache: ArpCache[bytearray] | None = None,
        icmp_error_rate: float = 1000.0,
        icmp_error_burst: int = 50,
        fast_path: bool = True,
    ) -> None:
        if len(mac) != ethernet.MAC_LEN or ethernet.is_multicast_mac(mac):
            raise ValueError("the interface MAC must be 6 bytes and an individual address")
        if len(ip) != ipv4.ADDR_LEN or not ipv4.is_unicast_source(ip):
            raise ValueError("the interface address must be a 4-byte unicast IPv4 address")
        if not 0 <= prefix_len <= 30:
            raise ValueError(f"prefix length {prefix_len} is not in 0..30")
        if gateway is not None and len(gateway) != ipv4.ADDR_LEN:
            raise ValueError("the gateway must be a 4-byte IPv4 address")
        if not 1 <= ttl <= 255:
            raise ValueError(f"TTL {ttl} is not in 1..255")
        self.mac = bytes(mac)
        self.ip = bytes(ip)
        self.prefix_len = prefix_len
        self.ttl = ttl
        self._netmask = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
        self._network = int.from_bytes(self.ip, "big") & self._netmask
        if gateway is not None and int.from_bytes(gateway, "big") & self._netmask != self._network:
            raise ValueError("the gateway must be inside the interface's subnet")
        self.gateway = gateway
        self.subnet_broadcast = (self._network | (~self._netmask & 0xFFFFFFFF)).to_bytes(4, "big")
        if self.ip == self.subnet_broadcast or int.from_bytes(self.ip, "big") == self._network:
            raise ValueError("the interface address is the subnet's broadcast or network address")
        self.outbox: deque[bytes] = deque()
        self.events: deque[NetEvent] = deque()
        self.counters = StackCounters()
        self.arp: ArpCache[bytearray] = arp_cache if arp_cache is not None else ArpCache()
        self.ip_handlers: dict[int, IpHandler] = {
            ipv4.PROTO_ICMP: self._receive_icmp,
            ipv4.PROTO_UDP: self._receive_udp,
        }
        self._udp_ports: set[int] = set()
        self._ident = 0
        self._fast_path = fast_path
        self._ip_sum = fastpath.address_sum(self.ip)
        # The payload of the last datagram taken by the fast lane and its checksum share,
        # kept so that echoing those very bytes skips a pass over them.
        self._last_rx_payload: bytes | None = None
        self._last_rx_payload_sum = 0
        self.tcp_writer: TcpWriter | None = None
        self.tcp_input_verified: VerifiedTcpInput | None = None
        self._icmp_error_rate = icmp_error_rate
        self._icmp_error_burst = float(icmp_error_burst)
        self._icmp_tokens = float(icmp_error_burst)
        self._icmp_tokens_at: float | None = None


    def register_ip_protocol(self, protocol: int, handler: IpHandler) -> None:
        """Route IPv4 datagrams of ``protocol`` (e.g. 6 for TCP) to ``handler``."""
        if protocol in (ipv4.PROTO_ICMP, ipv4.PROTO_UDP) or not 0 <= protocol <= 255:
            raise ValueError(f"protocol {protocol} is not available for registration")
        self.ip_handlers[protocol] = handler

    def udp_bind(self, port: int) -> None:
        if not 1 <= port <= 0xFFFF:
            raise ValueError(f"UDP port {port} is not in 1..65535")
        if port in self._udp_ports:
            raise ValueError(f"UDP port {port} is already bound")
        self._udp_ports.add(port)

    def udp_unbind(self, port: int) -> None:
        self._udp_ports.discard(port)

    def send_udp(
        self, src_port: int, dst_ip: bytes, dst_port: int, payload: bytes | bytearray | memoryview, now: float
    ) -> bool:
        """Send one datagram; False when it was dropped (no route, ARP queue full).

        Raises ValueError for arguments no datagram could carry (bad ports, a payload
        over the MTU: this stack sets DF and never fragments).
        """
        length = len(payload)
        if length > MAX_UDP_PAYLOAD or not (0 <= src_port <= 0xFFFF and 1 <= dst_port <= 0xFFFF):
            raise ValueError("UDP ports must be 16-bit (destination nonzero) and the payload at most 1472 bytes")
        if len(dst_ip) != 4:
            raise ValueError("the destination must be a 4-byte IPv4 address")
        next_hop, dst_mac = self._resolve(dst_ip, now)
        if next_hop is None:
            return False
        ident = self._ident = (self._ident + 1) & 0xFFFF
        if payload is self._last_rx_payload:
            # Echoing what just arrived: its sum is already known (immutable bytes).
            data_sum = self._last_rx_payload_sum
        else:
            data_sum = fastpath.payload_sum(payload)
        frame = fastpath.udp_frame(
            dst_mac or ethernet.ZERO_MAC,
            self.mac,
            self.ip,
            dst_ip,
            self._ip_sum + fastpath.address_sum(dst_ip),
            self.ttl,
            ident,
            src_port,
            dst_port,
            payload,
            data_sum,
        )
        self.counters.udp.tx_datagrams += 1
        return self._send_frame(next_hop, dst_mac, frame, now)

    def send_ip(self, dst_ip: bytes, protocol: int, payload: bytes | bytearray | memoryview, now: float) -> bool:
        """Send one IPv4 datagram from our address (for transport layers such as TCP)."""
        if len(payload) > MTU - ipv4.HEADER_LEN:
            raise ValueError(f"IPv4 payload of {len(payload)} bytes exceeds the MTU")
        if len(dst_ip) != 4 or not 0 <= protocol <= 255:
            raise ValueError("bad destination address or protocol number")
        next_hop, dst_mac = self._resolve(dst_ip, now)
        if next_hop is None:
            return False
        ident = self._ident = (self._ident + 1) & 0xFFFF
        frame = fastpath.ipv4_frame(
            dst_mac or ethernet.ZERO_MAC,
            self.mac,
            self.ip,
            dst_ip,
            self._ip_sum + fastpath.address_sum(dst_ip),
            self.ttl,
            ident,
            protocol,
            payload,
        )
        return self._send_frame(next_hop, dst_mac, frame, now)

    def send_tcp(self, dst_ip: bytes, segment: TcpSegment, now: float) -> bool:
        """Send one TCP segment from our address.

        With a ``tcp_writer`` (the compiled path), a resolved next hop and nothing queued
        ahead, the frame is built in C straight into a TX buffer; otherwise (or when the
        writer declines: ring full, frame too long) it takes ``send_ip``, unchanged.
        """
        if segment.urgent == 0:
            options = segment.options
            written = self.write_tcp(
                dst_ip, segment.src_port, segment.dst_port, segment.seq, segment.ack, segment.flags,
                segment.window, b"" if options is NO_OPTIONS else options.encode(), segment.payload, now,
            )  # fmt: skip
            if written is not None:
                return written
        return self.send_ip(dst_ip, ipv4.PROTO_TCP, segment.emit(self.ip, dst_ip), now)

    def write_tcp(
        self,
        dst_ip: bytes,
        src_port: int,
        dst_port: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        options: bytes,
        payload: bytes | memoryview,
        now: float,
    ) -> bool | None:
        """The compiled writer's part of ``send_tcp``: True if the frame was posted, False
        if there is no route (counted), None when the general path must take it. The TCP
        layer also calls it directly for segments it has only as header fields."""
        writer = self.tcp_writer
        if writer is None or self.outbox:
            return None
        next_hop, dst_mac = self._resolve(dst_ip, now)
        if next_hop is None:
            return False
        if dst_mac is None:
            return None
        ident = (self._ident + 1) & 0xFFFF
        if not writer(
            dst_mac + self.mac + self.ip + dst_ip, self.ttl, ident,
            src_port, dst_port, seq, ack, flags, window, options, payload,
        ):  # fmt: skip
            return None
        self._ident = ident
        counters = self.counters
        counters.ipv4.tx_packets += 1
        counters.ethernet.tx_frames += 1
        return True

    def receive_burst(self, frames: list[bytes], kinds: list[int], now: float) -> None:
        """Frames from the driver with what C found out about each (``libos.fast.KIND_*``).

        A TCP segment whose checksums C verified, addressed to us from a plausible source,
        goes straight to ``tcp_input_verified``; everything else to ``receive``.
        """
        verified_input = self.tcp_input_verified
        if verified_input is None or len(kinds) != len(frames):
            for frame in frames:
                self.receive(frame, now)
            return
        for frame, kind in zip(frames, kinds):
            if kind == fast.KIND_TCP:
                (
                    dst_mac, src_mac, _ethertype, _ver_ihl, _tos, total_length, _ident,
                    flags_frag, _ttl, _protocol, _checksum, src_ip, dst_ip,
                ) = _TCP_HEADERS_RX.unpack_from(frame, 0)  # fmt: skip
                # The same acceptance as the general path's (see _receive_ipv4): C already
                # saw IPv4, IHL 5, no fragment, protocol 6, lengths that fit, checksums.
                if (
                    dst_mac == self.mac
                    and dst_ip == self.ip
                    and not flags_frag & 0x8000  # the reserved bit
                    and not src_mac[0] & 1
                    and 0 < src_ip[0] < 224
                    and src_ip[0] != 127
                    and src_ip != self.ip
                    and src_ip != self.subnet_broadcast
                ):
                    counters = self.counters
                    counters.ethernet.rx_frames += 1
                    counters.ipv4.rx_packets += 1
                    verified_input(src_ip, dst_ip, frame, 14 + total_length, now)
                    continue
            self.receive(frame, now)

    def _send_frame(self, next_hop: bytes, dst_mac: bytes | None, frame: bytes, now: float) -> bool:
        """Queue an IPv4 frame for the wire, or hold it until ARP resolves its next hop."""
        counters = self.counters
        counters.ipv4.tx_packets += 1
        if dst_mac is not None:
            self.outbox.append(frame)
            counters.ethernet.tx_frames += 1
            return True
        return self._hold(next_hop, frame, now)

    def send_echo_request(self, dst_ip: bytes, ident: int, sequence: int, data: bytes, now: float) -> bool:
        """Ping: an ICMP echo request; the answer arrives as an ``EchoReply`` event."""
        sent = self.send_ip(dst_ip, ipv4.PROTO_ICMP, icmp.build_echo(True, ident, sequence, data), now)
        if sent:
            self.counters.icmp.tx_echo_requests += 1
        return sent

    def next_deadline(self) -> float | None:
        """When ``on_timer`` next has work (ARP retries), or None when idle."""
        return self.arp.next_deadline()

    def on_timer(self, now: float) -> None:
        retry, failed = self.arp.poll(now)
        for target in retry:
            self._send_arp_request(target, ethernet.BROADCAST_MAC)
        for target, dropped in failed:
            self.counters.arp.resolution_failures += 1
            self.counters.arp.drop_unresolved += dropped
            self.events.append(ArpResolutionFailed(target, dropped))


    def receive(self, frame: bytes | bytearray | memoryview, now: float) -> None:
        """Handle one received frame. Never raises on any content: drops and counts."""
        size = len(frame)
        if self._fast_path and size >= fastpath.UDP_HEADERS_LEN:
            (
                dst_mac, src_mac, ethertype,
                ver_ihl, total_length, flags_frag, protocol, src_ip, dst_ip,
                src_port, dst_port, udp_length, udp_checksum,
            ) = fastpath.UDP_HEADERS_RX.unpack_from(frame, 0)  # fmt: skip
            # The lane takes only what the general path would certainly accept and
            # deliver; every other frame falls through to it unchanged.
            if (
                ethertype == _IPV4
                and ver_ihl == 0x45
                and protocol == _UDP
                and dst_mac == self.mac
                and dst_ip == self.ip
                and not flags_frag & 0xBFFF  # no MF, no offset, no reserved bit; DF is fine
                and udp_length + 20 == total_length
                and total_length + 14 <= size
                and udp_length >= 8
                and dst_port in self._udp_ports
                and not src_mac[0] & 1
                and 0 < src_ip[0] < 224
                and src_ip[0] != 127
                and src_ip != self.ip
                and src_ip != self.subnet_broadcast
                and fastpath.ipv4_header_ok(frame)
            ):
                payload = bytes(frame[42 : 34 + udp_length])
                if udp_checksum:
                    if not fastpath.udp_checksum_ok(frame, udp_length):
                        self._receive_general(frame, now)  # counts the bad checksum
                        return
                    self._last_rx_payload = payload
                    self._last_rx_payload_sum = fastpath.payload_sum_of_verified(
                        self._ip_sum + int.from_bytes(src_ip, "big"), src_port, dst_port, udp_length, udp_checksum
                    )
                counters = self.counters
                counters.ethernet.rx_frames += 1
                counters.ipv4.rx_packets += 1
                counters.udp.rx_datagrams += 1
                self.events.append(UdpDatagram(dst_port, src_ip, src_port, payload))
                return
        self._receive_general(frame, now)

    def _receive_general(self, frame: bytes | bytearray | memoryview, now: float) -> None:
        counters = self.counters.ethernet
        counters.rx_frames += 1
        try:
            eth = ethernet.parse(frame)
        except WireError:
            counters.drop_malformed += 1
            return
        if eth.dst != self.mac and eth.dst != ethernet.BROADCAST_MAC:
            counters.drop_not_for_us += 1
            return
        if eth.ethertype == ethernet.ETHERTYPE_IPV4:
            self._receive_ipv4(eth.payload, now)
        elif eth.ethertype == ethernet.ETHERTYPE_ARP:
            self._receive_arp(eth.payload, now)
        else:
            counters.drop_unknown_ethertype += 1

    def _receive_arp(self, payload: bytes, now: float) -> None:
        counters = self.counters.arp
        try:
            packet = arp.parse(payload)
        except WireError:
            counters.drop_malformed += 1
            return
        if packet.operation == arp.OP_REQUEST:
            counters.rx_requests += 1
        else:
            counters.rx_replies += 1
        sender_ip = packet.sender_ip
        if ethernet.is_multicast_mac(packet.sender_mac) or packet.sender_mac == self.mac:
            counters.drop_bad_sender += 1
            return
        if sender_ip == self.ip:
            # RFC 5227 2.4: another host uses our address. We keep it (no defence
            # policy yet) and must not learn a mapping for ourselves.
            counters.address_conflicts += 1
            return
        for_us = packet.target_ip == self.ip
        if sender_ip == ipv4.ANY:
            # RFC 5227 2.1.1: an address probe. Never learn from it, but answer it when
            # it asks about our address, which defends the address.
            pass
        elif not ipv4.is_unicast_source(sender_ip) or sender_ip == self.subnet_broadcast or not self._on_link(sender_ip):
            counters.drop_bad_sender += 1
            return
        else:
            released = self.arp.update(sender_ip, packet.sender_mac, now, create=for_us)
            self._release(released, packet.sender_mac)
        if for_us and packet.operation == arp.OP_REQUEST:
            reply = arp.build(arp.OP_REPLY, self.mac, self.ip, packet.sender_mac, sender_ip)
            self._transmit(packet.sender_mac, ethernet.ETHERTYPE_ARP, reply)
            counters.tx_replies += 1

    def _receive_ipv4(self, payload: bytes, now: float) -> None:
        counters = self.counters.ipv4
        counters.rx_packets += 1
        try:
            packet = ipv4.parse(payload)
        except ChecksumError:
            counters.drop_checksum += 1
            return
        except WireError:
            counters.drop_malformed += 1
            return
        dst = packet.dst
        if dst != self.ip and dst != ipv4.BROADCAST and dst != self.subnet_broadcast:
            counters.drop_not_for_us += 1
            return
        src = packet.src
        if src == self.ip or src == self.subnet_broadcast or src == ipv4.ANY:
            # RFC 1122 3.2.1.3: a directed broadcast is never a source, and 0.0.0.0 only
            # while a host boots (DHCP, which this stack does not serve); our own address
            # coming back from the link is a loop or a spoof. Answering any of them
            # would send traffic nowhere or to everyone.
            counters.drop_bad_source += 1
            return
        if packet.is_fragment:
            # No reassembly (RFC 791 3.2): the stack sets DF on everything it sends.
            counters.drop_fragment += 1
            return
        raw = payload[: packet.header_len + len(packet.payload)]
        handler = self.ip_handlers.get(packet.protocol)
        if handler is None:
            counters.drop_unknown_protocol += 1
            # RFC 1122 3.2.2.1: a host SHOULD say "protocol unreachable".
            self._send_icmp_error(icmp.CODE_PROTOCOL_UNREACHABLE, packet, raw, now)
            return
        try:
            handler(packet, raw, now)
        except WireError:
            counters.drop_malformed += 1

    def _receive_icmp(self, packet: ipv4.Ipv4Packet, raw: bytes, now: float) -> None:
        counters = self.counters.icmp
        counters.rx_messages += 1
        try:
            message = icmp.parse(packet.payload)
        except ChecksumError:
            counters.drop_checksum += 1
            return
        except WireError:
            counters.drop_malformed += 1
            return
        if isinstance(message, icmp.IcmpEcho):
            if not message.is_request:
                counters.rx_echo_replies += 1
                self.events.append(EchoReply(packet.src, message.ident, message.sequence, message.data))
                return
            counters.rx_echo_requests += 1
            if packet.dst != self.ip:
                counters.drop_broadcast_echo += 1
                return
            if len(message.data) > MAX_ECHO_DATA:
                # Only a link with a larger MTU than ours could carry it; our reply could
                # not go back the same way, and we never fragment.
                counters.drop_oversized += 1
                return
            # RFC 1122 3.2.2.6: the reply carries the request's identifier, sequence
            # number and all of its data.
            reply = icmp.build_echo(False, message.ident, message.sequence, message.data)
            if self.send_ip(packet.src, ipv4.PROTO_ICMP, reply, now):
                counters.tx_echo_replies += 1
        elif isinstance(message, icmp.IcmpDestUnreachable):
            counters.rx_dest_unreachable += 1
            self.events.append(DestinationUnreachable(packet.src, message.code, message.original))
        else:
            counters.rx_other += 1

    def _receive_udp(self, packet: ipv4.Ipv4Packet, raw: bytes, now: float) -> None:
        counters = self.counters.udp
        counters.rx_datagrams += 1
        try:
            datagram = udp.parse(packet.payload, packet.src, packet.dst)
        except ChecksumError:
            counters.drop_checksum += 1
            return
        except WireError:
            counters.drop_malformed += 1
            return
        if datagram.dst_port in self._udp_ports:
            self.events.append(UdpDatagram(datagram.dst_port, packet.src, datagram.src_port, datagram.payload))
            return
        counters.drop_no_port += 1
        self._send_icmp_error(icmp.CODE_PORT_UNREACHABLE, packet, raw, now)


    def learn_neighbour(self, ip: bytes, mac: bytes, now: float) -> None:
        """Take ``ip`` at ``mac`` from a frame it sent us (gleaning, as lwIP's
        ETHARP_TRUST_IP_MAC does), for a queue that never sees ARP replies: with
        receive-side scaling, ARP reaches only a function's first queue, while a worker on
        another queue must still answer the peers whose flows land there. Only an
        on-link unicast source is learnt; what waited on it goes out."""
        if mac[0] & 1 or not ipv4.is_unicast_source(ip) or ip == self.subnet_broadcast or not self._on_link(ip):
            return
        released = self.arp.update(ip, mac, now, create=True)
        self._release(released, mac)

    def _on_link(self, addr: bytes) -> bool:
        return int.from_bytes(addr, "big") & self._netmask == self._network

    def _resolve(self, dst_ip: bytes, now: float) -> tuple[bytes | None, bytes | None]:
        """(next hop, its MAC if known); next hop None means no route (counted)."""
        if dst_ip == ipv4.BROADCAST or dst_ip == self.subnet_broadcast:
            return dst_ip, ethernet.BROADCAST_MAC
        first = dst_ip[0]
        if first == 0 or first == 127 or first >= 224 or dst_ip == self.ip:
            # This network, loopback, multicast/class E (unsupported), or ourselves: no
            # link can carry it (RFC 1122 3.2.1.3).
            self.counters.ipv4.drop_no_route += 1
            return None, None
        if self._on_link(dst_ip):
            next_hop = dst_ip
        elif self.gateway is not None:
            next_hop = self.gateway
        else:
            self.counters.ipv4.drop_no_route += 1
            return None, None
        arp_cache = self.arp
        mac = arp_cache.lookup(next_hop, now)
        if arp_cache.refresh_wanted:
            for target, known_mac in arp_cache.refresh_wanted:
                self._send_arp_request(target, known_mac)
            arp_cache.refresh_wanted.clear()
        return next_hop, mac

    def _hold(self, next_hop: bytes, frame: bytes, now: float) -> bool:
        """Queue a frame (destination MAC still zero) until ``next_hop`` resolves."""
        outcome = self.arp.enqueue(next_hop, bytearray(frame), now)
        if outcome is Enqueued.FULL:
            self.counters.arp.drop_queue_full += 1
            return False
        if outcome is Enqueued.NEW:
            self._send_arp_request(next_hop, ethernet.BROADCAST_MAC)
        return True

    def _release(self, frames: list[bytearray], mac: bytes) -> None:
        for frame in frames:
            frame[0:6] = mac
            self.outbox.append(bytes(frame))
            self.counters.ethernet.tx_frames += 1

    def _transmit(self, dst_mac: bytes, ethertype: int, payload: bytes) -> None:
        self.outbox.append(ethernet.header(dst_mac, self.mac, ethertype) + payload)
        self.counters.ethernet.tx_frames += 1

    def _send_arp_request(self, target_ip: bytes, dst_mac: bytes) -> None:
        # The target hardware address is zero: RFC 826 leaves it unspecified and RFC 5227
        # 2.1.1 asks for zeros.
        request = arp.build(arp.OP_REQUEST, self.mac, self.ip, ethernet.ZERO_MAC, target_ip)
        self._transmit(dst_mac, ethernet.ETHERTYPE_ARP, request)
        self.counters.arp.tx_requests += 1

    def _send_icmp_error(self, code: int, packet: ipv4.Ipv4Packet, raw: bytes, now: float) -> None:
        # RFC 1122 3.2.2: no ICMP error about a datagram sent to a broadcast or multicast
        # address or from an address that is not one host. (Errors about ICMP errors and
        # about fragments cannot reach here: ICMP is always handled, fragments dropped.)
        if packet.dst != self.ip or not ipv4.is_unicast_source(packet.src):
            return
        if not self._icmp_error_allowed(now):
            self.counters.icmp.drop_rate_limited += 1
            return
        message = icmp.build_dest_unreachable(code, raw)
        if self.send_ip(packet.src, ipv4.PROTO_ICMP, message, now):
            self.counters.icmp.tx_dest_unreachable += 1

    def _icmp_error_allowed(self, now: float) -> bool:
        # A token bucket, as RFC 1812 4.3.2.8 suggests, so that a flood towards closed
        # ports cannot turn the stack into a reflector (Linux: icmp_msgs_per_sec/burst).
        if self._icmp_tokens_at is not None and now > self._icmp_tokens_at:
            elapsed = now - self._icmp_tokens_at
            self._icmp_tokens = min(self._icmp_error_burst, self._icmp_tokens + elapsed * self._icmp_error_rate)
        if self._icmp_tokens_at is None or now > self._icmp_tokens_at:
            self._icmp_tokens_at = now
        if self._icmp_tokens < 1.0:
            return False
        self._icmp_tokens -= 1.0
        return True
