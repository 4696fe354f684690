"""The bottom of the codec: ``ofp_header``, the OpenFlow error exception, and a checked
reader over a message's bytes.

Every read goes through :class:`Reader`, which refuses to run past the end of the slice it
was given, so a length field that lies can only produce an :class:`OFPError` (with the
specification's error type and code, 7.4.4), never an ``IndexError`` or a ``struct.error``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from kernelctl.openflow.constants import OFP_HEADER_LEN, BadRequest, ErrorType

# 7.1: version u8, type u8, length u16 (the whole message, header included), xid u32.
HEADER: Final = struct.Struct("!BBHI")


class OFPError(Exception):
    """A message (or part of one) refused with an OpenFlow error type and code."""

    def __init__(self, error_type: int, code: int, why: str) -> None:
        super().__init__(why)
        self.error_type = error_type
        self.code = code
        self.why = why


def bad_len(why: str) -> OFPError:
    return OFPError(ErrorType.BAD_REQUEST, BadRequest.BAD_LEN, why)


@dataclass(frozen=True, slots=True)
class Header:
    version: int
    type: int
    length: int
    xid: int

    def pack(self) -> bytes:
        return HEADER.pack(self.version, self.type, self.length, self.xid)


def parse_header(data: bytes | memoryview) -> Header:
    if len(data) < OFP_HEADER_LEN:
        raise bad_len(f"a header is {OFP_HEADER_LEN} bytes, got {len(data)}")
    version, msg_type, length, xid = HEADER.unpack_from(data)
    if length < OFP_HEADER_LEN:
        raise bad_len(f"header length {length} is shorter than the header")
    return Header(version, msg_type, length, xid)


def pad8(length: int) -> int:
    """Bytes of padding that bring ``length`` up to a multiple of 8."""
    return (8 - length % 8) % 8


class Reader:
    """Checked, forward-only reads over ``data[start:end]``. ``error`` makes the exception
    a truncated read raises (the right type/code depends on what is being read)."""

    __slots__ = ("data", "pos", "end", "error_type", "error_code")

    def __init__(
        self,
        data: bytes | memoryview,
        start: int = 0,
        end: int | None = None,
        error_type: int = ErrorType.BAD_REQUEST,
        error_code: int = BadRequest.BAD_LEN,
    ) -> None:
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end
        if not 0 <= start <= self.end <= len(data):
            raise OFPError(error_type, error_code, "a length runs past the message")
        self.error_type = error_type
        self.error_code = error_code

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, count: int, what: str) -> None:
        if count < 0 or self.pos + count > self.end:
            raise OFPError(
                self.error_type, self.error_code, f"{what}: needs {count} bytes, {self.remaining} left"
            )

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        self.need(fmt.size, what)
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def take(self, count: int, what: str) -> bytes:
        self.need(count, what)
        chunk = bytes(self.data[self.pos : self.pos + count])
        self.pos += count
        return chunk

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.pos += count

    def sub(self, count: int, what: str, error_type: int | None = None, error_code: int | None = None) -> Reader:
        """A reader over the next ``count`` bytes (a TLV body); this one moves past them."""
        self.need(count, what)
        start = self.pos
        self.pos += count
        return Reader(
            self.data,
            start,
            start + count,
            self.error_type if error_type is None else error_type,
            self.error_code if error_code is None else error_code,
        )

    def rest(self) -> bytes:
        chunk = bytes(self.data[self.pos : self.end])
        self.pos = self.end
        return chunk
