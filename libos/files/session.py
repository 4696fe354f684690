"""One reader's connection to a file server, sans-I/O: bytes in, bytes out.

kernelctl checked access when it connected the reader (``Grant``: which name, for which
uid, writable or not); the session enforces that grant and nothing else: OPEN must name the
granted path, WRITE needs a writable grant. Requests are answered in order.

What a reader can cost the server is bounded: ``MAX_HANDLES`` open handles, one partial
frame (``kernelctl.fileproto.MAX_FRAME``) buffered, and while more than ``MAX_OUTPUT``
bytes of replies wait for the reader to take them, no further request is read. A frame
that cannot be decoded (the reader sent garbage) ends the session: ``failed`` says why, and
the I/O layer closes that connection only.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from kernelctl import fileproto as fp
from libos.files.sources import Handle, Source

MAX_HANDLES = 64
MAX_OUTPUT = 4 << 20
DIR_MODE = 0o555


@dataclass(frozen=True)
class Grant:
    path: str
    uid: int
    gid: int
    write: bool


Lookup = Callable[[str], Source | None]
Children = Callable[[str], list[tuple[int, str]] | None]


class _DirHandle:
    def __init__(self, path: str, children: Children) -> None:
        self.path = path
        self.children = children

    def attr(self) -> fp.Attr:
        return fp.Attr(fp.KIND_DIR, DIR_MODE, 0, 0)

    def close(self) -> None:
        pass


class ServerSession:
    def __init__(self, grant: Grant, lookup: Lookup, children: Children) -> None:
        self.grant = grant
        self.lookup = lookup
        self.children = children
        self.decoder = fp.FrameDecoder()
        self.handles: dict[int, Handle | _DirHandle] = {}
        self._next_handle = 1
        self._output = bytearray()
        self.failed = ""
        self.requests = 0

    @property
    def wants_input(self) -> bool:
        return not self.failed and len(self._output) < MAX_OUTPUT

    def take_output(self, limit: int = 1 << 30) -> bytes:
        data = bytes(self._output[:limit])
        del self._output[:limit]
        return data

    def unread_output(self, data: bytes) -> None:
        """Put back what the socket did not take, in front (the output stays in order)."""
        self._output[0:0] = data

    def has_output(self) -> bool:
        return bool(self._output)

    def receive(self, data: bytes) -> None:
        """Feed bytes from the reader; answers what is whole, while output stays bounded."""
        if self.failed:
            return
        try:
            if data:
                self.decoder.feed(data)
            self.process()
        except fp.FileProtoError as exc:
            self.failed = str(exc)

    def process(self) -> None:
        """Answer buffered requests until output is over its bound (call again as it drains)."""
        if self.failed:
            return
        try:
            while len(self._output) < MAX_OUTPUT:
                got = self.decoder.next_frame()
                if got is None:
                    return
                op, tag, body = got
                request = fp.decode_request(op, tag, body)
                self.requests += 1
                self._output += fp.encode_reply(self._answer(request))
        except fp.FileProtoError as exc:
            self.failed = str(exc)

    def close(self) -> None:
        for handle in self.handles.values():
            try:
                handle.close()
            except OSError:
                pass
        self.handles.clear()

    # ---- requests ----------------------------------------------------------------------

    def _answer(self, request: fp.Request) -> fp.Reply:
        try:
            if isinstance(request, fp.Open):
                return self._open(request)
            handle = self.handles.get(request.handle)
            if handle is None:
                return fp.Error(request.tag, errno.EBADF, f"no handle {request.handle}")
            if isinstance(request, fp.Close):
                del self.handles[request.handle]
                handle.close()
                return fp.Closed(request.tag)
            if isinstance(request, fp.Stat):
                return fp.Stated(request.tag, handle.attr())
            if isinstance(request, fp.ReadDir):
                return self._readdir(request, handle)
            if isinstance(handle, _DirHandle):
                return fp.Error(request.tag, errno.EISDIR, "a directory")
            if isinstance(request, fp.Read):
                if request.count > fp.MAX_IO:
                    return fp.Error(request.tag, errno.EINVAL, f"at most {fp.MAX_IO} bytes a read")
                return fp.Data(request.tag, handle.read(request.offset, request.count))
            if not self.grant.write:
                return fp.Error(request.tag, errno.EBADF, "opened for reading")
            return fp.Written(request.tag, handle.write(request.offset, request.data))
        except OSError as exc:
            return fp.Error(request.tag, exc.errno or errno.EIO, exc.strerror or str(exc))
        except (OverflowError, ValueError):  # an offset past what the file system takes
            return fp.Error(request.tag, errno.EINVAL, "offset out of range")
        except Exception as exc:  # a source's bug is this request's error, not the server's end
            return fp.Error(request.tag, errno.EIO, f"server error: {type(exc).__name__}")

    def _open(self, request: fp.Open) -> fp.Reply:
        if request.path != self.grant.path:
            return fp.Error(request.tag, errno.EACCES, "this connection was granted another name")
        if request.write and not self.grant.write:
            return fp.Error(request.tag, errno.EACCES, "granted for reading only")
        if len(self.handles) >= MAX_HANDLES:
            return fp.Error(request.tag, errno.EMFILE, f"at most {MAX_HANDLES} handles a connection")
        handle: Handle | _DirHandle
        source = self.lookup(request.path)
        if source is not None:
            handle = source.open(request.write)
        elif self.children(request.path) is not None:
            if request.write:
                return fp.Error(request.tag, errno.EISDIR, "a directory")
            handle = _DirHandle(request.path, self.children)
        else:
            return fp.Error(request.tag, errno.ENOENT, "no longer served")
        number = self._next_handle
        self._next_handle = self._next_handle % 0xFFFFFFFF + 1
        self.handles[number] = handle
        return fp.Opened(request.tag, number, handle.attr())

    def _readdir(self, request: fp.ReadDir, handle: Handle | _DirHandle) -> fp.Reply:
        if not isinstance(handle, _DirHandle):
            return fp.Error(request.tag, errno.ENOTDIR, "not a directory")
        entries = handle.children(handle.path) or []
        chosen: list[tuple[int, str]] = []
        size = 0
        at = request.cookie
        while at < len(entries) and size + 2 + len(entries[at][1].encode()) <= fp.MAX_ENTRIES_BYTES - 8:
            chosen.append(entries[at])
            size += 2 + len(entries[at][1].encode())
            at += 1
        return fp.DirEntries(request.tag, at if at < len(entries) else 0, tuple(chosen))
