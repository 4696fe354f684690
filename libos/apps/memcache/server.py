"""The memcached-compatible server over the queue API: TCP and UDP on one port.

TCP connections run through the ``StreamServer`` loop (``libos.apps.streams``); the
UDP queue is served from that loop too, one request datagram per completed ``pop``
(``McUdpHandler`` answers it, memcached's frame header included). Reply datagrams are
sent with ``pushto``; their tokens are collected by the loop, and no more than
``max_udp_in_flight`` may be outstanding, so a backend that cannot send fast enough
makes us drop replies (counted), as a full socket buffer would, rather than queue
without bound.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from libos.api import Address, LibOS, LibOSError, Opcode, QResult, SocketKind
from libos.apps.streams import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CLIENTS, StreamServer, StreamSession, open_listener
from libos.apps.memcache.protocol import McEngine, McSession
from libos.apps.memcache.udp import McUdpHandler

DEFAULT_MAX_UDP_IN_FLIGHT = 1024


class McConnection:
    """A ``McSession`` seen as a ``StreamSession``."""

    __slots__ = ("mc",)

    def __init__(self, mc: McSession) -> None:
        self.mc = mc

    def feed(self, data: bytes, now: float) -> None:
        self.mc.feed(data, now)

    def take_output(self) -> bytes:
        return self.mc.take_output()

    def has_backlog(self) -> bool:
        return self.mc.has_backlog

    def should_close(self) -> bool:
        return self.mc.should_close

    def close(self) -> None:
        self.mc.close()


@dataclasses.dataclass
class UdpServerCounters:
    datagrams_in: int = 0
    datagrams_out: int = 0
    replies_dropped: int = 0
    pop_failed: int = 0
    push_failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class McServer:
    """One ``McEngine`` shared by the TCP connections and the UDP queue."""

    def __init__(self, los: LibOS, port: int, *, address: str = "0.0.0.0", backlog: int = 1024,
                 udp: bool = True, clock: Callable[[], float] = time.time, engine: McEngine | None = None,
                 max_clients: int = DEFAULT_MAX_CLIENTS,
                 max_udp_in_flight: int = DEFAULT_MAX_UDP_IN_FLIGHT) -> None:
        if max_udp_in_flight < 1 or max_clients < 1:
            raise ValueError("max_udp_in_flight and max_clients must be at least 1")
        self.los = los
        self.clock = clock
        self.engine = engine if engine is not None else McEngine(clock())
        self.listen_qd = open_listener(los, address, port, backlog)
        self.server = StreamServer(los, self.listen_qd, self._new_session, clock=clock,
                                   max_clients=max_clients)
        self.udp_counters = UdpServerCounters()
        self.max_udp_in_flight = max_udp_in_flight
        self._udp_in_flight = 0
        self.udp_qd = -1
        self.udp_handler: McUdpHandler | None = None
        if udp:
            qd = los.socket(SocketKind.UDP)
            try:
                los.bind(qd, (address, port))
            except LibOSError:
                los.close(qd)
                los.close(self.listen_qd)
                raise
            self.udp_qd = qd
            self.udp_handler = McUdpHandler(self.engine)
            self._udp_read()

    def _new_session(self, now: float) -> StreamSession:
        return McConnection(self.engine.open_session(now))

    def _udp_read(self) -> None:
        self.server.watch(self.los.pop(self.udp_qd), self._udp_popped)

    def _udp_popped(self, result: QResult) -> None:
        # Re-arm first: whatever this datagram holds, the queue keeps being served.
        self._udp_read()
        handler = self.udp_handler
        if result.opcode is not Opcode.POP or result.address is None or handler is None:
            self.udp_counters.pop_failed += 1
            return
        self.udp_counters.datagrams_in += 1
        replies = handler.handle_datagram(result.data, self.clock())
        if self._udp_in_flight + len(replies) > self.max_udp_in_flight:
            # All or nothing: a reply missing one of its datagrams is useless to the client.
            self.udp_counters.replies_dropped += 1
            return
        for datagram in replies:
            self._udp_send(datagram, result.address)

    def _udp_send(self, datagram: bytes, address: Address) -> None:
        try:
            token = self.los.pushto(self.udp_qd, datagram, address)
        except LibOSError:
            self.udp_counters.push_failed += 1
            return
        self._udp_in_flight += 1
        self.udp_counters.datagrams_out += 1
        self.server.watch(token, self._udp_pushed)

    def _udp_pushed(self, result: QResult) -> None:
        self._udp_in_flight -= 1
        if result.opcode is not Opcode.PUSH:
            self.udp_counters.push_failed += 1

    def turn(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.server.turn(idle_timeout)

    def serve(self, should_stop: Callable[[], bool]) -> None:
        self.server.serve(should_stop)

    def stats(self) -> dict[str, object]:
        counters = self.engine.counters
        out: dict[str, object] = {
            "server": self.server.stats(),
            "cmd_get": counters.cmd_get,
            "cmd_set": counters.cmd_set,
            "curr_items": self.engine.store.curr_items,
            "evictions": self.engine.store.counters.evictions,
            "limit_maxbytes": self.engine.store.max_bytes,
            "udp": self.udp_counters.as_dict(),
            "libos": self.los.stats(),
        }
        if self.udp_handler is not None:
            out["udp_frames"] = dataclasses.asdict(self.udp_handler.counters)
        return out
