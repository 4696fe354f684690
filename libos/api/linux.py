"""The ``linux`` backend: the same queue API over kernel sockets, the baseline.

It must be a fair, well-tuned baseline, never a strawman: non-blocking sockets, one epoll
set, level-triggered readiness, and every readable socket drained until EAGAIN (up to a
burst) so that a busy server pays one ``epoll_wait`` per burst, not per datagram. What is left
per request is what Linux costs: ``recvfrom`` and ``sendto`` system calls and the kernel's
network stack behind them.

Stream (TCP) queues use the same epoll set, edge-triggered (``EPOLLET``), because a stream
is read only while the application has a ``pop`` waiting: the bytes it has not asked for
yet stay in the kernel's receive buffer, where they close the window on the sender, and a
level-triggered readable socket would wake every ``epoll_wait`` meanwhile. Some facts
about edge-triggered epoll this code relies on:

* An event is queued for every wake-up of the socket after the last ``epoll_wait`` that
  reported it (new data, a FIN, an error, freed send space), not only for empty ->
  non-empty transitions. So a ``recv`` that returns fewer bytes than asked proves the
  buffer was empty at that moment and anything later raises a new event: no second
  ``recv`` ending in EAGAIN is needed (nginx relies on the same fact). The exception is
  a FIN already reported (``EPOLLRDHUP``): then the stream is read until ``recv``
  returns b"".
* A socket in SYN-SENT reports nothing; once the handshake ends it reports ``EPOLLOUT``
  (or ``EPOLLERR``/``EPOLLHUP`` and an ``SO_ERROR`` when it failed).
* ``EPOLLOUT`` is asked for only while a handshake or unsent bytes wait (``_arm_out``), as
  asyncio does; otherwise every ACK that frees send space would queue an event.
  ``EPOLL_CTL_MOD`` re-checks readiness, so an edge that came before it is not lost.
* The usual event of a busy server, new data for a connection with a pop waiting, is read
  in ``_sleep`` itself: one ``recv`` that drains the socket completes the pop.

Every connected socket has ``TCP_NODELAY``: the API hands whole messages to ``push``,
and Nagle's algorithm would only add a round trip to request/response traffic.
"""

from __future__ import annotations

import errno
import os
import select
import socket as socket_module
from collections import deque
from dataclasses import dataclass, field

from libos.api.queues import POP, PollingRuntime, QueueTable, new_result
from libos.api.types import Address, LibOSError, Opcode, QResult, SocketKind

RECV_BURST = 64
RECV_SIZE = 65536
MAX_PENDING_SENDS = 1024
ACCEPT_BURST = 64  # connections taken off a listener per readiness event
MAX_BACKLOG = 65535

_STREAM_IN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_STREAM_EVENTS = _STREAM_IN_EVENTS | select.EPOLLOUT
_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
_IN_OUT = select.EPOLLIN | select.EPOLLOUT


@dataclass(slots=True, eq=False)
class _Stream:
    """What the backend knows of one TCP socket between edge-triggered events."""

    sock: socket_module.socket
    qd: int = -1
    registered: bool = False
    out_armed: bool = False  # EPOLLOUT asked for: while connecting or while bytes wait to go
    listening: bool = False
    connecting: int = 0  # the pending connect token, 0 when none
    connected: bool = False
    readable: bool = False  # data, a FIN or an error may be waiting
    writable: bool = False
    peer_closed: bool = False  # EPOLLRDHUP seen: read until recv() returns b""
    eof: bool = False
    error: str = ""
    unsent: deque[tuple[memoryview, int]] = field(default_factory=deque)  # (rest, token)
    accepted: deque[tuple[socket_module.socket, Address]] = field(default_factory=deque)
    accept_tokens: deque[int] = field(default_factory=deque)


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc)


