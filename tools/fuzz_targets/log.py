"""Recovery of the Caladan persistent log (``libos.storage.log``) from damaged images.

The harness writes a real log on an in-memory disk (appends, trims, compactions, then a
clean close or not), damages the image as the input says (bit flips, zeroed or copied
blocks, random runs, a cut tail, either superblock) or replaces it with random bytes
behind an intact superblock, and reopens it.

Contract: opening raises nothing but ``LogCorruption`` (or ``LogError`` for an exhausted
epoch). A log that opens returns only records that were acknowledged, each byte for byte
under its own sequence number, as one unbroken run; after a clean close with intact
superblocks and ``repair=False``, nothing acknowledged may be missing without
``LogCorruption``. A reopened log accepts an append that survives the next reopen.
"""

from __future__ import annotations

from tools.fuzz_targets import ContractViolation
from tools.fuzz_targets._input import Input
from libos.storage.blockdev import MemoryBlockDevice
from libos.storage.log import LogCorruption, LogError, LogFull, PersistentLog, RecordTooLarge

BLOCK = 512
AREA = 2 + 2 * 16  # two superblock slots, two halves of 16 blocks


def _build(inp: Input) -> tuple[bytes, dict[int, bytes], dict[int, bytes], bool]:
    """A log image, the live records (seq -> payload), every record ever acknowledged
    (trimmed and compacted-away ones included: a sequence number names one record forever)
    and whether the log was closed."""
    dev = MemoryBlockDevice(AREA, BLOCK)
    log = PersistentLog(dev, max_batch_bytes=BLOCK * (1 + inp.below(4)))
    records: dict[int, bytes] = {}
    ever: dict[int, bytes] = {}
    for _ in range(inp.below(24)):
        action = inp.below(10)
        try:
            if action < 7:
                payload = inp.blob(700) if inp.below(4) else inp.blob(30)
                seq = log.append(payload)
                records[seq] = payload
                ever[seq] = payload
            elif action == 7:
                upto = log.start_seq + inp.below(4)
                if upto <= log.durable_seq:
                    log.trim(upto)
                    for seq in [s for s in records if s < upto]:
                        del records[seq]
            elif action == 8:
                live = sorted(records.items())
                kept = [payload for seq, payload in live if inp.below(4)]
                seqs = log.compact(kept)
                records = dict(zip(seqs, kept))
                ever.update(records)
            else:
                log.close()
                log = PersistentLog(dev)
                if log.recovery.end_seq != max(records, default=log.start_seq - 1) + 1 and records:
                    raise ContractViolation(f"a clean reopen recovered up to {log.recovery.end_seq}, wrote {max(records) + 1}")
        except (LogFull, RecordTooLarge):
            continue
    closed = inp.below(4) != 0
    if closed:
        log.close()
    return dev.image(), records, ever, closed


