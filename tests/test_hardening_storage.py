"""Issue 7, defects 11-13: the storage side against an unprivileged uid.

* 11: blocks another uid's VSA used (deleted, or released by a shrink) read back as zeros in
  the next VSA over them, because the registry zeroes new space before it hands it out;
* 12: per-uid bounds on VSAs, bytes, grants per VSA and extents per VSA, with root exempt;
* 13: no shrink or delete of a VSA while a function has it open (EBUSY); growing it is safe.

The registry is checked alone first (no root needed); then each defect is attacked on a real
instance as uid 1000, with ``setpriv`` running ``kernelctl vsa ...`` and a small app that
opens VSAs through ``libos.storage.vsa.open_vsa``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kernelctl.client import ControlClient, ControlError
from kernelctl.names import Topology
from kernelctl.policy import Policy
from kernelctl.registry import (
    DEFAULT_LIMITS,
    DEFAULT_MAX_BYTES_PER_UID,
    DEFAULT_MAX_EXTENTS_PER_VSA,
    DEFAULT_MAX_GRANTS_PER_VSA,
    DEFAULT_MAX_VSAS_PER_UID,
    EXTENT_UNIT_BLOCKS,
    HARD_MAX_EXTENTS,
    Busy,
    Extent,
    Limits,
    QuotaExceeded,
    Registry,
    RegistryError,
)
from kernelctl.storage import StorageConfigError, parse_storage_limits, storage_limits, zero_extents
from tests.conftest import PYTHON, REPO
from vdev.vsic.function import MAX_EXTENTS as VSIC_MAX_EXTENTS

MIB = 1 << 20
UNIT = EXTENT_UNIT_BLOCKS
CAPACITY = 64 * UNIT
ATTACKER = 1000
VICTIM = 1001


# ---- the registry alone ------------------------------------------------------------------


class ZeroLog:
    """A ``zero`` callback that records what it was asked to zero, and checks that the
    space is not yet visible as handed out to anyone reading the database meanwhile."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.calls: list[list[Extent]] = []
        self.fail = False

    def __call__(self, extents: Sequence[Extent]) -> None:
        if self.fail:
            raise OSError(5, "the disk refused")
        # A second connection sees only committed data: the extents being zeroed must not
        # belong to any VSA yet, or someone could open them before they are zero.
        other = sqlite3.connect(self.db_path)
        try:
            for extent in extents:
                (owned,) = other.execute(
                    "SELECT COUNT(*) FROM extent WHERE physical_block < ? AND ? < physical_block + block_count",
                    (extent.physical_block + extent.block_count, extent.physical_block),
                ).fetchone()
                assert owned == 0, f"{extent} is handed out before it was zeroed"
        finally:
            other.close()
        self.calls.append(list(extents))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "registry-vsaharden.sqlite"


@pytest.fixture
def zeros(db_path: Path) -> ZeroLog:
    return ZeroLog(db_path)


@pytest.fixture
def reg(db_path: Path, zeros: ZeroLog) -> Iterator[Registry]:
    registry = Registry(db_path, CAPACITY, zero=zeros)
    try:
        yield registry
    finally:
        registry.close()


def test_new_space_is_zeroed_before_the_transaction_that_hands_it_out_commits(reg: Registry, zeros: ZeroLog) -> None:
    a = reg.create_vsa("a", 2 * MIB, ATTACKER)
    assert zeros.calls == [list(a.extents)]
    reg.create_vsa("b", MIB, VICTIM)
    zeros.calls.clear()
    grown = reg.resize_vsa("a", 4 * MIB, ATTACKER)
    # Only the new space, not what "a" already held (its data stays).
    assert zeros.calls == [[Extent(3 * UNIT, 2 * UNIT)]]
    assert grown.extents == (Extent(0, 2 * UNIT), Extent(3 * UNIT, 2 * UNIT))
    zeros.calls.clear()
    reg.resize_vsa("a", MIB, ATTACKER)
    reg.delete_vsa("b", VICTIM)
    assert zeros.calls == []  # freeing zeroes nothing: the next owner's allocation does
    c = reg.create_vsa("c", 3 * MIB, ATTACKER)
    assert zeros.calls == [list(c.extents)]
    assert c.extents[0] == Extent(UNIT, 3 * UNIT)  # the blocks "a" and "b" gave back


