"""A Caladan-style file store on a VSA: files are chains of log records, with an inode table.

Every change is one record of the persistent log (``libos.storage.log``), whose records
carry a length, a sequence number and a CRC32C, and whose recovery keeps exactly the valid
prefix after a crash or a torn write. The store is that log read as files:

* the **inode table** (in memory, rebuilt by replaying the log at open) maps a name to an
  inode: its size, mode, and the *chain* of record pieces that hold its bytes, each piece
  ``(file offset, length, record seq, offset in the record)``. A read follows the chain and
  reads those records back (each checked against its CRC again); holes read as zeros;
* ``write``, ``append``, ``create``, ``truncate``, ``rename``, ``unlink`` queue a record
  and return at once; a read sees them at once (queued data is kept until it is durable);
* ``fsync`` returns only when every record before it is on stable storage (one log commit:
  concurrent fsyncs share it, the log's group commit);
* **cleaning**: when the log's half fills, ``compact`` writes the live files (one CREATE and
  the file's bytes per file) into the other half and switches to it atomically, so a crash
  leaves the old store or the new one; the inode table is then rebuilt from the new records.

Record payloads (little-endian; the log's header and CRC come around them)::

    CREATE    op=1  u64 inode  u16 mode  u16 name_len  name
    WRITE     op=2  u64 inode  u64 offset  data
    TRUNCATE  op=3  u64 inode  u64 size
    RENAME    op=4  u64 inode  u16 name_len  name    (replaces a file of that name)
    UNLINK    op=5  u64 inode

Crash semantics: after a crash the store is the replay of a prefix of the records, and that
prefix holds every record submitted before the last ``fsync`` that returned. Nothing else is
ever read: a record the log hands back passed its CRC. The records are input (a grantee
reads a store its owner wrote): a record that does not make sense (unknown op or inode,
bad name, a size past ``MAX_FILE_SIZE``) is a ``FileStoreCorrupt``, never a crash.

**Shared reading (way 2).** A grantee opens the same VSA read-only and the store with
``read_only=True``: it replays what is on the device *now* and never writes. Consistency
given: the reader sees the replay of a prefix of the records the owner has written, which
includes every record the owner had made durable (``fsync``) before the reader opened or
``refresh``ed, and never a torn record (each one is CRC-checked; the scan stops at the
first that is not whole). While the owner writes, the reader may catch a batch half-written:
that looks like damage in the middle to the log's recovery, so ``refresh`` retries a few
times before it reports ``FileStoreCorrupt``.
"""

from __future__ import annotations

import bisect
import errno
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from libos.storage.blockdev import BlockDevice
from libos.storage.log import (
    DEFAULT_MAX_BATCH_BYTES,
    LogCorruption,
    LogError,
    LogFull,
    PersistentLog,
)

OP_CREATE: Final = 1
OP_WRITE: Final = 2
OP_TRUNCATE: Final = 3
OP_RENAME: Final = 4
OP_UNLINK: Final = 5

MAX_NAME: Final = 128
MAX_FILE_SIZE: Final = 1 << 40
MAX_FILES: Final = 100_000
REFRESH_TRIES: Final = 8

_OP = struct.Struct("<BQ")  # op, inode
_CREATE = struct.Struct("<BQHH")  # op, inode, mode, name_len
_WRITE = struct.Struct("<BQQ")  # op, inode, offset
_TRUNCATE = struct.Struct("<BQQ")
_RENAME = struct.Struct("<BQH")
_NAME = re.compile(r"[A-Za-z0-9._+@:,=-]{1,%d}" % MAX_NAME)
# A record holds one log block's worth of header besides its data.
_RECORD_OVERHEAD: Final = 64


class FileStoreError(OSError):
    """A refused operation, with its errno (ENOENT, EEXIST, ENOSPC, EROFS ...)."""


class FileStoreCorrupt(FileStoreError):
    """The records on the device do not describe a file store."""


@dataclass
class Piece:
    offset: int  # in the file
    length: int
    seq: int  # the log record holding the bytes
    at: int  # where they start in that record's payload


@dataclass
class Inode:
    number: int
    name: str
    mode: int
    size: int = 0
    mtime: float = 0.0
    pieces: list[Piece] = field(default_factory=list)  # sorted by offset, never overlapping


