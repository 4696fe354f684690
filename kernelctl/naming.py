"""The naming half of the daemon: the name tree's requests and the live file servers.

A file server (an application, through ``libos.files``) sends ``name_serve`` with one fd:
its end of a ``SOCK_SEQPACKET`` pair, the *server channel*. When someone opens one of its
names, the daemon checks access (once, by the opener's ``SO_PEERCRED`` uid), makes a fresh
``SOCK_STREAM`` socket pair, sends one end to the server over its channel with a small JSON
note (which name, for which uid, writable or not) and hands the other end to the opener.
From then on the two talk the file RPC (``kernelctl.fileproto``) and the daemon is off the
path, as for a device function.

The channel is also the server's life line: when it closes (the application exited or
was killed) or carries anything the daemon did not ask for, the server's names are
withdrawn at once, in the same loop turn that saw it. The daemon never blocks on a server:
the note goes out with ``MSG_DONTWAIT`` and a server whose channel is full is busy, an
error for that opener only.

Bounds: ``MAX_SERVERS_PER_UID`` live servers per uid (root: ``MAX_SERVERS`` in all); names
per uid and in all, as ``kernelctl.nametree`` counts them.
"""

from __future__ import annotations

import builtins
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernelctl.nametree import Caller, NameError_, NameTree
from vdev import control

log = logging.getLogger("kernelctl")

MAX_SERVERS = 256
MAX_SERVERS_PER_UID = 16
NO_UID = control.U32  # "as_uid" left out: the connection's own uid


class NamingError(Exception):
    """A refused name request; the text goes back to the caller, led by an errno name."""


@dataclass(eq=False)
class FileServer:
    """A live file server: its channel, whose closing withdraws its names."""

    server_id: int
    uid: int
    gid: int
    pid: int
    channel: socket.socket
    opens: int = 0


def _err(exc: NameError_) -> NamingError:
    return NamingError(f"{exc.errno_name}: {exc}")


