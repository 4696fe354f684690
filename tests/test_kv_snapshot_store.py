"""The durable kv server's snapshot as a file in a file store (libos/apps/kv/durable.py):
the log fills, the keyspace goes to ``snapshot`` in the store, the log is emptied, and a
restart (or a read-only reader) finds every key; a crash at every device operation of the
snapshot leaves a state that replays to the same keyspace."""

from __future__ import annotations

import pytest

from libos.apps.kv.commands import ClientState, KvEngine
from libos.apps.kv.durable import SNAPSHOT_FILE, CommandLog
from libos.storage.blockdev import MemoryBlockDevice, SimulatedCrash
from libos.storage.filestore import FileStore
from libos.storage.log import PersistentLog

BLOCK = 4096
BLOCKS = 2 * (2 + 2 * 40)  # store and log, each two superblocks and two halves of 40 blocks


def open_log(dev: MemoryBlockDevice) -> CommandLog:
    split = BLOCKS // 2
    return CommandLog(PersistentLog(dev, split, BLOCKS - split), store=FileStore(dev, 0, split))


def keyspace(engine: KvEngine) -> dict[bytes, bytes | None]:
    return {key: engine.keyspace.get(key, 0.0) for key in list(engine.keyspace.keys())}


def fill(log: CommandLog, rounds: int) -> KvEngine:
    engine = KvEngine(on_write=log.record)
    log.replay(engine)
    for n in range(rounds):
        for k in range(8):
            engine.execute([b"SET", b"key%d" % k, b"v%d-" % n + b"x" * 2000], 0.0, ClientState())
        engine.execute([b"INCR", b"counter"], 0.0, ClientState())
        log.commit()
    return engine


def test_the_snapshot_is_a_file_and_a_restart_finds_every_key() -> None:
    dev = MemoryBlockDevice(BLOCKS, BLOCK)
    log = open_log(dev)
    engine = fill(log, 40)
    assert log.snapshots > 0 and log.store is not None and log.store.exists(SNAPSHOT_FILE)
    expected = keyspace(engine)
    assert expected[b"counter"] == b"40"  # INCR is not idempotent: no command replayed twice
    again = open_log(MemoryBlockDevice(BLOCKS, BLOCK, image=dev.durable_image()))
    restarted = KvEngine()
    again.replay(restarted)
    assert keyspace(restarted) == expected
    reader = FileStore(MemoryBlockDevice(BLOCKS, BLOCK, image=dev.durable_image()), read_only=True)
    assert b"counter" in reader.read(SNAPSHOT_FILE)


def test_a_crash_at_every_operation_of_a_snapshot_loses_nothing() -> None:
    dev = MemoryBlockDevice(BLOCKS, BLOCK)
    log = open_log(dev)
    fill(log, 9)
    base = dev.durable_image()
    reference = MemoryBlockDevice(BLOCKS, BLOCK, image=base)
    ref_log = open_log(reference)
    ref_engine = fill(ref_log, 3)
    assert ref_log.snapshots == 1, "the workload must cross one snapshot"
    ops = len(reference.ops)
    acked_states = []
    checked = 0
    for crash_at in range(ops):
        crashing = MemoryBlockDevice(BLOCKS, BLOCK, image=base, crash_after=crash_at)
        acked = -1
        try:
            crash_log = open_log(crashing)
            engine = KvEngine(on_write=crash_log.record)
            crash_log.replay(engine)
            start = int(engine.keyspace.get(b"counter", 0.0) or b"0")
            for n in range(3):
                for k in range(8):
                    engine.execute([b"SET", b"key%d" % k, b"v%d-" % n + b"x" * 2000], 0.0, ClientState())
                engine.execute([b"INCR", b"counter"], 0.0, ClientState())
                crash_log.commit()
                acked = start + n + 1
        except SimulatedCrash:
            pass
        for label, image in crashing.crash_states():
            recovered = KvEngine()
            open_log(MemoryBlockDevice(BLOCKS, BLOCK, image=image)).replay(recovered)
            counter = int(recovered.keyspace.get(b"counter", 0.0) or b"0")
            assert counter >= acked, f"crash at op {crash_at}, {label}: counter {counter}, {acked} acknowledged"
            assert counter <= 12, f"crash at op {crash_at}, {label}: a command replayed twice ({counter})"
            checked += 1
        acked_states.append(acked)
    assert checked > 20 and keyspace(ref_engine)[b"counter"] == b"12"


def test_replies_waiting_on_the_batch_that_filled_the_log_are_released() -> None:
    dev = MemoryBlockDevice(BLOCKS, BLOCK)
    log = open_log(dev)
    engine = KvEngine(on_write=log.record)
    log.replay(engine)
    for n in range(200):
        engine.execute([b"SET", b"k", b"x" * 3000], 0.0, ClientState())
        position = log.record([b"PING"])  # what a reply of this turn waits for
        durable = log.commit()
        assert durable is not None and durable >= position, f"turn {n}: reply at {position} never released ({durable})"
    assert log.snapshots > 0
