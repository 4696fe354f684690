"""The VNIC's filter table: which function and queue a received frame goes to, and whether a
function may transmit a frame (anti-spoofing). Pure logic, no I/O.

The model is an OpenFlow-style table of *match / action / stats* entries, as a NIC's flow
director would hold them:

* **Receive filters** match (EtherType, IP protocol, destination IP, destination port) and
  deliver to ``(function_id, queue)``. A match with every field set is *exact* and lives in
  a dict, so a lookup costs the same whatever the number of filters; any other match is a
  *wildcard*, tried in priority order (lower number first, then oldest first) only after the
  exact lookup missed.
* **Address grants** say which IPv4 addresses a function owns. ARP frames are replicated to
  every function granted the ARP target address and also to the default function, which
  belongs to the control plane (it answers ARP for the NIC's addresses); a function may
  transmit ARP only with a granted sender address.
* **MAC grants** say which Ethernet address a function sends from. Every frame a function
  transmits must carry it as its Ethernet source, and an ARP frame also as its sender
  hardware address: a forged one would teach the bridge's forwarding table and the
  neighbours' ARP caches to send someone else's traffic here. A function without a MAC
  grant sends nothing.
* **Transmit filters** are the same predicates on *source* fields: a function may send an
  IPv4 frame only if one of its transmit filters matches (protocol, source IP, source port).
* Frames that match nothing, and anything that is not a well-formed frame, go to the
  default function on queue 0: the control plane answers ICMP echo and sends RST / port
  unreachable for unclaimed ports, like a Linux host, and drops what it cannot parse.

Classification never counts. :meth:`FilterTable.classify_rx` gives ``(function, queue)``
pairs, :meth:`FilterTable.classify_rx_deliveries` the same with each filter id; the device
counts with :meth:`FilterTable.record_rx` and :meth:`FilterTable.record_tx` once it knows
what happened, so a frame dropped because the queue was full (or the rate limiter said no)
is a drop, not a delivery.

The classifier reads fixed header offsets itself, as NIC hardware does, rather than running
a full codec: one precompiled ``struct`` reads the Ethernet and fixed IPv4 fields at once.
Frames are bytes-like objects of bytes (``bytes``, ``bytearray``, a byte ``memoryview``).
"""

from __future__ import annotations

import bisect
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final, NamedTuple

from vdev.layout import MAX_RINGS
from vdev.vnic.flows import Flow, FlowError, FlowTable

DEFAULT_FUNCTION: Final = 0  # owned by the control plane (kernelctl)
DEFAULT_QUEUE: Final = 0  # where the default function and ARP copies receive

# Pseudo filter ids carried by a Delivery or a transmit verdict; real filter ids start at 1.
UNMATCHED: Final = 0  # no filter matched: the default function got the frame
ADDRESS_GRANT: Final = -1  # ARP, delivered or allowed because of an address grant
TX_REFUSED: Final = -2  # transmit verdict: the frame's source was not granted
FLOW_COPY: Final = -3  # a controller flow's second and later deliveries (counted once)

# Pseudo function ids of a Delivery made by a controller flow (vdev.vnic.flows).
DROP_FUNCTION: Final = -1  # the flow drops the frame
CONTROLLER_FUNCTION: Final = -2  # the frame goes to the controller (a packet-in)

ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_ARP: Final = 0x0806
# IEEE 802.3: values below 0x0600 in the type field are lengths, not EtherTypes.
MIN_ETHERTYPE: Final = 0x0600
IPPROTO_ICMP: Final = 1
IPPROTO_TCP: Final = 6
IPPROTO_UDP: Final = 17
_PORT_PROTOCOLS: Final = frozenset((IPPROTO_TCP, IPPROTO_UDP))
_PROTOCOL_NAMES: Final = {IPPROTO_ICMP: "icmp", IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}

ETH_HEADER_LEN: Final = 14
IPV4_MIN_HEADER_LEN: Final = 20
# RFC 791 3.1: the fragment offset is the low 13 bits of the flags/offset word.
_FRAGMENT_OFFSET_MASK: Final = 0x1FFF
# RFC 826 over Ethernet (hardware type 1) carrying IPv4: 6-byte MACs, 4-byte addresses.
_ARP_HTYPE_ETHERNET: Final = 1
_ARP_OPERATIONS: Final = frozenset((1, 2))  # request, reply

