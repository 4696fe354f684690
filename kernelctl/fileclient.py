"""The opener's side of the file server RPC (``kernelctl.fileproto``), blocking.

``open_served`` asks kernelctl to open a name (access is checked there, once) and gets back
a socket connected to the application that serves it; ``FileClient`` then speaks the RPC on
it. A server that dies, closes, answers garbage or does not answer within ``timeout``
seconds is an ``FileRpcError`` with errno EIO: a reader gets an error, never a hang.
"""

from __future__ import annotations

import errno
import itertools
import socket
from collections.abc import Iterator
from typing import Any, TypeVar

from kernelctl import fileproto as fp
from kernelctl.client import ControlClient, ControlError
from vdev import control

DEFAULT_TIMEOUT = 10.0
READ_CHUNK = 1 << 20


_R = TypeVar("_R", bound=fp.Reply)


class FileRpcError(OSError):
    """An errno from the server (ENOENT, EACCES, ...) or EIO when the server failed."""


class FileClient:
    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        self._tags = itertools.count(1)
        self._decoder = fp.FrameDecoder()
        self.broken = False

    def close_connection(self) -> None:
        self.broken = True
        self.sock.close()

    def __enter__(self) -> FileClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_connection()

    def _fail(self, why: str) -> FileRpcError:
        self.broken = True
        return FileRpcError(errno.EIO, f"file server: {why}")

    def call(self, request: fp.Request, expected: type[_R]) -> _R:
        """Send ``request``; its reply, which must be an ``expected``. The server is another
        process: a reply of any other kind is a broken server (EIO), and an Error reply
        its errno."""
        if self.broken:
            raise FileRpcError(errno.EIO, "file server: the connection failed earlier")
        try:
            self.sock.sendall(fp.encode_request(request))
        except OSError as exc:
            raise self._fail(f"cannot send ({exc.strerror or exc})") from None
        while True:
            try:
                got = self._decoder.next_frame()
            except fp.FileProtoError as exc:
                raise self._fail(f"bad reply: {exc}") from None
            if got is not None:
                break
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise self._fail("no answer in time") from None
            except OSError as exc:
                raise self._fail(f"connection lost ({exc.strerror or exc})") from None
            if not data:
                raise self._fail("the server closed the connection")
            try:
                self._decoder.feed(data)
            except fp.FileProtoError as exc:
                raise self._fail(f"bad reply: {exc}") from None
        op, tag, body = got
        try:
            reply = fp.decode_reply(op, tag, body)
        except fp.FileProtoError as exc:
            raise self._fail(f"bad reply: {exc}") from None
        if reply.tag != request.tag:
            raise self._fail("a reply to another request")
        if isinstance(reply, fp.Error):
            raise FileRpcError(reply.errno or errno.EIO, reply.message)
        if not isinstance(reply, expected):
            raise self._fail(f"a {type(reply).__name__} reply to {type(request).__name__}")
        return reply

    def open(self, path: str, write: bool = False) -> tuple[int, fp.Attr]:
        reply = self.call(fp.Open(next(self._tags), path, write), fp.Opened)
        return reply.handle, reply.attr

    def read(self, handle: int, offset: int, count: int) -> bytes:
        reply = self.call(fp.Read(next(self._tags), handle, offset, min(count, fp.MAX_IO)), fp.Data)
        return reply.data

    def write(self, handle: int, offset: int, data: bytes) -> int:
        reply = self.call(fp.Write(next(self._tags), handle, offset, data), fp.Written)
        return reply.count

    def stat(self, handle: int) -> fp.Attr:
        reply = self.call(fp.Stat(next(self._tags), handle), fp.Stated)
        return reply.attr

    def readdir(self, handle: int) -> list[tuple[int, str]]:
        entries: list[tuple[int, str]] = []
        cookie = 0
        while True:
            reply = self.call(fp.ReadDir(next(self._tags), handle, cookie), fp.DirEntries)
            entries += reply.entries
            if reply.next_cookie == 0 or not reply.entries:
                return entries
            cookie = reply.next_cookie

    def close(self, handle: int) -> None:
        self.call(fp.Close(next(self._tags), handle), fp.Closed)

    def read_all(self, handle: int, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        offset = 0
        while True:
            data = self.read(handle, offset, chunk)
            if not data:
                return
            offset += len(data)
            yield data


def open_name(
    client: ControlClient, path: str, write: bool = False, as_uid: int | None = None, as_gid: int | None = None
) -> tuple[dict[str, Any], socket.socket | None]:
    """kernelctl's answer to opening ``path``: the name, and for a served name the socket."""
    fields: dict[str, Any] = {"path": path, "write": write}
    if as_uid is not None:
        fields["as_uid"] = as_uid
    if as_gid is not None:
        fields["as_gid"] = as_gid
    try:
        body = control.NameOpen(**fields)
    except control.ProtocolError as exc:
        raise ControlError(f"name_open: {exc}") from None
    result, fds = client.call(body)
    if not isinstance(result, dict):
        control.close_fds(fds)
        raise ControlError("malformed name_open reply")
    if result.get("kind") != "served":
        control.close_fds(fds)
        return result, None
    if len(fds) != 1:
        control.close_fds(fds)
        raise ControlError("kernelctl sent no socket for a served name")
    return result, socket.socket(fileno=fds[0])


def errno_of(error: ControlError) -> int:
    """The errno a refused name request names at its start ("ENOENT: ..."), EIO if none."""
    head = str(error).split(":", 1)[0]
    return int(getattr(errno, head, errno.EIO)) if head.isupper() and head.startswith("E") else errno.EIO
