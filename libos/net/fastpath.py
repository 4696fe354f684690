"""Fixed-header shortcuts for the UDP fast path: one struct call per frame.

The general path parses a frame layer by layer through ``vdev.wire``; for the common
case (Ethernet + a 20-byte IPv4 header + UDP) these helpers read or write all 42 bytes
of headers with one precompiled ``struct.Struct``, and compute checksums as one big
integer.

Why a big integer works: a 16-bit one's complement sum is congruent modulo 0xffff to
the plain sum of the words, and 2**16 is 1 modulo 0xffff, so ``int.from_bytes`` of a
word-aligned byte string is congruent to the sum of its words. For data that is not all
zeros, the folded sum is 0xffff exactly when that integer is 0 modulo 0xffff (RFC 1071
section 2(A) and the verification rule of section 3). The integer is built in C, which
is far cheaper in CPython than looping over words.
"""

from __future__ import annotations

import struct
from typing import Final

# Receive view: the fields the fast path decides on, the rest skipped with pad bytes.
#   0 dst MAC, 6 src MAC, 12 EtherType | 14 version/IHL, (TOS), 16 total length,
#   (ident), 20 flags/fragment, (TTL), 23 protocol, (checksum), 26 src, 30 dst |
#   34 src port, 36 dst port, 38 UDP length, 40 UDP checksum
UDP_HEADERS_RX: Final = struct.Struct("!6s6sHBxH2xHxB2x4s4sHHHH")
# Transmit: every field of the same 42 bytes.
UDP_HEADERS_TX: Final = struct.Struct("!6s6sHBBHHHBBH4s4sHHHH")
UDP_HEADERS_LEN: Final = UDP_HEADERS_TX.size  # 42
UDP_PAYLOAD_OFFSET: Final = UDP_HEADERS_LEN
IPV4_HEADERS_TX: Final = struct.Struct("!6s6sHBBHHHBBH4s4s")  # Ethernet + IPv4, 34 bytes
IPV4_HEADERS_RX: Final = IPV4_HEADERS_TX  # every field, for the receive lanes too

_ETHERTYPE_IPV4: Final = 0x0800
_VER_IHL: Final = 0x45
_FLAGS_DF: Final = 0x4000
_UDP: Final = 17
_IP_START: Final = 14
_IP_END: Final = 34
_PSEUDO_START: Final = 26  # source address: addresses and UDP header are contiguous


def address_sum(addr: bytes) -> int:
    """An IPv4 address as an integer: congruent to the sum of its two 16-bit words."""
    return int.from_bytes(addr, "big")


def ipv4_header_ok(frame: bytes | bytearray | memoryview) -> bool:
    """Whether the 20-byte IPv4 header at offset 14 carries a valid checksum.

    The caller has seen 0x45 at offset 14, so the header is not all zeros.
    """
    return int.from_bytes(frame[_IP_START:_IP_END], "big") % 0xFFFF == 0


def udp_checksum_ok(frame: bytes | bytearray | memoryview, udp_length: int) -> bool:
    """Whether the UDP checksum verifies (a nonzero checksum field; IHL 5 at offset 14).

    The bytes from the source address to the end of the datagram are the pseudo-header's
    addresses, the UDP header and the data, in order; the pseudo-header's zero, protocol
    and length words are added as numbers (RFC 768).
    """
    value = int.from_bytes(frame[_PSEUDO_START : _IP_END + udp_length], "big")
    if udp_length & 1:
        value <<= 8  # the zero pad byte RFC 768 appends to an odd-length datagram
    return (value + _UDP + udp_length) % 0xFFFF == 0


def payload_sum_of_verified(
    addresses_sum: int, src_port: int, dst_port: int, udp_length: int, udp_checksum: int
) -> int:
    """The sum (mod 0xffff) of the data of a datagram whose nonzero checksum verified.

    A verified datagram sums to 0 modulo 0xffff, pseudo-header included, so its data
    sum is minus everything else, all of which are header fields: no pass over the data.
    An echo server that sends the same bytes back then gets its checksum for free.
    """
    return -(addresses_sum + _UDP + 2 * udp_length + src_port + dst_port + udp_checksum) % 0xFFFF


def payload_sum(payload: bytes | bytearray | memoryview) -> int:
    """The data's share of the UDP checksum (mod 0xffff), zero-padded to even length."""
    data = int.from_bytes(payload, "big")
    if len(payload) & 1:
        data <<= 8
    return data % 0xFFFF


def udp_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    addresses_sum: int,
    ttl: int,
    ident: int,
    src_port: int,
    dst_port: int,
    payload: bytes | bytearray | memoryview,
    data_sum: int,
) -> bytes:
    """A complete Ethernet/IPv4/UDP frame with both checksums; DF set, no options.

    ``addresses_sum`` is ``address_sum(src_ip) + address_sum(dst_ip)``; ``data_sum``
    is ``payload_sum(payload)``, or a value the caller already knows.
    """
    udp_length = len(payload) + 8
    total_length = udp_length + 20
    ip_rest = (0x4500 + total_length + ident + _FLAGS_DF + (ttl << 8 | _UDP) + addresses_sum) % 0xFFFF
    ip_checksum = 0xFFFF - ip_rest if ip_rest else 0
    # No "if zero" case: a zero remainder means a sum of 0xffff, a checksum of zero,
    # which RFC 768 sends as 0xffff; 0xffff - 0 gives exactly that.
    udp_checksum = 0xFFFF - (data_sum + addresses_sum + _UDP + 2 * udp_length + src_port + dst_port) % 0xFFFF
    return UDP_HEADERS_TX.pack(
        dst_mac, src_mac, _ETHERTYPE_IPV4,
        _VER_IHL, 0, total_length, ident, _FLAGS_DF, ttl, _UDP, ip_checksum, src_ip, dst_ip,
        src_port, dst_port, udp_length, udp_checksum,
    ) + payload  # fmt: skip


def ipv4_frame(
    dst_mac: bytes,
    src_mac: bytes,
    src_ip: bytes,
    dst_ip: bytes,
    addresses_sum: int,
    ttl: int,
    ident: int,
    protocol: int,
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """An Ethernet frame carrying an IPv4 datagram (DF set, no options) around ``payload``."""
    total_length = len(payload) + 20
    rest = (0x4500 + total_length + ident + _FLAGS_DF + (ttl << 8 | protocol) + addresses_sum) % 0xFFFF
    return IPV4_HEADERS_TX.pack(
        dst_mac, src_mac, _ETHERTYPE_IPV4,
        _VER_IHL, 0, total_length, ident, _FLAGS_DF, ttl, protocol, 0xFFFF - rest if rest else 0, src_ip, dst_ip,
    ) + payload  # fmt: skip
