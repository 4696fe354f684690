"""The registry of virtual storage areas (VSAs), persisted in SQLite.

A VSA is a list of extents on the physical raw image: ``(physical_block, block_count)``
pairs in VSA order. The registry hands out space first-fit (largest gaps first where first
fit would split a VSA past its extent bound), in whole extent units, and guarantees that no two VSAs ever share a block and none reaches past the device. Every
change (create, resize, delete, grant, revoke) is one SQLite transaction, so a crash in the
middle leaves the registry as it was before the change: no overlap, no leaked extent.

Units: a block is 4096 bytes (the page size, so a direct-I/O buffer of whole blocks is
always aligned, and a block of every sector size a loop device uses, 512..4096). Space is
allocated in extent units of 1 MiB (256 blocks); VSA sizes are rounded up to that unit, which
keeps the free list coarse and the extent lists short.

Access is decided by uid: root may do anything; the owner reads, writes, resizes, deletes
and grants; other uids read ("ro") or read and write ("rw") only what they were granted.

Three promises keep one uid from reaching another's data or starving it (issue 7):

* **Blocks are zeroed before they are handed out.** ``create_vsa`` and a growing
  ``resize_vsa`` call ``zero`` on exactly the new extents *inside* the transaction that
  hands them out, before it commits: a crash before the commit hands out nothing, and the
  blocks a VSA gets never hold what an earlier VSA (deleted, shrunk, or from an image older
  than this registry) left there. Zeroing on allocation, not on free, needs no extra state
  in the database to be crash-safe and covers data from any history of the image.
* **Per-uid bounds** (:class:`Limits`): VSAs and bytes per owner, grants and extents per
  VSA, checked in the same transaction as the change they limit; uids in
  ``Limits.exempt_uids`` (root by default) skip them. ``HARD_MAX_EXTENTS`` binds everyone:
  a VSA with more extents could not be opened on the VSIC.
* **No shrink or delete of an open VSA**: the caller passes the names of the VSAs that
  functions have open (``busy``), and the change is refused with :class:`Busy`, as a block
  device refuses to go away while it is mounted. A function keeps the extents it was
  opened with, so releasing them under it would let it write into the next owner's VSA.
  Growing is safe: the open function's extents stay a prefix of the VSA's.

The database file is input like any other: everything read back is checked (types, ranges,
names, no overlap, sizes that add up) and anything wrong is a :class:`RegistryError`, never
a crash of the daemon.
"""

from __future__ import annotations

import builtins
import re
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, NamedTuple, TypeGuard

from kernelctl.sqlite_tx import immediate

BLOCK_SIZE = 4096
EXTENT_UNIT_BLOCKS = 256  # 1 MiB
SCHEMA_VERSION = 1
ROOT_UID = 0
# uid_t is 32 bits and (uid_t)-1 means "no uid" to setreuid(2) and chown(2).
MAX_UID = 2**32 - 2
# Keep every block number inside a signed 64-bit SQLite INTEGER and a u64 descriptor field.
MAX_CAPACITY_BLOCKS = 2**62 // BLOCK_SIZE

# A VSA's extent list is sent whole to the VSIC device host, which accepts at most this many
# (vdev.vsic.function.MAX_EXTENTS; kept equal by a test): no uid, root included, gets more.
HARD_MAX_EXTENTS = 4096

# Per-uid bounds (issue 7, defect 12), the defaults of Limits; a policy may change them.
DEFAULT_MAX_VSAS_PER_UID = 16
DEFAULT_MAX_BYTES_PER_UID = 512 << 20  # half of the default 1 GiB image
DEFAULT_MAX_GRANTS_PER_VSA = 16
DEFAULT_MAX_EXTENTS_PER_VSA = 64

Mode = Literal["ro", "rw"]
# Zeroes the given physical extents on the device before they are handed out; OSError on
# failure. None where no device is behind the registry (unit tests, offline tools).
Zeroer = Callable[[Sequence["Extent"]], None]
_MODES: frozenset[str] = frozenset({"ro", "rw"})
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")

