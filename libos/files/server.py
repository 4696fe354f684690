"""The file server an application embeds: it publishes names and serves their readers.

``FileServer.start`` makes a ``SOCK_SEQPACKET`` pair, sends one end to kernelctl with the
names (``name_serve``; more with ``publish``) and starts one thread that waits, with one
selector, on the other end (kernelctl's notes: a reader was connected, here is its socket)
and on every reader's socket. The thread runs the sans-I/O ``ServerSession`` of each reader.

Why a thread: the applications' loops sleep on their device's interrupt when idle, and a
reader must not wait for the next network packet to be answered. The sessions share
nothing with the application but the sources (see ``libos.files.sources``).

One reader never costs the server more than its connection: sockets are non-blocking, one
``recv`` of at most ``RECV_BYTES`` per reader per turn, output per reader bounded by the
session (while it is over the bound its requests wait), ``MAX_READERS`` connections (past
it a new one is closed at once), garbage ends that session only. If kernelctl goes away
the channel closes and the server stops serving.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
from collections.abc import Iterable
from pathlib import Path

from kernelctl import fileproto as fp
from kernelctl.client import ControlClient, ControlError
from kernelctl.names import topology
from libos.files.session import Grant, ServerSession
from libos.files.sources import Source
from vdev import control

log = logging.getLogger("libos.files")

MAX_READERS = 1024
RECV_BYTES = 256 << 10
SEND_BYTES = 1 << 20
NOTES_PER_TURN = 64


class ServerError(Exception):
    """The server could not start or publish (kernelctl refused, or cannot be reached)."""


class _Reader:
    __slots__ = ("sock", "session", "events")

    def __init__(self, sock: socket.socket, session: ServerSession) -> None:
        self.sock = sock
        self.session = session
        self.events = 0


class FileServer:
    """Serve ``Source`` objects under names in kernelctl's tree."""

    def __init__(self, instance: str = "", control_path: str | os.PathLike[str] | None = None) -> None:
        self.control_path = Path(control_path) if control_path else topology(instance).control_socket
        self._sources: dict[str, Source] = {}
        self._dirs: dict[str, dict[str, int]] = {}  # directory -> child name -> kind
        self._lock = threading.Lock()
        self._control: ControlClient | None = None
        self._channel: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.server_id = 0
        self.readers_served = 0
        self.readers_failed = 0
        self.readers: dict[int, _Reader] = {}

    # ---- the application's side ------------------------------------------------------------

    def _record(self, path: str, kind: int, source: Source | None) -> None:
        parent, _, leaf = path.rpartition("/")
        self._dirs.setdefault(parent or "/", {})[leaf] = kind
        if source is not None:
            self._sources[path] = source
        else:
            self._dirs.setdefault(path, {})

    def _specs(self, names: Iterable[tuple[str, Source | None, int]]) -> list[control.NameSpec]:
        specs = []
        with self._lock:
            for path, source, mode in names:
                kind = "served" if source is not None else "dir"
                self._record(path, fp.KIND_FILE if source is not None else fp.KIND_DIR, source)
                specs.append(control.NameSpec(path=path, mode=mode, kind=kind))
        return specs

    def start(self, names: Iterable[tuple[str, Source | None, int]]) -> None:
        """Publish ``(path, source, mode)`` names (source None: a directory) and serve them."""
        specs = self._specs(names)
        if not specs:
            raise ServerError("a file server needs at least one name")
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._control = ControlClient(self.control_path)
            first = specs[: control.MAX_NAMES_PER_REQUEST]
            result, _ = self._control.call(control.NameServe(names=tuple(first)), fds=[theirs.fileno()])
        except (ControlError, control.ProtocolError) as exc:
            mine.close()
            if self._control is not None:
                self._control.close()
                self._control = None
            raise ServerError(str(exc)) from None
        finally:
            theirs.close()
        if not isinstance(result, dict) or not isinstance(result.get("server"), int):
            mine.close()
            raise ServerError("kernelctl gave no server number")
        self.server_id = result["server"]
        mine.setblocking(False)
        self._channel = mine
        self._send_more(specs[control.MAX_NAMES_PER_REQUEST :])
        self._thread = threading.Thread(target=self._run, args=(mine,), name="file-server", daemon=True)
        self._thread.start()

    def publish(self, names: Iterable[tuple[str, Source | None, int]]) -> None:
        """More names, after ``start``."""
        self._send_more(self._specs(names))

    def _send_more(self, specs: list[control.NameSpec]) -> None:
        if self._control is None:
            raise ServerError("the server is not started")
        for at in range(0, len(specs), control.MAX_NAMES_PER_REQUEST):
            batch = tuple(specs[at : at + control.MAX_NAMES_PER_REQUEST])
            try:
                self._control.call(control.NamePublish(server=self.server_id, names=batch))
            except (ControlError, control.ProtocolError) as exc:
                raise ServerError(str(exc)) from None

    def stop(self) -> None:
        """Stop serving: the channel closes, so kernelctl withdraws the names at once."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._control is not None:
            self._control.close()
            self._control = None

    # ---- lookups for the sessions (server thread) --------------------------------------------

    def _lookup(self, path: str) -> Source | None:
        with self._lock:
            return self._sources.get(path)

    def _children(self, path: str) -> list[tuple[int, str]] | None:
        with self._lock:
            children = self._dirs.get(path)
            return None if children is None else sorted((kind, name) for name, kind in children.items())

    # ---- the server thread ---------------------------------------------------------------------

    def _run(self, channel: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(channel, selectors.EVENT_READ, "channel")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                for key, mask in selector.select(timeout=1.0):
                    if key.data == "wake":
                        return
                    if key.data == "channel":
                        if not self._on_notes(selector, channel):
                            return
                    else:
                        try:
                            self._on_reader(selector, key.data, mask)
                        except Exception:  # one reader's trouble ends its connection only
                            log.exception("file server: a reader")
                            self.readers_failed += 1
                            self._drop(selector, key.data)
        except Exception:
            log.exception("file server thread")
        finally:
            for reader in list(self.readers.values()):
                self._drop(selector, reader)
            selector.close()

    def _on_notes(self, selector: selectors.BaseSelector, channel: socket.socket) -> bool:
        """kernelctl's notes, each with a reader's socket; False when kernelctl went away."""
        for _ in range(NOTES_PER_TURN):
            try:
                data, fds, _flags, _addr = socket.recv_fds(channel, 4096, 4)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not data and not fds:
                return False
            grant = self._grant(data)
            if grant is None or len(fds) != 1 or len(self.readers) >= MAX_READERS:
                control.close_fds(fds)
                continue
            sock = socket.socket(fileno=fds[0])
            if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                sock.close()
                continue
            sock.setblocking(False)
            reader = _Reader(sock, ServerSession(grant, self._lookup, self._children))
            self.readers[sock.fileno()] = reader
            self.readers_served += 1
            reader.events = selectors.EVENT_READ
            selector.register(sock, reader.events, reader)
        return True

    @staticmethod
    def _grant(data: bytes) -> Grant | None:
        """kernelctl's note, checked (it is trusted, but a bug should be a refusal here)."""
        try:
            note = json.loads(data)
        except ValueError:
            return None
        if not isinstance(note, dict) or note.get("op") != "connect":
            return None
        path, uid, gid, write = note.get("path"), note.get("uid"), note.get("gid"), note.get("write")
        if not isinstance(path, str) or not isinstance(write, bool):
            return None
        if not isinstance(uid, int) or not isinstance(gid, int):
            return None
        return Grant(path, uid, gid, write)

    def _on_reader(self, selector: selectors.BaseSelector, reader: _Reader, mask: int) -> None:
        session = reader.session
        if mask & selectors.EVENT_READ and session.wants_input:
            try:
                data = reader.sock.recv(RECV_BYTES)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._drop(selector, reader)
                return
            if data:
                session.receive(data)
        self._flush(selector, reader)

    def _flush(self, selector: selectors.BaseSelector, reader: _Reader) -> None:
        session = reader.session
        while session.has_output():
            chunk = session.take_output(SEND_BYTES)
            try:
                sent = reader.sock.send(chunk)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(selector, reader)
                return
            if sent < len(chunk):
                session.unread_output(chunk[sent:])
                break
            session.process()  # output drained: buffered requests may go on
        if session.failed and not session.has_output():
            self.readers_failed += 1
            self._drop(selector, reader)
            return
        events = (selectors.EVENT_READ if session.wants_input else 0) | (
            selectors.EVENT_WRITE if session.has_output() else 0
        )
        if not events:
            events = selectors.EVENT_READ  # still notice a reader that hangs up
        if events != reader.events:
            reader.events = events
            selector.modify(reader.sock, events, reader)

    def _drop(self, selector: selectors.BaseSelector, reader: _Reader) -> None:
        if self.readers.pop(reader.sock.fileno(), None) is None:
            return
        try:
            selector.unregister(reader.sock)
        except (KeyError, ValueError):
            pass
        reader.session.close()
        reader.sock.close()

    def stats(self) -> dict[str, int]:
        return {"readers": len(self.readers), "served": self.readers_served, "failed": self.readers_failed}