def test_a_failed_zeroing_hands_out_nothing(reg: Registry, zeros: ZeroLog) -> None:
    reg.create_vsa("a", MIB, ATTACKER)
    before, free = reg.list(), reg.free_blocks()
    zeros.fail = True
    for change in (lambda: reg.create_vsa("b", MIB, ATTACKER), lambda: reg.resize_vsa("a", 3 * MIB, ATTACKER)):
        with pytest.raises(RegistryError, match="cannot zero"):
            change()
        assert reg.list() == before and reg.free_blocks() == free


CRASH_IN_ZERO = textwrap.dedent(
    """
    import os, sys
    from kernelctl.registry import Registry

    def die(extents):
        os._exit(9)  # killed while zeroing: the transaction never commits

    reg = Registry(sys.argv[1], zero=die)
    reg.create_vsa(sys.argv[2], 1 << 20, 1000)
    """
)


def test_a_crash_while_zeroing_hands_out_nothing(db_path: Path) -> None:
    with Registry(db_path, CAPACITY) as reg:
        reg.create_vsa("a", MIB, ATTACKER)
        before = reg.list()
    child = subprocess.run(
        [sys.executable, "-c", CRASH_IN_ZERO, str(db_path), "b"], cwd=REPO, capture_output=True, timeout=60
    )
    assert child.returncode == 9, child.stderr
    with Registry(db_path) as reg:
        assert reg.list() == before


def test_vsas_and_bytes_are_bounded_per_uid_and_root_is_exempt(db_path: Path) -> None:
    limits = Limits(max_vsas_per_uid=3, max_bytes_per_uid=6 * MIB)
    with Registry(db_path, CAPACITY, limits=limits) as reg:
        for index in range(3):
            reg.create_vsa(f"a{index}", MIB, ATTACKER)
        with pytest.raises(QuotaExceeded, match="owns 3 VSAs, the most a uid may own is 3"):
            reg.create_vsa("a3", MIB, ATTACKER)
        reg.create_vsa("v0", 4 * MIB, VICTIM)  # the bound is per uid: another one is unaffected
        reg.resize_vsa("a0", 4 * MIB, ATTACKER)  # 6 MiB held: exactly the bound
        with pytest.raises(QuotaExceeded, match="would hold 7 MiB of VSAs, the most a uid may hold is 6 MiB"):
            reg.resize_vsa("a1", 2 * MIB, ATTACKER)
        with pytest.raises(QuotaExceeded, match="the most a uid may hold is 6 MiB"):
            reg.create_vsa("v1", 3 * MIB, VICTIM)
        assert reg.usage(ATTACKER) == (3, 6 * MIB)
        reg.resize_vsa("a0", MIB, ATTACKER)  # shrinking is always allowed, and frees quota
        reg.resize_vsa("a1", 4 * MIB, ATTACKER)
        # Root is exempt, for its own VSAs and when it acts on someone else's.
        for index in range(5):
            reg.create_vsa(f"r{index}", 2 * MIB, 0)
        reg.resize_vsa("a2", 8 * MIB, 0)
        assert reg.usage(ATTACKER) == (3, 13 * MIB)
        with pytest.raises(QuotaExceeded):
            reg.resize_vsa("a2", 9 * MIB, ATTACKER)  # ...but that does not lift the owner's bound


def test_grants_per_vsa_are_bounded(reg: Registry) -> None:
    reg.create_vsa("a", MIB, ATTACKER)
    for grantee in range(2000, 2000 + DEFAULT_MAX_GRANTS_PER_VSA):
        reg.grant("a", grantee, "ro", ATTACKER)
    with pytest.raises(QuotaExceeded, match=f"has {DEFAULT_MAX_GRANTS_PER_VSA} grants"):
        reg.grant("a", 3000, "ro", ATTACKER)
    reg.grant("a", 2000, "rw", ATTACKER)  # replacing a grant adds none
    reg.revoke("a", 2001, ATTACKER)
    reg.grant("a", 3000, "ro", ATTACKER)
    reg.grant("a", 3001, "ro", 0)  # root is exempt
    assert len(reg.get("a").grants) == DEFAULT_MAX_GRANTS_PER_VSA + 1


