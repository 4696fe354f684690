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
written as a snapshot of SET commands into the log's other half (AOF rewrite, in Redis's
words); the log switches to it atomically. At start the records are replayed in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kernelctl.client import ControlClient, ControlError
from kernelctl.names import topology
from libos.apps.kv import resp
from libos.apps.kv.commands import KvEngine
from libos.storage.blockdev import BlockDevice, FileBlockDevice
from libos.storage.log import LogFull, PersistentLog
from libos.storage.vsa import VsaHandle, open_vsa

DEFAULT_LOG_BYTES = 256 << 20
SNAPSHOT_RECORD_BYTES = 512 << 10  # a snapshot is cut into records of about this size


class CommandLogError(Exception):
    """The command log could not be opened or replayed."""


class CommandLog:
    def __init__(self, log: PersistentLog, close: Callable[[], None] = lambda: None) -> None:
        self.log = log
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
            # The batch's effects are already in the keyspace: a snapshot covers them.
            self._snapshot()
        else:
            self.log.commit()
            self.records_written += 1
        return self.log.durable_seq - 1

    def _snapshot(self) -> None:
        if self.engine is None:
            raise CommandLogError("the log is full and no engine to snapshot")
        self.log.compact(list(snapshot_records(self.engine, time.time())))
        self.snapshots += 1

    # ---- start-up ----------------------------------------------------------------------

    def replay(self, engine: KvEngine) -> int:
        """Apply every logged command to ``engine``; how many were applied."""
        self.engine = engine
        applied = 0
        for _seq, record in self.log.records():
            parser = resp.RequestParser()
            parser.feed(record)
            while True:
                try:
                    argv = parser.next_request()
                except resp.ProtocolError as exc:
                    raise CommandLogError(f"a log record does not parse: {exc}") from None
                if argv is None:
                    break
                engine.replay(argv)
                applied += 1
            if parser.buffered_bytes:
                raise CommandLogError("a log record ends inside a command")
        return applied

    def close(self) -> None:
        self.log.close()
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
    return _open_log(handle.device, handle.close)


def baseline_log_path(instance: str, port: int) -> Path:
    return topology(instance).baseline_mount / f"kv-{port}.log"