_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "CREATE TABLE vsa (name TEXT PRIMARY KEY, owner_uid INTEGER NOT NULL, size_blocks INTEGER NOT NULL)",
    "CREATE TABLE extent (vsa TEXT NOT NULL REFERENCES vsa(name), seq INTEGER NOT NULL,"
    " physical_block INTEGER NOT NULL, block_count INTEGER NOT NULL, PRIMARY KEY (vsa, seq))",
    "CREATE TABLE vsa_grant (vsa TEXT NOT NULL REFERENCES vsa(name), uid INTEGER NOT NULL,"
    " mode TEXT NOT NULL, PRIMARY KEY (vsa, uid))",
)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


class RegistryError(Exception):
    """A registry operation failed, or the database does not hold what it must."""


class NotFound(RegistryError, KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class AccessDenied(RegistryError, PermissionError):
    pass


class OutOfRange(RegistryError, ValueError):
    """A block range that is not inside the VSA."""


class QuotaExceeded(RegistryError):
    """The change would take a uid past one of its bounds (:class:`Limits`)."""


class Busy(RegistryError):
    """The VSA is open: it may not be deleted or shrunk now (EBUSY)."""


@dataclass(frozen=True)
class Limits:
    """Per-uid bounds. The VSA counts and bytes are the owner's; grants and extents are per
    VSA. A uid in ``exempt_uids`` acting on any VSA is not bound by them."""

    max_vsas_per_uid: int = DEFAULT_MAX_VSAS_PER_UID
    max_bytes_per_uid: int = DEFAULT_MAX_BYTES_PER_UID
    max_grants_per_vsa: int = DEFAULT_MAX_GRANTS_PER_VSA
    max_extents_per_vsa: int = DEFAULT_MAX_EXTENTS_PER_VSA
    exempt_uids: frozenset[int] = frozenset({ROOT_UID})

    def __post_init__(self) -> None:
        for key in ("max_vsas_per_uid", "max_bytes_per_uid", "max_grants_per_vsa"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise RegistryError(f"limit {key} must be a non-negative integer, not {value!r}")
        extents = self.max_extents_per_vsa
        if not _is_int(extents) or not 1 <= extents <= HARD_MAX_EXTENTS:
            raise RegistryError(f"limit max_extents_per_vsa must be 1..{HARD_MAX_EXTENTS}, not {extents!r}")
        if not isinstance(self.exempt_uids, frozenset) or not all(
            _is_int(uid) and 0 <= uid <= MAX_UID for uid in self.exempt_uids
        ):
            raise RegistryError(f"exempt_uids must be a set of uids, not {self.exempt_uids!r}")

    def as_dict(self) -> dict[str, object]:
        return {
            "max_vsas_per_uid": self.max_vsas_per_uid,
            "max_bytes_per_uid": self.max_bytes_per_uid,
            "max_grants_per_vsa": self.max_grants_per_vsa,
            "max_extents_per_vsa": self.max_extents_per_vsa,
            "exempt_uids": sorted(self.exempt_uids),
        }


DEFAULT_LIMITS = Limits()


class Extent(NamedTuple):
    physical_block: int
    block_count: int


@dataclass(frozen=True)
class Vsa:
    name: str
    owner_uid: int
    size_blocks: int
    extents: tuple[Extent, ...]  # in VSA order: VSA block 0 is extents[0].physical_block
    grants: Mapping[int, Mode] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def size_bytes(self) -> int:
        return self.size_blocks * BLOCK_SIZE

    def allows(self, uid: int, write: bool) -> bool:
        if uid == ROOT_UID or uid == self.owner_uid:
            return True
        mode = self.grants.get(uid)
        return mode == "rw" or (mode == "ro" and not write)


def validate_name(name: object) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or name in (".", ".."):
        raise RegistryError(f"bad VSA name {name!r}: 1-64 characters of A-Z a-z 0-9 . _ -")
    return name


def _validate_uid(uid: object, what: str = "uid") -> int:
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid <= MAX_UID:
        raise RegistryError(f"bad {what} {uid!r}")
    return uid


def blocks_for(size_bytes: int) -> int:
    """``size_bytes`` in blocks, rounded up to whole extent units."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise RegistryError(f"bad VSA size {size_bytes!r}: a positive number of bytes")
    unit_bytes = EXTENT_UNIT_BLOCKS * BLOCK_SIZE
    return -(-size_bytes // unit_bytes) * EXTENT_UNIT_BLOCKS


def translate(vsa: Vsa, block: int, count: int) -> list[tuple[int, int]]:
    """Map ``count`` VSA blocks from ``block`` to physical ``(block, count)`` runs, in order.

    The range check is written the way it must be in a fixed-width language
    (``count > size - block`` after ``block <= size``), so ``block + count`` can never wrap
    even for u64 values from a hostile descriptor.
    """
    for value, what in ((block, "block"), (count, "count")):
        if isinstance(value, bool) or not isinstance(value, int):
            raise OutOfRange(f"{what} must be an integer, not {type(value).__name__}")
    if count <= 0:
        raise OutOfRange(f"block count {count} must be positive")
    if block < 0 or block > vsa.size_blocks or count > vsa.size_blocks - block:
        raise OutOfRange(f"blocks [{block}, +{count}) are outside VSA {vsa.name!r} of {vsa.size_blocks} blocks")
    runs: list[tuple[int, int]] = []
    extent_start = 0  # VSA block at which the current extent begins
    remaining = count
    position = block
    for extent in vsa.extents:
        extent_end = extent_start + extent.block_count
        if position < extent_end:
            offset = position - extent_start
            take = min(remaining, extent.block_count - offset)
            runs.append((extent.physical_block + offset, take))
            remaining -= take
            position += take
            if remaining == 0:
                return runs
        extent_start = extent_end
    # Only reachable when the extents do not cover size_blocks, which _load rules out.
    raise RegistryError(f"VSA {vsa.name!r}: extents cover fewer than {vsa.size_blocks} blocks")


def free_extents(used: list[Extent], capacity_blocks: int) -> list[Extent]:
    """The gaps between ``used`` extents (any order, not overlapping), in block order."""
    gaps = []
    cursor = 0
    for extent in sorted(used):
        if extent.physical_block > cursor:
            gaps.append(Extent(cursor, extent.physical_block - cursor))
        cursor = max(cursor, extent.physical_block + extent.block_count)
    if capacity_blocks > cursor:
        gaps.append(Extent(cursor, capacity_blocks - cursor))
    return gaps


def _append_extent(extents: list[Extent], new: Extent) -> None:
    """Append, merging with the last extent when physically contiguous (shorter lists)."""
    if extents and extents[-1].physical_block + extents[-1].block_count == new.physical_block:
        last = extents.pop()
        extents.append(Extent(last.physical_block, last.block_count + new.block_count))
    else:
        extents.append(new)


class Registry:
    """VSAs on one physical device of ``capacity_blocks`` blocks, persisted at ``path``.

    ``capacity_blocks`` is recorded when the database is created; on reopen, None keeps the
    recorded value, and a different value is accepted only when every extent still fits
    (the image grew, or shrank only past free space).

    ``limits`` are the per-uid bounds; ``zero`` zeroes extents on the device before they
    are handed out (see the module's docstring).
    """

    def __init__(
        self,
        path: str | Path,
        capacity_blocks: int | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
        zero: Zeroer | None = None,
    ) -> None:
        if not isinstance(limits, Limits):
            raise RegistryError(f"bad limits {limits!r}")
        self.limits = limits
        self._zero = zero
        if capacity_blocks is not None:
            if isinstance(capacity_blocks, bool) or not isinstance(capacity_blocks, int):
                raise RegistryError(f"bad capacity {capacity_blocks!r}")
            if not EXTENT_UNIT_BLOCKS <= capacity_blocks <= MAX_CAPACITY_BLOCKS:
                raise RegistryError(f"capacity {capacity_blocks} blocks is out of range")
        self.path = Path(path)
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction spans
            # exactly one registry operation.
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry {self.path}: {exc}") from exc
        try:
            self._open(capacity_blocks)
        except BaseException:
            self._db.close()
            raise

    def _open(self, capacity_blocks: int | None) -> None:
        with self._transaction() as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                if capacity_blocks is None:
                    raise RegistryError(f"{self.path} is a new registry: its capacity must be given")
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                db.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("block_size", BLOCK_SIZE), ("extent_unit_blocks", EXTENT_UNIT_BLOCKS),
                     ("capacity_blocks", capacity_blocks)],
                )
                return
            self._check_schema(db)
            vsas, stored_capacity = self._load(db)
            if capacity_blocks is not None and capacity_blocks != stored_capacity:
                end = max((e.physical_block + e.block_count for v in vsas.values() for e in v.extents), default=0)
                if end > capacity_blocks:
                    raise RegistryError(
                        f"capacity {capacity_blocks} blocks is below allocated block {end}; shrink VSAs first"
                    )
                db.execute("UPDATE meta SET value = ? WHERE key = 'capacity_blocks'", (capacity_blocks,))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self._db, f"registry {self.path}", RegistryError)

    def _check_schema(self, db: sqlite3.Connection) -> None:
        try:
            rows = db.execute("SELECT version FROM schema_version").fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"{self.path} is not a VSA registry: {exc}") from exc
        if len(rows) != 1 or rows[0][0] != SCHEMA_VERSION:
            raise RegistryError(f"{self.path}: unsupported schema version {rows!r} (want {SCHEMA_VERSION})")

    def _load(self, db: sqlite3.Connection) -> tuple[dict[str, Vsa], int]:
        """Read and check everything; returns the VSAs by name and the capacity in blocks."""
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("block_size") != BLOCK_SIZE or meta.get("extent_unit_blocks") != EXTENT_UNIT_BLOCKS:
            raise RegistryError(f"{self.path}: block size or extent unit differs from this version's")
        capacity = meta.get("capacity_blocks")
        if not _is_int(capacity) or not EXTENT_UNIT_BLOCKS <= capacity <= MAX_CAPACITY_BLOCKS:
            raise RegistryError(f"{self.path}: corrupt capacity {capacity!r}")
        rows: dict[str, tuple[int, int]] = {}
        for name, owner, size in db.execute("SELECT name, owner_uid, size_blocks FROM vsa"):
            self._check_row(name, owner, size)
            rows[name] = (owner, size)
        extents: dict[str, list[Extent]] = {name: [] for name in rows}
        expected_seq: dict[str, int] = {name: 0 for name in rows}
        every_extent: list[tuple[Extent, str]] = []
        for name, seq, start, count in db.execute(
            "SELECT vsa, seq, physical_block, block_count FROM extent ORDER BY vsa, seq"
        ):
            if name not in rows:
                raise RegistryError(f"{self.path}: extent of unknown VSA {name!r}")
            if seq != expected_seq[name]:
                raise RegistryError(f"{self.path}: VSA {name!r} has a gap in its extent list")
            expected_seq[name] += 1
            if not (_is_int(start) and _is_int(count) and start >= 0 and count > 0 and start + count <= capacity):
                raise RegistryError(f"{self.path}: VSA {name!r} has a bad extent ({start!r}, {count!r})")
            if start % EXTENT_UNIT_BLOCKS or count % EXTENT_UNIT_BLOCKS:
                raise RegistryError(f"{self.path}: VSA {name!r} has an unaligned extent ({start}, {count})")
            extent = Extent(start, count)
            extents[name].append(extent)
            every_extent.append((extent, name))
        every_extent.sort()
        for (before, owner_before), (after, owner_after) in zip(every_extent, every_extent[1:]):
            if before.physical_block + before.block_count > after.physical_block:
                raise RegistryError(f"{self.path}: VSAs {owner_before!r} and {owner_after!r} overlap")
        grants: dict[str, dict[int, Mode]] = {name: {} for name in rows}
        for name, uid, mode in db.execute("SELECT vsa, uid, mode FROM vsa_grant"):
            if name not in rows or not _is_int(uid) or not 0 <= uid <= MAX_UID or mode not in _MODES:
                raise RegistryError(f"{self.path}: bad grant ({name!r}, {uid!r}, {mode!r})")
            grants[name][uid] = "rw" if mode == "rw" else "ro"
        vsas = {}
        for name, (owner, size) in rows.items():
            if sum(e.block_count for e in extents[name]) != size:
                raise RegistryError(f"{self.path}: the extents of VSA {name!r} do not add up to its size")
            vsas[name] = Vsa(name, owner, size, tuple(extents[name]), MappingProxyType(grants[name]))
        return vsas, capacity

    def _check_row(self, name: object, owner: object, size: object) -> None:
        if not isinstance(name, str) or _NAME.fullmatch(name) is None or name in (".", ".."):
            raise RegistryError(f"{self.path}: bad VSA name {name!r}")
        if not _is_int(owner) or not 0 <= owner <= MAX_UID:
            raise RegistryError(f"{self.path}: VSA {name!r} has a bad owner {owner!r}")
        if not _is_int(size) or size <= 0 or size % EXTENT_UNIT_BLOCKS:
            raise RegistryError(f"{self.path}: VSA {name!r} has a bad size {size!r}")

    def _write_extents(self, db: sqlite3.Connection, name: str, extents: builtins.list[Extent]) -> None:
        db.execute("DELETE FROM extent WHERE vsa = ?", (name,))
        db.executemany(
            "INSERT INTO extent (vsa, seq, physical_block, block_count) VALUES (?, ?, ?, ?)",
            [(name, seq, e.physical_block, e.block_count) for seq, e in enumerate(extents)],
        )

    def _managed(self, vsas: dict[str, Vsa], name: str, uid: int) -> Vsa:
        """The VSA, if ``uid`` may change it (its owner, or root)."""
        vsa = vsas.get(name)
        if vsa is None:
            raise NotFound(f"no VSA named {name!r}")
        if uid != ROOT_UID and uid != vsa.owner_uid:
            raise AccessDenied(f"uid {uid} does not own VSA {name!r}")
        return vsa

    @staticmethod
    def _allocate(
        vsas: dict[str, Vsa], capacity: int, blocks: int, existing: Sequence[Extent], max_extents: int
    ) -> tuple[builtins.list[Extent], builtins.list[Extent]]:
        """``blocks`` of free space appended to ``existing``: (the new extents, the whole list).

        First fit (the lowest gaps first). When that would leave the VSA with more than
        ``max_extents`` extents, the largest gaps first, which needs the fewest; if even
        that is too many, the free space is too fragmented for this VSA.
        """
        used = [extent for vsa in vsas.values() for extent in vsa.extents]
        usable = capacity - capacity % EXTENT_UNIT_BLOCKS
        gaps = free_extents(used, usable)
        available = sum(gap.block_count for gap in gaps)
        if blocks > available:
            raise RegistryError(f"no space: {blocks} blocks wanted, {available} free")
        largest_first = sorted(gaps, key=lambda gap: (-gap.block_count, gap.physical_block))
        for order in (gaps, largest_first):
            taken: list[Extent] = []
            wanted = blocks
            for gap in order:
                take = min(gap.block_count, wanted)
                taken.append(Extent(gap.physical_block, take))
                wanted -= take
                if wanted == 0:
                    break
            extents = list(existing)
            for extent in taken:
                _append_extent(extents, extent)
            if len(extents) <= max_extents:
                return taken, extents
        raise QuotaExceeded(
            f"the free space is too fragmented: {blocks} blocks would take the VSA past"
            f" {max_extents} extents"
        )

    def _exempt(self, uid: int) -> bool:
        return uid in self.limits.exempt_uids

    def _max_extents(self, uid: int) -> int:
        return HARD_MAX_EXTENTS if self._exempt(uid) else self.limits.max_extents_per_vsa

    def _check_space_quota(self, vsas: dict[str, Vsa], owner: int, extra_blocks: int, new_vsa: bool) -> None:
        """Refuse when ``extra_blocks`` more (and one more VSA, with ``new_vsa``) would take
        ``owner`` past its bounds."""
        limits = self.limits
        owned = [vsa for vsa in vsas.values() if vsa.owner_uid == owner]
        if new_vsa and len(owned) >= limits.max_vsas_per_uid:
            raise QuotaExceeded(
                f"quota: uid {owner} owns {len(owned)} VSAs, the most a uid may own is {limits.max_vsas_per_uid}"
            )
        held = sum(vsa.size_bytes for vsa in owned)
        wanted = held + extra_blocks * BLOCK_SIZE
        if wanted > limits.max_bytes_per_uid:
            raise QuotaExceeded(
                f"quota: uid {owner} would hold {wanted >> 20} MiB of VSAs, the most a uid may hold is"
                f" {limits.max_bytes_per_uid >> 20} MiB ({held >> 20} MiB held now)"
            )

    def _zero_new(self, extents: Sequence[Extent]) -> None:
        """Zero blocks about to be handed out; called inside the transaction that hands them
        out, so they are zero before anyone can own them (and nothing is handed out if this fails)."""
        if self._zero is None or not extents:
            return
        try:
            self._zero(extents)
        except OSError as exc:
            raise RegistryError(f"cannot zero the blocks of the new space: {exc}") from exc

    def create_vsa(self, name: str, size_bytes: int, owner_uid: int) -> Vsa:
        validate_name(name)
        _validate_uid(owner_uid, "owner uid")
        blocks = blocks_for(size_bytes)
        with self._transaction() as db:
            vsas, capacity = self._load(db)
            if name in vsas:
                raise RegistryError(f"VSA {name!r} already exists")
            if not self._exempt(owner_uid):
                self._check_space_quota(vsas, owner_uid, blocks, new_vsa=True)
            taken, extents = self._allocate(vsas, capacity, blocks, (), self._max_extents(owner_uid))
            self._zero_new(taken)
            db.execute("INSERT INTO vsa (name, owner_uid, size_blocks) VALUES (?, ?, ?)", (name, owner_uid, blocks))
            self._write_extents(db, name, extents)
        return Vsa(name, owner_uid, blocks, tuple(extents), MappingProxyType({}))

    def resize_vsa(self, name: str, size_bytes: int, uid: int, busy: Collection[str] = ()) -> Vsa:
        """Grow by appending extents (first fit) or shrink by releasing the tail.

        ``busy``: the names of the VSAs that functions have open; shrinking one is refused.
        """
        validate_name(name)
        _validate_uid(uid)
        blocks = blocks_for(size_bytes)
        with self._transaction() as db:
            vsas, capacity = self._load(db)
            vsa = self._managed(vsas, name, uid)
            extents = list(vsa.extents)
            if blocks > vsa.size_blocks:
                extra = blocks - vsa.size_blocks
                if not self._exempt(uid):
                    self._check_space_quota(vsas, vsa.owner_uid, extra, new_vsa=False)
                taken, extents = self._allocate(vsas, capacity, extra, extents, self._max_extents(uid))
                self._zero_new(taken)
            elif blocks < vsa.size_blocks:
                if name in busy:
                    raise Busy(f"VSA {name!r} is open: close every function on it before shrinking it (EBUSY)")
                excess = vsa.size_blocks - blocks
                while excess:
                    last = extents.pop()
                    if last.block_count > excess:
                        extents.append(Extent(last.physical_block, last.block_count - excess))
                        excess = 0
                    else:
                        excess -= last.block_count
            else:
                return vsa
            db.execute("UPDATE vsa SET size_blocks = ? WHERE name = ?", (blocks, name))
            self._write_extents(db, name, extents)
        return Vsa(name, vsa.owner_uid, blocks, tuple(extents), vsa.grants)

    def delete_vsa(self, name: str, uid: int, busy: Collection[str] = ()) -> None:
        """``busy``: as for :meth:`resize_vsa`; deleting an open VSA is refused."""
        validate_name(name)
        _validate_uid(uid)
        with self._transaction() as db:
            vsas, _ = self._load(db)
            self._managed(vsas, name, uid)
            if name in busy:
                raise Busy(f"VSA {name!r} is open: close every function on it before deleting it (EBUSY)")
            db.execute("DELETE FROM extent WHERE vsa = ?", (name,))
            db.execute("DELETE FROM vsa_grant WHERE vsa = ?", (name,))
            db.execute("DELETE FROM vsa WHERE name = ?", (name,))

    def grant(self, name: str, uid: int, mode: Mode, by_uid: int) -> Vsa:
        """Let ``uid`` read (``"ro"``) or read and write (``"rw"``); replaces an earlier grant."""
        validate_name(name)
        _validate_uid(uid)
        _validate_uid(by_uid)
        if mode not in _MODES:
            raise RegistryError(f"bad mode {mode!r}: 'ro' or 'rw'")
        with self._transaction() as db:
            vsas, _ = self._load(db)
            vsa = self._managed(vsas, name, by_uid)
            if uid == vsa.owner_uid:
                raise RegistryError(f"uid {uid} owns VSA {name!r} already")
            others = len([grantee for grantee in vsa.grants if grantee != uid])
            if not self._exempt(by_uid) and others >= self.limits.max_grants_per_vsa:
                raise QuotaExceeded(
                    f"quota: VSA {name!r} has {others} grants, the most a VSA may have is"
                    f" {self.limits.max_grants_per_vsa}"
                )
            db.execute("INSERT OR REPLACE INTO vsa_grant (vsa, uid, mode) VALUES (?, ?, ?)", (name, uid, mode))
        return Vsa(vsa.name, vsa.owner_uid, vsa.size_blocks, vsa.extents, MappingProxyType({**vsa.grants, uid: mode}))

    def revoke(self, name: str, uid: int, by_uid: int) -> Vsa:
        """Take back ``uid``'s grant; no error when there was none."""
        validate_name(name)
        _validate_uid(uid)
        _validate_uid(by_uid)
        with self._transaction() as db:
            vsas, _ = self._load(db)
            vsa = self._managed(vsas, name, by_uid)
            db.execute("DELETE FROM vsa_grant WHERE vsa = ? AND uid = ?", (name, uid))
        grants = {grantee: mode for grantee, mode in vsa.grants.items() if grantee != uid}
        return Vsa(vsa.name, vsa.owner_uid, vsa.size_blocks, vsa.extents, MappingProxyType(grants))

    def check_access(self, name: str, uid: int, write: bool) -> Vsa:
        """The VSA if ``uid`` may read it (or write it, with ``write``); AccessDenied if not."""
        vsa = self.get(name)
        _validate_uid(uid)
        if not vsa.allows(uid, write):
            raise AccessDenied(f"uid {uid} may not {'write' if write else 'read'} VSA {name!r}")
        return vsa

    def get(self, name: str) -> Vsa:
        validate_name(name)
        vsa = self._snapshot()[0].get(name)
        if vsa is None:
            raise NotFound(f"no VSA named {name!r}")
        return vsa

    def list(self) -> builtins.list[Vsa]:
        vsas, _ = self._snapshot()
        return [vsas[name] for name in sorted(vsas)]

    @property
    def capacity_blocks(self) -> int:
        return self._snapshot()[1]

    def usage(self, uid: int) -> tuple[int, int]:
        """How many VSAs ``uid`` owns and how many bytes they hold."""
        _validate_uid(uid)
        owned = [vsa for vsa in self._snapshot()[0].values() if vsa.owner_uid == uid]
        return len(owned), sum(vsa.size_bytes for vsa in owned)

    def free_blocks(self) -> int:
        vsas, capacity = self._snapshot()
        usable = capacity - capacity % EXTENT_UNIT_BLOCKS
        return usable - sum(vsa.size_blocks for vsa in vsas.values())

    def _snapshot(self) -> tuple[dict[str, Vsa], int]:
        # A transaction even for reads: the tables are read at one consistent point.
        with self._transaction() as db:
            return self._load(db)

