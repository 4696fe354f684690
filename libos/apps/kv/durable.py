"""Durable writes for the key-value server: a command log with group commit.

Every write command is logged before its reply is released (the engine's ``on_write``
hook; the session holds replies until ``release_durable``). The write commands of one
event-loop turn go into ONE log record, committed with one write that reaches stable
storage before the next turn waits for input: Redis's ``appendfsync always``, with its
group commit. Both backends use the same Caladan log (``libos.storage.log``):

* ``vnic``: on a virtual storage area, through the application's own VSIC function: the
  write and its flush are one descriptor on a ring, no file system, no system call per
  request in the application;
* ``linux``: on a file of the ext4 image mounted for the baseline, with pwrite + fdatasync.

A record is a sequence of RESP-encoded commands. When the log is full, the keyspace is
written as a snapshot of SET commands (AOF rewrite, in Redis's words):

* on a VSA, into the file ``snapshot`` of a file store (``libos.storage.filestore``) in the
  first half of the VSA, the command log taking the second half. The file is written as
  ``snapshot.new``, fsynced and renamed over ``snapshot`` (fsynced again), and only then is
  the command log emptied; the file starts with the sequence number it covers, so a crash
  between the two steps replays no command twice. A granted uid reads the snapshot through
  the shared VSA (way 2: ``kernelctl cat /apps/kv-PORT/snapshot``);
* without a store (the baseline's file), into the log's other half, which the log switches
  to atomically.

At start the snapshot (if any) is loaded, then the records it does not cover are replayed.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kernelctl.client import ControlClient, ControlError
from kernelctl.names import topology
from libos.apps.kv import resp
from libos.apps.kv.commands import KvEngine
from libos.storage.blockdev import BlockDevice, FileBlockDevice
from libos.storage.filestore import FileStore, FileStoreError
from libos.storage.log import LogError, LogFull, PersistentLog
from libos.storage.vsa import VsaHandle, open_vsa

DEFAULT_LOG_BYTES = 256 << 20
SNAPSHOT_RECORD_BYTES = 512 << 10  # a snapshot is cut into records of about this size
SNAPSHOT_FILE = "snapshot"
_SNAPSHOT_HEAD = struct.Struct("<8sQ")  # magic, the first log seq the snapshot does not cover
_SNAPSHOT_MAGIC = b"ARXKVSN1"


class CommandLogError(Exception):
    """The command log could not be opened or replayed."""


class CommandLog:
    def __init__(self, log: PersistentLog, close: Callable[[], None] = lambda: None,
                 store: FileStore | None = None) -> None:
        self.log = log
        self.store = store
        self._close = close
        self._batch = bytearray()
        self.engine: KvEngine | None = None
        self.records_written = 0
        self.commands_logged = 0
        self.snapshots = 0

    # ---- the engine's hook and the loop's commit ----------------------------------------

    def record(self, argv: list[bytes]) -> int:
        """Log one write command (not yet durable); the position its reply waits for."""
        self._batch += resp.encode_request(argv)
        self.commands_logged += 1
        return self.log.next_seq

    def commit(self) -> int | None:
        """Make every command recorded so far durable; the position now durable, if any."""
        if not self._batch:
            return None
        batch = bytes(self._batch)
        self._batch.clear()
        try:
            self.log.submit(batch)
        except LogFull:
            # The batch's effects are already in the keyspace: a snapshot covers them. Its
            # replies wait for position next_seq (what record() gave them), which the
            # snapshot covers even when it adds no record to the log (the store's way).
            position = self.log.next_seq
            self._snapshot()
            return max(position, self.log.durable_seq - 1)
        else:
            self.log.commit()
            self.records_written += 1
        return self.log.durable_seq - 1

    def _snapshot(self) -> None:
        if self.engine is None:
            raise CommandLogError("the log is full and no engine to snapshot")
        if self.store is None:
            self.log.compact(list(snapshot_records(self.engine, time.time())))
        else:
            self._snapshot_to_store(self.store, self.engine)
        self.snapshots += 1

    def _snapshot_to_store(self, store: FileStore, engine: KvEngine) -> None:
        # Every record below next_seq is in the keyspace (the one that did not fit too).
        covers = self.log.next_seq
        try:
            if store.exists("snapshot.new"):
                store.unlink("snapshot.new")
            store.create("snapshot.new", mode=0o644)
            store.write("snapshot.new", 0, _SNAPSHOT_HEAD.pack(_SNAPSHOT_MAGIC, covers))
            for record in snapshot_records(engine, time.time()):
                store.append("snapshot.new", record)
            store.fsync()
            store.rename("snapshot.new", SNAPSHOT_FILE)
            store.fsync()
        except FileStoreError as exc:
            raise CommandLogError(f"writing the snapshot: {exc}") from None
        # The snapshot is durable: the commands it covers may go.
        self.log.compact([])

    # ---- start-up ----------------------------------------------------------------------

    def replay(self, engine: KvEngine) -> int:
        """Apply every logged command to ``engine``; how many were applied."""
        self.engine = engine
        applied, covers = self._load_snapshot(engine)
        for _seq, record in self.log.records(covers):
            applied += self._apply(engine, record, "a log record")
        return applied

    def _load_snapshot(self, engine: KvEngine) -> tuple[int, int]:
        """Apply the store's snapshot, if any: (commands applied, first seq it does not cover)."""
        if self.store is None or not self.store.exists(SNAPSHOT_FILE):
            return 0, 0
        try:
            data = self.store.read(SNAPSHOT_FILE)
        except FileStoreError as exc:
            raise CommandLogError(f"reading the snapshot: {exc}") from None
        if len(data) < _SNAPSHOT_HEAD.size or data[:8] != _SNAPSHOT_MAGIC:
            raise CommandLogError("the snapshot file has no header")
        covers = _SNAPSHOT_HEAD.unpack_from(data)[1]
        return self._apply(engine, data[_SNAPSHOT_HEAD.size :], "the snapshot"), covers

    @staticmethod
    def _apply(engine: KvEngine, record: bytes, what: str) -> int:
        """Replay every command in ``record`` (``what`` names it in errors); how many."""
        parser = resp.RequestParser()
        parser.feed(record)
        applied = 0
        while True:
            try:
                argv = parser.next_request()
            except resp.ProtocolError as exc:
                raise CommandLogError(f"{what} does not parse: {exc}") from None
            if argv is None:
                break
            engine.replay(argv)
            applied += 1
        if parser.buffered_bytes:
            raise CommandLogError(f"{what} ends inside a command")
        return applied

    def close(self) -> None:
        self.log.close()
        if self.store is not None:
            self.store.close()
        self._close()

    def stats(self) -> dict[str, int]:
        return {
            "commands_logged": self.commands_logged,
            "records_written": self.records_written,
            "snapshots": self.snapshots,
        }