class NamePlane:
    """The tree plus its servers. ``watch``/``unwatch`` put a server channel into (and take
    it out of) the daemon's selector; ``vsas`` lists (name, owner) of every VSA."""

    def __init__(
        self,
        watch: Callable[[FileServer], None],
        unwatch: Callable[[FileServer], None],
        vsas: Callable[[], Iterable[tuple[str, int]]],
    ) -> None:
        self.tree: NameTree | None = None
        self.servers: dict[int, FileServer] = {}
        self._watch = watch
        self._unwatch = unwatch
        self._vsas = vsas
        self._next_server = 1

    def start(self, path: Path) -> None:
        self.tree = NameTree(path, vsas=self._vsas)

    def stop(self) -> None:
        for server in list(self.servers.values()):
            self.withdraw(server)
        if self.tree is not None:
            self.tree.close()
            self.tree = None

    def _tree(self) -> NameTree:
        if self.tree is None:
            raise NamingError("EIO: the name tree is not up")
        return self.tree

    @staticmethod
    def _acting(uid: int, gid: int, body: Any) -> Caller:
        """Who is asking: the connection's uid, or (root only) the one it acts for."""
        as_uid, as_gid = getattr(body, "as_uid", NO_UID), getattr(body, "as_gid", NO_UID)
        if as_uid == NO_UID and as_gid == NO_UID:
            return Caller(uid, gid)
        if uid != 0:
            raise NamingError("EPERM: only root may act for another uid")
        return Caller(as_uid if as_uid != NO_UID else uid, as_gid if as_gid != NO_UID else gid)

    # ---- requests ----------------------------------------------------------------------

    def serve(self, uid: int, gid: int, pid: int, body: control.NameServe, fds: builtins.list[int]) -> dict[str, Any]:
        if len(fds) != 1:
            raise NamingError("EINVAL: name_serve comes with exactly one fd, the server channel")
        held = sum(1 for s in self.servers.values() if s.uid == uid)
        if len(self.servers) >= MAX_SERVERS or (uid != 0 and held >= MAX_SERVERS_PER_UID):
            raise NamingError(f"EAGAIN: uid {uid} runs {held} file servers (limit {MAX_SERVERS_PER_UID})")
        channel = socket.socket(fileno=os.dup(fds[0]))
        try:
            if channel.type != socket.SOCK_SEQPACKET or channel.family != socket.AF_UNIX:
                raise NamingError("EINVAL: the server channel must be an AF_UNIX SOCK_SEQPACKET socket")
            channel.setblocking(False)
            server = FileServer(self._next_server, uid, gid, pid, channel)
            self._next_server += 1
            self._add(server, body.names)
        except BaseException:
            channel.close()
            raise
        self.servers[server.server_id] = server
        self._watch(server)
        log.info("file server %d (pid %d, uid %d): %d names", server.server_id, pid, uid, len(body.names))
        return {"server": server.server_id}

    def publish(self, uid: int, body: control.NamePublish, own: set[int]) -> dict[str, Any]:
        server = self.servers.get(body.server)
        if server is None or body.server not in own:
            raise NamingError(f"ENOENT: no file server {body.server} of this connection")
        self._add(server, body.names)
        return {"server": server.server_id, "names": len(body.names)}

    def _add(self, server: FileServer, names: tuple[control.NameSpec, ...]) -> None:
        try:
            self._tree().add(
                ((spec.path, spec.kind, spec.mode, "") for spec in names),
                Caller(server.uid, server.gid),
                server=server.server_id,
                replace_own=True,
            )
        except NameError_ as exc:
            raise _err(exc) from None

    def make(self, uid: int, gid: int, body: control.NameMake, vsa_access: Callable[[str, int], None]) -> dict[str, Any]:
        if body.kind == "store":
            vsa, sep, file = body.target.partition(":")
            if not sep or not file:
                raise NamingError("EINVAL: a store name's target is VSA:FILE")
            vsa_access(vsa, uid)  # only who may write the VSA names files in it
        try:
            made = self._tree().add([(body.path, body.kind, body.mode, body.target)], Caller(uid, gid))
        except NameError_ as exc:
            raise _err(exc) from None
        if not made:  # the caller's own directory was there already (add is mkdir -p)
            raise NamingError(f"EEXIST: {body.path} exists")
        return made[0].as_dict()

    def remove(self, uid: int, gid: int, body: control.NameRemove) -> dict[str, Any]:
        try:
            name = self._tree().remove(body.path, Caller(uid, gid))
        except NameError_ as exc:
            raise _err(exc) from None
        return name.as_dict()

    def stat(self, uid: int, gid: int, body: control.NameStat) -> dict[str, Any]:
        try:
            return self._tree().lookup(body.path, self._acting(uid, gid, body)).as_dict()
        except NameError_ as exc:
            raise _err(exc) from None

    def list(self, uid: int, gid: int, body: control.NameList) -> dict[str, Any]:
        try:
            name, entries = self._tree().list(body.path, self._acting(uid, gid, body))
        except NameError_ as exc:
            raise _err(exc) from None
        return {"name": name.as_dict(), "entries": [entry.as_dict() for entry in entries]}

    def open(self, uid: int, gid: int, body: control.NameOpen) -> tuple[dict[str, Any], builtins.list[int]]:
        """Access checked once; a served name comes back as a connected socket."""
        caller = self._acting(uid, gid, body)
        try:
            name = self._tree().check_open(body.path, caller, body.write)
        except NameError_ as exc:
            raise _err(exc) from None
        result = name.as_dict()
        if name.kind != "served":
            # dir: list it; vsa and store: the opener maps the VSA (way 2), where the VSA's
            # own grants decide again, at open_vsa.
            return result, []
        server = self.servers.get(name.server)
        if server is None:
            raise NamingError(f"ENOENT: the server of {name.path} is gone")
        opener_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            note = control.encode_json(
                {"op": "connect", "path": name.path, "uid": caller.uid, "gid": caller.gid, "write": body.write}
            )
            try:
                server.channel.sendmsg(
                    [note],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", server_end.fileno()))],
                    socket.MSG_DONTWAIT,
                )
            except BlockingIOError:
                raise NamingError(f"EAGAIN: the server of {name.path} is busy") from None
            except OSError as exc:
                self.withdraw(server)
                raise NamingError(f"ENOENT: the server of {name.path} is gone ({exc.strerror})") from None
            server.opens += 1
            fd = os.dup(opener_end.fileno())
        finally:
            opener_end.close()
            server_end.close()
        return result, [fd]

    # ---- server life -------------------------------------------------------------------

    def on_channel(self, server: FileServer) -> None:
        """The channel is readable: it closed, or the server spoke out of turn. Either way
        the server is done (a server has nothing to say on its channel)."""
        try:
            data = server.channel.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            log.warning("file server %d (pid %d) wrote on its channel; withdrawing it", server.server_id, server.pid)
        self.withdraw(server)

    def withdraw(self, server: FileServer) -> None:
        if self.servers.pop(server.server_id, None) is None:
            return
        self._unwatch(server)
        server.channel.close()
        removed = 0
        if self.tree is not None:
            try:
                removed = self.tree.withdraw(server.server_id)
            except NameError_ as exc:
                log.error("withdrawing the names of file server %d: %s", server.server_id, exc)
        log.info("file server %d (pid %d) gone: %d names withdrawn", server.server_id, server.pid, removed)

    def status(self) -> dict[str, object]:
        return {
            "servers": [
                {"server": s.server_id, "pid": s.pid, "uid": s.uid, "opens": s.opens} for s in self.servers.values()
            ],
            "names": self.tree.count() if self.tree is not None else 0,
        }


__all__ = ["FileServer", "NamePlane", "NamingError"]