MAX_QUEUES: Final = MAX_RINGS // 2  # each queue pair takes an RX and a TX ring block
MAX_FUNCTION_ID: Final = 0xFFFFFFFF  # the function_id register is a u32
MAX_PRIORITY: Final = 0xFFFF  # OpenFlow priorities are u16 as well

# Ethernet header and the fixed part of the IPv4 header (RFC 791 3.1) in one read:
# ethertype @12, version/IHL @14, total length @16, flags/fragment offset @20,
# protocol @23, source address @26, destination address @30.
_ETH_IPV4: Final = struct.Struct("!12xHBxH2xHxB2x4s4s")
# ARP for IPv4 over Ethernet (RFC 826): ethertype @12, htype @14, ptype @16, hlen @18,
# plen @19, oper @20, sender MAC @22, sender IP @28, target MAC @32, target IP @38.
_ETH_ARP: Final = struct.Struct("!12xHHHBBH6s4s6x4s")
# The Ethernet source address, bytes 6..12 of the header.
_ETH_SOURCE: Final = slice(6, 12)
_ETHERTYPE: Final = struct.Struct("!H")
# UDP (RFC 768) and TCP (RFC 9293 3.1) both start with source port, destination port.
_PORTS: Final = struct.Struct("!HH")


class FilterError(Exception):
    """Base class of the filter table's errors."""


class InvalidMatch(FilterError, ValueError):
    """A match, function id, queue or priority that the table cannot hold."""


class FilterConflict(FilterError):
    """The new filter would take traffic that another filter already holds."""


class UnknownFilter(FilterError, LookupError):
    """No filter with that id."""


class Delivery(NamedTuple):
    """Where one received frame goes, and which filter sent it there (for the counters)."""

    function_id: int
    queue: int
    filter_id: int


def _check_int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass; a True port is a caller bug, not port 1.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidMatch(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Match:
    """A predicate on a frame. Receive filters read destination fields, transmit filters
    source fields. ``None`` is a wildcard; a match with every field set is exact.

    A port needs the protocol to be TCP or UDP (other protocols have no ports), and a
    non-IPv4 EtherType can match only on itself (the classifier parses IPv4 only).
    """

    ethertype: int = ETHERTYPE_IPV4
    ip_proto: int | None = None
    ip: bytes | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        _check_int("ethertype", self.ethertype, MIN_ETHERTYPE, 0xFFFF)
        if self.ethertype == ETHERTYPE_ARP:
            raise InvalidMatch("ARP is not filtered by match: grant the address instead")
        if self.ethertype != ETHERTYPE_IPV4:
            if self.ip_proto is not None or self.ip is not None or self.port is not None:
                raise InvalidMatch(
                    f"ethertype {self.ethertype:#06x} can match only on the ethertype"
                )
            return
        if self.ip_proto is not None:
            _check_int("ip_proto", self.ip_proto, 0, 255)
        if self.ip is not None and (not isinstance(self.ip, bytes) or len(self.ip) != 4):
            raise InvalidMatch(f"ip must be 4 bytes (network order), got {self.ip!r}")
        if self.port is not None:
            _check_int("port", self.port, 0, 0xFFFF)
            if self.ip_proto not in _PORT_PROTOCOLS:
                raise InvalidMatch("a port match needs ip_proto TCP (6) or UDP (17)")

    @property
    def is_exact(self) -> bool:
        return self.ip_proto is not None and self.ip is not None and self.port is not None

    def describe(self) -> str:
        """A short human form for messages and ``kernelctl status``."""
        if self.ethertype != ETHERTYPE_IPV4:
            return f"ethertype {self.ethertype:#06x}"
        if self.ip_proto is None:
            proto = "ip"
        else:
            proto = _PROTOCOL_NAMES.get(self.ip_proto, f"proto {self.ip_proto}")
        host = "*" if self.ip is None else str(ipaddress.IPv4Address(self.ip))
        if self.ip_proto in _PORT_PROTOCOLS:
            return f"{proto} {host}:{'*' if self.port is None else self.port}"
        return f"{proto} {host}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ethertype": self.ethertype,
            "ip_proto": self.ip_proto,
            "ip": None if self.ip is None else str(ipaddress.IPv4Address(self.ip)),
            "port": self.port,
        }


