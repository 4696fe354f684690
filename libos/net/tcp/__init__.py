"""The libOS TCP (RFC 9293): ``TcpLayer`` owns the connections of one libOS instance.

The modules, each importing only those listed before it (an import-linter contract in
pyproject.toml holds them to it):

- ``seq``, ``types``: sequence arithmetic; states, events, close reasons, counters, tunables;
- ``isn``, ``rto``, ``congestion``, ``sack``, ``reassembly``: one algorithm each;
- ``control_block``, ``timers``: a connection's shared state and its named deadlines;
- ``lifecycle``: the Connected and Closed events, TIME-WAIT and CLOSED;
- ``receiver``: receive buffer, reassembly, FIN, the window we offer;
- ``sender``: send buffer, segments, retransmission, SACK recovery, probes;
- ``arrival``: the segment-arrival steps of RFC 9293 3.10.7;
- ``connection``: ``TcpConnection``, the public face composing the above;
- ``layer``: demultiplexing, listeners, the timer heap.

The rest of the libOS imports from here (tests also reach the helper modules).
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
