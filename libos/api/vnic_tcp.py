"""Stream (TCP) queues of the ``vnic`` backend: tokens over the libOS's sans-I/O TCP.

``VnicStreams`` owns the ``TcpLayer`` and maps its connections to queue descriptors. It
never touches the device or the control plane: ``VnicLibOS`` claims ports, feeds it IP
datagrams (``ip_input``, registered with ``NetStack`` for protocol 6), calls ``poll(now)``
on every turn of the wait loop and carries ``tcp.drain_outbox()`` to ``NetStack.send_ip``.

What completes a token:

* ``pop``: bytes taken from the connection's receive buffer, and only while a ``pop``
  waits: unread bytes stay in that buffer, where they shrink the window we advertise;
  b"" once the peer's FIN arrived and everything before it was read; FAILED after a reset.
* ``push``: every byte handed to ``TcpConnection.send``. The connection takes what fits in
  its bounded send buffer; the rest waits here (at most ``MAX_PENDING_SENDS`` pushes per
  queue) and goes in as acknowledgements free space.
* ``connect``: the handshake ended (CONNECT), or the connection was refused, reset or
  timed out (FAILED).
* ``accept``: a connection completed its handshake on the listener (RFC 9293 3.10.7.2).

``close`` is graceful: pending bytes still go out, then the FIN (RFC 9293 3.10.4).
"""

from __future__ import annotations

import socket
from collections import deque
from dataclasses import dataclass, field

from libos.api.queues import QueueTable
from libos.api.types import Address, LibOSError, Opcode, QResult, SocketKind
from libos.driver.vnic import VnicDriver
from libos.net.stack import NetStack
from libos.net.tcp import (
    CloseReason,
    Connected,
    TcpConfig,
    TcpConnection,
    TcpLayer,
    TcpListener,
    TcpState,
)
from vdev.wire.ipv4 import PROTO_TCP, Ipv4Packet

RECV_SIZE = 65536
MAX_PENDING_SENDS = 1024
MAX_BACKLOG = 65535

_CLOSE_ERRORS = {
    CloseReason.RESET: "connection reset by peer",
    CloseReason.REFUSED: "connection refused",
    CloseReason.TIMEOUT: "connection timed out",
    CloseReason.ABORTED: "connection aborted",
    CloseReason.NORMAL: "connection closed",
}
_OPEN_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
        TcpState.FIN_WAIT_1,
        TcpState.FIN_WAIT_2,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
        TcpState.TIME_WAIT,
    }
)


@dataclass(slots=True, eq=False)
class _Stream:
    port: int = 0  # the bound local port, 0 when none
    listener: TcpListener | None = None
    conn: TcpConnection | None = None
    connecting: int = 0  # the pending connect token, 0 when none
    unsent: deque[tuple[memoryview, int]] = field(default_factory=deque)  # (rest, token)
    accept_tokens: deque[int] = field(default_factory=deque)


def _close_error(conn: TcpConnection) -> str:
    return _CLOSE_ERRORS[conn.close_reason or CloseReason.NORMAL]