class _Route:
    """Where a class of frames goes, in both forms the classifier hands out. Built once
    when the table changes and returned for every frame: the hit path allocates nothing."""

    __slots__ = ("pairs", "deliveries")

    def __init__(self, deliveries: tuple[Delivery, ...]) -> None:
        self.deliveries = deliveries
        self.pairs = tuple((d.function_id, d.queue) for d in deliveries)


@dataclass(slots=True, eq=False)
class _Rule:
    filter_id: int
    direction: str  # "rx" or "tx"
    function_id: int
    queue: int
    match: Match
    priority: int
    route: _Route
    # The match fields again, as plain attributes, for the wildcard loop.
    ethertype: int
    ip_proto: int | None
    ip: bytes | None
    port: int | None
    packets: int = 0
    bytes: int = 0
    drops: int = 0


@dataclass(slots=True)
class _FunctionCounters:
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_drops: int = 0
    tx_spoofed: int = 0


_ExactKey = tuple[int, int, bytes, int]  # (ethertype, protocol, address, port)


class FilterTable:
    """Receive classification, transmit checks and their counters for one VNIC."""

    def __init__(self) -> None:
        self._next_id = 1
        self._rules: dict[int, _Rule] = {}
        self._rx_exact: dict[_ExactKey, _Rule] = {}
        self._rx_wildcards: dict[int, list[_Rule]] = {}  # ethertype -> rules, tried in order
        # Exact transmit sources are shared: two functions sending from one (protocol,
        # address, port) could inject into each other's connections.
        self._tx_exact: dict[_ExactKey, _Rule] = {}
        self._tx_wildcards: dict[int, list[_Rule]] = {}  # function -> rules
        self._grants: dict[int, set[bytes]] = {}  # function -> addresses
        self._macs: dict[int, bytes] = {}  # function -> the Ethernet address it sends from
        self._arp_targets: dict[bytes, _Route] = {}  # address -> copies
        self._counters: dict[int, _FunctionCounters] = {}
        self._unmatched = 0
        self._default = _Route((Delivery(DEFAULT_FUNCTION, DEFAULT_QUEUE, UNMATCHED),))
        # Controller flows, for frames no claimed filter takes; their ids share the
        # filters' id space so that a Delivery names either without ambiguity.
        self.flows = FlowTable()
        self._flow_routes: dict[int, _Route] = {}

    # --- programming (control plane) ----------------------------------------------

    def add_rx(self, function_id: int, queue: int, match: Match, priority: int = 100) -> int:
        """Deliver frames matching ``match`` to ``(function_id, queue)``; returns the id.

        Raises :class:`FilterConflict` if an exact match is already held, or a wildcard
        with the same match and priority exists (one of the two could never be hit).
        """
        self._check_owner(function_id, queue, priority, match)
        if match.is_exact:
            key = _exact_key(match)
            held = self._rx_exact.get(key)
            if held is not None:
                raise FilterConflict(
                    f"receive {match.describe()} is already held by function "
                    f"{held.function_id} queue {held.queue} (filter {held.filter_id})"
                )
            rule = self._new_rule("rx", function_id, queue, match, priority)
            self._rx_exact[key] = rule
            return rule.filter_id
        wildcards = self._rx_wildcards.setdefault(match.ethertype, [])
        for held in wildcards:
            if held.match == match and held.priority == priority:
                raise FilterConflict(
                    f"receive {match.describe()} at priority {priority} is already held by "
                    f"function {held.function_id} queue {held.queue} (filter {held.filter_id})"
                )
        rule = self._new_rule("rx", function_id, queue, match, priority)
        bisect.insort(wildcards, rule, key=_wildcard_order)
        return rule.filter_id

    def add_tx(self, function_id: int, match: Match) -> int:
        """Allow ``function_id`` to send IPv4 frames whose source fields match ``match``."""
        self._check_owner(function_id, DEFAULT_QUEUE, 0, match)
        if match.ethertype != ETHERTYPE_IPV4:
            raise InvalidMatch("transmit filters cover IPv4; ARP is allowed by grant_address")
        if match.is_exact:
            key = _exact_key(match)
            held = self._tx_exact.get(key)
            if held is not None:
                raise FilterConflict(
                    f"transmit from {match.describe()} is already held by function "
                    f"{held.function_id} (filter {held.filter_id})"
                )
            rule = self._new_rule("tx", function_id, DEFAULT_QUEUE, match, 0)
            self._tx_exact[key] = rule
            return rule.filter_id
        rules = self._tx_wildcards.setdefault(function_id, [])
        for held in rules:
            if held.match == match:
                raise FilterConflict(
                    f"transmit from {match.describe()} is already allowed to function "
                    f"{function_id} (filter {held.filter_id})"
                )
        rule = self._new_rule("tx", function_id, DEFAULT_QUEUE, match, 0)
        rules.append(rule)
        return rule.filter_id

    def grant_address(self, function_id: int, ip: bytes) -> None:
        """Give ``function_id`` the IPv4 address ``ip``: it receives ARP for it and may send
        ARP from it. Granting twice is harmless; several functions may share an address
        (they are told apart by their port filters)."""
        self._check_function(function_id)
        if not isinstance(ip, bytes) or len(ip) != 4:
            raise InvalidMatch(f"ip must be 4 bytes (network order), got {ip!r}")
        self._grants.setdefault(function_id, set()).add(ip)
        self._counters.setdefault(function_id, _FunctionCounters())
        self._rebuild_arp_target(ip)

    def grant_mac(self, function_id: int, mac: bytes) -> None:
        """``function_id`` sends from Ethernet address ``mac`` (replacing an earlier grant):
        the only source its frames, and sender its ARP frames, may carry."""
        self._check_function(function_id)
        if not isinstance(mac, bytes) or len(mac) != 6:
            raise InvalidMatch(f"mac must be 6 bytes, got {mac!r}")
        if mac[0] & 0x01:
            raise InvalidMatch("a group (multicast) address is never a source")
        self._macs[function_id] = mac
        self._counters.setdefault(function_id, _FunctionCounters())

    def revoke_address(self, function_id: int, ip: bytes) -> None:
        addresses = self._grants.get(function_id)
        if addresses is None or ip not in addresses:
            raise UnknownFilter(f"function {function_id} holds no grant for {ip!r}")
        addresses.discard(ip)
        self._rebuild_arp_target(ip)

    def remove(self, filter_id: int) -> None:
        rule = self._rules.pop(filter_id, None)
        if rule is None:
            raise UnknownFilter(f"no filter {filter_id}")
        if rule.direction == "rx":
            if rule.match.is_exact:
                del self._rx_exact[_exact_key(rule.match)]
            else:
                self._rx_wildcards[rule.ethertype].remove(rule)
        elif rule.match.is_exact:
            del self._tx_exact[_exact_key(rule.match)]
        else:
            self._tx_wildcards[rule.function_id].remove(rule)

    def remove_port(self, function_id: int, ip_proto: int, port: int) -> list[int]:
        """Remove the function's receive and transmit filters for ``ip_proto``/``port`` (a
        claim taken back); returns their ids."""
        removed = sorted(
            filter_id
            for filter_id, rule in self._rules.items()
            if rule.function_id == function_id and rule.ip_proto == ip_proto and rule.port == port
        )
        for filter_id in removed:
            self.remove(filter_id)
        return removed

    def remove_function(self, function_id: int) -> list[int]:
        """Tear a function down: its filters, grants and counters. Returns the removed
        filter ids (teardown is rare, so a scan of all filters is fine)."""
        removed = sorted(
            filter_id
            for filter_id, rule in self._rules.items()
            if rule.function_id == function_id
        )
        for filter_id in removed:
            self.remove(filter_id)
        self._tx_wildcards.pop(function_id, None)
        self._macs.pop(function_id, None)
        for ip in self._grants.pop(function_id, set()):
            self._rebuild_arp_target(ip)
        self._counters.pop(function_id, None)
        return removed

    def add_flow(
        self,
        priority: int,
        fields: dict[str, tuple[int, int]],
        outputs: Sequence[tuple[int, int]],
        to_controller: bool = False,
        controller_len: int = 0,
        meter: int = 0,
    ) -> int:
        """A controller flow (see ``vdev.vnic.flows``): frames that no claimed filter takes
        and that match ``fields`` go to ``outputs`` ((function, queue) pairs; the default
        function among them), to the controller, or nowhere. Returns the flow id."""
        for function_id, queue in outputs:
            self._check_function(function_id)
            _check_int("queue", queue, 0, MAX_QUEUES - 1)
        if len(set(outputs)) != len(outputs):
            raise InvalidMatch("the same output twice")
        flow_id = self._next_id
        flow = Flow(flow_id, priority, dict(fields), tuple(outputs), to_controller, controller_len, meter)
        try:
            self.flows.add(flow)
        except FlowError as exc:
            raise InvalidMatch(str(exc)) from None
        self._next_id += 1
        deliveries = [Delivery(fid, queue, flow_id) for fid, queue in outputs]
        if to_controller:
            # First, so that it keeps the flow id: the device looks the flow up by it.
            deliveries.insert(0, Delivery(CONTROLLER_FUNCTION, DEFAULT_QUEUE, flow_id))
        if not deliveries:
            deliveries.append(Delivery(DROP_FUNCTION, DEFAULT_QUEUE, flow_id))
        # The flow's counters count a frame once, however many copies it makes.
        deliveries[1:] = [d._replace(filter_id=FLOW_COPY) for d in deliveries[1:]]
        self._flow_routes[flow_id] = _Route(tuple(deliveries))
        return flow_id

    def remove_flow(self, flow_id: int) -> dict[str, int]:
        """Remove a controller flow; returns its final counters."""
        try:
            flow = self.flows.remove(flow_id)
        except FlowError:
            raise UnknownFilter(f"no flow {flow_id}") from None
        del self._flow_routes[flow_id]
        return {"packets": flow.packets, "bytes": flow.bytes, "drops": flow.drops}

    # --- data path (device) -------------------------------------------------------

    def classify_rx(self, frame: bytes | bytearray | memoryview) -> Sequence[tuple[int, int]]:
        """Where a received frame goes: ``(function_id, queue)`` pairs, one, or several for
        a replicated ARP frame. Never raises; anything that is not a well-formed frame goes
        to the default function. The returned sequence is shared: do not modify it."""
        return self._route(frame).pairs

    def classify_rx_deliveries(
        self, frame: bytes | bytearray | memoryview
    ) -> Sequence[Delivery]:
        """As :meth:`classify_rx`, with the filter id of each delivery, for
        :meth:`record_rx`."""
        return self._route(frame).deliveries

    def _route(self, frame: bytes | bytearray | memoryview) -> _Route:
        route = self._route_claimed(frame)
        # The control plane's filters and grants come first: a controller steers only what
        # they would hand to the default function.
        if route is self._default and self._flow_routes:
            flow = self.flows.lookup(frame)
            if flow is not None:
                return self._flow_routes[flow.flow_id]
        return route

    def _route_claimed(self, frame: bytes | bytearray | memoryview) -> _Route:
        length = len(frame)
        if length < _ETH_IPV4.size:
            return self._classify_short(frame, length)
        ethertype, version_ihl, total_length, fragment, proto, _src, dst = _ETH_IPV4.unpack_from(
            frame
        )
        if ethertype != ETHERTYPE_IPV4:
            if ethertype == ETHERTYPE_ARP:
                return self._classify_arp(frame, length)
            return self._classify_other(ethertype)
        header_length = (version_ihl & 0x0F) * 4
        # RFC 791 3.1: version 4, IHL at least 5 words, the total length covers the header
        # and fits in the frame (Ethernet may pad a short packet, never cut one).
        if (
            version_ihl >> 4 != 4
            or header_length < IPV4_MIN_HEADER_LEN
            or total_length < header_length
            or ETH_HEADER_LEN + total_length > length
        ):
            return self._default
        port: int | None = None
        # Only the first fragment (offset 0) carries the transport header.
        if proto in _PORT_PROTOCOLS and not fragment & _FRAGMENT_OFFSET_MASK:
            if total_length < header_length + _PORTS.size:
                return self._default
            _src_port, port = _PORTS.unpack_from(frame, ETH_HEADER_LEN + header_length)
            hit = self._rx_exact.get((ETHERTYPE_IPV4, proto, dst, port))
            if hit is not None:
                return hit.route
        for rule in self._rx_wildcards.get(ETHERTYPE_IPV4, ()):
            if (
                (rule.ip_proto is None or rule.ip_proto == proto)
                and (rule.ip is None or rule.ip == dst)
                and (rule.port is None or rule.port == port)
            ):
                return rule.route
        return self._default

    def classify_tx(self, function_id: int, frame: bytes | bytearray | memoryview) -> int:
        """The transmit verdict: the id of the filter that allows the frame,
        :data:`ADDRESS_GRANT` for a granted ARP frame, or :data:`TX_REFUSED`. Never raises.

        Every frame must come from the function's granted MAC; an ARP frame must also name
        it as the sender hardware address, with a granted sender IPv4 address.
        A non-first IPv4 fragment has no ports, so only a filter without a port allows it;
        the libOS sets DF and does not fragment.
        """
        length = len(frame)
        if length < _ETH_IPV4.size:
            return TX_REFUSED
        mac = self._macs.get(function_id)
        if mac is None or frame[_ETH_SOURCE] != mac:
            return TX_REFUSED
        ethertype, version_ihl, total_length, fragment, proto, src, _dst = _ETH_IPV4.unpack_from(
            frame
        )
        if ethertype == ETHERTYPE_ARP:
            sender = _arp_sender(frame, length)
            if (
                sender is not None
                and sender[0] == mac
                and sender[1] in self._grants.get(function_id, ())
            ):
                return ADDRESS_GRANT
            return TX_REFUSED
        if ethertype != ETHERTYPE_IPV4:
            return TX_REFUSED
        header_length = (version_ihl & 0x0F) * 4
        if (
            version_ihl >> 4 != 4
            or header_length < IPV4_MIN_HEADER_LEN
            or total_length < header_length
            or ETH_HEADER_LEN + total_length > length
        ):
            return TX_REFUSED
        port: int | None = None
        if proto in _PORT_PROTOCOLS and not fragment & _FRAGMENT_OFFSET_MASK:
            if total_length < header_length + _PORTS.size:
                return TX_REFUSED
            port, _dst_port = _PORTS.unpack_from(frame, ETH_HEADER_LEN + header_length)
            hit = self._tx_exact.get((ETHERTYPE_IPV4, proto, src, port))
            if hit is not None:
                return hit.filter_id if hit.function_id == function_id else TX_REFUSED
        for rule in self._tx_wildcards.get(function_id, ()):
            if (
                (rule.ip_proto is None or rule.ip_proto == proto)
                and (rule.ip is None or rule.ip == src)
                and (rule.port is None or rule.port == port)
            ):
                return rule.filter_id
        return TX_REFUSED

    def check_tx(self, function_id: int, frame: bytes | bytearray | memoryview) -> bool:
        """True if ``function_id`` may send ``frame``. Never raises; counts nothing."""
        return self.classify_tx(function_id, frame) != TX_REFUSED

    def record_rx(self, delivery: Delivery, nbytes: int, delivered: bool) -> None:
        """Count one received frame once its fate is known (``delivered`` False: dropped,
        e.g. the queue was full or the policer said no)."""
        if delivery.filter_id == UNMATCHED:
            self._unmatched += 1
        if delivery.function_id >= 0:
            counters = self._function_counters(delivery.function_id)
            if delivered:
                counters.rx_packets += 1
                counters.rx_bytes += nbytes
            else:
                counters.rx_drops += 1
        self._count_rule(delivery.filter_id, nbytes, delivered)

    def record_tx(self, function_id: int, verdict: int, nbytes: int, sent: bool) -> None:
        """Count one frame a function asked to send; ``verdict`` is what
        :meth:`classify_tx` returned, ``sent`` whether it left the device."""
        counters = self._function_counters(function_id)
        if verdict == TX_REFUSED:
            counters.tx_spoofed += 1
            return
        if sent:
            counters.tx_packets += 1
            counters.tx_bytes += nbytes
        else:
            counters.tx_drops += 1
        self._count_rule(verdict, nbytes, sent)

    def _count_rule(self, filter_id: int, nbytes: int, passed: bool) -> None:
        rule = self._rules.get(filter_id)
        if rule is None:
            flow = self.flows.flows.get(filter_id)
            if flow is not None:
                # OpenFlow counts what a flow matched; drops are the copies that were lost.
                flow.packets += 1
                flow.bytes += nbytes
                if not passed:
                    flow.drops += 1
            return  # else a stand-in id (unmatched, an address grant), or a filter just removed
        if passed:
            rule.packets += 1
            rule.bytes += nbytes
        else:
            rule.drops += 1

    # --- inspection ---------------------------------------------------------------

    @property
    def unmatched(self) -> int:
        return self._unmatched

    def function_counters(self, function_id: int) -> dict[str, int]:
        return asdict(self._counters.get(function_id, _FunctionCounters()))

    def filter_counters(self, filter_id: int) -> dict[str, int]:
        rule = self._rules.get(filter_id)
        if rule is None:
            raise UnknownFilter(f"no filter {filter_id}")
        return {"packets": rule.packets, "bytes": rule.bytes, "drops": rule.drops}

    def stats(self) -> list[dict[str, Any]]:
        """A JSON-able snapshot: the table, then each function, then each filter."""
        snapshot: list[dict[str, Any]] = [
            {
                "kind": "table",
                "unmatched": self._unmatched,
                "rx_exact": len(self._rx_exact),
                "rx_wildcard": sum(len(rules) for rules in self._rx_wildcards.values()),
                "tx_exact": len(self._tx_exact),
                "tx_wildcard": sum(len(rules) for rules in self._tx_wildcards.values()),
                "flows": len(self.flows),
            }
        ]
        functions = sorted(set(self._counters) | set(self._grants))
        for function_id in functions:
            entry: dict[str, Any] = {"kind": "function", "function": function_id}
            entry.update(self.function_counters(function_id))
            entry["addresses"] = sorted(
                str(ipaddress.IPv4Address(ip)) for ip in self._grants.get(function_id, ())
            )
            snapshot.append(entry)
        for filter_id in sorted(self._rules):
            rule = self._rules[filter_id]
            snapshot.append(
                {
                    "kind": "filter",
                    "id": filter_id,
                    "direction": rule.direction,
                    "function": rule.function_id,
                    "queue": rule.queue,
                    "priority": rule.priority,
                    "exact": rule.match.is_exact,
                    "match": rule.match.as_dict(),
                    "packets": rule.packets,
                    "bytes": rule.bytes,
                    "drops": rule.drops,
                }
            )
        for flow_id in sorted(self.flows.flows):
            flow = self.flows.flows[flow_id]
            snapshot.append(
                {
                    "kind": "flow",
                    "id": flow_id,
                    "priority": flow.priority,
                    "fields": {name: list(value) for name, value in flow.fields.items()},
                    "outputs": [list(output) for output in flow.outputs],
                    "to_controller": flow.to_controller,
                    "meter": flow.meter,
                    "packets": flow.packets,
                    "bytes": flow.bytes,
                    "drops": flow.drops,
                }
            )
        return snapshot

    # --- internals ----------------------------------------------------------------

    def _check_function(self, function_id: int) -> None:
        _check_int("function_id", function_id, 0, MAX_FUNCTION_ID)

    def _check_owner(self, function_id: int, queue: int, priority: int, match: Match) -> None:
        self._check_function(function_id)
        _check_int("queue", queue, 0, MAX_QUEUES - 1)
        _check_int("priority", priority, 0, MAX_PRIORITY)
        if not isinstance(match, Match):
            raise InvalidMatch(f"match must be a Match, got {type(match).__name__}")

    def _new_rule(
        self, direction: str, function_id: int, queue: int, match: Match, priority: int
    ) -> _Rule:
        filter_id = self._next_id
        self._next_id += 1
        rule = _Rule(
            filter_id=filter_id,
            direction=direction,
            function_id=function_id,
            queue=queue,
            match=match,
            priority=priority,
            route=_Route((Delivery(function_id, queue, filter_id),)),
            ethertype=match.ethertype,
            ip_proto=match.ip_proto,
            ip=match.ip,
            port=match.port,
        )
        self._rules[filter_id] = rule
        self._counters.setdefault(function_id, _FunctionCounters())
        return rule

    def _function_counters(self, function_id: int) -> _FunctionCounters:
        counters = self._counters.get(function_id)
        if counters is None:
            counters = self._counters[function_id] = _FunctionCounters()
        return counters

    def _rebuild_arp_target(self, ip: bytes) -> None:
        holders = sorted(fid for fid, addresses in self._grants.items() if ip in addresses)
        if not holders:
            self._arp_targets.pop(ip, None)
            return
        copies = [Delivery(fid, DEFAULT_QUEUE, ADDRESS_GRANT) for fid in holders]
        if DEFAULT_FUNCTION not in holders:
            copies.append(Delivery(DEFAULT_FUNCTION, DEFAULT_QUEUE, ADDRESS_GRANT))
        self._arp_targets[ip] = _Route(tuple(copies))

    def _classify_short(
        self, frame: bytes | bytearray | memoryview, length: int
    ) -> _Route:
        # Shorter than Ethernet + IPv4: a runt, a truncated IPv4 packet, or a short frame of
        # another EtherType that a wildcard may still claim.
        if length < ETH_HEADER_LEN:
            return self._default
        (ethertype,) = _ETHERTYPE.unpack_from(frame, ETH_HEADER_LEN - _ETHERTYPE.size)
        if ethertype == ETHERTYPE_IPV4 or ethertype == ETHERTYPE_ARP:
            return self._default
        return self._classify_other(ethertype)

    def _classify_arp(
        self, frame: bytes | bytearray | memoryview, length: int
    ) -> _Route:
        addresses = _arp_addresses(frame, length)
        if addresses is None:
            return self._default
        return self._arp_targets.get(addresses[1], self._default)

    def _classify_other(self, ethertype: int) -> _Route:
        # Matches on other EtherTypes have no other fields (Match enforces it).
        rules = self._rx_wildcards.get(ethertype)
        if rules:
            return rules[0].route
        return self._default


