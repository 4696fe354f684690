"""TCP segment codec: the header of RFC 9293 section 3.1 and the options of 3.2 and RFC 7323.

Parsing goes in three steps, as for the other codecs in this package:

1. integrity: enough bytes for the fixed header, a data offset of at least 5 words that
   stays inside the segment, a checksum that verifies over the IPv4 pseudo-header
   (RFC 9293 3.1); failures raise ``IntegrityError`` subclasses;
2. fields: unpacked once with a precompiled ``struct.Struct``;
3. sanity: port 0, SYN together with FIN or RST, an option whose length is below 2 or
   runs past the header, an option of a known kind with the wrong length (a SACK option
   must hold one to four 8-byte blocks, RFC 2018 section 3); failures raise
   ``SanityError``. SACK block edges are reported as sent: whether they make sense is the
   connection's business, against its own sequence space.

The payload of a parsed segment is a ``memoryview`` into the caller's buffer: no copy is
made until the state machine keeps the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vdev.wire.checksum import internet_checksum, ones_complement_sum, pseudo_header_sum
from vdev.wire.errors import ChecksumError, IntegrityError, SanityError, TruncatedError

IP_PROTO_TCP: Final = 6

FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
URG: Final = 0x20
ECE: Final = 0x40
CWR: Final = 0x80

HEADER_LEN: Final = 20
MAX_HEADER_LEN: Final = 60
# The pseudo-header carries the TCP length in 16 bits (RFC 9293 3.1).
MAX_SEGMENT_LEN: Final = 0xFFFF

OPT_EOL: Final = 0
OPT_NOP: Final = 1
OPT_MSS: Final = 2
OPT_WINDOW_SCALE: Final = 3
OPT_SACK_PERMITTED: Final = 4
OPT_SACK: Final = 5
OPT_TIMESTAMPS: Final = 8

# RFC 7323 2.3: a shift above 14 is treated as 14; the codec reports what was sent.
MAX_WINDOW_SCALE: Final = 14

# src port, dst port, seq, ack, data offset (high nibble), flags, window, checksum, urgent
_HEADER: Final = struct.Struct("!HHIIBBHHH")
_CHECKSUM_OFFSET: Final = 16
_U16: Final = struct.Struct("!H")
_U32_PAIR: Final = struct.Struct("!II")
_MSS_OPTION: Final = struct.Struct("!BBH")
_WINDOW_SCALE_OPTION: Final = struct.Struct("!BBB")
_TIMESTAMPS_OPTION: Final = struct.Struct("!BBII")
# RFC 2018 section 3: kind 5, length 2 + 8n; 40 option bytes hold at most four blocks.
MAX_SACK_BLOCKS: Final = 4
_SACK_HEAD: Final = struct.Struct("!BBBB")  # two NOPs, kind, length: keeps blocks aligned

# Lengths the options of known kinds must have (RFC 9293 3.2, RFC 2018, RFC 7323).
_OPTION_LENGTHS: Final = {
    OPT_MSS: 4,
    OPT_WINDOW_SCALE: 3,
    OPT_SACK_PERMITTED: 2,
    OPT_TIMESTAMPS: 10,
}


@dataclass(frozen=True, slots=True)
class TcpOptions:
    """The options this stack understands; unknown kinds are skipped on parse."""

    mss: int | None = None
    window_scale: int | None = None
    sack_permitted: bool = False
    timestamps: tuple[int, int] | None = None
    # (left edge, right edge) pairs: the first sequence number of a block and the one just
    # past it (RFC 2018 section 3).
    sack_blocks: tuple[tuple[int, int], ...] = ()

    def encode(self) -> bytes:
        """The option bytes, padded with NOPs/EOL to a multiple of 4."""
        parts: list[bytes] = []
        if self.mss is not None:
            parts.append(_MSS_OPTION.pack(OPT_MSS, 4, self.mss))
        if self.window_scale is not None:
            # A NOP first keeps the 3-byte option from misaligning what follows.
            parts.append(b"\x01" + _WINDOW_SCALE_OPTION.pack(OPT_WINDOW_SCALE, 3, self.window_scale))
        if self.sack_permitted:
            parts.append(bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERMITTED, 2)))
        if self.timestamps is not None:
            parts.append(
                b"\x01\x01" + _TIMESTAMPS_OPTION.pack(OPT_TIMESTAMPS, 10, *self.timestamps)
            )
        if self.sack_blocks:
            blocks = self.sack_blocks
            if len(blocks) > MAX_SACK_BLOCKS:
                raise ValueError(f"at most {MAX_SACK_BLOCKS} SACK blocks fit in a header")
            parts.append(_SACK_HEAD.pack(OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * len(blocks)))
            parts.extend(_U32_PAIR.pack(left, right) for left, right in blocks)
        encoded = b"".join(parts)
        padding = -len(encoded) % 4
        return encoded + bytes(padding)  # zero bytes are EOL


NO_OPTIONS: Final = TcpOptions()


@dataclass(slots=True)
class TcpSegment:
    """A TCP segment, parsed and checked, or about to be emitted.

    Mutable on purpose: the receive path trims the sequence space in place
    (RFC 9293 3.10.7.4) instead of allocating a new segment per trim.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: bytes | memoryview = b""
    options: TcpOptions = NO_OPTIONS
    urgent: int = 0

    @property
    def seg_len(self) -> int:
        """SEG.LEN: payload bytes plus one for SYN and one for FIN (RFC 9293 3.4)."""
        return len(self.payload) + (self.flags & SYN != 0) + (self.flags & FIN != 0)

    def __repr__(self) -> str:
        names = "".join(
            letter for bit, letter in ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "."))
            if self.flags & bit
        )
        return (
            f"TcpSegment({self.src_port}->{self.dst_port} [{names}] seq={self.seq} "
            f"ack={self.ack} win={self.window} len={len(self.payload)} {self.options})"
        )

    @classmethod
    def parse(
        cls,
        data: bytes | bytearray | memoryview,
        src_ip: bytes,
        dst_ip: bytes,
        *,
        verify_checksum: bool = True,
    ) -> TcpSegment:
        """Parse and check one segment carried between the IPv4 addresses given."""
        length = len(data)
        if length < HEADER_LEN:
            raise TruncatedError(f"TCP segment of {length} bytes is shorter than its header")
        if length > MAX_SEGMENT_LEN:
            raise IntegrityError(f"TCP segment of {length} bytes exceeds the 16-bit length")
        src_port, dst_port, seq, ack, offset_byte, flags, window, _, urgent = _HEADER.unpack_from(
            data
        )
        header_len = (offset_byte >> 4) * 4
        if header_len < HEADER_LEN:
            raise IntegrityError(f"TCP data offset {header_len // 4} is below 5")
        if header_len > length:
            raise TruncatedError(f"TCP data offset {header_len} runs past the {length}-byte segment")
        if verify_checksum:
            # Summing a correct segment, checksum field included, gives 0xffff (RFC 1071).
            total = ones_complement_sum(data, pseudo_header_sum(src_ip, dst_ip, IP_PROTO_TCP, length))
            if total != 0xFFFF:
                raise ChecksumError("TCP checksum does not verify")
        if src_port == 0 or dst_port == 0:
            raise SanityError("TCP port 0 is reserved")
        if flags & SYN and flags & (FIN | RST):
            raise SanityError("TCP SYN together with FIN or RST")
        options = _parse_options(data, header_len) if header_len > HEADER_LEN else NO_OPTIONS
        view = data if isinstance(data, memoryview) else memoryview(data)
        return cls(
            src_port,
            dst_port,
            seq,
            ack,
            flags,
            window,
            view[header_len:],
            options,
            urgent,
        )

    def emit(self, src_ip: bytes, dst_ip: bytes) -> bytes:
        """The segment on the wire, checksum computed over the pseudo-header."""
        options = b"" if self.options is NO_OPTIONS else self.options.encode()
        header_len = HEADER_LEN + len(options)
        if header_len > MAX_HEADER_LEN:
            raise ValueError("TCP options do not fit in 40 bytes")
        total = header_len + len(self.payload)
        if total > MAX_SEGMENT_LEN:
            raise ValueError(f"TCP segment of {total} bytes is too long")
        buf = bytearray(total)
        _HEADER.pack_into(
            buf,
            0,
            self.src_port,
            self.dst_port,
            self.seq,
            self.ack,
            (header_len // 4) << 4,
            self.flags,
            self.window,
            0,
            self.urgent,
        )
        buf[HEADER_LEN:header_len] = options
        buf[header_len:] = self.payload
        checksum = internet_checksum(buf, pseudo_header_sum(src_ip, dst_ip, IP_PROTO_TCP, total))
        _U16.pack_into(buf, _CHECKSUM_OFFSET, checksum)
        return bytes(buf)


def _parse_options(data: bytes | bytearray | memoryview, header_len: int) -> TcpOptions:
    """Walk the option list (RFC 9293 3.2); stop at EOL, skip NOPs and unknown kinds."""
    mss: int | None = None
    window_scale: int | None = None
    sack_permitted = False
    timestamps: tuple[int, int] | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()
    index = HEADER_LEN
    while index < header_len:
        kind = data[index]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            index += 1
            continue
        if index + 1 >= header_len:
            raise SanityError(f"TCP option {kind} has no length byte")
        option_len = data[index + 1]
        if option_len < 2:
            # A length of 0 or 1 would loop forever or point inside itself.
            raise SanityError(f"TCP option {kind} has length {option_len}")
        if index + option_len > header_len:
            raise SanityError(f"TCP option {kind} runs past the header")
        expected = _OPTION_LENGTHS.get(kind)
        if expected is not None and option_len != expected:
            raise SanityError(f"TCP option {kind} has length {option_len}, expected {expected}")
        if kind == OPT_MSS:
            mss = _U16.unpack_from(data, index + 2)[0]
        elif kind == OPT_WINDOW_SCALE:
            window_scale = data[index + 2]
        elif kind == OPT_SACK_PERMITTED:
            sack_permitted = True
        elif kind == OPT_TIMESTAMPS:
            value, echo = _U32_PAIR.unpack_from(data, index + 2)
            timestamps = (value, echo)
        elif kind == OPT_SACK:
            count, rest = divmod(option_len - 2, 8)
            if rest or not 1 <= count <= MAX_SACK_BLOCKS:
                raise SanityError(f"TCP SACK option of length {option_len}")
            sack_blocks = tuple(
                _U32_PAIR.unpack_from(data, index + 2 + 8 * block) for block in range(count)
            )
        index += option_len
    return TcpOptions(mss, window_scale, sack_permitted, timestamps, sack_blocks)
