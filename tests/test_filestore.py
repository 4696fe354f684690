"""The file store on the persistent log (libos/storage/filestore.py): operations, cleaning,
hostile records, the shared (read-only) reader, and crash states enumerated as for the log:
a power failure at every device operation, every image it could leave; the store must
reopen to a state between its last fsync and the operation that was running, never with a
lost acknowledged write, never with garbage."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import pytest

from libos.storage.blockdev import MemoryBlockDevice, SimulatedCrash
from libos.storage.filestore import FileStore, FileStoreCorrupt, FileStoreError
from libos.storage.log import PersistentLog

BLOCK = 4096
SMALL = 2 + 2 * 24  # blocks: two superblocks, two halves of 24 blocks

State = dict[str, bytes]
Step = Callable[[FileStore], object]


def contents(store: FileStore) -> State:
    return {info.name: store.read(info.name) for info in store.list()}


def test_operations_and_reopen() -> None:
    dev = MemoryBlockDevice(SMALL * 4, BLOCK)
    store = FileStore(dev)
    store.create("a")
    store.write("a", 0, b"hello world")
    store.write("a", 6, b"WORLD!")
    assert store.append("a", b"?") == 12
    store.create("b", mode=0o600)
    store.write("b", 10, b"x")  # a hole reads as zeros
    store.truncate("a", 5)
    store.truncate("a", 7)
    store.create("c")
    store.rename("c", "b")  # replaces b
    store.create("d")
    store.write("d", 0, b"d" * 10_000)  # several pieces, several blocks
    store.unlink("d")
    assert contents(store) == {"a": b"hello\0\0", "b": b""}
    store.create("big")
    data = bytes(range(256)) * 100
    store.write("big", 0, data)
    store.write("big", 100, b"Z" * 50)
    expected = data[:100] + b"Z" * 50 + data[150:]
    assert store.read("big", 90, 70) == expected[90:160]
    store.fsync()
    again = FileStore(MemoryBlockDevice(SMALL * 4, BLOCK, image=dev.durable_image()))
    assert contents(again) == {"a": b"hello\0\0", "b": b"", "big": expected}
    assert again.stat("a").size == 7 and again.stat("big").mode == 0o644
    for call, code in ((lambda: again.create("a"), errno.EEXIST), (lambda: again.read("nope"), errno.ENOENT),
                       (lambda: again.create("../x"), errno.EINVAL), (lambda: again.write("a", 1 << 41, b"x"), errno.EFBIG)):
        with pytest.raises(FileStoreError) as refused:
            call()
        assert refused.value.errno == code


def test_cleaning_reclaims_space() -> None:
    store = FileStore(MemoryBlockDevice(SMALL, BLOCK))
    store.create("hot")
    for round_ in range(100):  # far more than a half holds: only cleaning makes room
        store.write("hot", 0, bytes([round_]) * 3000)
        store.fsync()
    assert store.compactions > 0 and store.read("hot") == bytes([99]) * 3000
    with pytest.raises(FileStoreError) as full:
        store.create("huge")
        store.write("huge", 0, b"x" * (SMALL * BLOCK))
    assert full.value.errno == errno.ENOSPC


@pytest.mark.parametrize("payload", [b"", b"\x09" + bytes(8), b"\x01" + bytes(8) + b"\0\0\x05\0ab", b"\x02" + (7).to_bytes(8, "little") + bytes(8),
                                     b"\x01" + (1).to_bytes(8, "little") + b"\0\0\x02\0.."])
def test_hostile_records_are_corruption_not_a_crash(payload: bytes) -> None:
    dev = MemoryBlockDevice(SMALL, BLOCK)
    log = PersistentLog(dev)
    log.append(payload)
    log.close()
    with pytest.raises(FileStoreCorrupt):
        FileStore(dev)


# ---- crash states ------------------------------------------------------------------------------


def formatted() -> bytes:
    dev = MemoryBlockDevice(SMALL, BLOCK)
    FileStore(dev).close()
    return dev.durable_image()


def reference_run(base: bytes, steps: list[Step]) -> tuple[list[State], list[int], list[int], int]:
    """States after each record; the state index each step ends at; the state index made
    durable by the last fsync before each step; and the device operations in all."""
    dev = MemoryBlockDevice(SMALL, BLOCK, image=base)
    store = FileStore(dev)
    states = [contents(store)]
    submit = store._submit

    def recording(payload: bytes) -> int:
        seq = submit(payload)
        states.append(contents(store))
        return seq

    store._submit = recording  # type: ignore[method-assign]
    ends, durable_before = [], []
    durable = 0
    for step in steps:
        durable_before.append(durable)
        step(store)
        ends.append(len(states) - 1)
        if step is fsync:
            durable = len(states) - 1
    return states, ends, durable_before, len(dev.ops)


def fsync(store: FileStore) -> None:
    store.fsync()


def check_every_crash(steps: list[Step]) -> int:
    base = formatted()
    states, ends, durable_before, total_ops = reference_run(base, steps)
    checked = 0
    for crash_at in range(total_ops):
        dev = MemoryBlockDevice(SMALL, BLOCK, image=base, crash_after=crash_at)
        done = 0
        try:
            store = FileStore(dev)
            for step in steps:
                step(store)
                done += 1
            continue  # the crash point lies past the steps (the open's own writes)
        except SimulatedCrash:
            pass
        low = durable_before[done] if done < len(steps) else ends[-1]
        high = ends[done] if done < len(steps) else ends[-1]
        for label, image in dev.crash_states():
            where = f"crash at op {crash_at} (step {done}), {label}"
            survivor = MemoryBlockDevice(SMALL, BLOCK, image=image)
            recovered = FileStore(survivor)
            state = contents(recovered)
            assert state in states[low : high + 1], where
            recovered.create("probe")
            recovered.write("probe", 0, b"after")
            recovered.fsync()
            assert contents(FileStore(survivor)) == {**state, "probe": b"after"}, where
            checked += 1
    return checked


def test_crash_at_every_operation_of_creates_writes_and_fsyncs() -> None:
    steps: list[Step] = [
        lambda s: s.create("a"), lambda s: s.write("a", 0, b"one " * 300), fsync,
        lambda s: s.append("a", b"two " * 1200), lambda s: s.create("b"), lambda s: s.write("b", 0, b"B" * 9000), fsync,
        lambda s: s.truncate("a", 100), lambda s: s.rename("b", "c"), fsync,
        lambda s: s.unlink("a"), lambda s: s.write("c", 5, b"overwrite"), fsync,
    ]
    assert check_every_crash(steps) > 50


def test_crash_at_every_operation_of_cleaning() -> None:
    steps: list[Step] = [lambda s: s.create("f"), fsync]
    for round_ in range(6):
        steps += [lambda s, r=round_: s.write("f", 0, bytes([r]) * 20_000), fsync]
    steps += [lambda s: s.compact(), lambda s: s.append("f", b"tail"), fsync]
    assert check_every_crash(steps) > 50


# ---- way 2: a reader of a store that another writes ----------------------------------------------


def test_a_read_only_reader_sees_committed_prefixes_never_torn_records() -> None:
    """A writer and a reader share one device (as two apps share a VSA). The owner appends
    numbered lines, fsyncing each batch; the reader refreshes as fast as it can. Every
    state it sees must be a prefix of the lines, at least as long as what was fsynced
    before the refresh began."""
    dev = MemoryBlockDevice(2 + 2 * 2048, BLOCK)
    owner = FileStore(dev)
    owner.create("log")
    owner.fsync()
    lines = [b"line %06d %s\n" % (n, b"x" * (n % 300)) for n in range(3000)]
    full = b"".join(lines)
    durable = [0]
    done = threading.Event()
    reading = threading.Event()

    def write() -> None:
        reading.wait(timeout=30)  # the reader has looked once: what follows overlaps it
        written = 0
        for at in range(0, len(lines), 37):
            batch = b"".join(lines[at : at + 37])
            owner.append("log", batch)
            owner.fsync()
            written += len(batch)
            durable[0] = written
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reader = FileStore(dev, read_only=True)
    seen = 0
    refreshes = 0
    while not done.is_set() or refreshes < 3:
        floor = durable[0]
        reader.refresh()
        refreshes += 1
        reading.set()
        data = reader.read("log") if reader.exists("log") else b""
        assert full.startswith(data), "the reader saw bytes the owner never wrote"
        assert len(data) >= floor, "the reader missed data fsynced before it looked"
        assert len(data) >= seen
        seen = len(data)
    writer.join()
    reader.refresh()  # the writer is done: everything it fsynced is there
    assert reader.read("log") == full
    with pytest.raises(FileStoreError) as refused:
        reader.write("log", 0, b"no")
    assert refused.value.errno == errno.EROFS


# ---- fuzzing the replay: a grantee reads records its owner wrote -------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_OPS = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda op, inode, rest: bytes([op]) + inode.to_bytes(8, "little") + rest,
              st.integers(0, 6), st.integers(0, 4), st.binary(max_size=30)),
    st.builds(lambda inode, mode, name: b"\x01" + inode.to_bytes(8, "little") + mode.to_bytes(2, "little")
              + len(name).to_bytes(2, "little") + name, st.integers(0, 3), st.integers(0, 0xFFFF),
              st.binary(min_size=0, max_size=6)),
    st.builds(lambda inode, offset: b"\x02" + inode.to_bytes(8, "little") + offset.to_bytes(8, "little") + b"data",
              st.integers(0, 3), st.sampled_from([0, 5, 1 << 40, (1 << 64) - 1])),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_OPS, max_size=8))
def test_fuzz_replay_of_hostile_records(payloads: list[bytes]) -> None:
    dev = MemoryBlockDevice(SMALL, BLOCK)
    log = PersistentLog(dev)
    for payload in payloads:
        log.append(payload)
    log.close()
    try:
        store = FileStore(dev, read_only=True)
    except FileStoreCorrupt:
        return
    for info in store.list():
        assert info.size <= 1 << 40
        assert len(store.read(info.name, max(0, info.size - 4096), 8192)) == min(info.size, 4096)