def checkerboard(reg: Registry, holes: int) -> None:
    """Fill the device with 1-unit VSAs of root's, then free every other one: ``holes``
    separate 1-unit gaps (and one large gap after them, filled by "rest")."""
    for index in range(2 * holes):
        reg.create_vsa(f"f{index}", MIB, 0)
    reg.create_vsa("rest", reg.free_blocks() * 4096, 0)
    for index in range(1, 2 * holes, 2):
        reg.delete_vsa(f"f{index}", 0)
    assert reg.free_blocks() == holes * UNIT


def test_extents_per_vsa_are_bounded_even_on_fragmented_space(db_path: Path) -> None:
    limits = Limits(max_extents_per_vsa=4)
    with Registry(db_path, CAPACITY, limits=limits) as reg:
        checkerboard(reg, 6)
        with pytest.raises(QuotaExceeded, match="too fragmented: .* past 4 extents"):
            reg.create_vsa("a", 5 * MIB, ATTACKER)
        a = reg.create_vsa("a", 3 * MIB, ATTACKER)
        assert len(a.extents) == 3
        with pytest.raises(QuotaExceeded, match="past 4 extents"):
            reg.resize_vsa("a", 5 * MIB, ATTACKER)
        reg.resize_vsa("a", 4 * MIB, ATTACKER)
        reg.delete_vsa("a", ATTACKER)
        assert len(reg.create_vsa("r", 6 * MIB, 0).extents) == 6  # root: only the VSIC's bound


def test_largest_gaps_first_when_first_fit_would_take_too_many_extents(db_path: Path) -> None:
    with Registry(db_path, CAPACITY, limits=Limits(max_extents_per_vsa=2)) as reg:
        for index in range(6):
            reg.create_vsa(f"f{index}", MIB, 0)
        reg.delete_vsa("f1", 0)
        reg.delete_vsa("f3", 0)  # holes at units 1 and 3, then units 6.. are free
        first_fit = reg.create_vsa("small", 2 * MIB, ATTACKER)
        assert first_fit.extents == (Extent(UNIT, UNIT), Extent(3 * UNIT, UNIT))
        reg.delete_vsa("small", ATTACKER)
        # Three units by first fit would be three extents: the large gap instead.
        assert reg.create_vsa("big", 3 * MIB, ATTACKER).extents == (Extent(6 * UNIT, 3 * UNIT),)


def test_an_open_vsa_is_never_shrunk_or_deleted_but_may_grow(reg: Registry) -> None:
    reg.create_vsa("a", 2 * MIB, ATTACKER)
    reg.create_vsa("b", MIB, VICTIM)
    busy = frozenset({"a"})
    with pytest.raises(Busy, match="open: close every function on it before shrinking it"):
        reg.resize_vsa("a", MIB, ATTACKER, busy=busy)
    with pytest.raises(Busy, match="before deleting it"):
        reg.delete_vsa("a", 0, busy=busy)  # root too: the function would write into the next owner's blocks
    before = reg.get("a")
    grown = reg.resize_vsa("a", 4 * MIB, ATTACKER, busy=busy)
    assert grown.extents[: len(before.extents)] == before.extents  # the open function's extents stay the VSA's
    reg.delete_vsa("b", VICTIM, busy=busy)  # other VSAs are not held up
    reg.resize_vsa("a", MIB, ATTACKER)
    reg.delete_vsa("a", ATTACKER)


@pytest.mark.parametrize(
    "limits",
    [
        {"max_vsas_per_uid": -1},
        {"max_bytes_per_uid": "lots"},
        {"max_grants_per_vsa": True},
        {"max_extents_per_vsa": 0},
        {"max_extents_per_vsa": HARD_MAX_EXTENTS + 1},
        {"exempt_uids": frozenset({-1})},
        {"exempt_uids": [0]},
    ],
)
def test_bad_limits_are_refused(limits: dict[str, Any]) -> None:
    with pytest.raises(RegistryError):
        Limits(**limits)