@dataclass(frozen=True)
class FileInfo:
    name: str
    inode: int
    size: int
    mode: int
    mtime: float


def check_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name in (".", ".."):
        raise FileStoreError(errno.EINVAL, f"bad file name {str(name)[:40]!r}: 1-{MAX_NAME} of A-Z a-z 0-9 . _ + @ : , = -")
    return name


def _cut(pieces: list[Piece], start: int, end: int) -> None:
    """Remove the bytes [start, end) from a chain (pieces that cross an edge are trimmed)."""
    kept: list[Piece] = []
    for piece in pieces:
        piece_end = piece.offset + piece.length
        if piece_end <= start or piece.offset >= end:
            kept.append(piece)
            continue
        if piece.offset < start:
            kept.append(Piece(piece.offset, start - piece.offset, piece.seq, piece.at))
        if piece_end > end:
            skip = end - piece.offset
            kept.append(Piece(end, piece_end - end, piece.seq, piece.at + skip))
    pieces[:] = kept


class FileStore:
    """Files on the log at ``[start_block, start_block + num_blocks)`` of ``dev``."""

    def __init__(
        self,
        dev: BlockDevice,
        start_block: int = 0,
        num_blocks: int | None = None,
        *,
        create: bool = True,
        read_only: bool = False,
        use_fua: bool = False,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._dev = dev
        self._area = (start_block, num_blocks)
        self._options = {"create": create, "use_fua": use_fua, "max_batch_bytes": max_batch_bytes}
        self.read_only = read_only
        self.clock = clock
        self._files: dict[str, Inode] = {}
        self._inodes: dict[int, Inode] = {}
        self._next_inode = 1
        self._queued: dict[int, bytes] = {}  # payloads of records not yet durable, by seq
        self.compactions = 0
        self.log = self._open_log()
        self._replay()

    # ---- opening and replay ------------------------------------------------------------------

    def _open_log(self) -> PersistentLog:
        start, count = self._area
        tries = REFRESH_TRIES if self.read_only else 1
        for attempt in range(tries):
            try:
                return PersistentLog(self._dev, start, count, read_only=self.read_only, **self._options)  # type: ignore[arg-type]
            except LogCorruption as exc:
                if attempt == tries - 1:
                    raise FileStoreCorrupt(errno.EIO, f"the store's log: {exc}") from None
                time.sleep(0.01 * (attempt + 1))  # the owner was in the middle of a batch
            except LogError as exc:
                raise FileStoreCorrupt(errno.EIO, f"the store's log: {exc}") from None
        raise FileStoreCorrupt(errno.EIO, "the store's log could not be opened")

    def refresh(self) -> None:
        """Read-only: see what the owner has written since (reopens the log and replays)."""
        if not self.read_only:
            return
        self.log.close()
        self.log = self._open_log()
        self._replay()

    def _replay(self) -> None:
        self._files.clear()
        self._inodes.clear()
        self._next_inode = 1
        try:
            for seq, payload in self.log.records():
                self._apply(seq, payload)
        except LogError as exc:
            raise FileStoreCorrupt(errno.EIO, f"the store's log: {exc}") from None

    def _apply(self, seq: int, payload: bytes) -> None:
        """One record, checked, applied to the inode table."""
        if len(payload) < _OP.size:
            raise FileStoreCorrupt(errno.EIO, f"record {seq}: {len(payload)} bytes")
        op, number = _OP.unpack_from(payload)
        now = self.clock()
        if op == OP_CREATE:
            if len(payload) < _CREATE.size:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: short create")
            _, number, mode, name_len = _CREATE.unpack_from(payload)
            name = self._record_name(payload[_CREATE.size :], name_len, seq)
            if number in self._inodes or name in self._files or number == 0 or len(self._files) >= MAX_FILES:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: create of inode {number} ({name}) does not fit")
            made = Inode(number, name, mode & 0o7777, mtime=now)
            self._files[name] = self._inodes[number] = made
            self._next_inode = max(self._next_inode, number + 1)
            return
        found = self._inodes.get(number)
        if found is None:
            raise FileStoreCorrupt(errno.EIO, f"record {seq}: op {op} on unknown inode {number}")
        inode = found
        inode.mtime = now
        if op == OP_WRITE:
            if len(payload) < _WRITE.size:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: short write")
            _, _, offset = _WRITE.unpack_from(payload)
            length = len(payload) - _WRITE.size
            if offset + length > MAX_FILE_SIZE:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: write past {MAX_FILE_SIZE} bytes")
            self._place(inode, offset, length, seq, _WRITE.size)
        elif op == OP_TRUNCATE:
            if len(payload) != _TRUNCATE.size:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: bad truncate")
            size = _TRUNCATE.unpack_from(payload)[2]
            if size > MAX_FILE_SIZE:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: truncate past {MAX_FILE_SIZE} bytes")
            _cut(inode.pieces, size, max(size, inode.size))
            inode.size = size
        elif op == OP_RENAME:
            if len(payload) < _RENAME.size:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: short rename")
            name = self._record_name(payload[_RENAME.size :], _RENAME.unpack_from(payload)[2], seq)
            replaced = self._files.get(name)
            if replaced is not None and replaced is not inode:
                del self._inodes[replaced.number]
            del self._files[inode.name]
            inode.name = name
            self._files[name] = inode
        elif op == OP_UNLINK:
            if len(payload) != _OP.size:
                raise FileStoreCorrupt(errno.EIO, f"record {seq}: bad unlink")
            del self._files[inode.name]
            del self._inodes[number]
        else:
            raise FileStoreCorrupt(errno.EIO, f"record {seq}: unknown op {op}")

    @staticmethod
    def _record_name(raw: bytes, length: int, seq: int) -> str:
        if length != len(raw):
            raise FileStoreCorrupt(errno.EIO, f"record {seq}: name length {length}, {len(raw)} bytes follow")
        try:
            return check_name(raw.decode("ascii"))
        except (UnicodeDecodeError, FileStoreError):
            raise FileStoreCorrupt(errno.EIO, f"record {seq}: bad name") from None

    @staticmethod
    def _place(inode: Inode, offset: int, length: int, seq: int, at: int) -> None:
        end = offset + length
        if length:
            if offset >= inode.size or not inode.pieces or inode.pieces[-1].offset + inode.pieces[-1].length <= offset:
                inode.pieces.append(Piece(offset, length, seq, at))  # the common case: append
            else:
                _cut(inode.pieces, offset, end)
                index = bisect.bisect_left([p.offset for p in inode.pieces], offset)
                inode.pieces.insert(index, Piece(offset, length, seq, at))
        inode.size = max(inode.size, end)

    # ---- changes ---------------------------------------------------------------------------

    def _submit(self, payload: bytes) -> int:
        """Queue one record (compacting once if the log's half is full); apply it; its seq."""
        if self.read_only:
            raise FileStoreError(errno.EROFS, "the file store was opened read-only")
        try:
            try:
                seq = self.log.submit(payload)
            except LogFull:
                self.compact()
                seq = self.log.submit(payload)
        except LogFull:
            raise FileStoreError(errno.ENOSPC, "the file store is full") from None
        except LogError as exc:
            raise FileStoreError(errno.EIO, f"the store's log: {exc}") from None
        self._queued[seq] = payload
        self._apply(seq, payload)
        return seq

    @property
    def max_chunk(self) -> int:
        """The most data bytes one WRITE record carries (a record fits one commit batch)."""
        return self.log.batch_blocks * self.log.block_size - _RECORD_OVERHEAD

    def _inode(self, name: str) -> Inode:
        inode = self._files.get(check_name(name))
        if inode is None:
            raise FileStoreError(errno.ENOENT, f"no file {name}")
        return inode

    def create(self, name: str, mode: int = 0o644) -> None:
        check_name(name)
        if name in self._files:
            raise FileStoreError(errno.EEXIST, f"{name} exists")
        if len(self._files) >= MAX_FILES:
            raise FileStoreError(errno.ENOSPC, f"at most {MAX_FILES} files")
        raw = name.encode("ascii")
        self._submit(_CREATE.pack(OP_CREATE, self._next_inode, mode & 0o7777, len(raw)) + raw)

    def write(self, name: str, offset: int, data: bytes | bytearray | memoryview) -> int:
        inode = self._inode(name)
        if offset < 0 or offset + len(data) > MAX_FILE_SIZE:
            raise FileStoreError(errno.EFBIG, f"a file holds at most {MAX_FILE_SIZE} bytes")
        view = memoryview(data)
        chunk = self.max_chunk
        for at in range(0, len(view), chunk):
            part = view[at : at + chunk]
            self._submit(_WRITE.pack(OP_WRITE, inode.number, offset + at) + bytes(part))
        return len(view)

    def append(self, name: str, data: bytes | bytearray | memoryview) -> int:
        """Write at the end; returns the offset the data went to."""
        offset = self._inode(name).size
        self.write(name, offset, data)
        return offset

    def truncate(self, name: str, size: int) -> None:
        inode = self._inode(name)
        if not 0 <= size <= MAX_FILE_SIZE:
            raise FileStoreError(errno.EFBIG, f"a file holds at most {MAX_FILE_SIZE} bytes")
        self._submit(_TRUNCATE.pack(OP_TRUNCATE, inode.number, size))

    def rename(self, old: str, new: str) -> None:
        inode = self._inode(old)
        raw = check_name(new).encode("ascii")
        self._submit(_RENAME.pack(OP_RENAME, inode.number, len(raw)) + raw)

    def unlink(self, name: str) -> None:
        self._submit(_OP.pack(OP_UNLINK, self._inode(name).number))

    def fsync(self) -> None:
        """Every change made before this call is on stable storage when it returns."""
        if self.read_only:
            return
        try:
            durable = self.log.commit()
        except LogError as exc:
            raise FileStoreError(errno.EIO, f"the store's log: {exc}") from None
        for seq in [seq for seq in self._queued if seq < durable]:
            del self._queued[seq]

    # ---- reading ---------------------------------------------------------------------------

    def _record(self, seq: int) -> bytes:
        queued = self._queued.get(seq)
        if queued is not None:
            return queued
        try:
            return self.log.read(seq)
        except LogError as exc:
            raise FileStoreError(errno.EIO, f"the store's log: {exc}") from None

    def read(self, name: str, offset: int = 0, count: int | None = None) -> bytes:
        inode = self._inode(name)
        if offset < 0:
            raise FileStoreError(errno.EINVAL, "negative offset")
        end = inode.size if count is None else min(inode.size, offset + count)
        if end <= offset:
            return b""
        out = bytearray(end - offset)
        for piece in inode.pieces:
            start = max(piece.offset, offset)
            stop = min(piece.offset + piece.length, end)
            if start >= stop:
                continue
            record = self._record(piece.seq)
            source = piece.at + (start - piece.offset)
            out[start - offset : stop - offset] = record[source : source + (stop - start)]
        return bytes(out)

    def stat(self, name: str) -> FileInfo:
        inode = self._inode(name)
        return FileInfo(inode.name, inode.number, inode.size, inode.mode, inode.mtime)

    def list(self) -> list[FileInfo]:
        return [self.stat(name) for name in sorted(self._files)]

    def exists(self, name: str) -> bool:
        return check_name(name) in self._files

    # ---- cleaning ----------------------------------------------------------------------------

    def compact(self) -> None:
        """Rewrite the live files into the log's other half (atomically) and rebuild the table."""
        if self.read_only:
            raise FileStoreError(errno.EROFS, "the file store was opened read-only")
        self.fsync()
        snapshot: list[bytes] = []
        chunk = self.max_chunk
        for inode in sorted(self._inodes.values(), key=lambda i: i.number):
            raw = inode.name.encode("ascii")
            snapshot.append(_CREATE.pack(OP_CREATE, inode.number, inode.mode, len(raw)) + raw)
            data = self.read(inode.name)
            # Holes come back as written zeros: cleaning makes a file dense.
            for at in range(0, len(data), chunk):
                snapshot.append(_WRITE.pack(OP_WRITE, inode.number, at) + data[at : at + chunk])
        try:
            self.log.compact(snapshot)
        except LogFull:
            raise FileStoreError(errno.ENOSPC, "the live files do not fit half the store") from None
        except LogError as exc:
            raise FileStoreError(errno.EIO, f"the store's log: {exc}") from None
        self._queued.clear()
        self.compactions += 1
        next_inode = self._next_inode
        self._replay()
        self._next_inode = max(self._next_inode, next_inode)

    def close(self) -> None:
        if not self.read_only:
            self.fsync()
        self.log.close()

    def __enter__(self) -> FileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
