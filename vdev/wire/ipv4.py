"""IPv4 headers (RFC 791), plus address helpers.

Header layout (offsets in bytes)::

    off  size  field
    0    1     version (high nibble) | IHL in 32-bit words (low nibble)
    1    1     DSCP | ECN (the old type-of-service octet, RFC 2474 / RFC 3168)
    2    2     total length (header + data)
    4    2     identification
    6    2     flags (reserved, DF, MF) | fragment offset in 8-byte units
    8    1     time to live
    9    1     protocol
    10   2     header checksum (RFC 1071 over the header only)
    12   4     source address
    16   4     destination address
    20   ..    options (IHL > 5), accepted but not interpreted
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

from vdev.wire.checksum import internet_checksum, ones_complement_sum
from vdev.wire.errors import ChecksumError, SanityError, TruncatedError

HEADER = struct.Struct("!BBHHHBBH4s4s")
HEADER_LEN: Final = HEADER.size  # 20, the header without options
_U16 = struct.Struct("!H")
MAX_HEADER_LEN: Final = 60
TOTAL_LENGTH_OFFSET: Final = 2
CHECKSUM_OFFSET: Final = 10
SRC_OFFSET: Final = 12
DST_OFFSET: Final = 16

VERSION: Final = 4
FLAG_DF: Final = 0x4000
FLAG_MF: Final = 0x2000
FLAG_RESERVED: Final = 0x8000
FRAG_OFFSET_MASK: Final = 0x1FFF
DEFAULT_TTL: Final = 64  # RFC 1700 / Linux ip_default_ttl

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17

ADDR_LEN: Final = 4
ANY: Final = b"\x00\x00\x00\x00"
BROADCAST: Final = b"\xff\xff\xff\xff"


def ip_to_bytes(text: str) -> bytes:
    """``"10.0.0.1"`` -> 4 bytes; raises ValueError on anything else."""
    return ipaddress.IPv4Address(text).packed


def ip_to_str(addr: bytes) -> str:
    """4 bytes -> dotted quad."""
    if len(addr) != ADDR_LEN:
        raise ValueError(f"an IPv4 address has 4 bytes, not {len(addr)}")
    return f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}"


def is_multicast(addr: bytes) -> bool:
    """Class D, 224.0.0.0/4 (RFC 5771)."""
    return 224 <= addr[0] <= 239


def is_unicast_source(addr: bytes) -> bool:
    """Whether ``addr`` may appear as a source address at all (RFC 1122 3.2.1.3).

    0.0.0.0 is allowed only while a host learns its own address, and a broadcast,
    multicast, class E or loopback source never arrives legitimately from a link.
    """
    first = addr[0]
    return addr != ANY and first < 224 and first != 127


@dataclass(frozen=True, slots=True)
class Ipv4Packet:
    src: bytes
    dst: bytes
    protocol: int
    payload: bytes
    ttl: int = DEFAULT_TTL
    ident: int = 0
    dont_fragment: bool = True
    more_fragments: bool = False
    frag_offset: int = 0  # in bytes (a multiple of 8)
    dscp_ecn: int = 0
    options: bytes = b""

    @property
    def header_len(self) -> int:
        return HEADER_LEN + len(self.options)

    @property
    def is_fragment(self) -> bool:
        """True for any piece of a fragmented datagram, the first included (RFC 791 3.2)."""
        return self.more_fragments or self.frag_offset != 0

    def emit(self) -> bytes:
        return build(
            self.src,
            self.dst,
            self.protocol,
            self.payload,
            ttl=self.ttl,
            ident=self.ident,
            dont_fragment=self.dont_fragment,
            more_fragments=self.more_fragments,
            frag_offset=self.frag_offset,
            dscp_ecn=self.dscp_ecn,
            options=self.options,
        )


def parse(buf: bytes | bytearray | memoryview) -> Ipv4Packet:
    """Decode a datagram. The payload is cut at the total length (link padding dropped)."""
    available = len(buf)
    if available < HEADER_LEN:
        raise TruncatedError(f"IPv4 packet of {available} bytes is shorter than its header")
    ver_ihl, dscp_ecn, total_length, ident, flags_frag, ttl, protocol, _csum, src, dst = (
        HEADER.unpack_from(buf, 0)
    )
    version = ver_ihl >> 4
    header_len = (ver_ihl & 0x0F) * 4
    if version != VERSION:
        raise SanityError(f"IP version {version}, expected 4")
    # These two come before the checksum because they decide what the checksum covers.
    if header_len < HEADER_LEN:
        raise SanityError(f"IPv4 IHL {header_len // 4} is below the minimum of 5")
    if total_length < header_len:
        raise SanityError(f"IPv4 total length {total_length} is shorter than the header ({header_len})")
    if header_len > available or total_length > available:
        raise TruncatedError(
            f"IPv4 header/total length {header_len}/{total_length} exceeds the {available} bytes received"
        )
    # RFC 1071: summing a header that carries a valid checksum gives 0xffff.
    if ones_complement_sum(buf[:header_len]) != 0xFFFF:
        raise ChecksumError("IPv4 header checksum does not verify")
    if flags_frag & FLAG_RESERVED:
        # RFC 791 3.1: bit 0 "must be zero" (RFC 3514 notwithstanding).
        raise SanityError("IPv4 reserved flag is set")
    if src != ANY and not is_unicast_source(src):
        raise SanityError(f"IPv4 source {ip_to_str(src)} is not a unicast address")
    return Ipv4Packet(
        src=src,
        dst=dst,
        protocol=protocol,
        payload=bytes(buf[header_len:total_length]),
        ttl=ttl,
        ident=ident,
        dont_fragment=bool(flags_frag & FLAG_DF),
        more_fragments=bool(flags_frag & FLAG_MF),
        frag_offset=(flags_frag & FRAG_OFFSET_MASK) * 8,
        dscp_ecn=dscp_ecn,
        options=bytes(buf[HEADER_LEN:header_len]),
    )


def build(
    src: bytes,
    dst: bytes,
    protocol: int,
    payload: bytes | bytearray | memoryview,
    *,
    ttl: int = DEFAULT_TTL,
    ident: int = 0,
    dont_fragment: bool = True,
    more_fragments: bool = False,
    frag_offset: int = 0,
    dscp_ecn: int = 0,
    options: bytes = b"",
) -> bytes:
    """A complete datagram with its header checksum computed."""
    if len(src) != ADDR_LEN or len(dst) != ADDR_LEN:
        raise ValueError("IPv4 addresses must be 4 bytes")
    if len(options) % 4 or len(options) > MAX_HEADER_LEN - HEADER_LEN:
        raise ValueError(f"IPv4 options must be a multiple of 4 bytes, at most 40, not {len(options)}")
    if frag_offset % 8 or not 0 <= frag_offset <= FRAG_OFFSET_MASK * 8:
        raise ValueError(f"fragment offset {frag_offset} is not a multiple of 8 in range")
    header_len = HEADER_LEN + len(options)
    total_length = header_len + len(payload)
    if total_length > 0xFFFF:
        raise ValueError(f"IPv4 datagram of {total_length} bytes exceeds 65535")
    flags_frag = (FLAG_DF if dont_fragment else 0) | (FLAG_MF if more_fragments else 0) | (frag_offset // 8)
    head = bytearray(
        HEADER.pack(
            (VERSION << 4) | (header_len // 4), dscp_ecn, total_length, ident, flags_frag, ttl, protocol, 0, src, dst
        )
    )
    head += options
    _U16.pack_into(head, CHECKSUM_OFFSET, internet_checksum(head))
    return bytes(head) + bytes(payload)
