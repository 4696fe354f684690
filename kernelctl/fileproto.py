"""The file server RPC (way 1): bounded binary messages, sans-I/O.

kernelctl hands an opener one end of a connected ``SOCK_STREAM`` socket whose other end
belongs to the application that serves the name (``kernelctl.naming``). On it the opener
sends requests and the server answers each in order. This module is only the codec: bytes
in, typed messages or ``FileProtoError`` out; no sockets, no clocks. docs/fileproto.md
describes the same format for other implementations.

Every message is one frame::

    u32 length   bytes after this field (op + tag + body), at most MAX_FRAME
    u8  op       request 0x01..0x06, reply 0x81..0x86, error 0xFF
    u32 tag      chosen by the requester, echoed by the reply
    body         per op, big-endian fixed fields first, then at most one variable part

==========  ====================================  =========================================
op          request body                          reply body
==========  ====================================  =========================================
OPEN  1     u8 flags (1: write), path (UTF-8)     u32 handle, attr
READ  2     u32 handle, u64 offset, u32 count     the bytes (fewer at the end of the file)
WRITE 3     u32 handle, u64 offset, data          u32 count written
STAT  4     u32 handle                            attr
READDIR 5   u32 handle, u32 cookie                u32 next cookie (0: done), entries
CLOSE 6     u32 handle                            (empty)
ERROR                                             u16 errno, message (UTF-8)
==========  ====================================  =========================================

``attr`` is u8 kind (1 file, 2 directory), u16 mode, u64 size, u64 mtime in ns; a directory
entry is u8 kind, u8 name length, name. Bounds: ``MAX_FRAME`` (1 MiB + 64), ``MAX_IO``
(1 MiB read or written by one message), ``MAX_PATH`` (1024 bytes), ``MAX_ERROR`` (256 bytes
of message). A length over ``MAX_FRAME`` is refused before a byte of the frame is buffered.
Integrity errors (framing, lengths, unknown ops) are ``FileProtoError``: the connection is
beyond repair and the receiver closes it. A request that is well formed but wrong (a bad
handle, a read past ``MAX_IO``) gets an ERROR reply and the connection goes on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

MAX_IO = 1 << 20
MAX_FRAME = MAX_IO + 64
MAX_PATH = 1024
MAX_ERROR = 256
MAX_NAME = 255

OPEN, READ, WRITE, STAT, READDIR, CLOSE = 1, 2, 3, 4, 5, 6
REPLY = 0x80
ERROR = 0xFF
KIND_FILE, KIND_DIR = 1, 2
FLAG_WRITE = 1

_LEN = struct.Struct("!I")
_HEAD = struct.Struct("!IBI")  # length, op, tag
_HANDLE = struct.Struct("!I")
_IO = struct.Struct("!IQI")  # handle, offset, count
_WRITE = struct.Struct("!IQ")  # handle, offset (data follows)
_ATTR = struct.Struct("!BHQQ")
_OPENED = struct.Struct("!IBHQQ")  # handle + attr
_DIRREQ = struct.Struct("!II")
_COUNT = struct.Struct("!I")
_ERR = struct.Struct("!H")
_ENTRY = struct.Struct("!BB")


class FileProtoError(ValueError):
    """A frame that cannot be read: the connection is closed."""


@dataclass(frozen=True)
class Attr:
    kind: int
    mode: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Open:
    tag: int
    path: str
    write: bool


@dataclass(frozen=True)
class Read:
    tag: int
    handle: int
    offset: int
    count: int


@dataclass(frozen=True)
class Write:
    tag: int
    handle: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Stat:
    tag: int
    handle: int


@dataclass(frozen=True)
class ReadDir:
    tag: int
    handle: int
    cookie: int


@dataclass(frozen=True)
class Close:
    tag: int
    handle: int


Request = Union[Open, Read, Write, Stat, ReadDir, Close]


@dataclass(frozen=True)
class Opened:
    tag: int
    handle: int
    attr: Attr


@dataclass(frozen=True)
class Data:
    tag: int
    data: bytes


@dataclass(frozen=True)
class Written:
    tag: int
    count: int


@dataclass(frozen=True)
class Stated:
    tag: int
    attr: Attr


@dataclass(frozen=True)
class DirEntries:
    tag: int
    next_cookie: int
    entries: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class Closed:
    tag: int


@dataclass(frozen=True)
class Error:
    tag: int
    errno: int
    message: str


Reply = Union[Opened, Data, Written, Stated, DirEntries, Closed, Error]


class FrameDecoder:
    """Cuts a byte stream into frames ``(op, tag, body)``; holds at most one frame."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _LEN.size:
            (length,) = _LEN.unpack_from(self._buffer)
            self._check_length(length)

    def _check_length(self, length: int) -> None:
        if length < _HEAD.size - _LEN.size:
            raise FileProtoError(f"frame of {length} bytes is shorter than its header")
        if length > self.max_frame:
            raise FileProtoError(f"frame of {length} bytes (at most {self.max_frame})")

    def next_frame(self) -> tuple[int, int, bytes] | None:
        """The next whole frame, or None while it is still arriving."""
        buffer = self._buffer
        if len(buffer) < _HEAD.size:
            return None
        length, op, tag = _HEAD.unpack_from(buffer)
        self._check_length(length)
        end = _LEN.size + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[_HEAD.size : end])
        del buffer[:end]
        if len(buffer) >= _LEN.size:
            self._check_length(_LEN.unpack_from(buffer)[0])
        return op, tag, body


