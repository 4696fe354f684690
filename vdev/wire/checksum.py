"""The Internet checksum (RFC 1071) and the TCP/UDP pseudo-header sum (RFC 768, RFC 9293 3.1)."""

from __future__ import annotations

import struct
import sys

_BIG_ENDIAN_HOST = sys.byteorder == "big"


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The 16-bit one's complement sum of ``data`` (padded with a zero byte), folded.

    Summing the buffer as one big integer is much faster in CPython than a loop over
    16-bit words: ``int.from_bytes`` runs in C, and one's complement addition is
    associative, so the big sum can be folded down 16 bits at a time at the end.
    """
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total = int.from_bytes(data, "big") if data else 0
    total += initial
    # Fold: a number of 16-bit digits summed modulo 0xffff (end-around carry).
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16) if total < (1 << 64) else _fold_big(total)
    return total


def _fold_big(value: int) -> int:
    # Split the big integer into 16-bit digits cheaply: reduce modulo 0xffff, which is the
    # same as the one's complement sum except that 0xffff and 0 are both represented by 0.
    folded = value % 0xFFFF
    return folded if folded else 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value: the one's complement of the one's complement sum."""
    return (~ones_complement_sum(data, initial)) & 0xFFFF


_PSEUDO = struct.Struct("!4s4sBBH")


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """The one's complement sum of the IPv4 pseudo-header, to pass as ``initial``."""
    return ones_complement_sum(_PSEUDO.pack(src, dst, 0, protocol, length))
