"""A memcached-compatible server: ASCII protocol over TCP and UDP, sans-I/O.

``McEngine`` holds one server's store and counters; ``McSession`` speaks the protocol
for one TCP connection; ``McUdpHandler`` answers datagrams. The transport (sockets or the
libOS queues) only moves bytes and supplies ``now``.
"""

from libos.apps.memcache.protocol import MAX_GET_LINE, MAX_LINE, McEngine, McSession
from libos.apps.memcache.store import McStore, StoreError, StoreResult
from libos.apps.memcache.udp import MalformedFrame, McUdpHandler, UdpFrameHeader

__all__ = [
    "MAX_GET_LINE",
    "MAX_LINE",
    "MalformedFrame",
    "McEngine",
    "McSession",
    "McStore",
    "McUdpHandler",
    "StoreError",
    "StoreResult",
    "UdpFrameHeader",
]
