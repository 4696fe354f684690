"""The Caladan persistent log: an append-only record log on a :class:`BlockDevice`.

An append returns only when its record is on stable storage, and after a power failure
the log reopens to exactly the valid prefix of what was written: every acknowledged record,
possibly some unacknowledged ones that happened to land, never a damaged or stale one.

On-disk layout of the log area (block numbers relative to ``start_block``)::

    block 0, 1        superblock slots A and B (written alternately)
    block 2 ..        half 0: records
    block 2 + H ..    half 1: records (the target of the next compaction)

Records fill the active half from ``start_block`` on, each padded to whole blocks::

    off size field        meaning
    0   4    magic        RECORD_MAGIC
    4   u32  length       payload bytes
    8   u64  seq          sequence number: +1 per record, never reused
    16  u64  durable_seq  every record with a lower seq was on stable storage before this
                          one was written (the log's own commit mark)
    24  u32  epoch        the writing session (bumped at every open and compaction)
    28  u32  log_id       random at format: records of an earlier log on the disk differ
    32  u32  payload_crc  CRC32C of the payload
    36  u32  header_crc   CRC32C of bytes 0..35, so it covers the payload CRC too
    40  ...  payload, then zeros to the block boundary

Why each field is there:

* A CRC over header and payload, not a marker byte as in the original Caladan code: a torn
  write may land sectors in any order, and only a checksum notices a stale sector in the
  middle of a record.
* ``epoch`` and the superblock's ``open_end_seq``: a crash can leave *debris* after the
  valid prefix (records of a batch that was never acknowledged). After such a tail is cut,
  new records are written over it, and debris further on could otherwise line up with the
  new records and come back to life. Every record at or past ``open_end_seq`` (the end found
  when the session opened) must carry the session's epoch, so debris never does.
* ``durable_seq`` separates a torn tail from damage in the middle: if record n fails its
  checks but a later record of this session says that n was durable before it was written,
  n was acknowledged and then damaged: :class:`LogCorruption`, not a silent cut. Writes are
  grouped so that what lies between two flushes spans at most ``batch_blocks`` blocks, so
  that witness, if it exists, starts within ``batch_blocks`` blocks of the damage.
  The superblock's ``min_end_seq`` (the durable end when it was last written) catches
  damage to the last records of earlier sessions the same way.

The superblock is written at open, trim, compaction and clean close, never per append; it
fits in the first 512-byte sector of its block, which devices write atomically, and two
slots alternate so that even a torn superblock write leaves the previous one intact.
Compaction writes the kept records into the other half, flushes, then writes the superblock
that points there: a crash at any step leaves either the old log or the new one.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Final

from libos.storage.blockdev import SECTOR_SIZE, SUPPORTED_BLOCK_SIZES, BlockDevice
from libos.storage.crc32c import crc32c

SUPERBLOCK_IDENT: Final = b"ARXCLOG\x00"
FORMAT_VERSION: Final = 1
RECORD_MAGIC: Final = b"ArxR"

# ident, version, block_size, log_id, epoch, active_half, half_epoch, generation,
# area_blocks, batch_blocks, start_block, start_seq, open_end_seq, min_end_seq; then crc.
_SUPERBLOCK: Final = struct.Struct("<8sIIIIIIQQQQQQQ")
_CRC: Final = struct.Struct("<I")
SUPERBLOCK_SIZE: Final = _SUPERBLOCK.size + _CRC.size

# magic, length, seq, durable_seq, epoch, log_id, payload_crc; then header_crc.
_RECORD_FIELDS: Final = struct.Struct("<4sIQQIII")
RECORD_HEADER_SIZE: Final = _RECORD_FIELDS.size + _CRC.size

SUPERBLOCK_SLOTS: Final = 2
MIN_AREA_BLOCKS: Final = SUPERBLOCK_SLOTS + 2
MAX_EPOCH: Final = 0xFFFFFFFF
MAX_SEQ: Final = 0xFFFFFFFFFFFFFFFF
DEFAULT_MAX_BATCH_BYTES: Final = 1 << 20


class LogError(Exception):
    """Base class of the log's errors."""


