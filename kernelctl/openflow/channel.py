"""The OpenFlow channel's sockets, inside kernelctl's single-threaded selector loop.

Controllers connect to ``/run/arrakis/<instance>/openflow.sock`` (``AF_UNIX`` stream, as
``ovs-ofctl unix:PATH`` expects) and, when the daemon is asked for it, to a TLS listener on
127.0.0.1 that requires a client certificate. A UNIX peer is identified by ``SO_PEERCRED``
and admitted if it is root or a uid the policy names; a TLS peer by its certificate, which
only kernelctl's own CA can sign.

Nothing here may block or grow without bound, whatever a controller does (the same rules
as the control socket, issue 7):

* every socket is non-blocking; the TLS handshake runs step by step in the loop and must
  finish within ``HANDSHAKE_DEADLINE``;
* a session's requests are read only while its output is below ``READ_PAUSE``, so a
  controller that never reads its replies stops being read (its requests wait in its own
  socket buffer) instead of making kernelctl hold ever more replies; its unsolicited
  messages are dropped at ``MAX_OUTPUT`` (see ``OpenFlowConnection``);
* a session whose output has not moved for ``STALL_DEADLINE`` is closed;
* at most ``READ_CHUNK`` bytes and ``MESSAGES_PER_TURN`` messages per session per loop turn,
  ``MAX_SESSIONS`` sessions (the last ``ROOT_RESERVED`` only for root), ``MAX_PER_UID`` per
  non-root uid.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from kernelctl.openflow.connection import OpenFlowConnection
from kernelctl.openflow.constants import ErrorType, HelloFailed
from kernelctl.openflow.messages import Error
from kernelctl.openflow.switch import Switch

log = logging.getLogger("kernelctl")

READ_CHUNK: Final = 64 << 10
MESSAGES_PER_TURN: Final = 64
READ_PAUSE: Final = 256 << 10
MAX_OUTPUT: Final = 4 << 20
STALL_DEADLINE: Final = 10.0
HANDSHAKE_DEADLINE: Final = 5.0
MAX_SESSIONS: Final = 32
ROOT_RESERVED: Final = 4
MAX_PER_UID: Final = 4
_UCRED: Final = struct.Struct("3i")


@dataclass(eq=False)
class Session:
    sock: socket.socket
    uid: int
    pid: int
    peer: str
    conn: OpenFlowConnection = field(default_factory=lambda: OpenFlowConnection(MAX_OUTPUT))
    handshaking: bool = False
    opened: float = field(default_factory=time.monotonic)
    stalled_since: float = 0.0  # when the output last stopped moving (0: not stalled)
    closed: bool = False
    events: int = 0


class OpenFlowChannel:
    def __init__(
        self,
        switch: Switch,
        selector: selectors.BaseSelector,
        may_connect: Callable[[int], bool],
        may_revoke: Callable[[int], bool] = lambda uid: False,
    ) -> None:
        self.switch = switch
        self.selector = selector
        self.may_connect = may_connect
        self.may_revoke = may_revoke
        self.listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self.sessions: dict[int, Session] = {}
        self.refused = 0
        self.unix_path: Path | None = None

    # ---- listeners -------------------------------------------------------------------------------

    def listen_unix(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(path))
        os.chmod(path, 0o666)  # anyone may try; SO_PEERCRED and the policy decide
        self._listen(listener, None)
        self.unix_path = path

    def listen_tls(self, port: int, context: ssl.SSLContext) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        self._listen(listener, context)
        return int(listener.getsockname()[1])

    def _listen(self, listener: socket.socket, context: ssl.SSLContext | None) -> None:
        listener.listen(16)
        listener.setblocking(False)
        self.listeners.append((listener, context))
        self.selector.register(listener, selectors.EVENT_READ, lambda mask: self._accept(listener, context))

    def _accept(self, listener: socket.socket, context: ssl.SSLContext | None) -> None:
        for _ in range(16):
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("openflow accept: %s", exc)
                return
            sock.setblocking(False)
            if context is None:
                pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
                peer = f"pid {pid} uid {uid}"
            else:
                pid, uid, peer = 0, 0, f"{address[0]}:{address[1]}"  # TLS: the certificate is the identity
            refusal = self._refusal(uid)
            if refusal:
                self.refused += 1
                log.warning("openflow: refusing %s: %s", peer, refusal)
                self._refuse(sock, context, refusal)
                continue
            if context is not None:
                try:
                    sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("openflow tls %s: %s", peer, exc)
                    sock.close()
                    continue
            session = Session(sock, uid, pid, peer, handshaking=context is not None)
            self.sessions[sock.fileno()] = session
            session.events = selectors.EVENT_READ | (selectors.EVENT_WRITE if session.conn.pending_output else 0)
            self.selector.register(sock, session.events, lambda mask, s=session: self._on_session(s, mask))
            if not session.handshaking:
                self.switch.attach(session.conn, self.may_revoke(uid))
                self._flush(session)
            log.info("openflow: controller connected (%s)", peer)

    def _refusal(self, uid: int) -> str:
        if not self.may_connect(uid):
            return f"uid {uid} is not an OpenFlow controller in the policy"
        total = len(self.sessions)
        if total >= MAX_SESSIONS or (uid != 0 and total >= MAX_SESSIONS - ROOT_RESERVED):
            return f"{total} controllers are connected (limit {MAX_SESSIONS}, the last {ROOT_RESERVED} for root)"
        if uid != 0 and sum(1 for s in self.sessions.values() if s.uid == uid) >= MAX_PER_UID:
            return f"uid {uid} has {MAX_PER_UID} controller connections already"
        return ""

    @staticmethod
    def _refuse(sock: socket.socket, context: ssl.SSLContext | None, why: str) -> None:
        # HELLO_FAILED/EPERM in one non-blocking send, then close: never wait for a refused peer.
        if context is None:
            try:
                sock.send(Error(0, ErrorType.HELLO_FAILED, HelloFailed.EPERM, why.encode()[:256]).emit(), socket.MSG_DONTWAIT)
            except OSError:
                pass
        sock.close()

    # ---- sessions --------------------------------------------------------------------------------

    def _on_session(self, session: Session, mask: int) -> None:
        if session.closed:
            return
        try:
            if session.handshaking:
                self._handshake(session)
                return
            if mask & selectors.EVENT_WRITE:
                self._flush(session)
            if mask & selectors.EVENT_READ and session.conn.pending_output < READ_PAUSE:
                self._read(session)
            self._serve_buffered(session)
        except Exception:  # nothing a controller does may end the daemon's loop
            log.exception("openflow session %s", session.peer)
            self._close(session, "internal error")

    def _handshake(self, session: Session) -> None:
        sock = session.sock
        if not isinstance(sock, ssl.SSLSocket):  # only TLS sessions start handshaking
            session.handshaking = False
            return
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch(session, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._watch(session, selectors.EVENT_WRITE)
            return
        except (ssl.SSLError, OSError) as exc:
            self._close(session, f"TLS handshake: {exc}")
            return
        session.handshaking = False
        self.switch.attach(session.conn, self.may_revoke(session.uid))
        self._flush(session)

    def _read(self, session: Session) -> None:
        try:
            data = session.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as exc:
            self._close(session, str(exc))
            return
        if not data:
            self._close(session, "closed by the controller")
            return
        self._take(session, data)

    def _take(self, session: Session, data: bytes) -> None:
        now = time.monotonic()
        for message in session.conn.receive_data(data, MESSAGES_PER_TURN):
            self.switch.handle(session.conn, message, now)
        self._flush(session)

    def _serve_buffered(self, session: Session) -> None:
        """Pipelined requests beyond one turn's share wait in the connection's input; serve
        them once the output has room (called every turn by ``tick`` too)."""
        if self._ready(session):
            self._take(session, b"")

    def busy(self) -> bool:
        """Whether a session has requests waiting in its buffer (the loop must not sleep)."""
        return any(self._ready(s) for s in self.sessions.values())

    @staticmethod
    def _ready(session: Session) -> bool:
        # A closing connection reads nothing more: it must not keep the loop awake.
        conn = session.conn
        return (
            not session.closed and not conn.closing and conn.has_complete_message() and conn.pending_output < READ_PAUSE
        )

    def _flush(self, session: Session) -> None:
        conn = session.conn
        while conn.pending_output and not session.closed:
            data = conn.data_to_send()[:READ_CHUNK]
            try:
                sent = session.sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except OSError as exc:
                self._close(session, str(exc))
                return
            conn.sent(sent)
            session.stalled_since = 0.0
            if sent < len(data):
                break
        if conn.pending_output and not session.stalled_since:
            session.stalled_since = time.monotonic()
        if conn.closing and not conn.pending_output:
            self._close(session, conn.close_reason)
            return
        wanted = selectors.EVENT_WRITE if conn.pending_output else 0
        if conn.pending_output < READ_PAUSE:
            wanted |= selectors.EVENT_READ
        self._watch(session, wanted or selectors.EVENT_WRITE)

    def _watch(self, session: Session, events: int) -> None:
        if session.closed or events == session.events:
            return
        session.events = events
        self.selector.modify(session.sock, events, self.selector.get_key(session.sock).data)

    def _close(self, session: Session, why: str) -> None:
        if session.closed:
            return
        session.closed = True
        log.info("openflow: controller %s gone: %s", session.peer, why)
        self.switch.detach(session.conn)
        self.sessions.pop(session.sock.fileno(), None)
        try:
            self.selector.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        try:
            session.sock.close()
        except OSError:
            pass

    # ---- every loop turn -------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        self.switch.tick(now)
        for session in list(self.sessions.values()):
            if session.closed:
                continue
            if session.handshaking:
                if now - session.opened > HANDSHAKE_DEADLINE:
                    self._close(session, "TLS handshake too slow")
                continue
            if session.conn.pending_output:
                self._flush(session)
                if session.stalled_since and now - session.stalled_since > STALL_DEADLINE:
                    self._close(session, f"it read nothing for {STALL_DEADLINE:g} s")
                    continue
            self._serve_buffered(session)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self._close(session, "kernelctl stops")
        for listener, _context in self.listeners:
            try:
                self.selector.unregister(listener)
            except (KeyError, ValueError):
                pass
            listener.close()
        self.listeners.clear()
        if self.unix_path is not None:
            try:
                self.unix_path.unlink()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("openflow: %s", exc)