def snapshot_records(engine: KvEngine, now: float) -> Iterator[bytes]:
    """The keyspace as SET commands, cut into records of about SNAPSHOT_RECORD_BYTES."""
    keyspace = engine.keyspace
    record = bytearray()
    for key in list(keyspace.keys()):
        value = keyspace.get(key, now)
        if value is None:
            continue
        deadline = keyspace.deadline(key, now)
        argv = [b"SET", key, value]
        if deadline is not None:
            argv += [b"PXAT", str(deadline).encode()]
        record += resp.encode_request(argv)
        if len(record) >= SNAPSHOT_RECORD_BYTES:
            yield bytes(record)
            record.clear()
    if record:
        yield bytes(record)


def _open_log(device: BlockDevice, close: Callable[[], None]) -> CommandLog:
    try:
        log = PersistentLog(device, use_fua=True)
    except Exception:
        close()
        raise
    return CommandLog(log, close)


def open_linux_log(path: Path, size_bytes: int = DEFAULT_LOG_BYTES) -> CommandLog:
    """The baseline's log: a file on the ext4 image, pwrite + fdatasync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    device = FileBlockDevice(path, block_size=4096, num_blocks=size_bytes // 4096, create=True)
    return _open_log(device, device.close)


def open_vsa_log(instance: str, name: str, size_bytes: int = DEFAULT_LOG_BYTES) -> CommandLog:
    """The bypass path's log: a VSA of our own (created on first use), through our VSIC function."""
    with ControlClient(topology(instance).control_socket) as control:
        try:
            control.request("vsa_create", name=name, size_bytes=size_bytes)
        except ControlError as exc:
            if "exists" not in str(exc):
                raise
    handle: VsaHandle = open_vsa(name, instance=instance)
    device = handle.device
    # The snapshot's file store in the first half (where a reader finds its superblock),
    # the command log in the second.
    split = device.num_blocks // 2
    try:
        store = FileStore(device, 0, split, use_fua=True)
        log = PersistentLog(device, split, device.num_blocks - split, use_fua=True)
    except (FileStoreError, LogError) as exc:
        handle.close()
        raise CommandLogError(
            f"VSA {name}: {exc} (a VSA of an older kv layout: delete it, or use --vsa with a new name)"
        ) from None
    except Exception:
        handle.close()
        raise
    return CommandLog(log, handle.close, store=store)


def baseline_log_path(instance: str, port: int) -> Path:
    return topology(instance).baseline_mount / f"kv-{port}.log"
