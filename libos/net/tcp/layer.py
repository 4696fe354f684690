"""The TCP layer of the libOS: demultiplexing, listeners and the socket-facing API.

The IP layer calls ``segment_received`` with each TCP payload of an IPv4 packet and
drains ``outbox`` of ``(dst_ip, src_ip, segment)`` triples to wrap and send. The event
loop calls ``on_timer(now)`` once ``now >= next_deadline()``. Nothing here raises on
bad input: a malformed segment is dropped and counted.

The event loop asks for ``next_deadline`` on every turn, and a server holds many idle
connections, so neither that call nor ``on_timer`` looks at every connection: each
connection reports its earliest deadline whenever it changes (``reschedule``), and the
layer keeps those in a heap with lazy deletion. An entry is live only while it is the
one recorded for its connection; stale entries are dropped when they reach the top, and
the heap is rebuilt when they outnumber the live ones. Connections with output queued by
the application wait in the dirty set until ``flush``.

A SYN flood is bounded by the listener backlog: once half-open plus not-yet-accepted
connections reach it, further SYNs are dropped and counted (no SYN cookies), so memory
stays proportional to the backlog whatever the attack rate.
"""

from __future__ import annotations

import heapq
import random
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from libos import fast
from libos.net.tcp.connection import PREDICT_WINDOW_UPDATE, TcpConnection
from libos.net.tcp.control_block import STATE_CODES
from libos.net.tcp.isn import IsnGenerator
from libos.net.tcp.seq import seq_add
from libos.net.tcp.types import TcpConfig, TcpCounters, TcpEvent, TcpState
from vdev.wire.errors import ChecksumError, TruncatedError, WireError
from vdev.wire.tcp import ACK, RST, SYN, TcpSegment

# (remote IP, source port, destination port, seq, ack, flags, window, options, payload,
# now) -> True if the frame was posted, False or None if not: NetStack.write_tcp.
FieldsSender = Callable[[bytes, int, int, int, int, int, int, bytes, "bytes | memoryview", float], "bool | None"]

# RFC 6056 recommends the whole range above 1023; we keep to the IANA dynamic range.
EPHEMERAL_PORTS: Final = range(49152, 65536)
MAX_BACKLOG: Final = 65535

FourTuple = tuple[bytes, int, bytes, int]
# What a layer runs on unless told otherwise: the compiled module with header prediction,
# unless ARRAKIS_PURE=1 or ARRAKIS_TCP_PREDICT=0 (see libos.fast).
DEFAULT_FAST_PATH: Final = (fast.ffi, fast.lib) if fast.ENABLED and fast.TCP_PREDICT else None
# The TCP ports of a frame with a 20-byte IPv4 header.
_PORTS: Final = struct.Struct("!HH")
_TCP_OFFSET: Final = 34
# Rebuild the timer heap once stale entries outnumber live ones by this much.
_HEAP_SLACK: Final = 64


class TcpListener:
    """A passive open on one port (RFC 9293 LISTEN)."""

    def __init__(self, layer: TcpLayer, port: int, backlog: int, local_ip: bytes | None) -> None:
        self.port = port
        self.backlog = backlog
        self.local_ip = local_ip
        self.half_open = 0
        self.accept_queue: deque[TcpConnection] = deque()
        self.closed = False
        self._layer = layer

    def accept(self) -> TcpConnection | None:
        """The oldest established connection not yet accepted, or None."""
        while self.accept_queue:
            conn = self.accept_queue.popleft()
            if conn.state != TcpState.CLOSED or conn.readable:
                return conn
        return None

    @property
    def pending(self) -> int:
        """Connections counted against the backlog."""
        return self.half_open + len(self.accept_queue)

    def close(self, now: float) -> None:
        """Stop listening and abort the connections nobody accepted."""
        self._layer.unlisten(self, now)


