"""ARP for IPv4 over Ethernet (RFC 826).

Packet layout (offsets in bytes, the only combination this stack speaks)::

    off  size  field
    0    2     hardware type (1: Ethernet)
    2    2     protocol type (0x0800: IPv4)
    4    1     hardware address length (6)
    5    1     protocol address length (4)
    6    2     operation (1: request, 2: reply)
    8    6     sender hardware address
    14   4     sender protocol address
    18   6     target hardware address
    24   4     target protocol address

Any bytes after offset 28 are Ethernet padding and are ignored.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vdev.wire.errors import SanityError, TruncatedError

PACKET = struct.Struct("!HHBBH6s4s6s4s")
PACKET_LEN: Final = PACKET.size  # 28

HTYPE_ETHERNET: Final = 1
PTYPE_IPV4: Final = 0x0800
OP_REQUEST: Final = 1
OP_REPLY: Final = 2


@dataclass(frozen=True, slots=True)
class ArpPacket:
    operation: int
    sender_mac: bytes
    sender_ip: bytes
    target_mac: bytes
    target_ip: bytes

    def emit(self) -> bytes:
        return build(self.operation, self.sender_mac, self.sender_ip, self.target_mac, self.target_ip)


def parse(buf: bytes | bytearray | memoryview) -> ArpPacket:
    if len(buf) < PACKET_LEN:
        raise TruncatedError(f"ARP packet of {len(buf)} bytes is shorter than {PACKET_LEN}")
    htype, ptype, hlen, plen, operation, sha, spa, tha, tpa = PACKET.unpack_from(buf, 0)
    # RFC 826 "Packet Reception": a packet for another hardware or protocol space is
    # not ours to interpret; the length fields must agree with the types.
    if htype != HTYPE_ETHERNET or ptype != PTYPE_IPV4:
        raise SanityError(f"ARP for hardware type {htype} / protocol 0x{ptype:04x}, expected Ethernet/IPv4")
    if hlen != 6 or plen != 4:
        raise SanityError(f"ARP address lengths {hlen}/{plen}, expected 6/4")
    if operation not in (OP_REQUEST, OP_REPLY):
        raise SanityError(f"ARP operation {operation} is neither request nor reply")
    return ArpPacket(operation, sha, spa, tha, tpa)


def build(operation: int, sender_mac: bytes, sender_ip: bytes, target_mac: bytes, target_ip: bytes) -> bytes:
    if len(sender_mac) != 6 or len(target_mac) != 6 or len(sender_ip) != 4 or len(target_ip) != 4:
        raise ValueError("ARP addresses must be 6-byte MACs and 4-byte IPv4 addresses")
    return PACKET.pack(HTYPE_ETHERNET, PTYPE_IPV4, 6, 4, operation, sender_mac, sender_ip, target_mac, target_ip)