class LogCorruption(LogError):
    """The log on the device is damaged in a way recovery may not silently cut off.

    ``offset`` is the byte offset on the device of the damaged structure; ``seq`` the
    sequence number expected there (None for the superblock); ``lost_through_seq`` the
    highest sequence number known to exist beyond the damage (None when unknown).
    """

    def __init__(self, offset: int, reason: str, *, seq: int | None = None, lost_through_seq: int | None = None) -> None:
        where = f"byte offset {offset}" + (f", seq {seq}" if seq is not None else "")
        super().__init__(f"log corruption at {where}: {reason}")
        self.offset = offset
        self.reason = reason
        self.seq = seq
        self.lost_through_seq = lost_through_seq


class LogFull(LogError):
    """The active half has no room for the record: trim, then compact."""


class RecordTooLarge(LogError, ValueError):
    """A record larger than one commit batch (``batch_blocks``) or the area."""


class LogFailed(LogError):
    """An earlier device error left the log in an unknown state; reopen it to recover."""


class LogClosed(LogError):
    """The log was closed."""


@dataclass(frozen=True)
class Superblock:
    """The rarely written root of the log: geometry, the active half and its start."""

    block_size: int
    log_id: int
    epoch: int
    active_half: int
    half_epoch: int
    generation: int
    area_blocks: int
    batch_blocks: int
    start_block: int
    start_seq: int
    open_end_seq: int
    min_end_seq: int

    def pack(self) -> bytes:
        body = _SUPERBLOCK.pack(
            SUPERBLOCK_IDENT,
            FORMAT_VERSION,
            self.block_size,
            self.log_id,
            self.epoch,
            self.active_half,
            self.half_epoch,
            self.generation,
            self.area_blocks,
            self.batch_blocks,
            self.start_block,
            self.start_seq,
            self.open_end_seq,
            self.min_end_seq,
        )
        return body + _CRC.pack(crc32c(body))

    @classmethod
    def unpack(cls, block: bytes) -> Superblock | None:
        """The superblock in ``block``, or None if it holds no intact one of this version."""
        if len(block) < SUPERBLOCK_SIZE:
            return None
        (stored_crc,) = _CRC.unpack_from(block, _SUPERBLOCK.size)
        if crc32c(memoryview(block)[: _SUPERBLOCK.size]) != stored_crc:
            return None
        ident, version, *fields = _SUPERBLOCK.unpack_from(block)
        if ident != SUPERBLOCK_IDENT or version != FORMAT_VERSION:
            return None
        return cls(*fields)


@dataclass(frozen=True)
class RecoveryReport:
    """What opening the log found."""

    start_seq: int
    end_seq: int  # the first sequence number after the recovered records
    stop_reason: str  # why the scan stopped where it did
    repaired: bool = False
    lost_from_seq: int | None = None  # set when repair=True cut off damaged records
    lost_through_seq: int | None = None  # highest seq known lost, None if unknown
    damage_offset: int | None = None


@dataclass(frozen=True)
class _RecordHeader:
    length: int
    seq: int
    durable_seq: int
    epoch: int
    payload_crc: int
    blocks: int


@dataclass(frozen=True)
class _Queued:
    payload: bytes
    payload_crc: int
    blocks: int