class TcpLayer:
    """All TCP connections and listeners of one libOS instance."""

    def __init__(
        self,
        config: TcpConfig | None = None,
        *,
        isn_key: bytes | None = None,
        rng: random.Random | None = None,
        fast_path: tuple[Any, Any] | None = DEFAULT_FAST_PATH,
    ) -> None:
        """``fast_path``: the compiled module's ``(ffi, lib)`` for header prediction and
        control blocks in C, or None for the pure-Python path."""
        self.config = config if config is not None else TcpConfig()
        self.counters = TcpCounters()
        self.outbox: list[tuple[bytes, bytes, bytes]] = []
        # When set (the compiled path on a VNIC), segments go to this sender, which builds
        # the frame in C straight into a TX buffer; it returns False to decline, and the
        # segment then takes the outbox. Only used while the outbox is empty, so segments
        # leave in the order they were made.
        self.direct_send: Callable[[bytes, TcpSegment, float], bool] | None = None
        # The same for segments without options or urgent data, given as header fields:
        # the data and ACK segments of an established connection, which then never
        # become a Python object (``transmit_fields``).
        self.direct_fields: FieldsSender | None = None
        self._events: deque[tuple[TcpConnection, TcpEvent]] = deque()
        self._connections: dict[FourTuple, TcpConnection] = {}
        self._listeners: dict[tuple[bytes | None, int], TcpListener] = {}
        self._listener_of: dict[TcpConnection, TcpListener] = {}
        self._dirty: set[TcpConnection] = set()
        # Timers: a heap of (deadline, entry number, connection); the live entry of a
        # connection is the very tuple ``_timer_entry`` holds for it. The entry number
        # breaks ties, so connections are never compared.
        self._timers: list[tuple[float, int, TcpConnection]] = []
        self._timer_entry: dict[TcpConnection, tuple[float, int, TcpConnection]] = {}
        self._next_entry = 0
        # When several connections are due at once they run in the order they were
        # created, as they would in a walk over ``_connections``.
        self._serial: dict[TcpConnection, int] = {}
        self._next_serial = 0
        self._isn = IsnGenerator(isn_key)
        self._rng = rng if rng is not None else random.Random()
        self._last_now = 0.0
        self._challenge_window_start = float("-inf")
        self._challenge_count = 0
        # Header prediction in C (``fast_path``): the cffi module, its prediction call and
        # the one summary record it fills.
        self._ffi: Any = None
        self._predict: Any = None
        self._summary: Any = None
        if fast_path is not None:
            ffi, lib = fast_path
            if (
                lib.ARX_TCP_ESTABLISHED != STATE_CODES[TcpState.ESTABLISHED]
                or lib.ARX_PREDICT_WINDOW_UPDATE != PREDICT_WINDOW_UPDATE
            ):
                raise RuntimeError("libos.fast and libos.net.tcp disagree on their constants: rebuild")
            self._ffi = ffi
            self._predict = lib.arx_tcp_predict
            self._summary = ffi.new("struct arx_tcp_summary *")

    @property
    def compiled(self) -> bool:
        """Whether connections keep their state in C and header prediction runs."""
        return self._predict is not None

    def _new_shared(self) -> Any:
        ffi = self._ffi
        return None if ffi is None else ffi.new("struct arx_tcb *")


    def listen(self, port: int, backlog: int = 128, local_ip: bytes | None = None) -> TcpListener:
        """Accept connections to ``port`` (on ``local_ip``, or any address if None)."""
        if not 0 < port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
        if not 0 < backlog <= MAX_BACKLOG:
            raise ValueError(f"backlog {backlog} out of range")
        if local_ip is not None:
            local_ip = _address(local_ip)
        key = (local_ip, port)
        if key in self._listeners:
            raise OSError(f"port {port} is already listening")
        listener = TcpListener(self, port, backlog, local_ip)
        self._listeners[key] = listener
        return listener

    def accept(self, port: int, local_ip: bytes | None = None) -> TcpConnection | None:
        listener = self._listeners.get((local_ip, port))
        return listener.accept() if listener is not None else None

    def unlisten(self, listener: TcpListener, now: float) -> None:
        if listener.closed:
            return
        listener.closed = True
        self._listeners.pop((listener.local_ip, listener.port), None)
        for conn, owner in list(self._listener_of.items()):
            if owner is listener:
                conn.abort(now)
        for conn in listener.accept_queue:
            conn.abort(now)
        listener.accept_queue.clear()

    def connect(
        self,
        local_ip: bytes,
        remote_ip: bytes,
        remote_port: int,
        now: float,
        local_port: int | None = None,
    ) -> TcpConnection:
        """Active open: the SYN is in the outbox when this returns."""
        local_ip = _address(local_ip)
        remote_ip = _address(remote_ip)
        if not 0 < remote_port <= 0xFFFF:
            raise ValueError(f"port {remote_port} out of range")
        self._last_now = now
        if local_port is None:
            local_port = self._pick_port(local_ip, remote_ip, remote_port)
        elif not 0 < local_port <= 0xFFFF:
            raise ValueError(f"port {local_port} out of range")
        key = (local_ip, local_port, remote_ip, remote_port)
        if key in self._connections:
            raise OSError("address already in use for this remote endpoint")
        iss = self._isn.isn(local_ip, local_port, remote_ip, remote_port, now)
        conn = TcpConnection(
            self, self.config, local_ip, local_port, remote_ip, remote_port, iss, passive=False,
            shared=self._new_shared(),
        )
        self._add_connection(key, conn)
        conn.open_active(now)
        return conn

    def pop_events(self) -> list[tuple[TcpConnection, TcpEvent]]:
        """Events since the last call, oldest first."""
        events = list(self._events)
        self._events.clear()
        return events

    def drain_outbox(self) -> list[tuple[bytes, bytes, bytes]]:
        out = self.outbox
        self.outbox = []
        return out

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def connection(self, four_tuple: FourTuple) -> TcpConnection | None:
        return self._connections.get(four_tuple)


    def segment_received(
        self, src_ip: bytes, dst_ip: bytes, segment: bytes | memoryview, now: float, verified: bool = False
    ) -> None:
        """One TCP segment from the IP layer; never raises on malformed input.

        ``verified``: the compiled receive path has already checked the checksum.
        """
        self._last_now = now
        counters = self.counters
        counters.segments_in += 1
        if len(src_ip) != 4 or len(dst_ip) != 4:
            counters.drop_bad_address += 1
            return
        src_ip = bytes(src_ip)
        dst_ip = bytes(dst_ip)
        try:
            seg = TcpSegment.parse(segment, src_ip, dst_ip, verify_checksum=not verified)
        except TruncatedError:
            counters.drop_truncated += 1
            return
        except ChecksumError:
            counters.drop_checksum += 1
            return
        except WireError:
            counters.drop_malformed += 1
            return
        conn = self._connections.get((dst_ip, seg.dst_port, src_ip, seg.src_port))
        if conn is not None:
            conn.segment_arrived(seg, now)
            return
        listener = self._listeners.get((dst_ip, seg.dst_port)) or self._listeners.get(
            (None, seg.dst_port)
        )
        if listener is None:
            counters.drop_no_listener += 1
            self._reset_unknown(src_ip, dst_ip, seg)
            return
        self._listen_input(listener, src_ip, dst_ip, seg, now)

    def frame_received(self, src_ip: bytes, dst_ip: bytes, frame: bytes, end: int, now: float) -> None:
        """A whole Ethernet frame whose IPv4 header (20 bytes, ending at 34) and TCP
        checksum C verified; the segment ends at ``end``. On the compiled path the
        connection first tries header prediction; everything else, and every segment on
        the pure path, goes to ``segment_received`` unchanged."""
        predict = self._predict
        if predict is not None and type(frame) is bytes and end >= _TCP_OFFSET + 4:
            src_port, dst_port = _PORTS.unpack_from(frame, _TCP_OFFSET)
            conn = self._connections.get((dst_ip, dst_port, src_ip, src_port))
            if conn is not None:
                self._last_now = now  # the clock of what the connection sends
                if conn.predicted_arrival(frame, predict, self._summary, now):
                    counters = self.counters
                    counters.segments_in += 1
                    counters.predicted += 1
                    return
        self.segment_received(src_ip, dst_ip, memoryview(frame)[_TCP_OFFSET:end], now, True)

    def next_deadline(self) -> float | None:
        """When ``on_timer`` must next run; a time already past if output is pending."""
        if self._dirty:
            return self._last_now
        timers = self._timers
        live = self._timer_entry
        while timers:
            top = timers[0]
            if live.get(top[2]) is top:
                return top[0]
            heapq.heappop(timers)
        return None

    def on_timer(self, now: float) -> None:
        """Run due timers and send what the application queued."""
        self._last_now = now
        self.flush(now)
        timers = self._timers
        live = self._timer_entry
        due: list[TcpConnection] = []
        while timers and timers[0][0] <= now:
            top = heapq.heappop(timers)
            conn = top[2]
            if live.get(conn) is top:
                del live[conn]
                due.append(conn)
        if len(due) > 1:
            serial = self._serial
            due.sort(key=lambda conn: serial.get(conn, -1))
        for conn in due:
            deadline = conn.next_deadline()
            if deadline is not None and deadline <= now:
                conn.on_timer(now)  # reports its next deadline itself
            else:
                self.reschedule(conn, deadline)

    def flush(self, now: float) -> None:
        """Transmit data queued by ``send`` and window updates queued by ``recv``."""
        self._last_now = now
        while self._dirty:
            conn = self._dirty.pop()
            conn.flush(now)


    def transmit(self, local_ip: bytes, remote_ip: bytes, segment: TcpSegment) -> None:
        """Send one segment of the connection between these addresses, now: its payload
        may be a view valid only during the call."""
        self.counters.segments_out += 1
        direct = self.direct_send
        if direct is not None and not self.outbox and direct(remote_ip, segment, self._last_now):
            return
        self.outbox.append((remote_ip, local_ip, segment.emit(local_ip, remote_ip)))

    def transmit_fields(
        self,
        local_ip: bytes,
        remote_ip: bytes,
        src_port: int,
        dst_port: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | memoryview,
    ) -> None:
        """``transmit`` for a segment without options or urgent data, as its header
        fields: on the compiled path the frame is written in C with no segment object;
        otherwise the same bytes as ``transmit`` would queue, from a segment made here."""
        self.counters.segments_out += 1
        direct = self.direct_fields
        if direct is not None and not self.outbox and direct(
            remote_ip, src_port, dst_port, seq, ack, flags, window, b"", payload, self._last_now
        ):
            return
        segment = TcpSegment(src_port, dst_port, seq, ack, flags, window, payload)
        self.outbox.append((remote_ip, local_ip, segment.emit(local_ip, remote_ip)))

    def post_event(self, conn: TcpConnection, event: TcpEvent) -> None:
        self._events.append((conn, event))

    def mark_dirty(self, conn: TcpConnection) -> None:
        self._dirty.add(conn)

    def reschedule(self, conn: TcpConnection, deadline: float | None) -> None:
        """``conn``'s earliest deadline is now ``deadline`` (None: no timer runs).

        Connections call this at the end of every entry point that may move a timer.
        """
        live = self._timer_entry
        current = live.get(conn)
        if current is not None and current[0] == deadline:
            return
        if deadline is None:
            live.pop(conn, None)
            return
        if conn not in self._serial:
            return  # already forgotten by ``connection_closed``
        entry = (deadline, self._next_entry, conn)
        self._next_entry += 1
        live[conn] = entry
        timers = self._timers
        heapq.heappush(timers, entry)
        if len(timers) > 2 * len(live) + _HEAP_SLACK:
            # Entries replaced before they fell due pile up (an RTO restarted by every
            # ACK); drop them all in one linear pass.
            timers[:] = [item for item in timers if live.get(item[2]) is item]
            heapq.heapify(timers)

    def allow_challenge_ack(self, now: float) -> bool:
        """RFC 5961 section 7: at most ``challenge_ack_limit`` per interval."""
        if now - self._challenge_window_start >= self.config.challenge_ack_interval:
            self._challenge_window_start = now
            self._challenge_count = 0
        if self._challenge_count >= self.config.challenge_ack_limit:
            return False
        self._challenge_count += 1
        return True

    def connection_established(self, conn: TcpConnection) -> None:
        listener = self._listener_of.pop(conn, None)
        if listener is not None:
            listener.half_open -= 1
            if listener.closed:
                return
            listener.accept_queue.append(conn)

    def connection_closed(self, conn: TcpConnection) -> None:
        self._connections.pop(conn.four_tuple, None)
        self._dirty.discard(conn)
        self._timer_entry.pop(conn, None)
        self._serial.pop(conn, None)
        listener = self._listener_of.pop(conn, None)
        if listener is not None:
            listener.half_open -= 1


    def _add_connection(self, key: FourTuple, conn: TcpConnection) -> None:
        self._connections[key] = conn
        self._serial[conn] = self._next_serial
        self._next_serial += 1

    def _listen_input(
        self, listener: TcpListener, src_ip: bytes, dst_ip: bytes, seg: TcpSegment, now: float
    ) -> None:
        """RFC 9293 3.10.7.2 (LISTEN)."""
        flags = seg.flags
        if flags & RST:
            self.counters.drop_state += 1
            return
        if flags & ACK:
            self._reset_unknown(src_ip, dst_ip, seg)
            self.counters.drop_state += 1
            return
        if not flags & SYN:
            self.counters.drop_state += 1
            return
        if listener.pending >= listener.backlog:
            self.counters.drop_backlog_full += 1
            return
        iss = self._isn.isn(dst_ip, seg.dst_port, src_ip, seg.src_port, now)
        conn = TcpConnection(
            self, self.config, dst_ip, seg.dst_port, src_ip, seg.src_port, iss, passive=True,
            shared=self._new_shared(),
        )
        self._add_connection(conn.four_tuple, conn)
        self._listener_of[conn] = listener
        listener.half_open += 1
        conn.open_passive(seg, now)

    def _reset_unknown(self, src_ip: bytes, dst_ip: bytes, seg: TcpSegment) -> None:
        """RST for a segment that matches no connection (RFC 9293 3.10.7.1)."""
        if seg.flags & RST:
            return
        if seg.flags & ACK:
            reply = TcpSegment(seg.dst_port, seg.src_port, seg.ack, 0, RST, 0)
        else:
            reply = TcpSegment(
                seg.dst_port, seg.src_port, 0, seq_add(seg.seq, seg.seg_len), RST | ACK, 0
            )
        self.counters.rst_sent += 1
        self.counters.segments_out += 1
        self.outbox.append((src_ip, dst_ip, reply.emit(dst_ip, src_ip)))

    def _pick_port(self, local_ip: bytes, remote_ip: bytes, remote_port: int) -> int:
        """RFC 6056 algorithm 1: random port, linear probe on collision."""
        span = len(EPHEMERAL_PORTS)
        start = self._rng.randrange(span)
        for step in range(span):
            port = EPHEMERAL_PORTS[(start + step) % span]
            if (local_ip, port, remote_ip, remote_port) not in self._connections and (
                (None, port) not in self._listeners and (local_ip, port) not in self._listeners
            ):
                return port
        raise OSError("no ephemeral port left for this remote endpoint")


def _address(value: bytes) -> bytes:
    raw = bytes(value)
    if len(raw) != 4:
        raise ValueError("an IPv4 address is 4 bytes")
    return raw
