"""The libOS TCP (RFC 9293): ``TcpLayer`` owns the connections of one libOS instance.

The modules, lowest first: ``seq`` and ``types``; the helpers ``isn``, ``rto``,
``congestion``, ``sack`` and ``reassembly``; ``connection`` (one connection); ``layer``
(demultiplexing, listeners). Everything above the package imports from here.
"""

from libos.net.tcp.connection import TcpConnection
from libos.net.tcp.layer import EPHEMERAL_PORTS, TcpLayer, TcpListener
from libos.net.tcp.types import (
    Closed,
    CloseReason,
    Connected,
    DataReadable,
    PeerClosed,
    Reset,
    TcpConfig,
    TcpCounters,
    TcpEvent,
    TcpState,
)

__all__ = [
    "EPHEMERAL_PORTS",
    "CloseReason",
    "Closed",
    "Connected",
    "DataReadable",
    "PeerClosed",
    "Reset",
    "TcpConfig",
    "TcpConnection",
    "TcpCounters",
    "TcpEvent",
    "TcpLayer",
    "TcpListener",
    "TcpState",
]
