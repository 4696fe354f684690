"""UDP (RFC 768) over IPv4.

Header layout (offsets in bytes)::

    off  size  field
    0    2     source port (0: none, RFC 768)
    2    2     destination port
    4    2     length (header + data)
    6    2     checksum over the pseudo-header, header and data; 0: not computed

The checksum covers the IPv4 pseudo-header (source, destination, zero, protocol 17,
UDP length), so parsing and building need the two addresses.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vdev.wire.checksum import ones_complement_sum, pseudo_header_sum
from vdev.wire.errors import ChecksumError, SanityError, TruncatedError

HEADER = struct.Struct("!HHHH")
HEADER_LEN: Final = HEADER.size  # 8
LENGTH_OFFSET: Final = 4
CHECKSUM_OFFSET: Final = 6
PROTOCOL: Final = 17
MAX_PAYLOAD: Final = 0xFFFF - HEADER_LEN


@dataclass(frozen=True, slots=True)
class UdpPacket:
    src_port: int
    dst_port: int
    payload: bytes
    checksum_present: bool = True

    def emit(self, src_ip: bytes, dst_ip: bytes) -> bytes:
        return build(self.src_port, self.dst_port, self.payload, src_ip, dst_ip, checksum=self.checksum_present)


def parse(buf: bytes | bytearray | memoryview, src_ip: bytes, dst_ip: bytes) -> UdpPacket:
    """Decode a datagram: ``buf`` is the whole IPv4 payload, already cut to its length."""
    available = len(buf)
    if available < HEADER_LEN:
        raise TruncatedError(f"UDP datagram of {available} bytes is shorter than its header")
    src_port, dst_port, length, checksum = HEADER.unpack_from(buf, 0)
    if length > available:
        raise TruncatedError(f"UDP length {length} exceeds the {available} bytes the IP layer carried")
    if length < HEADER_LEN:
        raise SanityError(f"UDP length {length} is shorter than the header")
    if length != available:
        # The IP total length already removed the link padding, so a shorter UDP length
        # means two length fields disagree; refuse rather than guess which is right.
        raise SanityError(f"UDP length {length} disagrees with the IP payload length {available}")
    # RFC 768: a zero checksum field means the sender did not compute one.
    if checksum and ones_complement_sum(buf, pseudo_header_sum(src_ip, dst_ip, PROTOCOL, length)) != 0xFFFF:
        raise ChecksumError("UDP checksum does not verify")
    if dst_port == 0:
        raise SanityError("UDP destination port 0")
    return UdpPacket(src_port, dst_port, bytes(buf[HEADER_LEN:length]), checksum != 0)


def build(
    src_port: int,
    dst_port: int,
    payload: bytes | bytearray | memoryview,
    src_ip: bytes,
    dst_ip: bytes,
    *,
    checksum: bool = True,
) -> bytes:
    """A complete datagram (header + payload), its checksum computed unless told not to."""
    if not (0 <= src_port <= 0xFFFF and 0 <= dst_port <= 0xFFFF):
        raise ValueError("UDP ports are 16-bit")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"UDP payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    length = HEADER_LEN + len(payload)
    datagram = bytearray(HEADER.pack(src_port, dst_port, length, 0))
    datagram += payload
    if checksum:
        value = (~ones_complement_sum(datagram, pseudo_header_sum(src_ip, dst_ip, PROTOCOL, length))) & 0xFFFF
        # RFC 768: a computed zero is sent as all ones, since zero means "no checksum".
        HEADER.pack_into(datagram, 0, src_port, dst_port, length, value or 0xFFFF)
    return bytes(datagram)
