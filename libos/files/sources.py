"""What an application serves: each name's ``Source`` gives an opener a ``Handle``.

Three kinds cover the applications here:

* ``BytesSource``: the content is made when the name is opened (a snapshot: the kv server's
  key list or INFO text). One opener sees one consistent version, however long it reads.
* ``MemoryFile``: bytes held in memory, live (a reader sees appends as they happen, so
  ``tail -f`` through the FUSE export works), writable when the mode allows.
* ``LocalFile``: a file of the application's own, read with ``pread`` when asked (live).

Sources are called from the file server's thread, never from the application's loop: what
they read must be safe to read from another thread (a ``list()`` of a dict is, under the
GIL; building an INFO text of integers is).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol

from kernelctl import fileproto as fp

MAX_MEMORY_FILE = 256 << 20


class Handle(Protocol):
    def attr(self) -> fp.Attr: ...

    def read(self, offset: int, count: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> int: ...

    def close(self) -> None: ...


class Source(Protocol):
    mode: int

    def open(self, write: bool) -> Handle: ...


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class _Snapshot:
    def __init__(self, data: bytes, mode: int, made: float) -> None:
        self.data = data
        self.mode = mode
        self.made = made

    def attr(self) -> fp.Attr:
        return fp.Attr(fp.KIND_FILE, self.mode, len(self.data), _ns(self.made))

    def read(self, offset: int, count: int) -> bytes:
        return self.data[offset : offset + count]

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "a generated file cannot be written")

    def close(self) -> None:
        self.data = b""


class BytesSource:
    """Content made by ``make`` at each open (and at each STAT of an open handle)."""

    def __init__(self, make: Callable[[], bytes], mode: int = 0o444, clock: Callable[[], float] = time.time) -> None:
        self.make = make
        self.mode = mode
        self.clock = clock

    def open(self, write: bool) -> Handle:
        if write:
            raise OSError(errno.EROFS, "a generated file cannot be written")
        return _Snapshot(self.make(), self.mode, self.clock())


class MemoryFile:
    """Live bytes in memory; ``append`` and ``write`` from the application, readers see them."""

    def __init__(self, data: bytes = b"", mode: int = 0o644, clock: Callable[[], float] = time.time) -> None:
        self.data = bytearray(data)
        self.mode = mode
        self.clock = clock
        self.mtime = clock()
        self.lock = threading.Lock()

    def append(self, data: bytes) -> None:
        with self.lock:
            self.data += data
            self.mtime = self.clock()

    def open(self, write: bool) -> Handle:
        return _MemoryHandle(self, write)


class _MemoryHandle:
    def __init__(self, file: MemoryFile, write: bool) -> None:
        self.file = file
        self.writable = write

    def attr(self) -> fp.Attr:
        with self.file.lock:
            return fp.Attr(fp.KIND_FILE, self.file.mode, len(self.file.data), _ns(self.file.mtime))

    def read(self, offset: int, count: int) -> bytes:
        with self.file.lock:
            return bytes(self.file.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> int:
        if not self.writable:
            raise OSError(errno.EBADF, "opened for reading")
        if offset + len(data) > MAX_MEMORY_FILE:  # a writer must not make us allocate at will
            raise OSError(errno.EFBIG, f"a file in memory holds at most {MAX_MEMORY_FILE} bytes")
        with self.file.lock:
            if offset > len(self.file.data):
                self.file.data += bytes(offset - len(self.file.data))
            self.file.data[offset : offset + len(data)] = data
            self.file.mtime = self.file.clock()
        return len(data)

    def close(self) -> None:
        pass


class LocalFile:
    """A file of the application's own, served as it is on disk (read-only)."""

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o444) -> None:
        self.path = os.fspath(path)
        self.mode = mode

    def open(self, write: bool) -> Handle:
        if write:
            raise OSError(errno.EROFS, "served read-only")
        return _LocalHandle(os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), self.mode)


class _LocalHandle:
    def __init__(self, fd: int, mode: int) -> None:
        self.fd = fd
        self.mode = mode

    def attr(self) -> fp.Attr:
        st = os.fstat(self.fd)
        return fp.Attr(fp.KIND_FILE, self.mode, st.st_size, st.st_mtime_ns)

    def read(self, offset: int, count: int) -> bytes:
        return os.pread(self.fd, count, offset)

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "served read-only")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
