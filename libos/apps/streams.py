"""The event loop that serves a sans-I/O stream protocol over the queue API.

``StreamServer`` is protocol-agnostic: it accepts connections on a listening queue, keeps
exactly one ``pop`` pending per connection that may read, feeds what arrives to that
connection's session, and pushes the session's output. The key-value and memcached
servers both run on it.

Why the loop looks the way it does:

* One dict of every pending token, waited on with ``wait_many``, which hands back every
  completion of one poll at once; each token maps to its connection (a pop or a push of
  it) or to a handler, so a completion costs one dict lookup and no object of its own,
  whatever the number of connections.
* At most one push in flight per connection; a push that completed at once (the stack
  took it whole, the usual case) is taken with ``take_done`` and not waited for. Output produced meanwhile accumulates in the
  session, which stops running requests at its high-water mark; a client that does not read
  its replies thus stops its own requests, and nobody else's (Redis and memcached do the
  same with their per-client output buffers).
* A connection reads again only when its session has caught up (no backlog, output
  handed over). The input a client can make us buffer is then bounded by what one ``pop``
  returns plus the session's own limits.
* Sessions whose last ``feed`` stopped on their work bound are "busy": each loop turn
  polls for new events without sleeping, then gives every busy session one more bounded
  ``feed(b"", now)``. A pipelining client gets its share per turn and no more.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from libos.api import LibOS, LibOSError, Opcode, QResult, SocketKind

# Events handled per turn before busy sessions get their turn, so a flood of new data
# cannot starve sessions that already hold buffered requests.
EVENTS_PER_TURN = 64
DEFAULT_MAX_CLIENTS = 10000
DEFAULT_IDLE_TIMEOUT = 0.1
_POP = Opcode.POP
_PUSH = Opcode.PUSH


class StreamSession(Protocol):
    """What the loop needs from one connection's protocol engine."""

    def feed(self, data: bytes, now: float) -> None: ...

    def take_output(self) -> bytes: ...

    def has_backlog(self) -> bool:
        """The last feed stopped on a bound; feed(b"", now) again on a later turn."""
        ...

    def should_close(self) -> bool:
        """No more requests will run; close once the output is sent."""
        ...

    def close(self) -> None: ...


Handler = Callable[[QResult], None]


@dataclass
class ServerCounters:
    accepted: int = 0
    refused_max_clients: int = 0
    accept_failed: int = 0
    closed: int = 0
    closed_by_peer: int = 0
    closed_by_session: int = 0
    read_failed: int = 0
    push_failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    busy_turns: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Connection:
    """One accepted connection: its queue, its session, its pending operations."""

    __slots__ = ("qd", "session", "pop_token", "push_token", "peer_closed", "closed")

    def __init__(self, qd: int, session: StreamSession) -> None:
        self.qd = qd
        self.session = session
        self.pop_token: int | None = None
        self.push_token: int | None = None
        # The peer shut its side: read no more, finish what was received, then close.
        self.peer_closed = False
        self.closed = False


