"""Crash injection for the persistent log: a power failure at every device operation.

Each workload runs once without failure to record the durable contents after every step,
then once per device operation with the power failing at that operation; every image the
failure could leave (pending writes lost, reordered, the last one torn at each sector
boundary keeping either side, junk after it) must reopen without error to contents allowed
for the step that was running: every acknowledged record present, no unacknowledged record
out of order, no damaged record returned. Each recovered log then takes one more append
and is reopened again, so that debris of the crashed session never comes back to life.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from libos.storage.blockdev import MemoryBlockDevice, SimulatedCrash, garbage_bytes
from libos.storage.log import RECORD_HEADER_SIZE, PersistentLog

BLOCK_SIZE = 4096
NUM_BLOCKS = 2 + 2 * 12

Records = list[tuple[int, bytes]]
Step = Callable[[PersistentLog], object]


def payload(tag: int, size: int) -> bytes:
    return bytes((tag * 13 + i) % 253 for i in range(size))


def allowed(recovered: Records, before: Records, after: Records) -> bool:
    """A crash during a step leaves its start, its end, or (appending) something between."""
    if recovered in (before, after):
        return True
    grows = after[: len(before)] == before
    return grows and recovered[: len(before)] == before and after[: len(recovered)] == recovered


def run_steps(dev: MemoryBlockDevice, steps: list[Step], options: dict[str, int]) -> list[Records]:
    """Open a log and run ``steps``; the durable contents before the first step and after each."""

    def durable_contents() -> Records:
        # Read through a second log on a copy of the durable image: what a crash now keeps.
        copy = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE, image=dev.durable_image())
        return list(PersistentLog(copy, **options).records())  # type: ignore[arg-type]

    log = PersistentLog(dev, **options)  # type: ignore[arg-type]
    snapshots = [durable_contents()]
    for step in steps:
        step(log)
        snapshots.append(durable_contents())
    return snapshots


def check_every_crash(base: bytes, steps: list[Step], options: dict[str, int] | None = None) -> int:
    """Crash at every operation of ``steps`` on a log opened from ``base``; states checked."""
    options = options or {}
    reference = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE, image=base)
    snapshots = run_steps(reference, steps, options)
    total_ops = len(reference.ops)
    checked = 0
    for crash_at in range(total_ops):
        dev = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE, image=base, crash_after=crash_at)
        opened = False
        done = 0
        try:
            log = PersistentLog(dev, **options)  # type: ignore[arg-type]
            opened = True
            for step in steps:
                step(log)
                done += 1
            pytest.fail(f"no crash at operation {crash_at} of {total_ops}")
        except SimulatedCrash:
            pass
        before = snapshots[done]
        after = snapshots[done + 1] if opened else before
        for label, image in dev.crash_states():
            where = f"crash at op {crash_at} (step {done}, opened {opened}), {label}"
            survivor = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE, image=image)
            recovered_log = PersistentLog(survivor, **options)  # type: ignore[arg-type]
            recovered = list(recovered_log.records())
            assert allowed(recovered, before, after), where
            probe_seq = recovered_log.append(b"probe after recovery")
            again = list(PersistentLog(survivor, **options).records())  # type: ignore[arg-type]
            assert again == [*recovered, (probe_seq, b"probe after recovery")], where
            checked += 1
    return checked


def append(tag: int, size: int) -> Step:
    return lambda log: log.append(payload(tag, size))


def group(*sizes: int) -> Step:
    def step(log: PersistentLog) -> None:
        for index, size in enumerate(sizes):
            log.submit(payload(100 + index, size))
        log.commit()

    return step


def formatted() -> bytes:
    dev = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE)
    PersistentLog(dev).close()
    return dev.durable_image()


def with_debris() -> bytes:
    """Three durable records, then a batch torn so that its *later* records landed."""
    dev = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE)
    log = PersistentLog(dev)
    for tag in range(3):
        log.append(payload(tag, 700))
    dev.crash_after = len(dev.ops) + 1  # the batch write completes, its flush fails
    for tag in range(3, 6):
        log.submit(payload(tag, 2000))
    with pytest.raises(SimulatedCrash):
        log.commit()
    # The first sector of the batch (record 3's header) never landed; records 4 and 5 did.
    return dev.crash(tear_at=512, tear_keeps_end=True)


def with_junk_tail() -> bytes:
    """Two durable records, then junk to the end of the area, some of it record-shaped."""
    dev = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE)
    log = PersistentLog(dev)
    log.append(payload(0, 100))
    log.append(payload(1, 5000))
    end = 2 + 3  # superblocks, then a 1-block and a 2-block record
    image = bytearray(dev.durable_image())
    junk = garbage_bytes((NUM_BLOCKS - end) * BLOCK_SIZE, seed=5)
    image[end * BLOCK_SIZE :] = junk
    # A copy of record 1's header with its seq bumped: a valid-looking but wrong record.
    header = bytearray(image[3 * BLOCK_SIZE : 3 * BLOCK_SIZE + RECORD_HEADER_SIZE])
    header[8] = 2
    image[(end + 1) * BLOCK_SIZE : (end + 1) * BLOCK_SIZE + RECORD_HEADER_SIZE] = header
    return bytes(image)


APPEND_STEPS = [append(0, 100), append(1, 5000), group(0, 9000, 200), append(2, 300), lambda log: log.close()]


@pytest.mark.parametrize("fua", [False, True], ids=["flush", "fua"])
def test_crash_at_every_operation_of_appends(fua: bool) -> None:
    checked = check_every_crash(formatted(), APPEND_STEPS, {"use_fua": int(fua)})
    assert checked > 50


def test_crash_at_every_operation_over_a_junk_tail() -> None:
    base = with_junk_tail()
    assert [seq for seq, _ in PersistentLog(MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE, image=base)).records()] == [0, 1]
    assert check_every_crash(base, [append(3, 300), group(2000, 10), lambda log: log.close()]) > 30


def test_debris_is_cut_not_reported_as_corruption() -> None:
    base = with_debris()
    log = PersistentLog(MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE, image=base))
    assert [seq for seq, _ in log.records()] == [0, 1, 2]
    assert not log.recovery.repaired


def test_crash_at_every_operation_over_debris() -> None:
    # New records of sizes unlike the debris, so that some land right before stale ones.
    steps = [append(7, 100), group(10, 6000), append(8, 2000), lambda log: log.close()]
    assert check_every_crash(with_debris(), steps) > 50


def durable_records(count: int) -> bytes:
    dev = MemoryBlockDevice(NUM_BLOCKS, BLOCK_SIZE)
    log = PersistentLog(dev, max_batch_bytes=2 * BLOCK_SIZE)
    for tag in range(count):
        log.append(payload(tag, 1500 * (tag % 3)))
    log.close()
    return dev.durable_image()


def test_crash_at_every_operation_of_trim_and_compaction() -> None:
    steps: list[Step] = [
        lambda log: log.trim(2),
        append(20, 5000),
        lambda log: log.compact(lambda seq, data: seq % 2 == 1),
        append(21, 100),
        lambda log: log.compact([payload(30, 4000), payload(31, 0), payload(32, 7000)]),
        append(22, 300),
        lambda log: log.trim(log.durable_seq),
        lambda log: log.compact(lambda seq, data: True),
        append(23, 10),
    ]
    assert check_every_crash(durable_records(6), steps, {"max_batch_bytes": 2 * BLOCK_SIZE}) > 100