def _damage(inp: Input, image: bytearray) -> bool:
    """Damage ``image`` in place; True when a superblock slot may have been touched."""
    touched_superblock = False
    for _ in range(1 + inp.below(4)):
        kind = inp.below(7)
        if kind == 0:
            offset = inp.below(len(image))
            image[offset] ^= 1 << inp.below(8)
        elif kind == 1:
            block = inp.below(AREA)
            image[block * BLOCK : (block + 1) * BLOCK] = bytes(BLOCK)
        elif kind == 2:
            source, target = inp.below(AREA), inp.below(AREA)
            image[target * BLOCK : (target + 1) * BLOCK] = image[source * BLOCK : (source + 1) * BLOCK]
        elif kind == 3:
            offset = inp.below(len(image))
            run = inp.blob(64)
            image[offset : offset + len(run)] = run[: len(image) - offset]
        elif kind == 4:
            cut = inp.below(len(image))
            image[cut:] = bytes(len(image) - cut)
        elif kind == 5:
            # A torn sector: the first 512 bytes of a 512-byte block are the whole block, so
            # tear inside a record by zeroing its second half instead.
            block = inp.below(AREA)
            image[block * BLOCK + BLOCK // 2 : (block + 1) * BLOCK] = bytes(BLOCK // 2)
        else:
            continue
        touched_superblock = True if kind in (0, 3, 4) else touched_superblock
        if kind in (1, 2, 5) and (block if kind != 2 else target) < 2:
            touched_superblock = True
    return touched_superblock


def _open(image: bytes, repair: bool) -> PersistentLog | None:
    dev = MemoryBlockDevice(AREA, BLOCK, image=image)
    try:
        return PersistentLog(dev, repair=repair, create=False)
    except LogCorruption:
        return None
    except LogError as exc:
        if "epoch" in str(exc):
            return None
        raise


def _check_records(log: PersistentLog, written: dict[int, bytes]) -> list[tuple[int, bytes]]:
    got = list(log.records())
    expected_seq = log.start_seq
    for seq, payload in got:
        if seq != expected_seq:
            raise ContractViolation(f"recovered seq {seq} where {expected_seq} was due")
        expected_seq += 1
        if seq not in written:
            raise ContractViolation(f"recovered a record (seq {seq}) that was never acknowledged")
        if written[seq] != payload:
            raise ContractViolation(f"record {seq} came back with other bytes")
    return got


def one_input_log_recovery(data: bytes) -> None:
    inp = Input(data)
    mode = inp.below(4)
    if mode == 0:
        # Random bytes behind a freshly formatted, intact superblock.
        dev = MemoryBlockDevice(AREA, BLOCK)
        PersistentLog(dev).close()
        image = bytearray(dev.image())
        noise = inp.take(len(image) - 2 * BLOCK)
        image[2 * BLOCK : 2 * BLOCK + len(noise)] = noise
        written: dict[int, bytes] = {}
        ever: dict[int, bytes] = {}
        closed, superblock_touched = False, False
    elif mode == 1:
        image = bytearray(inp.take(AREA * BLOCK).ljust(AREA * BLOCK, b"\0"))
        written, ever, closed, superblock_touched = {}, {}, False, True
    else:
        built, written, ever, closed = _build(inp)
        image = bytearray(built)
        superblock_touched = _damage(inp, image)
    repair = inp.flag()
    log = _open(bytes(image), repair)
    if log is None:
        return
    # With a superblock damaged, recovery may fall back to the previous one, from before a
    # trim or a compaction: records the log had let go of may come back, but only as
    # themselves, under their own sequence numbers.
    got = _check_records(log, ever if superblock_touched else written)
    if closed and not repair and not superblock_touched and written:
        end = max(written) + 1
        if log.recovery.end_seq < end:
            raise ContractViolation(f"acknowledged records {log.recovery.end_seq}..{end - 1} lost without LogCorruption")
    # The reopened log must go on working, and what it now holds must survive a reopen.
    try:
        new_seq = log.append(b"after recovery")
    except LogFull:
        new_seq = None
    log.close()
    again = _open(log._dev.image(), False)  # type: ignore[attr-defined]
    if again is None:
        raise ContractViolation("a log refused to reopen right after it recovered and closed")
    expected = dict(got)
    if new_seq is not None:
        expected[new_seq] = b"after recovery"
    final = dict(_check_records(again, {**ever, **expected}))
    if final != expected:
        raise ContractViolation(f"reopen after recovery holds seqs {sorted(final)}, expected {sorted(expected)}")
    again.close()


def seeds_log_recovery() -> list[bytes]:
    return [
        b"\x02\x00\x08" + b"\x00\x05hello\x00\x05world\x00\x03abc" + b"\x01\x00\x01\x10\x00",
        b"\x03\x01\x06" + b"\x01\x10" + bytes(range(16)) + b"\x07\x00\x08\x02\x00\x05abcde" + b"\x02\x01\x01\x05\x00\x01",
        b"\x00" + bytes(range(256)) * 4,
        b"\x02\x02\x10" + b"\x00\x08recordAA" * 8 + b"\x01\x03\x04\x03\x01",
    ]