class StreamServer:
    """Serves ``new_session`` sessions on the listening queue ``listen_qd``."""

    def __init__(self, los: LibOS, listen_qd: int, new_session: Callable[[float], StreamSession], *,
                 clock: Callable[[], float] = time.time, max_clients: int = DEFAULT_MAX_CLIENTS,
                 on_turn: Callable[[float], None] | None = None,
                 on_turn_end: Callable[[float], bool] | None = None) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.los = los
        self.listen_qd = listen_qd
        self.new_session = new_session
        self.clock = clock
        self.max_clients = max_clients
        self.on_turn = on_turn
        # Called once a turn's events are handled; True means replies were released (a
        # group commit made writes durable) and idle connections may have output to send.
        self.on_turn_end = on_turn_end
        # Every token this loop waits on: a connection's pop or push token maps to the
        # connection (which of the two it is, its pop_token says), any other to its handler.
        self.pending: dict[int, Connection | Handler] = {}
        self.connections: dict[int, Connection] = {}
        self.busy: set[Connection] = set()
        self.counters = ServerCounters()
        self.pending[los.accept(listen_qd)] = self._accepted

    def watch(self, token: int, handler: Handler) -> None:
        """Wait on ``token`` in this loop too (e.g. a UDP queue served alongside)."""
        self.pending[token] = handler

    def serve(self, should_stop: Callable[[], bool], idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        while not should_stop():
            self.turn(idle_timeout)

    def turn(self, idle_timeout: float) -> None:
        """One loop turn: handle completions in batches (at least one batch, up to about
        EVENTS_PER_TURN completions), then the busy sessions."""
        now = self.clock()
        if self.on_turn is not None:
            self.on_turn(now)
        timeout = 0.0 if self.busy else idle_timeout
        pending = self.pending
        wait_many = self.los.wait_many
        after_feed = self._after_feed
        clock = self.clock
        counters = self.counters
        handled = 0
        while handled < EVENTS_PER_TURN:
            # After the first batch, what the handlers' own operations completed at once
            # (a push the stack took whole) comes back without another poll.
            batch = wait_many(pending, timeout)
            if not batch:
                break
            pop = pending.pop
            # A connection's pop and push completions, most of the work, are handled
            # inline: after a pop, feed the session; after a push, only go on.
            for token, result in batch:
                conn = pop(token, None)
                if conn is None:
                    continue  # its connection closed while this batch was handled
                if type(conn) is not Connection:
                    conn(result)  # type: ignore[operator]  # not a Connection: a Handler
                    continue
                if token == conn.pop_token:
                    conn.pop_token = None
                    if conn.closed:
                        continue
                    if result.opcode is not _POP:
                        counters.read_failed += 1
                        self._close(conn)
                        continue
                    data = result.data
                    if data:
                        counters.bytes_in += len(data)
                        conn.session.feed(data, clock())
                    else:
                        counters.closed_by_peer += 1
                        conn.peer_closed = True
                else:
                    conn.push_token = None
                    if conn.closed:
                        continue
                    if result.opcode is not _PUSH:
                        counters.push_failed += 1
                        self._close(conn)
                        continue
                after_feed(conn)
            handled += len(batch)
            timeout = 0.0
        if self.busy:
            self.counters.busy_turns += 1
            now = self.clock()
            for conn in list(self.busy):
                self.busy.discard(conn)
                if not conn.closed:
                    conn.session.feed(b"", now)
                    self._after_feed(conn)
        if self.on_turn_end is not None and self.on_turn_end(self.clock()):
            for conn in list(self.connections.values()):
                if not conn.closed and conn.push_token is None:
                    self._after_feed(conn)

    def _accepted(self, result: QResult) -> None:
        self.pending[self.los.accept(self.listen_qd)] = self._accepted
        if result.opcode is not Opcode.ACCEPT or result.new_qd < 0:
            # A connection that failed before we took it; the listener goes on.
            self.counters.accept_failed += 1
            return
        if len(self.connections) >= self.max_clients:
            self.counters.refused_max_clients += 1
            self._close_queue(result.new_qd)
            return
        self.counters.accepted += 1
        conn = Connection(result.new_qd, self.new_session(self.clock()))
        self.connections[conn.qd] = conn
        self._read(conn)

    def _read(self, conn: Connection) -> None:
        try:
            token = self.los.pop(conn.qd)
        except LibOSError:
            self.counters.read_failed += 1
            self._close(conn)
            return
        conn.pop_token = token
        self.pending[token] = conn

    def _after_feed(self, conn: Connection) -> None:
        """Send what the session produced, then decide: read more, work more, or close."""
        session = conn.session
        if conn.push_token is None:
            out = session.take_output()
            if out:  # what ``_push`` does, inline
                los = self.los
                try:
                    token = los.push(conn.qd, out)
                except LibOSError:
                    self.counters.push_failed += 1
                    self._close(conn)
                    return
                self.counters.bytes_out += len(out)
                # Most pushes complete at once (the stack took it all): then go on without
                # waiting for the token; a failed one closes the connection.
                result = los.take_done(token)
                if result is None:
                    conn.push_token = token
                    self.pending[token] = conn
                elif result.opcode is not _PUSH:
                    self.counters.push_failed += 1
                    self._close(conn)
                    return
        if session.should_close():
            # Close once everything taken was handed to the stack; a pop still pending
            # is of no interest any more.
            if conn.push_token is None:
                self._close(conn)
            return
        if session.has_backlog():
            self.busy.add(conn)
            return
        if conn.peer_closed:
            if conn.push_token is None:
                self._close(conn)
            return
        if conn.pop_token is None and conn.push_token is None:
            try:  # what ``_read`` does, inline
                token = self.los.pop(conn.qd)
            except LibOSError:
                self.counters.read_failed += 1
                self._close(conn)
                return
            conn.pop_token = token
            self.pending[token] = conn

    def _close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.busy.discard(conn)
        if conn.session.should_close() and not conn.peer_closed:
            self.counters.closed_by_session += 1
        self.counters.closed += 1
        conn.session.close()
        del self.connections[conn.qd]
        self._close_queue(conn.qd)
        for token in (conn.pop_token, conn.push_token):
            if token is not None:
                self._reap(token)
        conn.pop_token = conn.push_token = None

    def _close_queue(self, qd: int) -> None:
        try:
            self.los.close(qd)
        except LibOSError:
            pass  # already gone on the backend's side (reset by the peer)

    def _reap(self, token: int) -> None:
        # The backend may complete a closed queue's tokens (FAILED) or forget them; either
        # way this loop stops waiting, and a completed one is collected so none piles up.
        self.pending.pop(token, None)
        try:
            self.los.wait(token, timeout=0.0)
        except LibOSError:
            pass

    def close_all(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)

    def stats(self) -> dict[str, int]:
        out = self.counters.as_dict()
        out["connections"] = len(self.connections)
        return out


def open_listener(los: LibOS, address: str, port: int, backlog: int) -> int:
    """A listening TCP queue on (address, port); LibOSError when that fails."""
    qd = los.socket(SocketKind.TCP)
    try:
        los.bind(qd, (address, port))
        los.listen(qd, backlog)
    except LibOSError:
        los.close(qd)
        raise
    return qd