def _blocks_for(payload_len: int, block_size: int) -> int:
    return -(-(RECORD_HEADER_SIZE + payload_len) // block_size)


def recorded_area_blocks(dev: BlockDevice, start_block: int = 0) -> int | None:
    """The area size a log at ``start_block`` recorded in its newest intact superblock, if
    any: how a reader that did not format the log (a grantee of a shared VSA) finds its end."""
    if not 0 <= start_block <= dev.num_blocks - SUPERBLOCK_SLOTS:
        return None
    slots = dev.read(start_block, SUPERBLOCK_SLOTS)
    size = dev.block_size
    found = [sb for sb in (Superblock.unpack(slots[i * size : (i + 1) * size]) for i in range(SUPERBLOCK_SLOTS)) if sb]
    if not found:
        return None
    area = max(found, key=lambda sb: sb.generation).area_blocks
    return area if MIN_AREA_BLOCKS <= area <= dev.num_blocks - start_block else None


class PersistentLog:
    """An append-only log of byte records in blocks ``[start_block, start_block + num_blocks)``.

    Opening recovers the valid prefix (see the module docstring) and starts a new session.
    A device without a log (no superblock identifier in either slot) is formatted when
    ``create`` is true. Damage in the middle raises :class:`LogCorruption` unless
    ``repair`` is true, in which case the log is cut there and :attr:`recovery` says what
    was lost. ``use_fua`` commits with FUA writes instead of write + flush.

    ``read_only`` opens a log that another process writes (a grantee of a shared VSA): it
    recovers the valid prefix as it is on the device now and never writes, so it starts no
    session; a reader that wants later records opens the log again.

    Thread safety: every method may be called from any thread. Appends that overlap in time
    are committed together: the first caller to find no commit in progress becomes the
    leader and writes everything queued so far in one write, while the others wait.
    """

    def __init__(
        self,
        dev: BlockDevice,
        start_block: int = 0,
        num_blocks: int | None = None,
        *,
        repair: bool = False,
        create: bool = True,
        use_fua: bool = False,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        read_only: bool = False,
    ) -> None:
        block_size = dev.block_size
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"unsupported block size {block_size}")
        if num_blocks is None and read_only:
            num_blocks = recorded_area_blocks(dev, start_block)
        if num_blocks is None:
            num_blocks = dev.num_blocks - start_block
        if start_block < 0 or num_blocks < MIN_AREA_BLOCKS or start_block + num_blocks > dev.num_blocks:
            raise ValueError(
                f"log area [{start_block}, {start_block + num_blocks}) must lie in the device "
                f"[0, {dev.num_blocks}) and hold at least {MIN_AREA_BLOCKS} blocks"
            )
        if max_batch_bytes < block_size:
            raise ValueError(f"max_batch_bytes must be at least one block ({block_size})")
        self._dev = dev
        self._block_size = block_size
        self._area_start = start_block
        self._area_blocks = num_blocks
        self._half_blocks = (num_blocks - SUPERBLOCK_SLOTS) // 2
        self._use_fua = use_fua
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._failed: BaseException | None = None
        self._closed = False
        self._committing = False
        self._queue: list[_Queued] = []
        self._layout_version = 0
        self.read_only = read_only

        sb, newest_known = self._load_superblock(create and not read_only, max_batch_bytes)
        self.recovery, offsets, end_block = self._recover(sb, repair and not read_only)
        if read_only:
            self._sb = sb
            self._base_seq = sb.start_seq
            self._offsets = offsets
            self._end_block = end_block
            self._next_seq = self._durable_seq = self.recovery.end_seq
            return
        # When the other slot is damaged, the superblock lost there may have been the newest
        # one and started a session (epoch + 1) whose records are still on the disk, cut off
        # by this recovery. Reusing that epoch would let them line up behind the new
        # session's records and come back; skipping it cannot (a superblock moves the epoch
        # by at most one, so nothing on the disk carries epoch + 2).
        epoch_step = 1 if newest_known else 2
        if sb.epoch > MAX_EPOCH - epoch_step:
            raise LogError("the log's epoch counter is exhausted; compact it into a new log")
        end_seq = self.recovery.end_seq
        # A new session: records from here on carry the new epoch, and anything past
        # end_seq from earlier sessions (debris of an unacknowledged batch, records cut
        # off by repair) can never be taken for part of the log again.
        self._sb = replace(
            sb,
            epoch=sb.epoch + epoch_step,
            generation=sb.generation + 1,
            open_end_seq=end_seq,
            min_end_seq=end_seq,
        )
        self._write_superblock(self._sb)
        self._base_seq = sb.start_seq
        self._offsets = offsets
        self._end_block = end_block
        self._next_seq = end_seq
        self._durable_seq = end_seq

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def batch_blocks(self) -> int:
        """The most blocks one commit writes between two flushes (and the largest record)."""
        return self._sb.batch_blocks

    @property
    def start_seq(self) -> int:
        """The first sequence number still in the log (the trim point)."""
        with self._lock:
            return self._base_seq

    @property
    def durable_seq(self) -> int:
        """Every record with a lower sequence number is on stable storage."""
        with self._lock:
            return self._durable_seq

    @property
    def next_seq(self) -> int:
        """The sequence number the next submitted record gets."""
        with self._lock:
            return self._next_seq

    @property
    def queued(self) -> int:
        """Records submitted but not yet durable (being written included)."""
        with self._lock:
            return self._next_seq - self._durable_seq

    @property
    def free_blocks(self) -> int:
        """Blocks left in the active half for new records."""
        with self._lock:
            return self._half_blocks - self._end_block

    def submit(self, record: bytes | bytearray | memoryview) -> int:
        """Queue ``record`` without writing it; :meth:`commit` makes it durable."""
        item = self._prepare(record)
        with self._lock:
            return self._submit_locked(item)

    def commit(self) -> int:
        """Write every queued record in one write and one flush; returns :attr:`durable_seq`."""
        with self._lock:
            self._check_usable()
            self._wait_durable(self._next_seq)
            return self._durable_seq

    def append(self, record: bytes | bytearray | memoryview) -> int:
        """Append ``record``; returns its sequence number once it is on stable storage."""
        item = self._prepare(record)
        with self._lock:
            seq = self._submit_locked(item)
            self._wait_durable(seq + 1)
            return seq

    def _prepare(self, record: bytes | bytearray | memoryview) -> _Queued:
        if not isinstance(record, (bytes, bytearray, memoryview)):
            raise TypeError(f"a record is bytes, not {type(record).__name__}")
        payload = bytes(record)  # our own copy: the caller may reuse its buffer
        blocks = _blocks_for(len(payload), self._block_size)
        if blocks > self._sb.batch_blocks:
            raise RecordTooLarge(
                f"record of {len(payload)} bytes needs {blocks} blocks, more than one batch ({self._sb.batch_blocks})"
            )
        return _Queued(payload, crc32c(payload), blocks)

    def _submit_locked(self, item: _Queued) -> int:
        self._check_usable()
        if self._end_block + item.blocks > self._half_blocks:
            raise LogFull(
                f"record needs {item.blocks} blocks, {self._half_blocks - self._end_block} left: trim and compact"
            )
        if self._next_seq >= MAX_SEQ:
            raise LogFull("sequence numbers exhausted")
        seq = self._next_seq
        self._next_seq += 1
        self._offsets.append(self._end_block)
        self._end_block += item.blocks
        self._queue.append(item)
        return seq

    def _wait_durable(self, target: int) -> None:
        """Return once records below ``target`` are durable; called with the lock held.

        Leader/follower group commit: whoever finds no commit in flight takes the queue
        (up to one batch), writes it with the lock released so that others can keep
        queueing, and wakes everyone when it is durable.
        """
        while self._durable_seq < target:
            self._check_usable()
            if self._committing:
                self._cond.wait()
                continue
            self._commit_one_batch()

    def _commit_one_batch(self) -> None:
        taken_blocks = 0
        count = 0
        for item in self._queue:
            if count and taken_blocks + item.blocks > self._sb.batch_blocks:
                break
            taken_blocks += item.blocks
            count += 1
        if count == 0:
            raise LogError("internal: records are missing from the commit queue")
        batch = self._queue[:count]
        del self._queue[:count]
        first_seq = self._durable_seq
        first_block = self._offsets[first_seq - self._base_seq]
        sb = self._sb
        self._committing = True
        self._lock.release()
        try:
            buf = bytearray(taken_blocks * self._block_size)
            offset = 0
            for index, item in enumerate(batch):
                # durable_seq = first_seq: everything before this batch was flushed before
                # the batch is written (the previous leader finished its flush).
                self._encode_into(buf, offset, first_seq + index, first_seq, sb, item)
                offset += item.blocks * self._block_size
            block = self._half_base(sb.active_half) + first_block
            self._dev.write(block, memoryview(buf), fua=self._use_fua)
            if not self._use_fua:
                self._dev.flush()
        except BaseException as exc:
            self._lock.acquire()
            self._failed = exc
            self._committing = False
            self._cond.notify_all()
            raise
        self._lock.acquire()
        self._durable_seq = first_seq + count
        self._committing = False
        self._cond.notify_all()

    def _encode_into(self, buf: bytearray, offset: int, seq: int, durable_seq: int, sb: Superblock, item: _Queued) -> None:
        length = len(item.payload)
        _RECORD_FIELDS.pack_into(buf, offset, RECORD_MAGIC, length, seq, durable_seq, sb.epoch, sb.log_id, item.payload_crc)
        header_crc = crc32c(memoryview(buf)[offset : offset + _RECORD_FIELDS.size])
        _CRC.pack_into(buf, offset + _RECORD_FIELDS.size, header_crc)
        start = offset + RECORD_HEADER_SIZE
        buf[start : start + length] = item.payload

    def _check_usable(self) -> None:
        if self.read_only:
            raise LogError("the log was opened read-only")
        if self._closed:
            raise LogClosed("the log is closed")
        if self._failed is not None:
            raise LogFailed(f"an earlier device error stopped the log: {self._failed!r}") from self._failed

    def records(self, from_seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Durable records with ``seq >= from_seq`` (and past the trim point), in order.

        Records appended during the iteration are included; a compaction during it ends
        the iteration with :class:`LogError` because sequence numbers change.
        """
        seq = from_seq
        with self._lock:
            version = self._layout_version
        while True:
            with self._lock:
                if self._closed:
                    raise LogClosed("the log is closed")
                if version != self._layout_version:
                    raise LogError("the log was compacted during iteration")
                seq = max(seq, self._base_seq)
                if seq >= self._durable_seq:
                    return
                payload = self._read_record_locked(seq)
            yield seq, payload
            seq += 1

    def read(self, seq: int) -> bytes:
        """The durable record ``seq`` (checked again as it is read: LogCorruption if not)."""
        with self._lock:
            if self._closed:
                raise LogClosed("the log is closed")
            if not self._base_seq <= seq < self._durable_seq:
                raise LogError(f"no durable record {seq} (the log holds [{self._base_seq}, {self._durable_seq}))")
            return self._read_record_locked(seq)

    def _read_record_locked(self, seq: int) -> bytes:
        index = seq - self._base_seq
        position = self._offsets[index]
        blocks = (self._offsets[index + 1] if index + 1 < len(self._offsets) else self._end_block) - position
        data = self._read_half(self._sb.active_half, position, blocks)
        header = self._parse_header(data, position, self._sb)
        if isinstance(header, str) or header.seq != seq or header.blocks != blocks:
            reason = header if isinstance(header, str) else "record changed on the device"
            raise LogCorruption(self._byte_offset(self._sb.active_half, position), reason, seq=seq)
        payload = data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + header.length]
        if crc32c(payload) != header.payload_crc:
            raise LogCorruption(self._byte_offset(self._sb.active_half, position), "payload checksum mismatch", seq=seq)
        return payload

    def trim(self, upto_seq: int) -> None:
        """Drop the records before ``upto_seq``; durable when this returns.

        The space is reclaimed by the next :meth:`compact`.
        """
        with self._lock:
            self._check_usable()
            if upto_seq <= self._base_seq:
                return
            if upto_seq > self._durable_seq:
                raise ValueError(f"cannot trim to {upto_seq}: only records below {self._durable_seq} are durable")
            index = upto_seq - self._base_seq
            start_block = self._offsets[index] if index < len(self._offsets) else self._end_block
            sb = replace(
                self._sb,
                generation=self._sb.generation + 1,
                start_block=start_block,
                start_seq=upto_seq,
                min_end_seq=self._durable_seq,
            )
            self._write_superblock_guarded(sb)
            self._sb = sb
            del self._offsets[:index]
            self._base_seq = upto_seq

    def compact(self, keep: Callable[[int, bytes], bool] | Iterable[bytes | bytearray | memoryview]) -> range:
        """Rewrite the log into the other half; returns the new records' sequence numbers.

        ``keep`` is either a predicate on ``(seq, record)`` selecting the live records to
        copy, or an iterable of new records that replaces the log's contents (a snapshot).
        Either way the kept records get fresh sequence numbers from :attr:`next_seq` on, in
        order, so that a sequence number always names one record. Queued records are
        committed first. ``keep`` runs with the log locked and must not call the log.
        A crash at any point leaves either the old log or the new one.
        """
        with self._lock:
            self._check_usable()
            while self._committing or self._queue:
                self._wait_durable(self._next_seq)
            if callable(keep):
                predicate = keep
                payloads = [
                    payload
                    for seq in range(self._base_seq, self._durable_seq)
                    if predicate(seq, payload := self._read_record_locked(seq))
                ]
            else:
                payloads = [self._prepare(record).payload for record in keep]
            items = [self._prepare(payload) for payload in payloads]
            total_blocks = sum(item.blocks for item in items)
            if total_blocks > self._half_blocks:
                raise LogFull(f"kept records need {total_blocks} blocks, a half holds {self._half_blocks}")
            if self._sb.epoch >= MAX_EPOCH:
                raise LogError("the log's epoch counter is exhausted")
            first_seq = self._next_seq
            if first_seq + len(items) > MAX_SEQ:
                raise LogFull("sequence numbers exhausted")
            target = 1 - self._sb.active_half
            new_sb = replace(
                self._sb,
                epoch=self._sb.epoch + 1,
                generation=self._sb.generation + 1,
                active_half=target,
                half_epoch=self._sb.epoch + 1,
                start_block=0,
                start_seq=first_seq,
                open_end_seq=first_seq,
                min_end_seq=first_seq + len(items),
            )
            try:
                offsets = self._write_compacted(items, first_seq, new_sb)
                self._write_superblock(new_sb)
            except BaseException as exc:
                self._failed = exc
                raise
            self._sb = new_sb
            self._offsets = offsets
            self._base_seq = first_seq
            self._next_seq = self._durable_seq = first_seq + len(items)
            self._end_block = total_blocks
            self._layout_version += 1
            return range(first_seq, first_seq + len(items))

    def _write_compacted(self, items: list[_Queued], first_seq: int, sb: Superblock) -> list[int]:
        offsets: list[int] = []
        position = 0
        index = 0
        while index < len(items):
            chunk_start = position
            chunk: list[_Queued] = []
            chunk_blocks = 0
            while index < len(items) and (not chunk or chunk_blocks + items[index].blocks <= sb.batch_blocks):
                chunk.append(items[index])
                chunk_blocks += items[index].blocks
                index += 1
            buf = bytearray(chunk_blocks * self._block_size)
            offset = 0
            for item in chunk:
                seq = first_seq + len(offsets)
                offsets.append(position)
                # All compacted records are flushed before the superblock names them, so
                # their own commit mark is the new log's first record.
                self._encode_into(buf, offset, seq, first_seq, sb, item)
                offset += item.blocks * self._block_size
                position += item.blocks
            self._dev.write(self._half_base(sb.active_half) + chunk_start, memoryview(buf))
        # Stable before the superblock points at them: write new, flush, then switch.
        self._dev.flush()
        return offsets

    def close(self) -> None:
        """Commit what is queued and record the durable end in the superblock."""
        with self._lock:
            if self._closed:
                return
            if self.read_only:
                self._closed = True
                return
            try:
                if self._failed is None:
                    while self._committing or self._queue:
                        self._wait_durable(self._next_seq)
                    sb = replace(self._sb, generation=self._sb.generation + 1, min_end_seq=self._durable_seq)
                    self._write_superblock_guarded(sb)
                    self._sb = sb
            finally:
                self._closed = True

    def __enter__(self) -> PersistentLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load_superblock(self, create: bool, max_batch_bytes: int) -> tuple[Superblock, bool]:
        """The newest intact superblock, and whether it is surely the newest ever written.

        Generation g goes to slot g % 2, so two intact slots of consecutive generations show
        that nothing newer was written; any other state (one slot damaged, or both holding
        the same generation) may hide a newer superblock that did not survive.
        """
        slots = self._dev.read(self._area_start, SUPERBLOCK_SLOTS)
        size = self._block_size
        blocks = [slots[i * size : (i + 1) * size] for i in range(SUPERBLOCK_SLOTS)]
        found = [sb for sb in map(Superblock.unpack, blocks) if sb is not None]
        area_offset = self._area_start * size
        if not found:
            if create and not any(block.startswith(SUPERBLOCK_IDENT) for block in blocks):
                return self._format(max_batch_bytes), True
            raise LogCorruption(area_offset, "no intact superblock")
        sb = max(found, key=lambda candidate: candidate.generation)
        problem = self._superblock_problem(sb)
        if problem:
            raise LogCorruption(area_offset, f"superblock: {problem}")
        generations = sorted(candidate.generation for candidate in found)
        newest_known = len(generations) == SUPERBLOCK_SLOTS and generations[1] - generations[0] == 1
        return sb, newest_known

    def _superblock_problem(self, sb: Superblock) -> str:
        """Why an intact superblock still cannot describe this area ('' when it can)."""
        if sb.block_size != self._block_size:
            return f"block size {sb.block_size}, the device has {self._block_size}"
        if sb.area_blocks != self._area_blocks:
            return f"area of {sb.area_blocks} blocks, opened with {self._area_blocks}"
        if sb.active_half not in (0, 1):
            return f"active half {sb.active_half}"
        if sb.half_epoch > sb.epoch:
            return "half epoch ahead of the epoch"
        if not 1 <= sb.batch_blocks <= self._half_blocks:
            return f"batch of {sb.batch_blocks} blocks"
        if sb.start_block > self._half_blocks:
            return f"start block {sb.start_block} past the half ({self._half_blocks} blocks)"
        if not sb.open_end_seq <= sb.min_end_seq or sb.start_seq > sb.min_end_seq:
            return "sequence marks out of order"
        if sb.min_end_seq - sb.start_seq > self._half_blocks - sb.start_block:
            return "more records promised than the half can hold"
        return ""

    def _format(self, max_batch_bytes: int) -> Superblock:
        sb = Superblock(
            block_size=self._block_size,
            log_id=int.from_bytes(os.urandom(4), "little"),
            epoch=0,
            active_half=0,
            half_epoch=0,
            generation=0,
            area_blocks=self._area_blocks,
            batch_blocks=max(1, min(self._half_blocks, max_batch_bytes // self._block_size)),
            start_block=0,
            start_seq=0,
            open_end_seq=0,
            min_end_seq=0,
        )
        self._write_superblock(sb)
        return sb

    def _write_superblock(self, sb: Superblock) -> None:
        # The structure sits in the first sector, so a torn write cannot half-update it;
        # the alternate slot keeps the previous one in case this write is lost entirely.
        if SUPERBLOCK_SIZE > SECTOR_SIZE:
            raise LogError("superblock larger than a sector")
        block = bytearray(self._block_size)
        block[:SUPERBLOCK_SIZE] = sb.pack()
        self._dev.write(self._area_start + sb.generation % SUPERBLOCK_SLOTS, memoryview(block))
        self._dev.flush()

    def _write_superblock_guarded(self, sb: Superblock) -> None:
        try:
            self._write_superblock(sb)
        except BaseException as exc:
            self._failed = exc
            raise

    def _half_base(self, half: int) -> int:
        return self._area_start + SUPERBLOCK_SLOTS + half * self._half_blocks

    def _byte_offset(self, half: int, position: int) -> int:
        return (self._half_base(half) + position) * self._block_size

    def _read_half(self, half: int, position: int, count: int) -> bytes:
        return self._dev.read(self._half_base(half) + position, count)

    def _parse_header(self, data: bytes, position: int, sb: Superblock) -> _RecordHeader | str:
        """Structural checks of the record header at the start of ``data`` (an error string if bad)."""
        magic, length, seq, durable_seq, epoch, log_id, payload_crc = _RECORD_FIELDS.unpack_from(data)
        if magic != RECORD_MAGIC:
            return "no record here"
        (header_crc,) = _CRC.unpack_from(data, _RECORD_FIELDS.size)
        if crc32c(memoryview(data)[: _RECORD_FIELDS.size]) != header_crc:
            return "header checksum mismatch"
        if log_id != sb.log_id:
            return "record of another log"
        blocks = _blocks_for(length, self._block_size)
        if blocks > self._half_blocks - position:
            return f"length {length} runs past the end of the area"
        if durable_seq > seq:
            return "commit mark ahead of the record"
        if not sb.half_epoch <= epoch <= sb.epoch:
            return f"epoch {epoch} outside [{sb.half_epoch}, {sb.epoch}]"
        return _RecordHeader(length, seq, durable_seq, epoch, payload_crc, blocks)

    def _probe(self, position: int, sb: Superblock) -> tuple[_RecordHeader, bytes] | str:
        """Read and fully check the record at ``position`` of the active half."""
        head = self._read_half(sb.active_half, position, 1)
        header = self._parse_header(head, position, sb)
        if isinstance(header, str):
            return header
        if header.blocks > 1:
            head += self._read_half(sb.active_half, position + 1, header.blocks - 1)
        payload = head[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + header.length]
        if crc32c(payload) != header.payload_crc:
            return "payload checksum mismatch"
        return header, payload

    def _recover(self, sb: Superblock, repair: bool) -> tuple[RecoveryReport, list[int], int]:
        """Scan forward from the trim point and keep the valid prefix."""
        offsets: list[int] = []
        position = sb.start_block
        seq = sb.start_seq
        last_epoch = sb.half_epoch
        reason = "end of the log area"
        while position < self._half_blocks:
            probe = self._probe(position, sb)
            if isinstance(probe, str):
                reason = probe
                break
            header, _ = probe
            if header.seq != seq:
                reason = f"sequence number {header.seq}, expected {seq}"
                break
            if header.epoch < last_epoch or (seq >= sb.open_end_seq and header.epoch != sb.epoch):
                reason = f"stale record of epoch {header.epoch}"
                break
            offsets.append(position)
            position += header.blocks
            seq += 1
            last_epoch = header.epoch
        damage = ""
        lost_through: int | None = None
        if seq < sb.min_end_seq:
            damage = f"{reason}; the log reached seq {sb.min_end_seq} when its superblock was written"
            lost_through = sb.min_end_seq - 1
        else:
            witness = self._find_witness(position, seq, sb)
            if witness is not None:
                damage = f"{reason}; a later record (seq {witness}) proves this one was durable"
                lost_through = witness
        if not damage:
            return RecoveryReport(sb.start_seq, seq, reason), offsets, position
        offset = self._byte_offset(sb.active_half, position)
        if not repair:
            raise LogCorruption(offset, damage, seq=seq, lost_through_seq=lost_through)
        report = RecoveryReport(
            sb.start_seq,
            seq,
            damage,
            repaired=True,
            lost_from_seq=seq,
            lost_through_seq=lost_through,
            damage_offset=offset,
        )
        return report, offsets, position

    def _find_witness(self, position: int, bad_seq: int, sb: Superblock) -> int | None:
        """The seq of a record showing that record ``bad_seq`` (at ``position``) was durable.

        Only records of the current epoch count: ``bad_seq >= min_end_seq >= open_end_seq``,
        so older ones past it are debris. The first record flushed after ``bad_seq``'s batch
        starts within ``batch_blocks`` blocks of ``position``; valid records found on the way
        are stepped over whole and followed as long as they chain.
        """
        limit = min(self._half_blocks, position + sb.batch_blocks + 1)
        candidate = position + 1
        chained = False
        while candidate < self._half_blocks and (candidate < limit or chained):
            probe = self._probe(candidate, sb)
            if isinstance(probe, str):
                candidate += 1
                chained = False
                continue
            header, _ = probe
            if header.seq <= bad_seq or header.epoch != sb.epoch:
                candidate += 1
                chained = False
                continue
            if header.durable_seq > bad_seq:
                return header.seq
            candidate += header.blocks
            chained = True
        return None
