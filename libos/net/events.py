"""What the network stack hands to the application: small immutable events.

Payloads are copies (``bytes``), never views into a receive buffer, because the
driver gives that buffer back to the device as soon as ``receive`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """A datagram arrived for a bound port."""

    local_port: int
    src_ip: bytes
    src_port: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class EchoReply:
    """An ICMP echo reply arrived (answer to ``NetStack.send_echo_request``)."""

    src_ip: bytes
    ident: int
    sequence: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DestinationUnreachable:
    """An ICMP destination unreachable arrived; ``original`` is the quoted datagram."""

    reporter_ip: bytes
    code: int
    original: bytes


@dataclass(frozen=True, slots=True)
class ArpResolutionFailed:
    """No ARP reply for ``ip`` after the last retry; its queued packets were dropped."""

    ip: bytes
    dropped: int


NetEvent = UdpDatagram | EchoReply | DestinationUnreachable | ArpResolutionFailed