class VnicStreams:
    """The TCP queues of one ``VnicLibOS``."""

    def __init__(self, table: QueueTable, config: TcpConfig | None = None) -> None:
        self.table = table
        self.tcp = TcpLayer(config)
        self.deadline: float | None = None  # when ``poll`` next has timer work
        self._streams: dict[int, _Stream] = {}
        self._qd_of: dict[TcpConnection, int] = {}
        self._writers: set[int] = set()  # queues with bytes not yet taken by the connection
        self._acceptors: set[int] = set()  # listening queues with accept tokens waiting
        self._lingering: dict[TcpConnection, deque[tuple[memoryview, int]]] = {}
        self._stale = True  # something happened since ``deadline`` was computed

    def __contains__(self, qd: int) -> bool:
        return qd in self._streams

    def attach(self, stack: NetStack, driver: VnicDriver) -> None:
        """Take IP protocol 6 from ``stack``; on the compiled path, TCP frames are built
        in C into the driver's TX buffers and checksum-verified segments skip Python's check."""
        stack.register_ip_protocol(PROTO_TCP, self.ip_input)
        if driver.compiled:
            stack.tcp_writer = driver.transmit_tcp
            stack.tcp_input_verified = self._verified_input
            self.tcp.direct_send = stack.send_tcp
            self.tcp.direct_fields = stack.write_tcp

    def _verified_input(self, src_ip: bytes, dst_ip: bytes, frame: bytes, end: int, now: float) -> None:
        self._stale = True
        self.tcp.frame_received(src_ip, dst_ip, frame, end, now)

    def ip_input(self, packet: Ipv4Packet, raw: bytes, now: float) -> None:
        """The ``NetStack`` handler for IP protocol 6."""
        self._stale = True
        self.tcp.segment_received(packet.src, packet.dst, packet.payload, now)

    def socket(self) -> int:
        qd = self.table.new_queue(SocketKind.TCP)
        self._streams[qd] = _Stream()
        return qd

    def _stream(self, qd: int) -> _Stream:
        self.table.check(qd)
        stream = self._streams.get(qd)
        if stream is None:
            raise LibOSError(f"queue {qd} is not a TCP queue")
        return stream

    def bound_port(self, qd: int) -> int:
        return self._stream(qd).port

    def bind(self, qd: int, port: int) -> None:
        stream = self._stream(qd)
        if stream.port or stream.conn is not None:
            raise LibOSError(f"queue {qd} is already bound")
        stream.port = port

    def listen(self, qd: int, backlog: int) -> None:
        stream = self._stream(qd)
        if stream.conn is not None or stream.listener is not None:
            raise LibOSError(f"queue {qd} is already connected or listening")
        if not stream.port:
            raise LibOSError(f"queue {qd} is not bound")
        if not 0 < backlog <= MAX_BACKLOG:
            raise LibOSError(f"backlog {backlog} is not in 1..{MAX_BACKLOG}")
        try:
            stream.listener = self.tcp.listen(stream.port, backlog)
        except (OSError, ValueError) as exc:
            raise LibOSError(str(exc)) from None

    def accept(self, qd: int) -> int:
        stream = self._stream(qd)
        if stream.listener is None:
            raise LibOSError(f"queue {qd} is not listening")
        token = self.table.pending(qd)
        stream.accept_tokens.append(token)
        self._acceptors.add(qd)
        self._accept_ready(qd, stream)
        return token

    def connect(
        self, qd: int, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int, now: float
    ) -> int:
        """Active open from ``local_port``; OSError when that 4-tuple is taken."""
        stream = self._stream(qd)
        if stream.conn is not None or stream.listener is not None:
            raise LibOSError(f"queue {qd} is already connected or listening")
        try:
            conn = self.tcp.connect(local_ip, remote_ip, remote_port, now, local_port=local_port)
        except ValueError as exc:
            raise LibOSError(str(exc)) from None
        self._stale = True
        stream.port = local_port
        stream.conn = conn
        self._qd_of[conn] = qd
        token = self.table.pending(qd)
        stream.connecting = token
        return token

    def push(self, qd: int, data: bytes) -> int:
        stream = self._stream(qd)
        conn = stream.conn
        table = self.table
        if conn is None or stream.connecting:
            raise LibOSError(f"queue {qd} is not connected")
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may change its buffer once push returns
        taken = 0
        if not stream.unsent:
            try:
                taken = conn.send(data)
            except OSError:
                table.counters.push_failed += 1
                return table.completed(Opcode.FAILED, qd, error=_close_error(conn))
            self._stale = True
            if taken == len(data):
                return table.push_done(qd)
        view = memoryview(data)
        if len(stream.unsent) >= MAX_PENDING_SENDS:
            table.counters.push_failed += 1
            return table.completed(Opcode.FAILED, qd, error="send queue full")
        token = table.pending(qd)
        stream.unsent.append((view[taken:], token))
        self._writers.add(qd)
        return token

    def pop_service(self, qd: int) -> None:
        """After ``QueueTable.pop`` on a stream queue: complete it now if bytes wait."""
        stream = self._streams[qd]
        if stream.listener is not None:
            raise LibOSError(f"queue {qd} is listening: use accept")
        if stream.conn is not None and not stream.connecting:
            self._read(qd, stream.conn)

    def close(self, qd: int, now: float) -> None:
        stream = self._stream(qd)
        self.table.drop_queue(qd)
        del self._streams[qd]
        self._writers.discard(qd)
        self._acceptors.discard(qd)
        self._stale = True
        if stream.listener is not None:
            stream.listener.close(now)
        conn = stream.conn
        if conn is None:
            return
        del self._qd_of[conn]
        if stream.unsent and conn.state != TcpState.CLOSED:
            self._lingering[conn] = stream.unsent  # the FIN follows the last byte
        else:
            conn.close(now)

    def queues(self) -> list[int]:
        return list(self._streams)

    def poll(self, now: float) -> int:
        """Handle what the TCP layer did since the last call, run due timers."""
        tcp = self.tcp
        if not self._stale:
            # Nothing arrived and the application did nothing: only a timer can be due.
            # (Writers wait for acknowledgements, which are input.)
            deadline = self.deadline
            if deadline is None or now < deadline:
                return 0
        work = self._handle_events()
        if self._writers or self._lingering:
            work += self._feed_writers(now)
        deadline = tcp.next_deadline()
        if deadline is not None and deadline <= now:
            tcp.on_timer(now)
            work += self._handle_events()
        self._stale = False
        self.deadline = tcp.next_deadline()
        return work

    def touched(self) -> None:
        """Say that the application acted (pushed, read): output may be due."""
        self._stale = True

    def _handle_events(self) -> int:
        events = self.tcp.pop_events()
        if not events:
            return 0
        qd_of = self._qd_of
        touched: set[int] = set()
        new_connections = False
        for conn, event in events:
            qd = qd_of.get(conn)
            if qd is not None:
                touched.add(qd)
            elif type(event) is Connected and conn.passive:
                new_connections = True
        streams = self._streams
        for qd in touched:
            stream = streams.get(qd)
            if stream is not None and stream.conn is not None:
                self._service(qd, stream, stream.conn)
        if new_connections:
            # Only listeners with a waiting accept, in queue order (the order of
            # ``_streams``), instead of a walk over every connected queue.
            for qd in sorted(self._acceptors):
                listening = streams.get(qd)
                if listening is not None:
                    self._accept_ready(qd, listening)
        return len(events)

    def _service(self, qd: int, stream: _Stream, conn: TcpConnection) -> None:
        if stream.connecting:
            if conn.state in _OPEN_STATES:
                self.table.finish(stream.connecting, QResult(Opcode.CONNECT, qd))
                stream.connecting = 0
            elif conn.state == TcpState.CLOSED:
                self.table.finish(stream.connecting, QResult(Opcode.FAILED, qd, error=_close_error(conn)))
                stream.connecting = 0
            else:
                return
        if stream.unsent:
            self._feed(qd, stream, conn)
        self._read(qd, conn)

    def _read(self, qd: int, conn: TcpConnection) -> None:
        table = self.table
        while table.wants_data(qd):
            if conn.readable:
                table.deliver(qd, conn.recv(RECV_SIZE), None)
                self._stale = True  # the window may have opened: an update is due
            elif conn.eof:
                table.deliver(qd, b"", None)
            elif conn.state == TcpState.CLOSED:
                table.fail_pops(qd, _close_error(conn))
            else:
                return

    def _feed(self, qd: int, stream: _Stream, conn: TcpConnection) -> None:
        table = self.table
        unsent = stream.unsent
        while unsent:
            view, token = unsent[0]
            try:
                taken = conn.send(view)
            except OSError:
                error = _close_error(conn)
                while unsent:
                    table.counters.push_failed += 1
                    table.finish(unsent.popleft()[1], QResult(Opcode.FAILED, qd, error=error))
                break
            self._stale = True
            if taken < len(view):
                unsent[0] = (view[taken:], token)
                return
            unsent.popleft()
            table.counters.pushed += 1
            table.finish(token, QResult(Opcode.PUSH, qd))
        self._writers.discard(qd)

    def _feed_writers(self, now: float) -> int:
        work = 0
        streams = self._streams
        for qd in list(self._writers):
            stream = streams.get(qd)
            if stream is None or stream.conn is None:
                self._writers.discard(qd)
                continue
            before = len(stream.unsent)
            self._feed(qd, stream, stream.conn)
            work += before - len(stream.unsent)
        for conn, unsent in list(self._lingering.items()):
            while unsent and conn.state != TcpState.CLOSED:
                view, token = unsent[0]
                try:
                    taken = conn.send(view)
                except OSError:
                    unsent.clear()
                    break
                self._stale = True
                if taken < len(view):
                    unsent[0] = (view[taken:], token)
                    break
                unsent.popleft()
            if not unsent or conn.state == TcpState.CLOSED:
                del self._lingering[conn]
                conn.close(now)
                work += 1
        return work

    def _accept_ready(self, qd: int, stream: _Stream) -> None:
        listener = stream.listener
        if listener is None:
            return
        table = self.table
        while stream.accept_tokens:
            conn = listener.accept()
            if conn is None:
                return
            new_qd = table.new_queue(SocketKind.TCP)
            self._streams[new_qd] = _Stream(port=conn.local_port, conn=conn)
            self._qd_of[conn] = new_qd
            address: Address = (socket.inet_ntoa(conn.remote_ip), conn.remote_port)
            table.finish(stream.accept_tokens.popleft(), QResult(Opcode.ACCEPT, qd, address=address, new_qd=new_qd))
        self._acceptors.discard(qd)

    def stats(self) -> dict[str, object]:
        return {"connections": self.tcp.connection_count, **self.tcp.counters.as_dict()}