class LinuxLibOS(PollingRuntime):
    backend = "linux"

    def __init__(self, netns: str | None = None, reuse_port: bool = False) -> None:
        # SO_REUSEPORT on every socket: worker processes each bind the same port and the
        # kernel spreads connections and datagrams over them by 4-tuple hash.
        self.reuse_port = reuse_port
        if netns:
            # The baseline host is a network namespace of its own (DESIGN section 2).
            from pyroute2 import netns as pyroute2_netns

            pyroute2_netns.setns(netns, flags=0)  # never create a namespace that is gone
        self.table = QueueTable()
        self._epoll = select.epoll()
        self._sockets: dict[int, socket_module.socket] = {}
        self._by_fd: dict[int, int] = {}
        self._stream_by_fd: dict[int, _Stream] = {}  # registered streams, by socket fd
        self._readable: set[int] = set()
        self._unsent: dict[int, deque[tuple[bytes, Address]]] = {}
        self._streams: dict[int, _Stream] = {}
        self._stream_work: set[int] = set()  # stream queues with events not yet handled
        self._lingering: dict[int, _Stream] = {}  # fd -> closed stream still sending

    def socket(self, kind: SocketKind) -> int:
        if kind is SocketKind.TCP:
            return self._stream_socket()
        if kind is not SocketKind.UDP:
            raise LibOSError(f"unknown socket kind {kind!r}")
        sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM)
        sock.setblocking(False)
        if self.reuse_port:
            sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEPORT, 1)
        qd = self.table.new_queue(kind)
        self._sockets[qd] = sock
        self._by_fd[sock.fileno()] = qd
        self._unsent[qd] = deque()
        self._epoll.register(sock.fileno(), select.EPOLLIN)
        return qd

    def _sock(self, qd: int) -> socket_module.socket:
        self.table.check(qd)
        return self._sockets[qd]

    def bind(self, qd: int, address: Address) -> None:
        try:
            self._sock(qd).bind(address)
        except OSError as exc:
            raise LibOSError(f"bind {address}: {exc.strerror}") from None

    def pop(self, qd: int) -> int:
        stream = self._streams.get(qd)
        if stream is None or stream.readable or stream.eof or stream.error or stream.listening:
            token = self.table.pop(qd)
            if stream is not None:
                self._pop_stream(qd, stream)
            return token
        # A stream with nothing to read yet (the usual case): ``table.pop`` inline. Nothing
        # ever waits in a stream queue's arrived line (``_read`` delivers only to pops).
        table = self.table
        token = next(table.next_token)
        table.waiting_pops[qd].append(token)
        table.token_qd[token] = qd
        return token

    def pushto(self, qd: int, data: bytes, address: Address) -> int:
        if qd in self._streams:
            raise LibOSError(f"queue {qd} is a stream: use push")
        sock = self._sock(qd)
        unsent = self._unsent[qd]
        if not unsent:
            try:
                sock.sendto(data, address)
                self.table.counters.pushed += 1
                return self.table.completed(Opcode.PUSH, qd)
            except BlockingIOError:
                pass
            except OSError as exc:
                self.table.counters.push_failed += 1
                return self.table.completed(Opcode.FAILED, qd, error=exc.strerror or str(exc))
        if len(unsent) >= MAX_PENDING_SENDS:
            self.table.counters.push_failed += 1
            return self.table.completed(Opcode.FAILED, qd, error="send queue full")
        unsent.append((data, address))
        self._epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLOUT)
        return self.table.completed(Opcode.PUSH, qd)

    def _progress(self, now: float) -> int:
        work = 0
        table = self.table
        if self._stream_work:
            work += self._progress_streams()
        if not self._readable:
            return work
        for qd in list(self._readable):
            sock = self._sockets.get(qd)
            if sock is None:
                self._readable.discard(qd)
                continue
            for _ in range(RECV_BURST):
                try:
                    data, address = sock.recvfrom(RECV_SIZE)
                except BlockingIOError:
                    self._readable.discard(qd)
                    break
                except OSError:
                    # ICMP errors surface here (ECONNREFUSED); a server ignores them.
                    continue
                table.deliver(qd, data, address)
                work += 1
        return work

    def _flush(self, qd: int) -> None:
        sock = self._sockets[qd]
        unsent = self._unsent[qd]
        while unsent:
            data, address = unsent[0]
            try:
                sock.sendto(data, address)
            except BlockingIOError:
                return
            except OSError:
                self.table.counters.push_failed += 1
            else:
                self.table.counters.pushed += 1
            unsent.popleft()
        self._epoll.modify(sock.fileno(), select.EPOLLIN)

    def _sleep(self, timeout: float) -> None:
        if self._readable or self._stream_work:
            return  # a burst was cut short: more is waiting, no need to ask the kernel
        stream_by_fd = self._stream_by_fd
        table = self.table
        waiting_pops = table.waiting_pops
        token_qd = table.token_qd
        done = table.done
        counters = table.counters
        for fd, mask in self._epoll.poll(timeout):
            stream = stream_by_fd.get(fd)
            if stream is not None:
                qd = stream.qd
                if mask == _IN_OUT or mask == select.EPOLLIN:
                    # The usual event of a busy connection (new data, often with send space
                    # freed by the peer's ACK), handled here when nothing else waits on it.
                    stream.readable = True
                    if mask == _IN_OUT:
                        stream.writable = True
                    if not stream.unsent and not stream.connecting and not stream.listening:
                        waiting = waiting_pops[qd]
                        if not waiting:
                            continue  # without a pop waiting, the next pop reads
                        # What ``_read`` does, inline for its usual case: one recv that
                        # drains the socket and completes the pop.
                        try:
                            data = stream.sock.recv(RECV_SIZE)
                        except BlockingIOError:
                            stream.readable = False
                            continue
                        except OSError as exc:
                            self._stream_failed(qd, stream, _strerror(exc))
                            continue
                        if data and len(data) < RECV_SIZE and not stream.peer_closed:
                            token = waiting.popleft()
                            del token_qd[token]
                            done[token] = new_result(QResult, (POP, qd, data, None, -1, ""))
                            counters.delivered += 1
                            stream.readable = False  # drained; see the module docstring
                        elif self._read_more(qd, stream, data):
                            self._stream_work.add(qd)  # the burst was cut short
                        continue
                    self._stream_work.add(qd)
                    continue
                if mask & _READ_EVENTS:
                    stream.readable = True
                    if mask & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                        stream.peer_closed = True
                if mask & _WRITE_EVENTS:
                    stream.writable = True
                self._stream_work.add(qd)
                continue
            udp_qd = self._by_fd.get(fd)
            if udp_qd is None:
                lingering = self._lingering.get(fd)
                if lingering is not None and mask & _WRITE_EVENTS:
                    lingering.writable = True
                    self._flush_lingering(fd, lingering)
                continue
            if mask & select.EPOLLOUT:
                self._flush(udp_qd)
            if mask & (select.EPOLLIN | select.EPOLLERR):
                self._readable.add(udp_qd)

    def close(self, qd: int) -> None:
        stream = self._streams.get(qd)
        if stream is not None:
            self._close_stream(qd, stream)
            return
        sock = self._sock(qd)
        self.table.drop_queue(qd)
        self._epoll.unregister(sock.fileno())
        del self._by_fd[sock.fileno()]
        del self._sockets[qd]
        del self._unsent[qd]
        sock.close()

    def shutdown(self) -> None:
        for qd in list(self._sockets):
            self.close(qd)
        for stream in self._lingering.values():
            stream.sock.close()
        self._lingering.clear()
        self._epoll.close()

    def stats(self) -> dict[str, object]:
        return {"backend": self.backend, "queues": self.table.counters.as_dict()}

    def _stream_socket(self) -> int:
        sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_STREAM)
        sock.setblocking(False)
        # A restarted server must be able to bind its port while old connections sit in
        # TIME-WAIT, as every Linux server does.
        sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEPORT, 1)
        qd = self.table.new_queue(SocketKind.TCP)
        self._sockets[qd] = sock
        self._streams[qd] = _Stream(sock, qd)
        return qd

    def _stream(self, qd: int) -> _Stream:
        self.table.check(qd)
        stream = self._streams.get(qd)
        if stream is None:
            raise LibOSError(f"queue {qd} is not a TCP queue")
        return stream

    def _register(self, qd: int, stream: _Stream, out: bool = False) -> None:
        if not stream.registered:
            fd = stream.sock.fileno()
            self._epoll.register(fd, _STREAM_EVENTS if out else _STREAM_IN_EVENTS)
            self._stream_by_fd[fd] = stream
            stream.registered = True
            stream.out_armed = out

    def _arm_out(self, stream: _Stream, out: bool) -> None:
        """Ask for EPOLLOUT, or stop. A connection asks only while it has bytes waiting
        for send space (or a handshake to finish), as asyncio and nginx do: otherwise every
        ACK that frees send space would queue an event. Arming re-checks readiness, so an
        edge that came first is not lost."""
        if stream.out_armed != out and stream.registered:
            self._epoll.modify(stream.sock.fileno(), _STREAM_EVENTS if out else _STREAM_IN_EVENTS)
            stream.out_armed = out

    def listen(self, qd: int, backlog: int) -> None:
        stream = self._stream(qd)
        if stream.connecting or stream.connected:
            raise LibOSError(f"queue {qd} is a connection, it cannot listen")
        if not 0 < backlog <= MAX_BACKLOG:
            raise LibOSError(f"backlog {backlog} is not in 1..{MAX_BACKLOG}")
        try:
            stream.sock.listen(backlog)
        except OSError as exc:
            raise LibOSError(f"listen: {_strerror(exc)}") from None
        stream.listening = True
        stream.readable = True  # connections may already wait: try once
        self._register(qd, stream)

    def accept(self, qd: int) -> int:
        stream = self._stream(qd)
        if not stream.listening:
            raise LibOSError(f"queue {qd} is not listening")
        token = self.table.pending(qd)
        stream.accept_tokens.append(token)
        self._accept_ready(qd, stream)
        return token

    def connect(self, qd: int, address: Address) -> int:
        stream = self._stream(qd)
        if stream.listening or stream.connecting or stream.connected:
            raise LibOSError(f"queue {qd} is already listening or connected")
        sock = stream.sock
        try:
            sock.setsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
        except (OSError, TypeError, ValueError, OverflowError) as exc:
            raise LibOSError(f"connect {address!r}: {exc}") from None
        if code == 0:
            stream.connected = True
            self._register(qd, stream)
            return self.table.completed(Opcode.CONNECT, qd)
        if code != errno.EINPROGRESS:
            return self.table.completed(Opcode.FAILED, qd, error=os.strerror(code))
        token = self.table.pending(qd)
        stream.connecting = token
        self._register(qd, stream, out=True)
        return token

    def push(self, qd: int, data: bytes) -> int:
        stream = self._streams.get(qd)
        if stream is None:
            stream = self._stream(qd)  # raises: not a queue, or not a TCP one
        table = self.table
        if not stream.connected:
            raise LibOSError(f"queue {qd} is not connected")
        if stream.error:
            table.counters.push_failed += 1
            return table.completed(Opcode.FAILED, qd, error=stream.error)
        if type(data) is not bytes:
            data = bytes(data)
        sent = 0
        if not stream.unsent:
            try:
                sent = stream.sock.send(data)
            except BlockingIOError:
                stream.writable = False
            except OSError as exc:
                self._stream_failed(qd, stream, _strerror(exc))
                table.counters.push_failed += 1
                return table.completed(Opcode.FAILED, qd, error=stream.error)
            if sent == len(data):  # ``table.push_done(qd)``, inline
                token = next(table.next_token)
                table.done[token] = table.pushed_results[qd]
                table.counters.pushed += 1
                return token
            stream.writable = False  # a short send: the buffer is full, EPOLLOUT will say when not
        view = memoryview(data)
        if len(stream.unsent) >= MAX_PENDING_SENDS:
            table.counters.push_failed += 1
            return table.completed(Opcode.FAILED, qd, error="send queue full")
        token = table.pending(qd)
        stream.unsent.append((view[sent:], token))
        if not stream.out_armed:
            self._arm_out(stream, True)
        return token

    def _pop_stream(self, qd: int, stream: _Stream) -> None:
        if stream.listening:
            raise LibOSError(f"queue {qd} is listening: use accept")
        if stream.eof:
            self.table.deliver(qd, b"", None)
        elif stream.error:
            self.table.fail_pops(qd, stream.error)
        elif stream.readable:
            self._read(qd, stream)

    def _progress_streams(self) -> int:
        work = 0
        pending = self._stream_work
        self._stream_work = set()
        streams = self._streams
        for qd in pending:
            stream = streams.get(qd)
            if stream is None:
                continue
            work += 1
            if stream.listening:
                self._accept_ready(qd, stream)
                continue
            if stream.connecting and (stream.writable or stream.peer_closed):
                self._finish_connect(qd, stream)
            if stream.unsent and stream.writable:
                self._send_unsent(qd, stream)
            if stream.readable and self.table.wants_data(qd):
                if self._read(qd, stream):
                    self._stream_work.add(qd)  # the burst was cut short
        return work

    def _finish_connect(self, qd: int, stream: _Stream) -> None:
        token = stream.connecting
        sock = stream.sock
        code = sock.getsockopt(socket_module.SOL_SOCKET, socket_module.SO_ERROR)
        if code == 0:
            try:
                sock.getpeername()
            except OSError:
                return  # a wake-up before the handshake ended: wait for the next
            stream.connecting = 0
            stream.connected = True
            self._arm_out(stream, False)
            self.table.finish(token, QResult(Opcode.CONNECT, qd))
            return
        stream.connecting = 0
        stream.error = os.strerror(code)
        stream.readable = stream.writable = False
        self.table.finish(token, QResult(Opcode.FAILED, qd, error=stream.error))

    def _read(self, qd: int, stream: _Stream) -> bool:
        """Complete waiting pops from the socket; True if more could be read right now."""
        return self._read_more(qd, stream, None)

    def _read_more(self, qd: int, stream: _Stream, first: bytes | None) -> bool:
        """``_read``, where ``first`` (unless None) is what a recv already returned."""
        table = self.table
        waiting = table.waiting_pops[qd]
        token_qd = table.token_qd
        done = table.done
        counters = table.counters
        recv = stream.sock.recv
        for _ in range(RECV_BURST):
            if not waiting:
                return False
            if first is not None:
                data = first
                first = None
            else:
                try:
                    data = recv(RECV_SIZE)
                except BlockingIOError:
                    stream.readable = False
                    return False
                except OSError as exc:
                    self._stream_failed(qd, stream, _strerror(exc))
                    return False
            if not data:
                stream.eof = True
                stream.readable = False
                while table.wants_data(qd):
                    table.deliver(qd, b"", None)
                return False
            # ``table.deliver(qd, data, None)``, inline: a pop is waiting
            token = waiting.popleft()
            del token_qd[token]
            done[token] = new_result(QResult, (POP, qd, data, None, -1, ""))
            counters.delivered += 1
            if len(data) < RECV_SIZE and not stream.peer_closed:
                stream.readable = False  # drained; see the module docstring
                return False
        return stream.readable and bool(waiting)

    def _send_unsent(self, qd: int, stream: _Stream) -> None:
        unsent = stream.unsent
        send = stream.sock.send
        table = self.table
        while unsent:
            view, token = unsent[0]
            try:
                sent = send(view)
            except BlockingIOError:
                stream.writable = False
                return
            except OSError as exc:
                self._stream_failed(qd, stream, _strerror(exc))
                return
            if sent < len(view):
                unsent[0] = (view[sent:], token)
                stream.writable = False
                return
            unsent.popleft()
            table.counters.pushed += 1
            table.finish(token, table.pushed(qd))
        self._arm_out(stream, False)  # all sent: no more EPOLLOUT until bytes wait again

    def _stream_failed(self, qd: int, stream: _Stream, error: str) -> None:
        """A reset or another fatal error: every waiting operation fails with it."""
        stream.error = stream.error or error
        stream.readable = stream.writable = False
        table = self.table
        table.fail_pops(qd, stream.error)
        while stream.unsent:
            _view, token = stream.unsent.popleft()
            table.counters.push_failed += 1
            table.finish(token, QResult(Opcode.FAILED, qd, error=stream.error))

    def _accept_ready(self, qd: int, stream: _Stream) -> None:
        tokens = stream.accept_tokens
        while tokens:
            if not stream.accepted:
                if not stream.readable:
                    return
                self._accept_burst(stream)
                if not stream.accepted:
                    return
            sock, address = stream.accepted.popleft()
            new_qd = self._adopt(sock)
            self.table.finish(tokens.popleft(), QResult(Opcode.ACCEPT, qd, address=address, new_qd=new_qd))

    def _accept_burst(self, stream: _Stream) -> None:
        listener = stream.sock
        for _ in range(ACCEPT_BURST):
            try:
                sock, address = listener.accept()
            except BlockingIOError:
                stream.readable = False
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that client gave up already; the next may not have
                # EMFILE and friends: retrying at once would spin. The next connection
                # (an edge) or the next accept() tries again.
                stream.readable = False
                return
            stream.accepted.append((sock, (str(address[0]), int(address[1]))))

    def _adopt(self, sock: socket_module.socket) -> int:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket_module.IPPROTO_TCP, socket_module.TCP_NODELAY, 1)
        except OSError:
            pass  # a connection reset already: the first recv reports it
        qd = self.table.new_queue(SocketKind.TCP)
        stream = _Stream(sock, qd, connected=True, readable=True, writable=True)
        self._sockets[qd] = sock
        self._streams[qd] = stream
        self._register(qd, stream)
        return qd

    def _close_stream(self, qd: int, stream: _Stream) -> None:
        """Graceful: bytes already handed to ``push`` still go out, then the FIN."""
        self.table.drop_queue(qd)
        del self._streams[qd]
        del self._sockets[qd]
        self._stream_work.discard(qd)
        sock = stream.sock
        for accepted, _address in stream.accepted:
            accepted.close()
        if stream.registered:
            fd = sock.fileno()
            del self._stream_by_fd[fd]
            if stream.unsent and not stream.error:
                self._lingering[fd] = stream
                self._flush_lingering(fd, stream)
                return
            self._epoll.unregister(fd)
        sock.close()

    def _flush_lingering(self, fd: int, stream: _Stream) -> None:
        unsent = stream.unsent
        while unsent:
            view, token = unsent[0]
            try:
                sent = stream.sock.send(view)
            except BlockingIOError:
                return
            except OSError:
                unsent.clear()
                break
            if sent < len(view):
                unsent[0] = (view[sent:], token)
                return
            unsent.popleft()
        del self._lingering[fd]
        self._epoll.unregister(fd)
        stream.sock.close()