def frame(op: int, tag: int, body: bytes = b"") -> bytes:
    length = _HEAD.size - _LEN.size + len(body)
    if length > MAX_FRAME:
        raise FileProtoError(f"frame of {length} bytes (at most {MAX_FRAME})")
    return _HEAD.pack(length, op, tag & 0xFFFFFFFF) + body


def _text(body: bytes, limit: int, what: str) -> str:
    if len(body) > limit:
        raise FileProtoError(f"{what} of {len(body)} bytes (at most {limit})")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise FileProtoError(f"{what} is not UTF-8") from None


def _fixed(layout: struct.Struct, body: bytes, what: str, exact: bool = True) -> tuple[int, ...]:
    if len(body) < layout.size or (exact and len(body) != layout.size):
        raise FileProtoError(f"{what}: body of {len(body)} bytes (want {layout.size})")
    return layout.unpack_from(body)


# ---- requests ---------------------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    if isinstance(request, Open):
        return frame(OPEN, request.tag, bytes([FLAG_WRITE if request.write else 0]) + request.path.encode())
    if isinstance(request, Read):
        return frame(READ, request.tag, _IO.pack(request.handle, request.offset, request.count))
    if isinstance(request, Write):
        return frame(WRITE, request.tag, _WRITE.pack(request.handle, request.offset) + request.data)
    if isinstance(request, Stat):
        return frame(STAT, request.tag, _HANDLE.pack(request.handle))
    if isinstance(request, ReadDir):
        return frame(READDIR, request.tag, _DIRREQ.pack(request.handle, request.cookie))
    return frame(CLOSE, request.tag, _HANDLE.pack(request.handle))


def decode_request(op: int, tag: int, body: bytes) -> Request:
    """A request frame's typed message; ``FileProtoError`` if it is not one."""
    if op == OPEN:
        if not body or body[0] & ~FLAG_WRITE:
            raise FileProtoError("open: bad flags")
        return Open(tag, _text(body[1:], MAX_PATH, "open: path"), bool(body[0] & FLAG_WRITE))
    if op == READ:
        handle, offset, count = _fixed(_IO, body, "read")
        return Read(tag, handle, offset, count)
    if op == WRITE:
        handle, offset = _fixed(_WRITE, body, "write", exact=False)
        data = body[_WRITE.size :]
        if len(data) > MAX_IO:
            raise FileProtoError(f"write of {len(data)} bytes (at most {MAX_IO})")
        return Write(tag, handle, offset, data)
    if op == STAT:
        return Stat(tag, _fixed(_HANDLE, body, "stat")[0])
    if op == READDIR:
        handle, cookie = _fixed(_DIRREQ, body, "readdir")
        return ReadDir(tag, handle, cookie)
    if op == CLOSE:
        return Close(tag, _fixed(_HANDLE, body, "close")[0])
    raise FileProtoError(f"not a request op: {op:#x}")