def _exact_key(match: Match) -> _ExactKey:
    # Only called for exact matches, whose fields are all set.
    if match.ip_proto is None or match.ip is None or match.port is None:
        raise InvalidMatch(f"{match.describe()} is not an exact match")
    return (match.ethertype, match.ip_proto, match.ip, match.port)


def _wildcard_order(rule: _Rule) -> tuple[int, int]:
    return (rule.priority, rule.filter_id)


def _arp_fields(
    frame: bytes | bytearray | memoryview, length: int
) -> tuple[bytes, bytes, bytes] | None:
    """(sender MAC, sender IP, target IP) of a well-formed ARP-for-IPv4-over-Ethernet
    frame, else None."""
    if length < _ETH_ARP.size:
        return None
    _ethertype, htype, ptype, hlen, plen, oper, sender_mac, sender, target = _ETH_ARP.unpack_from(
        frame
    )
    if (
        htype != _ARP_HTYPE_ETHERNET
        or ptype != ETHERTYPE_IPV4
        or hlen != 6
        or plen != 4
        or oper not in _ARP_OPERATIONS
    ):
        return None
    return sender_mac, sender, target


def _arp_addresses(
    frame: bytes | bytearray | memoryview, length: int
) -> tuple[bytes, bytes] | None:
    """(sender IP, target IP) of a well-formed ARP frame (see ``_arp_fields``), else None."""
    fields = _arp_fields(frame, length)
    return None if fields is None else (fields[1], fields[2])


def _arp_sender(
    frame: bytes | bytearray | memoryview, length: int
) -> tuple[bytes, bytes] | None:
    """(sender MAC, sender IP) of a well-formed ARP frame (see ``_arp_fields``), else None."""
    fields = _arp_fields(frame, length)
    return None if fields is None else (fields[0], fields[1])
