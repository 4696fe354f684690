"""One OpenFlow channel, sans I/O: bytes in, messages out; messages in, bytes out.

It does what every OpenFlow connection does whatever the switch behind it: the HELLO
exchange with version negotiation (7.5.1, 6.3.1), answering ECHO requests, cutting the byte
stream into messages by the header's length, and turning a message the codec refuses into
an ERROR that carries the first 64 bytes of it (7.4.4). What is left, the requests a switch
must act on, goes to the caller.

Bounds. A message is at most 64 KiB by construction (the length is a u16), so the input
buffer never holds more than one message plus one read. The output buffer is bounded by
``max_output``: replies to requests are always queued (the reader of this connection stops
reading requests while output waits, so replies cannot pile up), while unsolicited messages
(PACKET_IN, FLOW_REMOVED, PORT_STATUS) are dropped and counted once it is full, as a switch
drops packet-ins when its channel is congested.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from kernelctl.openflow.constants import (
    ERROR_DATA_LEN,
    OFP_HEADER_LEN,
    OFP_VERSION,
    ErrorType,
    HelloFailed,
    MsgType,
)
from kernelctl.openflow.messages import EchoReply, EchoRequest, Error, Hello, Message, parse_message
from kernelctl.openflow.wire import HEADER, OFPError

DEFAULT_MAX_OUTPUT: Final = 4 << 20  # room for a full dump of 10^4 flows and then some


@dataclass
class ConnectionCounters:
    received: int = 0
    sent: int = 0
    errors_sent: int = 0
    async_dropped: int = 0


class OpenFlowConnection:
    def __init__(self, max_output: int = DEFAULT_MAX_OUTPUT) -> None:
        self._input = bytearray()
        self._output = bytearray()
        self.max_output = max_output
        self.version: int | None = None  # negotiated; None until the peer's HELLO came
        self.close_reason = ""  # set when the connection must be closed (after flushing)
        self.counters = ConnectionCounters()
        # The bytes each message of the last batch came in, for errors about it (by id: two
        # equal messages may have come in different bytes, e.g. masks the codec normalized).
        self._raw: dict[int, tuple[Message, bytes]] = {}
        self._queue(Hello(0, frozenset({OFP_VERSION})).emit())

    @property
    def closing(self) -> bool:
        return bool(self.close_reason)

    # ---- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes, max_messages: int = 64) -> list[Message]:
        """Feed bytes; returns the requests for the switch, in order. At most
        ``max_messages`` are taken per call; the rest wait for :meth:`receive_data` with
        ``b""`` (the caller's fairness between connections)."""
        self._input += data
        self._raw.clear()
        out: list[Message] = []
        handled = 0
        while not self.close_reason and handled < max_messages and len(self._input) >= OFP_HEADER_LEN:
            _version, msg_type, length, xid = HEADER.unpack_from(self._input)
            if length < OFP_HEADER_LEN:
                # The stream cannot be cut any further: say why and close (7.4.4, BAD_LEN).
                self._error(OFPError(ErrorType.BAD_REQUEST, 6, f"header length {length}"), xid, bytes(self._input[:ERROR_DATA_LEN]))
                self.close_reason = f"message length {length} is shorter than a header"
                self._input.clear()
                break
            if len(self._input) < length:
                break
            raw = bytes(self._input[:length])
            del self._input[:length]
            handled += 1
            self.counters.received += 1
            message = self._take(raw, msg_type, xid)
            if message is not None:
                out.append(message)
                self._raw[id(message)] = (message, raw)
        return out

    @property
    def buffered_input(self) -> int:
        return len(self._input)

    def has_complete_message(self) -> bool:
        if len(self._input) < OFP_HEADER_LEN:
            return False
        length = HEADER.unpack_from(self._input)[2]
        return length < OFP_HEADER_LEN or len(self._input) >= length

    def _take(self, raw: bytes, msg_type: int, xid: int) -> Message | None:
        if self.version is None:
            self._hello(raw, msg_type, xid)
            return None
        try:
            message = parse_message(raw)
        except OFPError as exc:
            self._error(exc, xid, raw)
            return None
        if isinstance(message, EchoRequest):
            self.send(EchoReply(message.xid, message.data))
            return None
        if isinstance(message, Hello):
            return None  # a second HELLO changes nothing
        return message

    def _hello(self, raw: bytes, msg_type: int, xid: int) -> None:
        """6.3.1: the first message must be HELLO; the version is the highest both sides
        support (by bitmap when both sent one, else the smaller of the header versions)."""
        if msg_type != MsgType.HELLO:
            self._fail(xid, raw, f"the first message must be HELLO, not type {msg_type}")
            return
        try:
            hello = parse_message(raw)
        except OFPError as exc:
            self._fail(xid, raw, f"unreadable HELLO: {exc.why}")
            return
        if not isinstance(hello, Hello):  # cannot happen: the type said HELLO
            self._fail(xid, raw, "unreadable HELLO")
            return
        peer_version = raw[0]
        supported = OFP_VERSION in hello.versions if hello.versions else peer_version >= OFP_VERSION
        if not supported:
            self._fail(xid, raw, f"no common version (peer offers {sorted(hello.versions) or peer_version})")
            return
        self.version = OFP_VERSION

    def _fail(self, xid: int, raw: bytes, why: str) -> None:
        self._error(OFPError(ErrorType.HELLO_FAILED, HelloFailed.INCOMPATIBLE, why), xid, raw)
        self.close_reason = why

    def _error(self, exc: OFPError, xid: int, raw: bytes) -> None:
        self.counters.errors_sent += 1
        text = exc.why.encode("ascii", "replace")
        # HELLO_FAILED carries an ASCII reason (7.4.4); every other error the request's start.
        data = text if exc.error_type == ErrorType.HELLO_FAILED else raw[:ERROR_DATA_LEN]
        self.send(Error(xid, exc.error_type, exc.code, data))

    def refuse(self, exc: OFPError, request: Message) -> None:
        """Answer ``request`` with the error ``exc`` (for the switch's refusals); the error
        carries the request's first bytes as they came."""
        kept = self._raw.get(id(request))
        if kept is not None and kept[0] is request:
            raw = kept[1]
        else:
            try:
                raw = request.emit()
            except (ValueError, OverflowError, struct.error):
                raw = b""
        self._error(exc, request.xid, raw)

    # ---- output --------------------------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a reply. Replies are bounded by the caller reading one request batch at a
        time while output waits; see :meth:`send_async` for unsolicited messages."""
        self._queue(message.emit())

    def send_async(self, message: Message) -> bool:
        """Queue an unsolicited message unless the output is full; whether it was queued."""
        if self.version is None or len(self._output) >= self.max_output:
            self.counters.async_dropped += 1
            return False
        self._queue(message.emit())
        return True

    def _queue(self, data: bytes) -> None:
        self.counters.sent += 1
        self._output += data

    def data_to_send(self) -> bytes:
        return bytes(self._output)

    def sent(self, count: int) -> None:
        del self._output[:count]

    @property
    def pending_output(self) -> int:
        return len(self._output)