# ---- replies ----------------------------------------------------------------------------


def _attr(attr: Attr) -> bytes:
    return _ATTR.pack(attr.kind, attr.mode & 0xFFFF, attr.size, attr.mtime_ns)


def encode_reply(reply: Reply) -> bytes:
    if isinstance(reply, Opened):
        return frame(OPEN | REPLY, reply.tag, _HANDLE.pack(reply.handle) + _attr(reply.attr))
    if isinstance(reply, Data):
        return frame(READ | REPLY, reply.tag, reply.data)
    if isinstance(reply, Written):
        return frame(WRITE | REPLY, reply.tag, _COUNT.pack(reply.count))
    if isinstance(reply, Stated):
        return frame(STAT | REPLY, reply.tag, _attr(reply.attr))
    if isinstance(reply, DirEntries):
        parts = [_COUNT.pack(reply.next_cookie)]
        for kind, name in reply.entries:
            raw = name.encode()[:MAX_NAME]
            parts.append(_ENTRY.pack(kind, len(raw)) + raw)
        return frame(READDIR | REPLY, reply.tag, b"".join(parts))
    if isinstance(reply, Closed):
        return frame(CLOSE | REPLY, reply.tag)
    message = reply.message.encode()[:MAX_ERROR]
    return frame(ERROR, reply.tag, _ERR.pack(reply.errno & 0xFFFF) + message)


def _decode_attr(body: bytes, what: str) -> Attr:
    kind, mode, size, mtime = _fixed(_ATTR, body, what)
    if kind not in (KIND_FILE, KIND_DIR):
        raise FileProtoError(f"{what}: bad kind {kind}")
    return Attr(kind, mode, size, mtime)


def decode_reply(op: int, tag: int, body: bytes) -> Reply:
    if op == OPEN | REPLY:
        (handle,) = _fixed(_HANDLE, body, "opened", exact=False)
        return Opened(tag, handle, _decode_attr(body[_HANDLE.size :], "opened"))
    if op == READ | REPLY:
        if len(body) > MAX_IO:
            raise FileProtoError(f"data of {len(body)} bytes (at most {MAX_IO})")
        return Data(tag, body)
    if op == WRITE | REPLY:
        return Written(tag, _fixed(_COUNT, body, "written")[0])
    if op == STAT | REPLY:
        return Stated(tag, _decode_attr(body, "stat"))
    if op == READDIR | REPLY:
        (cookie,) = _fixed(_COUNT, body, "entries", exact=False)
        entries = []
        at = _COUNT.size
        while at < len(body):
            if at + _ENTRY.size > len(body):
                raise FileProtoError("entries: truncated entry")
            kind, length = _ENTRY.unpack_from(body, at)
            at += _ENTRY.size
            if at + length > len(body) or not length:
                raise FileProtoError("entries: bad name length")
            entries.append((kind, _text(body[at : at + length], MAX_NAME, "entry name")))
            at += length
        return DirEntries(tag, cookie, tuple(entries))
    if op == CLOSE | REPLY:
        if body:
            raise FileProtoError("closed: unexpected body")
        return Closed(tag)
    if op == ERROR:
        (number,) = _fixed(_ERR, body, "error", exact=False)
        return Error(tag, number, body[_ERR.size :][:MAX_ERROR].decode("utf-8", "replace"))
    raise FileProtoError(f"not a reply op: {op:#x}")


# The attribute of a directory entry listing one READDIR reply may carry: the reply stays
# inside one frame whatever the names.
MAX_ENTRIES_BYTES = MAX_IO
