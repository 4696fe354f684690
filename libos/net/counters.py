"""Per-layer counters of the network stack.

One mutable dataclass per layer, so a test can compare a layer's counters whole
(``stack.counters.udp == UdpCounters(rx_datagrams=1, ...)``). ``rx_*`` counts what
reached the layer, ``tx_*`` what it sent, ``drop_*`` what it refused, by reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class EthernetCounters:
    rx_frames: int = 0
    tx_frames: int = 0
    drop_malformed: int = 0
    drop_not_for_us: int = 0
    drop_unknown_ethertype: int = 0


@dataclass(slots=True)
class ArpCounters:
    rx_requests: int = 0
    rx_replies: int = 0
    tx_requests: int = 0
    tx_replies: int = 0
    drop_malformed: int = 0
    drop_bad_sender: int = 0  # group MAC, our own MAC, or a non-unicast sender address
    address_conflicts: int = 0  # someone else claims our IPv4 address (RFC 5227 2.4)
    resolution_failures: int = 0  # gave up after the last retry
    drop_unresolved: int = 0  # queued packets dropped when resolution failed
    drop_queue_full: int = 0  # packets refused because the per-address queue was full


@dataclass(slots=True)
class Ipv4Counters:
    rx_packets: int = 0
    tx_packets: int = 0
    drop_malformed: int = 0
    drop_checksum: int = 0
    drop_not_for_us: int = 0
    drop_bad_source: int = 0  # 0.0.0.0, our own address, or the subnet broadcast
    drop_fragment: int = 0
    drop_unknown_protocol: int = 0
    drop_no_route: int = 0


@dataclass(slots=True)
class IcmpCounters:
    rx_messages: int = 0
    rx_echo_requests: int = 0
    rx_echo_replies: int = 0
    rx_dest_unreachable: int = 0
    rx_other: int = 0
    tx_echo_requests: int = 0
    tx_echo_replies: int = 0
    tx_dest_unreachable: int = 0
    drop_malformed: int = 0
    drop_checksum: int = 0
    drop_broadcast_echo: int = 0  # RFC 1122 3.2.2.6 allows ignoring these; Linux does
    drop_oversized: int = 0  # an echo request whose reply would not fit our MTU
    drop_rate_limited: int = 0  # errors not sent because of the rate limit


@dataclass(slots=True)
class UdpCounters:
    rx_datagrams: int = 0
    tx_datagrams: int = 0
    drop_malformed: int = 0
    drop_checksum: int = 0
    drop_no_port: int = 0


@dataclass(slots=True)
class StackCounters:
    ethernet: EthernetCounters = field(default_factory=EthernetCounters)
    arp: ArpCounters = field(default_factory=ArpCounters)
    ipv4: Ipv4Counters = field(default_factory=Ipv4Counters)
    icmp: IcmpCounters = field(default_factory=IcmpCounters)
    udp: UdpCounters = field(default_factory=UdpCounters)