def test_the_hard_extent_bound_is_the_vsics() -> None:
    assert HARD_MAX_EXTENTS == VSIC_MAX_EXTENTS
    assert DEFAULT_LIMITS.max_extents_per_vsa <= HARD_MAX_EXTENTS


def test_limits_come_from_the_policys_storage_table(tmp_path: Path) -> None:
    assert parse_storage_limits("") == DEFAULT_LIMITS
    limits = parse_storage_limits(
        '[[rule]]\nuid = "*"\nports = "*"\n[storage]\nmax_vsas_per_uid = 2\nmax_bytes_per_uid = 1048576\n'
        "exempt_uids = [0, 42]\n"
    )
    assert limits == Limits(max_vsas_per_uid=2, max_bytes_per_uid=MIB, exempt_uids=frozenset({0, 42}))
    path = tmp_path / "policy.toml"
    path.write_text("[storage]\nmax_grants_per_vsa = 0\n")
    assert storage_limits(Policy.load(path)).max_grants_per_vsa == 0
    assert storage_limits(Policy()) == DEFAULT_LIMITS


@pytest.mark.parametrize(
    "text",
    [
        "storage = 3",
        "[storage]\nmax_vsas = 3",
        "[storage]\nmax_vsas_per_uid = -1",
        "[storage]\nmax_extents_per_vsa = 100000",
        "[storage]\nexempt_uids = 0",
        "[storage]\nexempt_uids = ['root']",
        "[storage\n",
    ],
)
def test_a_bad_storage_table_is_refused(text: str) -> None:
    with pytest.raises(StorageConfigError):
        parse_storage_limits(text)


def test_zero_extents_writes_zeros_where_there_is_no_blkzeroout(tmp_path: Path) -> None:
    path = tmp_path / "image-vsaharden"
    path.write_bytes(b"S" * (4 * UNIT * 4096))
    fd = os.open(path, os.O_RDWR)
    try:
        zero_extents(fd, [Extent(UNIT, UNIT), Extent(3 * UNIT, UNIT)])
    finally:
        os.close(fd)
    data = path.read_bytes()
    unit = UNIT * 4096
    assert data[:unit] == b"S" * unit and data[2 * unit : 3 * unit] == b"S" * unit
    assert data[unit : 2 * unit] == bytes(unit) and data[3 * unit :] == bytes(unit)


# ---- attacks as uid 1000 on a real instance ----------------------------------------------

# An app that opens a VSA with libos.storage.vsa.open_vsa and obeys one JSON command a line.
APP = textwrap.dedent(
    """
    import json, sys
    from libos.storage.vsa import open_vsa

    tag, name = sys.argv[1], sys.argv[2]
    with open_vsa(name, instance=tag) as vsa:
        device = vsa.device
        print(json.dumps({"blocks": device.num_blocks}), flush=True)
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "fill":
                device.write(command["block"], bytes([command["byte"]]) * (command["count"] * 4096), fua=True)
                reply = {"ok": True}
            elif command["op"] == "read":
                data = device.read(command["block"], command["count"])
                reply = {"bytes": sorted(set(data))}
            else:
                break
            print(json.dumps(reply), flush=True)
    """
)


