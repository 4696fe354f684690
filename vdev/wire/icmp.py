"""ICMP for IPv4 (RFC 792), the messages a host needs (RFC 1122 3.2.2).

Every message starts with the same 8 bytes::

    off  size  field
    0    1     type
    1    1     code
    2    2     checksum (RFC 1071 over the whole ICMP message)
    4    2     echo: identifier        | unreachable: unused
    6    2     echo: sequence number   | unreachable: next-hop MTU (RFC 1191, code 4)
    8    ..    echo: data              | unreachable: the original IP header + 8 data bytes

Other types are decoded as ``IcmpOther`` (type, code, the 4 header bytes, the body),
so a caller can count them without this module interpreting them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vdev.wire.checksum import internet_checksum, ones_complement_sum
from vdev.wire.errors import ChecksumError, SanityError, TruncatedError

HEADER = struct.Struct("!BBHHH")
HEADER_LEN: Final = HEADER.size  # 8
CHECKSUM_OFFSET: Final = 2
_U16 = struct.Struct("!H")
_WORDS = struct.Struct("!HH")

TYPE_ECHO_REPLY: Final = 0
TYPE_DEST_UNREACHABLE: Final = 3
TYPE_ECHO_REQUEST: Final = 8
TYPE_TIME_EXCEEDED: Final = 11
TYPE_PARAMETER_PROBLEM: Final = 12
# RFC 1122 3.2.2: a host never answers an ICMP error with another, so callers need to
# know which types are errors.
ERROR_TYPES: Final = frozenset({TYPE_DEST_UNREACHABLE, 4, 5, TYPE_TIME_EXCEEDED, TYPE_PARAMETER_PROBLEM})

CODE_NET_UNREACHABLE: Final = 0
CODE_HOST_UNREACHABLE: Final = 1
CODE_PROTOCOL_UNREACHABLE: Final = 2
CODE_PORT_UNREACHABLE: Final = 3
CODE_FRAGMENTATION_NEEDED: Final = 4
MAX_UNREACHABLE_CODE: Final = 15  # codes 0-12 RFC 792/1122, 13-15 RFC 1812 5.2.7.1

# RFC 792: the original internet header plus the first 64 bits of its data.
QUOTED_DATA_LEN: Final = 8
_MIN_QUOTE: Final = 20 + QUOTED_DATA_LEN


@dataclass(frozen=True, slots=True)
class IcmpEcho:
    """Echo request (type 8) or echo reply (type 0), RFC 792 page 14."""

    is_request: bool
    ident: int
    sequence: int
    data: bytes

    def emit(self) -> bytes:
        return build_echo(self.is_request, self.ident, self.sequence, self.data)


@dataclass(frozen=True, slots=True)
class IcmpDestUnreachable:
    """Destination unreachable (type 3): ``original`` is the quoted IP header + data."""

    code: int
    original: bytes
    next_hop_mtu: int = 0

    def emit(self) -> bytes:
        return _build(TYPE_DEST_UNREACHABLE, self.code, 0, self.next_hop_mtu, self.original)


@dataclass(frozen=True, slots=True)
class IcmpOther:
    """A type this module does not interpret."""

    type: int
    code: int
    rest_of_header: bytes  # the 4 bytes after the checksum
    body: bytes

    def emit(self) -> bytes:
        if len(self.rest_of_header) != 4:
            raise ValueError("the rest of an ICMP header is 4 bytes")
        word1, word2 = _WORDS.unpack(self.rest_of_header)
        return _build(self.type, self.code, word1, word2, self.body)


IcmpMessage = IcmpEcho | IcmpDestUnreachable | IcmpOther


def parse(buf: bytes | bytearray | memoryview) -> IcmpMessage:
    """Decode an ICMP message (the whole IPv4 payload, already cut to its length)."""
    if len(buf) < HEADER_LEN:
        raise TruncatedError(f"ICMP message of {len(buf)} bytes is shorter than its header")
    if ones_complement_sum(buf) != 0xFFFF:
        raise ChecksumError("ICMP checksum does not verify")
    icmp_type, code, _csum, word1, word2 = HEADER.unpack_from(buf, 0)
    body = bytes(buf[HEADER_LEN:])
    if icmp_type in (TYPE_ECHO_REQUEST, TYPE_ECHO_REPLY):
        if code != 0:
            raise SanityError(f"ICMP echo with code {code}, expected 0")
        return IcmpEcho(icmp_type == TYPE_ECHO_REQUEST, word1, word2, body)
    if icmp_type == TYPE_DEST_UNREACHABLE:
        if code > MAX_UNREACHABLE_CODE:
            raise SanityError(f"ICMP destination unreachable with unknown code {code}")
        _check_quote(body)
        return IcmpDestUnreachable(code, body, word2)
    return IcmpOther(icmp_type, code, bytes(buf[4:8]), body)


def _check_quote(quote: bytes) -> None:
    if len(quote) < _MIN_QUOTE:
        raise SanityError(f"ICMP error quotes {len(quote)} bytes, fewer than an IP header + 8")
    if quote[0] >> 4 != 4:
        raise SanityError("ICMP error quotes something that is not an IPv4 header")
    header_len = (quote[0] & 0x0F) * 4
    if header_len < 20 or len(quote) < header_len + QUOTED_DATA_LEN:
        raise SanityError("ICMP error quotes a malformed IPv4 header or too little of its data")


def _build(icmp_type: int, code: int, word1: int, word2: int, body: bytes | bytearray | memoryview) -> bytes:
    message = bytearray(HEADER.pack(icmp_type, code, 0, word1, word2))
    message += body
    _U16.pack_into(message, CHECKSUM_OFFSET, internet_checksum(message))
    return bytes(message)


def build_echo(is_request: bool, ident: int, sequence: int, data: bytes | bytearray | memoryview) -> bytes:
    return _build(TYPE_ECHO_REQUEST if is_request else TYPE_ECHO_REPLY, 0, ident, sequence, data)


def build_dest_unreachable(code: int, original_datagram: bytes | bytearray | memoryview, next_hop_mtu: int = 0) -> bytes:
    """A destination unreachable message quoting ``original_datagram``'s header + 8 bytes.

    RFC 1122 3.2.2 asks for the internet header and at least the first 8 data octets,
    enough for the sender to find the transport ports and match its socket.
    """
    if not 0 <= code <= MAX_UNREACHABLE_CODE:
        raise ValueError(f"unknown destination unreachable code {code}")
    if len(original_datagram) < 20:
        raise ValueError("the original datagram is shorter than an IPv4 header")
    header_len = (original_datagram[0] & 0x0F) * 4
    quote = bytes(original_datagram[: header_len + QUOTED_DATA_LEN])
    return _build(TYPE_DEST_UNREACHABLE, code, 0, next_hop_mtu, quote)
