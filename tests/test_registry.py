"""The VSA registry: allocation, resize, access, persistence, and a hostile database file."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kernelctl.registry import (
    BLOCK_SIZE,
    EXTENT_UNIT_BLOCKS,
    AccessDenied,
    Extent,
    NotFound,
    OutOfRange,
    Registry,
    RegistryError,
    Vsa,
    blocks_for,
    free_extents,
    translate,
)

MIB = 1 << 20
UNIT = EXTENT_UNIT_BLOCKS
CAPACITY = 16 * UNIT  # a 16 MiB device keeps "full" reachable in a few steps
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry-h10a.sqlite"


@pytest.fixture
def reg(db_path: Path) -> Iterator[Registry]:
    registry = Registry(db_path, CAPACITY)
    try:
        yield registry
    finally:
        registry.close()


def check_invariants(registry: Registry) -> None:
    """No overlap, nothing past the device, sizes add up, free space conserved."""
    vsas = registry.list()
    extents = sorted(extent for vsa in vsas for extent in vsa.extents)
    for before, after in zip(extents, extents[1:]):
        assert before.physical_block + before.block_count <= after.physical_block, (before, after)
    for extent in extents:
        assert extent.physical_block >= 0 and extent.block_count > 0
        assert extent.physical_block + extent.block_count <= registry.capacity_blocks
    for vsa in vsas:
        assert sum(extent.block_count for extent in vsa.extents) == vsa.size_blocks
    used = sum(vsa.size_blocks for vsa in vsas)
    assert used + registry.free_blocks() == registry.capacity_blocks
    gaps = free_extents(extents, registry.capacity_blocks)
    assert sum(gap.block_count for gap in gaps) == registry.free_blocks()


@pytest.mark.parametrize(
    ("size_bytes", "blocks"),
    [
        (1, UNIT),
        (BLOCK_SIZE, UNIT),
        (MIB - 1, UNIT),
        (MIB, UNIT),
        (MIB + 1, 2 * UNIT),
        (5 * MIB, 5 * UNIT),
    ],
)
def test_sizes_round_up_to_the_extent_unit(size_bytes: int, blocks: int) -> None:
    assert blocks_for(size_bytes) == blocks


@pytest.mark.parametrize("size_bytes", [0, -1, True, 1.5, "1M", None])
def test_bad_sizes_are_refused(reg: Registry, size_bytes: object) -> None:
    with pytest.raises(RegistryError, match="bad VSA size"):
        reg.create_vsa("a", size_bytes, 1000)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a/b", "a b", "../etc", ".", "..", "naïve", "a\n", "a\x00", 7, None]
)
def test_bad_names_are_refused(reg: Registry, name: object) -> None:
    with pytest.raises(RegistryError, match="bad VSA name"):
        reg.create_vsa(name, MIB, 1000)  # type: ignore[arg-type]
    assert reg.list() == []


@pytest.mark.parametrize("name", ["a", "x" * 64, "log.0", "redis-aof_1", "A.B-C_9", "..."])
def test_good_names_are_accepted(reg: Registry, name: str) -> None:
    assert reg.create_vsa(name, MIB, 1000).name == name


@pytest.mark.parametrize("uid", [-1, 2**32 - 1, 2**40, True, "1000"])
def test_bad_uids_are_refused(reg: Registry, uid: object) -> None:
    with pytest.raises(RegistryError, match="uid"):
        reg.create_vsa("a", MIB, uid)  # type: ignore[arg-type]


def test_first_fit_fills_the_lowest_gap_then_spills_over(reg: Registry) -> None:
    reg.create_vsa("a", 2 * MIB, 1000)
    reg.create_vsa("b", 3 * MIB, 1000)
    reg.create_vsa("c", 1 * MIB, 1000)
    assert reg.get("a").extents == (Extent(0, 2 * UNIT),)
    assert reg.get("b").extents == (Extent(2 * UNIT, 3 * UNIT),)
    assert reg.get("c").extents == (Extent(5 * UNIT, UNIT),)
    reg.delete_vsa("b", 1000)
    d = reg.create_vsa("d", 5 * MIB, 2000)
    # The 3-unit hole left by b first, the rest after c.
    assert d.extents == (Extent(2 * UNIT, 3 * UNIT), Extent(6 * UNIT, 2 * UNIT))
    assert d.size_blocks == 5 * UNIT and d.size_bytes == 5 * MIB
    check_invariants(reg)


def test_a_full_device_says_no_space_and_changes_nothing(reg: Registry) -> None:
    reg.create_vsa("a", 10 * MIB, 1000)
    with pytest.raises(RegistryError, match="no space"):
        reg.create_vsa("b", 7 * MIB, 1000)
    with pytest.raises(RegistryError, match="no space"):
        reg.resize_vsa("a", 17 * MIB, 1000)
    assert [vsa.name for vsa in reg.list()] == ["a"]
    assert reg.get("a").size_blocks == 10 * UNIT
    reg.create_vsa("b", 6 * MIB, 1000)  # exactly what is left
    assert reg.free_blocks() == 0
    check_invariants(reg)


def test_a_partial_unit_at_the_end_of_the_device_is_never_handed_out(db_path: Path) -> None:
    with Registry(db_path, 3 * UNIT + 100) as reg:
        assert reg.free_blocks() == 3 * UNIT
        reg.create_vsa("a", 3 * MIB, 0)
        with pytest.raises(RegistryError, match="no space"):
            reg.create_vsa("b", 1, 0)


def test_names_are_unique(reg: Registry) -> None:
    reg.create_vsa("a", MIB, 1000)
    with pytest.raises(RegistryError, match="already exists"):
        reg.create_vsa("a", MIB, 2000)
    assert reg.get("a").owner_uid == 1000


def test_grow_appends_and_merges_contiguous_space(reg: Registry) -> None:
    reg.create_vsa("a", MIB, 1000)
    grown = reg.resize_vsa("a", 3 * MIB, 1000)
    assert grown.extents == (Extent(0, 3 * UNIT),)
    reg.create_vsa("b", MIB, 1000)
    grown = reg.resize_vsa("a", 5 * MIB, 1000)
    assert grown.extents == (Extent(0, 3 * UNIT), Extent(4 * UNIT, 2 * UNIT))
    assert reg.get("a") == grown
    check_invariants(reg)


def test_shrink_releases_the_tail_across_extents(reg: Registry) -> None:
    reg.create_vsa("a", 2 * MIB, 1000)
    reg.create_vsa("b", MIB, 1000)
    reg.resize_vsa("a", 6 * MIB, 1000)
    assert reg.get("a").extents == (Extent(0, 2 * UNIT), Extent(3 * UNIT, 4 * UNIT))
    shrunk = reg.resize_vsa("a", 1 * MIB, 1000)
    assert shrunk.extents == (Extent(0, UNIT),)
    assert reg.free_blocks() == CAPACITY - 2 * UNIT
    assert reg.resize_vsa("a", MIB, 1000) == shrunk  # same size: nothing changes
    check_invariants(reg)


def test_grants_survive_a_resize(reg: Registry) -> None:
    reg.create_vsa("a", MIB, 1000)
    reg.grant("a", 2000, "ro", 1000)
    assert reg.resize_vsa("a", 2 * MIB, 1000).grants == {2000: "ro"}
    assert reg.get("a").grants == {2000: "ro"}


# (uid, write, allowed) with owner 1000, 2000 granted ro, 3000 granted rw, 4000 nothing.
ACCESS_TABLE = [
    (1000, False, True),
    (1000, True, True),
    (0, False, True),
    (0, True, True),
    (2000, False, True),
    (2000, True, False),
    (3000, False, True),
    (3000, True, True),
    (4000, False, False),
    (4000, True, False),
]


@pytest.mark.parametrize(("uid", "write", "allowed"), ACCESS_TABLE)
def test_access_rules(reg: Registry, uid: int, write: bool, allowed: bool) -> None:
    reg.create_vsa("a", MIB, 1000)
    reg.grant("a", 2000, "ro", 1000)
    reg.grant("a", 3000, "rw", 0)  # root may grant too
    if allowed:
        assert reg.check_access("a", uid, write).name == "a"
    else:
        with pytest.raises(AccessDenied):
            reg.check_access("a", uid, write)


@pytest.mark.parametrize(
    ("action", "error"),
    [
        (lambda r: r.resize_vsa("a", 2 * MIB, 3000), AccessDenied),
        (lambda r: r.delete_vsa("a", 3000), AccessDenied),
        (lambda r: r.grant("a", 4000, "rw", 3000), AccessDenied),
        (lambda r: r.revoke("a", 3000, 3000), AccessDenied),
        (lambda r: r.grant("a", 4000, "all", 1000), RegistryError),
        (lambda r: r.grant("a", 1000, "ro", 1000), RegistryError),
        (lambda r: r.get("nope"), NotFound),
        (lambda r: r.delete_vsa("nope", 0), NotFound),
        (lambda r: r.check_access("nope", 0, False), NotFound),
    ],
)
def test_only_owner_or_root_manage_a_vsa(reg: Registry, action: object, error: type[Exception]) -> None:
    reg.create_vsa("a", MIB, 1000)
    reg.grant("a", 3000, "rw", 1000)
    before = reg.list()
    with pytest.raises(error):
        action(reg)  # type: ignore[operator]
    assert reg.list() == before


def test_revoke_takes_access_back_and_regrant_replaces(reg: Registry) -> None:
    reg.create_vsa("a", MIB, 1000)
    reg.grant("a", 2000, "rw", 1000)
    reg.grant("a", 2000, "ro", 1000)
    with pytest.raises(AccessDenied):
        reg.check_access("a", 2000, True)
    assert reg.revoke("a", 2000, 1000).grants == {}
    with pytest.raises(AccessDenied):
        reg.check_access("a", 2000, False)
    reg.revoke("a", 2000, 1000)  # no grant left: still fine


def test_delete_frees_space_and_grants(reg: Registry) -> None:
    reg.create_vsa("a", 4 * MIB, 1000)
    reg.grant("a", 2000, "ro", 1000)
    reg.delete_vsa("a", 0)
    assert reg.list() == [] and reg.free_blocks() == CAPACITY
    reg.create_vsa("a", MIB, 5000)
    assert reg.get("a").grants == {}


def test_everything_survives_a_reopen(db_path: Path) -> None:
    with Registry(db_path, CAPACITY) as reg:
        reg.create_vsa("a", 2 * MIB, 1000)
        reg.create_vsa("b", MIB, 1001)
        reg.resize_vsa("a", 4 * MIB, 1000)
        reg.grant("b", 2000, "rw", 1001)
        before = reg.list()
    with Registry(db_path) as reopened:
        assert reopened.list() == before
        assert reopened.capacity_blocks == CAPACITY
        reopened.create_vsa("c", MIB, 7)
        check_invariants(reopened)


def test_capacity_on_reopen_may_grow_but_not_cut_into_vsas(db_path: Path) -> None:
    with Registry(db_path, CAPACITY) as reg:
        reg.create_vsa("a", 8 * MIB, 1000)
    with pytest.raises(RegistryError, match="below allocated"):
        Registry(db_path, 4 * UNIT)
    with Registry(db_path, 8 * UNIT) as reg:
        assert reg.free_blocks() == 0
    with Registry(db_path, 64 * UNIT) as reg:
        assert reg.capacity_blocks == 64 * UNIT


@pytest.mark.parametrize("capacity", [None, 0, UNIT - 1, 2**62, -5, True])
def test_a_new_registry_needs_a_sane_capacity(db_path: Path, capacity: int | None) -> None:
    with pytest.raises(RegistryError):
        Registry(db_path, capacity)


TRANSLATE_VSA = Vsa("t", 0, 6 * UNIT, (Extent(10 * UNIT, 2 * UNIT), Extent(3 * UNIT, 4 * UNIT)))


@pytest.mark.parametrize(
    ("block", "count", "runs"),
    [
        (0, 1, [(10 * UNIT, 1)]),
        (2 * UNIT - 1, 2, [(12 * UNIT - 1, 1), (3 * UNIT, 1)]),
        (0, 6 * UNIT, [(10 * UNIT, 2 * UNIT), (3 * UNIT, 4 * UNIT)]),
        (6 * UNIT - 1, 1, [(7 * UNIT - 1, 1)]),
        (2 * UNIT, 5, [(3 * UNIT, 5)]),
    ],
)
def test_translate_maps_vsa_blocks_to_physical_runs(block: int, count: int, runs: list[tuple[int, int]]) -> None:
    assert translate(TRANSLATE_VSA, block, count) == runs


@pytest.mark.parametrize(
    ("block", "count"),
    [
        (0, 0),
        (0, -1),
        (-1, 1),
        (6 * UNIT, 1),
        (6 * UNIT - 1, 2),
        (1, 2**64 - 1),  # wraps to 0 in u64 arithmetic: block + count < size would pass
        (2**64 - 1, 2),
        (True, 1),
    ],
)
def test_translate_refuses_ranges_outside_the_vsa(block: int, count: int) -> None:
    with pytest.raises(OutOfRange):
        translate(TRANSLATE_VSA, block, count)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 5), min_size=1, max_size=5),
    block=st.integers(-3, 40),
    count=st.integers(-3, 40),
)
def test_translate_agrees_with_a_block_by_block_map(lengths: list[int], block: int, count: int) -> None:
    # Extents laid out backwards with gaps between, so order and gaps both matter.
    extents, cursor = [], 1000
    for length in lengths:
        cursor -= length + 3
        extents.append(Extent(cursor, length))
    vsa = Vsa("p", 0, sum(lengths), tuple(extents))
    naive = [extent.physical_block + i for extent in extents for i in range(extent.block_count)]
    if count <= 0 or block < 0 or block + count > len(naive):
        with pytest.raises(OutOfRange):
            translate(vsa, block, count)
        return
    runs = translate(vsa, block, count)
    assert [start + i for start, run in runs for i in range(run)] == naive[block : block + count]


class RegistryMachine(RuleBasedStateMachine):
    """Random create/resize/delete/reopen sequences against a model of names and sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="arx-h10a-reg.", dir="/var/tmp"))
        self.path = self.tmp / "registry.sqlite"
        self.reg = Registry(self.path, CAPACITY)
        self.model: dict[str, int] = {}  # name -> size in units

    @initialize()
    def start(self) -> None:
        assert self.reg.list() == []

    def teardown(self) -> None:
        self.reg.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def free_units(self) -> int:
        return CAPACITY // UNIT - sum(self.model.values())

    @rule(name=st.sampled_from(["a", "b", "c", "d", "e"]), units=st.integers(1, 8))
    def create(self, name: str, units: int) -> None:
        if name in self.model:
            with pytest.raises(RegistryError, match="already exists"):
                self.reg.create_vsa(name, units * MIB, 1000)
        elif units > self.free_units():
            with pytest.raises(RegistryError, match="no space"):
                self.reg.create_vsa(name, units * MIB, 1000)
        else:
            vsa = self.reg.create_vsa(name, units * MIB, 1000)
            assert vsa.size_blocks == units * UNIT
            self.model[name] = units

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), units=st.integers(1, 10))
    def resize(self, data: st.DataObject, units: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        if units - self.model[name] > self.free_units():
            with pytest.raises(RegistryError, match="no space"):
                self.reg.resize_vsa(name, units * MIB, 1000)
            return
        before = self.reg.get(name)
        after = self.reg.resize_vsa(name, units * MIB, 0)
        kept = min(before.size_blocks, after.size_blocks)
        # Resizing never moves data: the first `kept` blocks map where they did.
        assert translate(after, 0, kept) == translate(before, 0, kept)
        self.model[name] = units

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        self.reg.delete_vsa(name, 1000)
        del self.model[name]

    @rule()
    def reopen(self) -> None:
        before = self.reg.list()
        self.reg.close()
        self.reg = Registry(self.path)
        assert self.reg.list() == before

    @invariant()
    def matches_the_model_and_never_overlaps(self) -> None:
        assert {vsa.name: vsa.size_blocks // UNIT for vsa in self.reg.list()} == self.model
        check_invariants(self.reg)


RegistryMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_registry_state_machine = RegistryMachine.TestCase


def test_a_failure_mid_change_leaves_the_registry_as_it_was(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    reg.create_vsa("a", 2 * MIB, 1000)
    reg.create_vsa("b", MIB, 1000)
    before = reg.list()
    original = Registry._write_extents

    def fail_after_delete(self: Registry, db: sqlite3.Connection, name: str, extents: list[Extent]) -> None:
        db.execute("DELETE FROM extent WHERE vsa = ?", (name,))
        raise OSError("disk on fire")

    monkeypatch.setattr(Registry, "_write_extents", fail_after_delete)
    for change in (lambda: reg.resize_vsa("a", 5 * MIB, 1000), lambda: reg.create_vsa("c", MIB, 1000)):
        with pytest.raises(OSError, match="disk on fire"):
            change()
        assert reg.list() == before
    monkeypatch.setattr(Registry, "_write_extents", original)
    check_invariants(reg)


CRASH_CHILD = textwrap.dedent(
    """
    import os, sys
    from kernelctl.registry import Registry

    def die(self, db, name, extents):
        db.execute("DELETE FROM extent WHERE vsa = ?", (name,))
        os._exit(9)  # the process dies with the transaction open: no rollback, no close

    reg = Registry(sys.argv[1])
    Registry._write_extents = die
    reg.resize_vsa("a", 6 * 1024 * 1024, 1000)
    """
)


def test_a_process_killed_mid_change_leaves_no_trace(db_path: Path) -> None:
    with Registry(db_path, CAPACITY) as reg:
        reg.create_vsa("a", 2 * MIB, 1000)
        reg.create_vsa("b", MIB, 1000)
        before = reg.list()
    child = subprocess.run([sys.executable, "-c", CRASH_CHILD, str(db_path)], cwd=REPO, capture_output=True, timeout=60)
    assert child.returncode == 9, child.stderr
    with Registry(db_path) as reg:
        assert reg.list() == before
        check_invariants(reg)


def _tamper(db_path: Path, statement: str) -> None:
    db = sqlite3.connect(db_path)
    try:
        db.execute(statement)
        db.commit()
    finally:
        db.close()


@pytest.mark.parametrize(
    "statement",
    [
        f"UPDATE extent SET physical_block = {UNIT} WHERE vsa = 'b'",  # b now overlaps a
        "UPDATE extent SET physical_block = -256 WHERE vsa = 'a'",
        f"UPDATE extent SET physical_block = {CAPACITY} WHERE vsa = 'b'",  # past the device
        "UPDATE extent SET block_count = 0 WHERE vsa = 'b'",
        "UPDATE extent SET block_count = 'many' WHERE vsa = 'b'",
        "UPDATE extent SET physical_block = 3.5 WHERE vsa = 'b'",
        "UPDATE extent SET physical_block = physical_block + 1 WHERE vsa = 'b'",  # unaligned
        "UPDATE extent SET seq = 4 WHERE vsa = 'b'",
        "DELETE FROM extent WHERE vsa = 'a'",  # a's size no longer adds up
        "INSERT INTO extent VALUES ('ghost', 0, 4096, 256)",
        "UPDATE vsa SET size_blocks = 999 WHERE name = 'a'",
        "UPDATE vsa SET owner_uid = -3 WHERE name = 'a'",
        "UPDATE vsa SET owner_uid = X'00' WHERE name = 'a'",
        "UPDATE vsa SET name = 'bad/name' WHERE name = 'c'",
        "INSERT INTO vsa_grant VALUES ('a', 5, 'admin')",
        "INSERT INTO vsa_grant VALUES ('ghost', 5, 'ro')",
        "INSERT INTO vsa_grant VALUES ('a', 'root', 'ro')",
        "INSERT INTO vsa_grant VALUES ('a', 4294967295, 'ro')",
        "UPDATE schema_version SET version = 99",
        "INSERT INTO schema_version VALUES (1)",
        "UPDATE meta SET value = 512 WHERE key = 'block_size'",
        "UPDATE meta SET value = 'big' WHERE key = 'capacity_blocks'",
        "DELETE FROM meta WHERE key = 'capacity_blocks'",
        "DROP TABLE vsa_grant",
        "DROP TABLE schema_version",
    ],
)
def test_a_tampered_database_is_a_registry_error(db_path: Path, statement: str) -> None:
    with Registry(db_path, CAPACITY) as reg:
        reg.create_vsa("a", 2 * MIB, 1000)
        reg.create_vsa("b", MIB, 1000)
        reg.create_vsa("c", MIB, 1000)
    _tamper(db_path, statement)
    with pytest.raises(RegistryError):
        with Registry(db_path) as reg:
            reg.list()


def test_a_database_that_is_not_ours_is_refused(db_path: Path) -> None:
    _tamper(db_path, "CREATE TABLE something (x)")
    with pytest.raises(RegistryError, match="not a VSA registry"):
        Registry(db_path, CAPACITY)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=4096), keep_header=st.booleans())
def test_random_bytes_as_the_database_raise_only_registry_errors(
    tmp_path: Path, junk: bytes, keep_header: bool
) -> None:
    path = tmp_path / "junk-h10a.sqlite"
    # With a valid SQLite header the junk reaches SQLite's page parser, not just its magic check.
    path.write_bytes((b"SQLite format 3\x00" if keep_header else b"") + junk)
    try:
        with Registry(path, CAPACITY) as reg:
            reg.list()
            reg.create_vsa("a", MIB, 1000)
    except RegistryError:
        pass


def test_a_corrupted_page_of_a_real_registry_is_a_registry_error(db_path: Path) -> None:
    with Registry(db_path, 64 * UNIT) as reg:
        for index in range(20):
            reg.create_vsa(f"v{index}", MIB // 2, 1000 + index)
    data = bytearray(db_path.read_bytes())
    for offset in range(4096, len(data), 7):  # every page but the header page
        data[offset] ^= 0x5A
    db_path.write_bytes(bytes(data))
    with pytest.raises(RegistryError):
        with Registry(db_path) as reg:
            reg.list()
