"""memcached over UDP: the 8-byte frame header and one request per datagram, sans-I/O.

Every datagram, either way, starts with a frame header (protocol.txt, "UDP protocol"),
four big-endian u16 fields::

    off  size  field           meaning
    0    u16   request_id      chosen by the client, echoed on every reply datagram
    2    u16   sequence        this datagram's index in its message, from 0
    4    u16   total           datagrams in the message
    6    u16   reserved        0

A request must fit in one datagram: memcached 1.6 silently drops one whose header says
otherwise (total != 1), and so does this handler, counting it. A reply is split into
datagrams of at most ``max_datagram`` bytes, header included (memcached's
UDP_MAX_PAYLOAD_SIZE of 1400 keeps a datagram under a typical path MTU), all carrying the
request id, their sequence number and the total.

Each datagram is parsed by a fresh protocol session: nothing carries over between
datagrams, so a command or data block cut short by the end of a datagram is ignored, as
memcached does. ``quit`` just ends the datagram's processing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from libos.apps.memcache.protocol import McEngine, McSession

UDP_FRAME_HEADER = struct.Struct("!HHHH")
UDP_HEADER_SIZE = UDP_FRAME_HEADER.size
MAX_DATAGRAM = 1400
# The total field is a u16; a smaller default bounds what one request can make us
# build and send (a multi-get of the same big value is an amplification vector).
DEFAULT_MAX_REPLY_DATAGRAMS = 1024
_U16_MAX = 0xFFFF


class MalformedFrame(ValueError):
    """A datagram too short for the frame header, or a header that makes no sense."""


@dataclass(frozen=True, slots=True)
class UdpFrameHeader:
    request_id: int
    sequence: int
    total: int
    reserved: int = 0

    @classmethod
    def parse(cls, datagram: bytes) -> UdpFrameHeader:
        if len(datagram) < UDP_HEADER_SIZE:
            raise MalformedFrame(f"datagram of {len(datagram)} bytes has no frame header")
        request_id, sequence, total, reserved = UDP_FRAME_HEADER.unpack_from(datagram)
        if total == 0 or sequence >= total:
            raise MalformedFrame(f"datagram {sequence} of {total}")
        return cls(request_id, sequence, total, reserved)

    def emit(self) -> bytes:
        for value in (self.request_id, self.sequence, self.total, self.reserved):
            if not 0 <= value <= _U16_MAX:
                raise MalformedFrame(f"header field {value} outside u16")
        return UDP_FRAME_HEADER.pack(self.request_id, self.sequence, self.total, self.reserved)


@dataclass(slots=True)
class UdpCounters:
    datagrams_in: int = 0
    malformed: int = 0
    multi_datagram_requests: int = 0
    replies: int = 0
    datagrams_out: int = 0
    replies_too_large: int = 0


class McUdpHandler:
    """Turns one request datagram into the reply datagrams, against a shared engine."""

    def __init__(
        self,
        engine: McEngine,
        *,
        max_datagram: int = MAX_DATAGRAM,
        max_reply_datagrams: int = DEFAULT_MAX_REPLY_DATAGRAMS,
    ) -> None:
        if max_datagram <= UDP_HEADER_SIZE:
            raise ValueError(f"max_datagram must exceed the {UDP_HEADER_SIZE}-byte header")
        if not 1 <= max_reply_datagrams <= _U16_MAX:
            raise ValueError("max_reply_datagrams must be in 1..65535")
        self.engine = engine
        self.max_datagram = max_datagram
        self.max_reply_datagrams = max_reply_datagrams
        self.counters = UdpCounters()

    def handle_datagram(self, data: bytes, now: float) -> list[bytes]:
        """The reply datagrams for one received datagram (empty when there is none)."""
        self.counters.datagrams_in += 1
        try:
            header = UdpFrameHeader.parse(data)
        except MalformedFrame:
            self.counters.malformed += 1
            return []
        if header.total != 1:
            self.counters.multi_datagram_requests += 1
            return []
        reply = self._run(bytes(data[UDP_HEADER_SIZE:]), now)
        if reply is None:
            self.counters.replies_too_large += 1
            return []
        return self._split(header.request_id, reply)

    def _run(self, request: bytes, now: float) -> bytes | None:
        chunk = self.max_datagram - UDP_HEADER_SIZE
        limit = chunk * self.max_reply_datagrams
        session = McSession(self.engine, now, datagram=True)
        session.feed(request, now)
        parts: list[bytes] = []
        size = 0
        # Each feed makes progress (at least one command or key) and the request is one
        # datagram, so this loop ends; the size check bounds what it holds meanwhile.
        while True:
            out = session.take_output()
            parts.append(out)
            size += len(out)
            if size > limit:
                return None
            if session.should_close or not session.has_backlog:
                return b"".join(parts)
            session.feed(b"", now)

    def _split(self, request_id: int, reply: bytes) -> list[bytes]:
        if not reply:
            return []
        chunk = self.max_datagram - UDP_HEADER_SIZE
        total = -(-len(reply) // chunk)
        datagrams = [
            UDP_FRAME_HEADER.pack(request_id, sequence, total, 0)
            + reply[sequence * chunk : (sequence + 1) * chunk]
            for sequence in range(total)
        ]
        self.counters.replies += 1
        self.counters.datagrams_out += total
        return datagrams