def as_uid(uid: int, *argv: str) -> list[str]:
    """``python argv...`` as ``uid`` with no supplementary groups."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", PYTHON, *argv]


def kctl(uid: int, tag: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``kernelctl vsa ...`` run by ``uid``; not checked (refusals are what some tests want)."""
    return subprocess.run(
        as_uid(uid, "-m", "kernelctl.cli", "--instance", tag, "vsa", *args),
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def kctl_ok(uid: int, tag: str, *args: str) -> None:
    result = kctl(uid, tag, *args)
    assert result.returncode == 0, f"uid {uid}: kernelctl vsa {' '.join(args)}: {result.stderr}"


def kctl_refused(uid: int, tag: str, *args: str, match: str) -> None:
    result = kctl(uid, tag, *args)
    assert result.returncode == 1, f"uid {uid}: kernelctl vsa {' '.join(args)} was not refused: {result.stdout}"
    assert match in result.stderr, result.stderr


class App:
    """The APP above, run by ``uid`` with ``setpriv``, holding ``name`` open until closed."""

    def __init__(self, uid: int, tag: str, name: str) -> None:
        self.proc = subprocess.Popen(
            as_uid(uid, "-c", APP, tag, name), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        self.blocks = self._reply()["blocks"]

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # the app always answers or exits (then "")
        if not line:
            self.proc.wait(30)
            assert self.proc.stderr is not None
            raise AssertionError(f"the app failed: {self.proc.stderr.read()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def command(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def run_app(uid: int, tag: str, name: str, *commands: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
    app = App(uid, tag, name)
    try:
        return app.blocks, [app.command(**command) for command in commands]
    finally:
        app.close()


def listing(topo: Topology) -> dict[str, Any]:
    with ControlClient(topo.control_socket) as client:
        result, _fds = client.request("vsa_list")
    assert isinstance(result, dict)
    return result


def extents_of(topo: Topology, name: str) -> set[tuple[int, int]]:
    vsa = {v["name"]: v for v in listing(topo)["vsas"]}[name]
    return {(start, count) for start, count in vsa["extents"]}


def blocks_of(extents: set[tuple[int, int]]) -> set[int]:
    return {block for start, count in extents for block in range(start, start + count)}


def wait_until_closed(topo: Topology, name: str, timeout: float = 30.0) -> None:
    """Until the daemon no longer lists a function on VSA ``name``."""
    deadline = time.monotonic() + timeout
    while True:
        with ControlClient(topo.control_socket) as client:
            functions = client.status()["functions"]
        if not any(f["name"] == f"vsa:{name}" for f in functions):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"a function on {name} is still listed: {functions}")
        time.sleep(0.05)  # polling a condition, with the deadline above


@pytest.mark.root
def test_blocks_of_another_uids_deleted_or_shrunk_vsa_read_back_as_zeros(instance: Topology) -> None:
    tag = instance.tag
    # The victim writes a secret over all of an 8 MiB VSA.
    kctl_ok(VICTIM, tag, "create", "victim", "8M")
    blocks, _ = run_app(VICTIM, tag, "victim", {"op": "fill", "block": 0, "byte": 0x5A, "count": 2048})
    assert blocks == 2048
    victim_blocks = blocks_of(extents_of(instance, "victim"))
    # Shrinking releases the second half: the attacker's next VSA is laid over it.
    kctl_ok(VICTIM, tag, "resize", "victim", "4M")
    kctl_ok(ATTACKER, tag, "create", "loot1", "4M")
    assert blocks_of(extents_of(instance, "loot1")) <= victim_blocks  # the same blocks, or the test proves nothing
    _, replies = run_app(ATTACKER, tag, "loot1", {"op": "read", "block": 0, "count": 1024})
    assert replies == [{"bytes": [0]}]
    # Deleting releases the rest.
    kctl_ok(VICTIM, tag, "delete", "victim")
    kctl_ok(ATTACKER, tag, "create", "loot2", "4M")
    assert blocks_of(extents_of(instance, "loot2")) <= victim_blocks
    _, replies = run_app(ATTACKER, tag, "loot2", {"op": "read", "block": 0, "count": 1024})
    assert replies == [{"bytes": [0]}]
    # Growing over released blocks zeroes them too: the attacker writes, deletes, the
    # victim's VSA grows over the same blocks and reads zeros there.
    kctl_ok(VICTIM, tag, "create", "victim", "4M")
    run_app(ATTACKER, tag, "loot1", {"op": "fill", "block": 0, "byte": 0x66, "count": 1024})
    kctl_ok(ATTACKER, tag, "delete", "loot1")
    kctl_ok(VICTIM, tag, "resize", "victim", "8M")
    _, replies = run_app(VICTIM, tag, "victim", {"op": "read", "block": 1024, "count": 1024})
    assert replies == [{"bytes": [0]}]


@pytest.mark.root
def test_one_uid_cannot_take_all_the_storage(instance: Topology) -> None:
    tag = instance.tag
    # VSAs: the bound, then a clear refusal, through the control socket and on the CLI.
    flood = textwrap.dedent(
        """
        import json, sys
        from kernelctl.client import ControlClient, ControlError
        from kernelctl.names import topology

        results = []
        with ControlClient(topology(sys.argv[1]).control_socket) as client:
            for index in range(int(sys.argv[2])):
                try:
                    client.request("vsa_create", name=f"q{index}", size_bytes=1 << 20)
                    results.append("ok")
                except ControlError as exc:
                    results.append(str(exc))
        print(json.dumps(results))
        """
    )
    out = subprocess.run(
        as_uid(ATTACKER, "-c", flood, tag, str(DEFAULT_MAX_VSAS_PER_UID + 4)),
        capture_output=True, text=True, timeout=120, cwd=REPO, check=True,
    ).stdout
    results = json.loads(out)
    assert results[:DEFAULT_MAX_VSAS_PER_UID] == ["ok"] * DEFAULT_MAX_VSAS_PER_UID
    for refusal in results[DEFAULT_MAX_VSAS_PER_UID:]:
        assert f"the most a uid may own is {DEFAULT_MAX_VSAS_PER_UID}" in refusal
    kctl_refused(ATTACKER, tag, "create", "one-more", "1M", match="quota: uid 1000 owns 16 VSAs")
    usage = json.loads(kctl(ATTACKER, tag, "ls", "-j").stdout)["usage"]
    assert usage == {"uid": ATTACKER, "vsas": DEFAULT_MAX_VSAS_PER_UID, "bytes": DEFAULT_MAX_VSAS_PER_UID * MIB}
    kctl_ok(ATTACKER, tag, "delete", "q0")
    kctl_ok(ATTACKER, tag, "delete", "q1")
    # Bytes: up to the bound, not one unit more, by create or by grow.
    quota_mib = DEFAULT_MAX_BYTES_PER_UID >> 20
    held_mib = DEFAULT_MAX_VSAS_PER_UID - 2
    kctl_ok(ATTACKER, tag, "create", "big", f"{quota_mib - held_mib - 1}M")
    kctl_refused(ATTACKER, tag, "create", "big2", "2M", match=f"the most a uid may hold is {quota_mib} MiB")
    kctl_refused(ATTACKER, tag, "resize", "big", f"{quota_mib - held_mib + 1}M", match="quota")
    kctl_ok(ATTACKER, tag, "resize", "big", f"{quota_mib - held_mib}M")  # exactly the bound
    # Grants per VSA.
    kctl_ok(ATTACKER, tag, "delete", "q2")
    kctl_ok(ATTACKER, tag, "create", "shared", "1M")
    grant = textwrap.dedent(
        """
        import json, sys
        from kernelctl.client import ControlClient, ControlError
        from kernelctl.names import topology

        results = []
        with ControlClient(topology(sys.argv[1]).control_socket) as client:
            for uid in range(2000, 2000 + int(sys.argv[2])):
                try:
                    client.request("vsa_grant", name="shared", uid=uid, mode="ro")
                    results.append("ok")
                except ControlError as exc:
                    results.append(str(exc))
        print(json.dumps(results))
        """
    )
    out = subprocess.run(
        as_uid(ATTACKER, "-c", grant, tag, str(DEFAULT_MAX_GRANTS_PER_VSA + 2)),
        capture_output=True, text=True, timeout=120, cwd=REPO, check=True,
    ).stdout
    results = json.loads(out)
    assert results[:DEFAULT_MAX_GRANTS_PER_VSA] == ["ok"] * DEFAULT_MAX_GRANTS_PER_VSA
    assert all("the most a VSA may have is 16" in refusal for refusal in results[DEFAULT_MAX_GRANTS_PER_VSA:])
    kctl_refused(ATTACKER, tag, "grant", "shared", "4000", "rw", match="quota: VSA 'shared' has 16 grants")
    # The rest of the device is still there for others; root is not bound.
    kctl_ok(VICTIM, tag, "create", "victim", "64M")
    kctl_ok(ATTACKER, tag, "delete", "big")
    with ControlClient(instance.control_socket) as root:
        for index in range(DEFAULT_MAX_VSAS_PER_UID + 1):
            root.request("vsa_create", name=f"r{index}", size_bytes=MIB)
        root.request("vsa_create", name="r-big", size_bytes=DEFAULT_MAX_BYTES_PER_UID + MIB)


@pytest.mark.root
def test_fragmented_space_cannot_give_a_uid_more_extents_than_its_bound(instance: Topology) -> None:
    holes = DEFAULT_MAX_EXTENTS_PER_VSA + 1
    with ControlClient(instance.control_socket) as root:
        for index in range(2 * holes):
            root.request("vsa_create", name=f"f{index}", size_bytes=MIB)
        root.request("vsa_create", name="rest", size_bytes=listing(instance)["free_bytes"])
        for index in range(1, 2 * holes, 2):
            root.request("vsa_delete", name=f"f{index}")
    assert listing(instance)["free_bytes"] == holes * MIB
    kctl_refused(
        ATTACKER, instance.tag, "create", "frag", f"{holes}M",
        match=f"too fragmented: {holes * UNIT} blocks would take the VSA past {DEFAULT_MAX_EXTENTS_PER_VSA} extents",
    )
    kctl_ok(ATTACKER, instance.tag, "create", "frag", f"{holes - 1}M")
    assert len(extents_of(instance, "frag")) == DEFAULT_MAX_EXTENTS_PER_VSA
    # The VSIC takes it: the attacker's app opens and uses all of it.
    blocks, replies = run_app(
        ATTACKER, instance.tag, "frag", {"op": "fill", "block": 0, "byte": 7, "count": (holes - 1) * UNIT},
        {"op": "read", "block": 0, "count": (holes - 1) * UNIT},
    )
    assert blocks == (holes - 1) * UNIT and replies[1] == {"bytes": [7]}


@pytest.mark.root
def test_an_open_vsa_cannot_be_shrunk_or_deleted_under_its_function(instance: Topology) -> None:
    tag = instance.tag
    kctl_ok(ATTACKER, tag, "create", "mine", "8M")
    app = App(ATTACKER, tag, "mine")
    try:
        assert app.blocks == 2048
        assert app.command(op="fill", block=2047, byte=0x77, count=1) == {"ok": True}
        before = extents_of(instance, "mine")
        # The attack: give the blocks back while the function still has them.
        kctl_refused(ATTACKER, tag, "resize", "mine", "4M", match="is open: close every function on it")
        kctl_refused(ATTACKER, tag, "delete", "mine", match="(EBUSY)")
        with ControlClient(instance.control_socket) as root:
            with pytest.raises(ControlError, match="is open"):
                root.request("vsa_delete", name="mine")
        assert extents_of(instance, "mine") == before
        # Growing is safe: the function keeps a prefix of the VSA, and still works.
        kctl_ok(ATTACKER, tag, "resize", "mine", "16M")
        assert blocks_of(before) <= blocks_of(extents_of(instance, "mine"))
        assert app.command(op="read", block=2047, count=1) == {"bytes": [0x77]}
        assert app.command(op="fill", block=0, byte=0x78, count=2048) == {"ok": True}
    finally:
        app.close()
    wait_until_closed(instance, "mine")
    # Closed: now the shrink goes through, and the next VSA over the tail reads zeros.
    kctl_ok(ATTACKER, tag, "resize", "mine", "4M")
    kctl_ok(VICTIM, tag, "create", "next", "12M")
    assert len(blocks_of(extents_of(instance, "next")) & blocks_of(before)) == 1024
    _, replies = run_app(VICTIM, tag, "next", {"op": "read", "block": 0, "count": 3072})
    assert replies == [{"bytes": [0]}]
    kctl_ok(ATTACKER, tag, "delete", "mine")
