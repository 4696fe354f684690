"""Controller flows: the part of the VNIC's receive table that an OpenFlow controller
programs (through kernelctl), for traffic no application claimed. Pure logic, no I/O.

A flow matches header fields of a frame from the wire, each exactly or under a mask:

=============  =====  ================================================================
field          bits   from the frame
=============  =====  ================================================================
``eth_dst``     48    Ethernet destination
``eth_src``     48    Ethernet source
``eth_type``    16    EtherType
``ip_proto``     8    IPv4 protocol (IPv4 frames only)
``ipv4_src``    32    IPv4 source
``ipv4_dst``    32    IPv4 destination
``l4_src``      16    TCP/UDP source port (first fragments only)
``l4_dst``      16    TCP/UDP destination port
=============  =====  ================================================================

and says what happens to a frame it matches: delivered to one or more ``(function, queue)``
pairs (the default function among them), sent to the controller, or dropped (no output).

Lookup is a *tuple space search*, as in Open vSwitch's classifier: flows with the same set
of fields and masks share a subtable, a dict keyed by the masked values, so a lookup costs
one dict probe per distinct mask shape whatever the number of flows (exact flows are one
shape: O(1)). Subtables are visited by their highest priority and the search stops as soon
as no remaining subtable can beat the best match found. Among equal priorities the oldest
flow wins (OpenFlow leaves that case undefined).

The claimed filters of ``vdev.vnic.filters`` are consulted first; only frames they would
hand to the default function reach this table (see ``FilterTable._route``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

FIELDS: Final = ("eth_dst", "eth_src", "eth_type", "ip_proto", "ipv4_src", "ipv4_dst", "l4_src", "l4_dst")
FIELD_BITS: Final = {"eth_dst": 48, "eth_src": 48, "eth_type": 16, "ip_proto": 8,
                     "ipv4_src": 32, "ipv4_dst": 32, "l4_src": 16, "l4_dst": 16}
_INDEX: Final = {name: index for index, name in enumerate(FIELDS)}
MAX_FLOWS: Final = 16384  # per VNIC: room for the 10^4-flow benchmark, bounded memory

_ETH: Final = struct.Struct("!6s6sH")
# IPv4 fixed header after Ethernet: version/IHL @14, total length @16, fragment @20,
# protocol @23, source @26, destination @30 (RFC 791 3.1).
_IPV4: Final = struct.Struct("!BxH2xHxB2xII")
_PORTS: Final = struct.Struct("!HH")
_PORT_PROTOCOLS: Final = frozenset((6, 17))

FrameFields = tuple[int | None, ...]  # values in the order of FIELDS; None: not in the frame


class FlowError(ValueError):
    """A flow the table cannot hold (bad field, mask, priority, or the table is full)."""


@dataclass(slots=True, eq=False)
class Flow:
    flow_id: int
    priority: int
    fields: dict[str, tuple[int, int]]  # name -> (value, mask); the value is within the mask
    outputs: tuple[tuple[int, int], ...]  # (function_id, queue) pairs
    to_controller: bool
    controller_len: int  # bytes of the frame a packet-in carries
    meter: int = 0  # 0: none; else the meter whose bucket the frame must pass
    packets: int = 0
    bytes: int = 0
    drops: int = 0
    order: int = 0  # insertion order, for ties


@dataclass(slots=True)
class _Subtable:
    indices: tuple[int, ...]
    masks: tuple[int, ...]
    entries: dict[tuple[int, ...], list[Flow]] = field(default_factory=dict)
    max_priority: int = -1
    size: int = 0


def frame_fields(frame: bytes | bytearray | memoryview, length: int) -> FrameFields:
    """The fields of a frame, read at fixed offsets as NIC hardware does. Never raises."""
    if length < _ETH.size:
        return (None,) * len(FIELDS)
    dst, src, ethertype = _ETH.unpack_from(frame)
    eth_dst, eth_src = int.from_bytes(dst, "big"), int.from_bytes(src, "big")
    if ethertype != 0x0800 or length < _ETH.size + _IPV4.size:
        return (eth_dst, eth_src, ethertype, None, None, None, None, None)
    version_ihl, total, fragment, proto, ip_src, ip_dst = _IPV4.unpack_from(frame, _ETH.size)
    header = (version_ihl & 0x0F) * 4
    if version_ihl >> 4 != 4 or header < 20 or total < header or _ETH.size + total > length:
        return (eth_dst, eth_src, ethertype, None, None, None, None, None)
    l4_src = l4_dst = None
    if proto in _PORT_PROTOCOLS and not fragment & 0x1FFF and total >= header + _PORTS.size:
        l4_src, l4_dst = _PORTS.unpack_from(frame, _ETH.size + header)
    return (eth_dst, eth_src, ethertype, proto, ip_src, ip_dst, l4_src, l4_dst)


class FlowTable:
    def __init__(self) -> None:
        self._subtables: dict[tuple[tuple[int, int], ...], _Subtable] = {}
        self._ordered: list[_Subtable] = []  # by max_priority, highest first
        self.flows: dict[int, Flow] = {}
        self._order = 0

    def __len__(self) -> int:
        return len(self.flows)

    def add(self, flow: Flow) -> None:
        if flow.flow_id in self.flows:
            raise FlowError(f"flow {flow.flow_id} exists")
        if len(self.flows) >= MAX_FLOWS:
            raise FlowError(f"the table holds {MAX_FLOWS} flows")
        if not 0 <= flow.priority <= 0xFFFF:
            raise FlowError(f"priority {flow.priority} is not a u16")
        signature = []
        for name, (value, mask) in flow.fields.items():
            bits = FIELD_BITS.get(name)
            if bits is None:
                raise FlowError(f"unknown field {name!r}")
            full = (1 << bits) - 1
            if not (0 < mask <= full and 0 <= value <= full) or value & ~mask:
                raise FlowError(f"{name}: value {value:#x} under mask {mask:#x}")
            signature.append((_INDEX[name], mask))
        signature.sort()
        key_signature = tuple(signature)
        subtable = self._subtables.get(key_signature)
        if subtable is None:
            subtable = _Subtable(tuple(i for i, _ in signature), tuple(m for _, m in signature))
            self._subtables[key_signature] = subtable
            self._ordered.append(subtable)
        key = tuple(flow.fields[FIELDS[i]][0] for i in subtable.indices)
        self._order += 1
        flow.order = self._order
        bucket = subtable.entries.setdefault(key, [])
        bucket.append(flow)
        bucket.sort(key=lambda f: (-f.priority, f.order))
        subtable.size += 1
        subtable.max_priority = max(subtable.max_priority, flow.priority)
        self.flows[flow.flow_id] = flow
        self._ordered.sort(key=lambda s: -s.max_priority)

    def remove(self, flow_id: int) -> Flow:
        flow = self.flows.pop(flow_id, None)
        if flow is None:
            raise FlowError(f"no flow {flow_id}")
        signature = tuple(sorted((_INDEX[n], m) for n, (_v, m) in flow.fields.items()))
        subtable = self._subtables[signature]
        key = tuple(flow.fields[FIELDS[i]][0] for i in subtable.indices)
        bucket = subtable.entries[key]
        bucket.remove(flow)
        if not bucket:
            del subtable.entries[key]
        subtable.size -= 1
        if subtable.size == 0:
            del self._subtables[signature]
            self._ordered.remove(subtable)
        elif flow.priority == subtable.max_priority:
            subtable.max_priority = max(b[0].priority for b in subtable.entries.values())
            self._ordered.sort(key=lambda s: -s.max_priority)
        return flow

    def lookup(self, frame: bytes | bytearray | memoryview) -> Flow | None:
        if not self.flows:
            return None
        values = frame_fields(frame, len(frame))
        best: Flow | None = None
        for subtable in self._ordered:
            if best is not None and best.priority >= subtable.max_priority:
                break  # no flow in this or any later subtable can win
            key = []
            for index, mask in zip(subtable.indices, subtable.masks):
                value = values[index]
                if value is None:
                    break
                key.append(value & mask)
            else:
                bucket = subtable.entries.get(tuple(key))
                if bucket:
                    candidate = bucket[0]
                    if best is None or (candidate.priority, -candidate.order) > (best.priority, -best.order):
                        best = candidate
        return best
