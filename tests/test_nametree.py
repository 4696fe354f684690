"""The name tree (kernelctl/nametree.py) on a scratch SQLite file: no root needed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kernelctl import nametree
from kernelctl.nametree import Caller, NameTree

ROOT = Caller(0, 0)
ALICE = Caller(1000, 1000)
BOB = Caller(1001, 1001)


@pytest.fixture
def tree(tmp_path: Path) -> NameTree:
    return NameTree(tmp_path / "registry.sqlite", vsas=lambda: [("applog", 1000), ("other", 0)])


def test_base_tree_and_vsa_names(tree: NameTree) -> None:
    _, entries = tree.list("/", ROOT)
    assert [(e.path, e.mode) for e in entries] == [("/apps", 0o1777), ("/vsa", 0o755)]
    _, vsas = tree.list("/vsa", ALICE)
    assert [(e.path, e.kind, e.owner_uid) for e in vsas] == [("/vsa/applog", "vsa", 1000), ("/vsa/other", "vsa", 0)]
    assert tree.lookup("/vsa/applog", BOB).kind == "vsa"
    with pytest.raises(nametree.NoSuchName):
        tree.lookup("/vsa/nothing", ROOT)


def test_modes_decide_open_and_list(tree: NameTree) -> None:
    tree.add([("/apps/kv", "dir", 0o750, ""), ("/apps/kv/keys", "served", 0o640, ""),
              ("/apps/kv/open", "served", 0o644, "")], ALICE, server=7)
    assert tree.check_open("/apps/kv/keys", ALICE, write=True).kind == "served"
    with pytest.raises(nametree.NameDenied):  # others may not search a 0750 directory
        tree.check_open("/apps/kv/open", BOB, write=False)
    with pytest.raises(nametree.NameDenied):
        tree.list("/apps/kv", BOB)
    assert tree.check_open("/apps/kv/keys", Caller(1001, 1000), write=False).path == "/apps/kv/keys"  # group
    with pytest.raises(nametree.NameDenied):
        tree.check_open("/apps/kv/keys", Caller(1001, 1000), write=True)
    assert tree.check_open("/apps/kv/keys", ROOT, write=True)


def test_withdraw_takes_every_name_of_a_server_and_start_clears_served(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    tree = NameTree(path)
    tree.add([("/apps/a", "dir", 0o777, ""), ("/apps/a/f", "served", 0o644, "")], ALICE, server=3)
    tree.add([("/apps/a/bob", "dir", 0o755, "")], BOB)  # made inside the server's directory
    tree.add([("/apps/keep", "dir", 0o755, "")], BOB)
    tree.add([("/apps/b", "dir", 0o755, ""), ("/apps/b/g", "served", 0o644, "")], ALICE, server=4)
    assert tree.withdraw(3) == 3
    assert [e.path for e in tree.list("/apps", ROOT)[1]] == ["/apps/b", "/apps/keep"]
    tree.close()
    again = NameTree(path)  # a new daemon: no server outlives the old one
    assert [e.path for e in again.list("/apps", ROOT)[1]] == ["/apps/keep"]


def test_making_and_removing_follow_posix(tree: NameTree) -> None:
    tree.add([("/apps/alice", "dir", 0o755, "")], ALICE)
    with pytest.raises(nametree.NameDenied):  # no w on alice's directory
        tree.add([("/apps/alice/x", "dir", 0o755, "")], BOB)
    with pytest.raises(nametree.NameDenied):  # /apps is sticky
        tree.remove("/apps/alice", BOB)
    with pytest.raises(nametree.NameExists):
        tree.add([("/apps/alice", "dir", 0o755, "")], BOB)
    with pytest.raises(nametree.NameDenied):
        tree.add([("/vsa/mine", "dir", 0o755, "")], ROOT)
    tree.add([("/apps/alice/x", "dir", 0o755, "")], ALICE)
    with pytest.raises(nametree.NotEmpty):
        tree.remove("/apps/alice", ALICE)
    tree.remove("/apps/alice/x", ALICE)
    tree.remove("/apps/alice", ALICE)
    with pytest.raises(nametree.NoSuchName):
        tree.lookup("/apps/alice", ROOT)


def test_a_batch_is_all_or_nothing(tree: NameTree) -> None:
    with pytest.raises(nametree.NoSuchName):
        tree.add([("/apps/ok", "dir", 0o755, ""), ("/apps/missing/x", "dir", 0o755, "")], ALICE)
    with pytest.raises(nametree.NoSuchName):
        tree.lookup("/apps/ok", ROOT)


@pytest.mark.parametrize("path", ["", "apps", "/apps/../etc", "/apps/./x", "/apps/a b", "/" + "a/" * 17,
                                  "/apps/" + "x" * 129, "/apps/\x00", "/apps/é"])
def test_bad_paths_are_refused(tree: NameTree, path: str) -> None:
    with pytest.raises(nametree.NameError_):
        tree.add([(path, "dir", 0o755, "")], ROOT)


def test_only_servers_make_served_names_and_kinds_are_checked(tree: NameTree) -> None:
    with pytest.raises(nametree.NameError_):
        tree.add([("/apps/f", "served", 0o644, "")], ALICE)
    with pytest.raises(nametree.NameError_):
        tree.add([("/apps/f", "store", 0o644, "v:f")], ALICE, server=2)
    with pytest.raises(nametree.NameError_):
        tree.add([("/apps/f", "vsa", 0o644, "")], ROOT)
    with pytest.raises(nametree.NameError_):
        tree.add([("/apps/f", "dir", 0o17777, "")], ROOT)


def test_per_uid_quota(tree: NameTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nametree, "MAX_NAMES_PER_UID", 3)
    tree.add([("/apps/q", "dir", 0o755, ""), ("/apps/q/a", "dir", 0o755, "")], ALICE)
    with pytest.raises(nametree.NameQuota):
        tree.add([("/apps/q/b", "dir", 0o755, ""), ("/apps/q/c", "dir", 0o755, "")], ALICE)
    tree.add([("/apps/q/b", "dir", 0o755, "")], ALICE)
    tree.add([("/apps/r", "dir", 0o755, ""), ("/apps/s", "dir", 0o755, "")], ROOT)  # root: not bound


@pytest.mark.parametrize("column, value", [("kind", "bogus"), ("mode", -1), ("owner_uid", "x"), ("mode", 1 << 20)])
def test_a_corrupt_row_is_an_error_not_a_crash(tmp_path: Path, column: str, value: object) -> None:
    path = tmp_path / "registry.sqlite"
    NameTree(path).close()
    db = sqlite3.connect(path)
    db.execute(f"UPDATE name_entry SET {column} = ? WHERE path = '/apps'", (value,))
    db.commit()
    db.close()
    with pytest.raises(nametree.NameError_):
        NameTree(path).list("/", ROOT)


def test_a_server_may_publish_into_a_lasting_directory_of_its_uid(tree: NameTree) -> None:
    tree.add([("/apps/kv", "dir", 0o755, ""), ("/apps/kv/snapshot", "store", 0o644, "kv:snapshot")], ALICE)
    tree.add([("/apps/kv", "dir", 0o755, ""), ("/apps/kv/keys", "served", 0o444, "")], ALICE, server=5)
    with pytest.raises(nametree.NameExists):  # not another uid's
        tree.add([("/apps/kv", "dir", 0o755, "")], BOB, server=6)
    tree.withdraw(5)
    assert [e.path for e in tree.list("/apps/kv", ROOT)[1]] == ["/apps/kv/snapshot"]


def test_a_listing_is_bounded(tree: NameTree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nametree, "MAX_LIST", 3)
    tree.add([(f"/apps/n{i}", "dir", 0o755, "") for i in range(4)], ROOT)
    with pytest.raises(nametree.NameQuota):
        tree.list("/apps", ROOT)
    tree.list("/", ROOT)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(["apps", "..", ".", "", "a b", "x" * 130, "ok", "é"]),
                                                 max_size=20).map("/".join)))
def test_fuzz_paths_raise_only_name_errors(path: str) -> None:
    try:
        parts = nametree.split_path(path)
    except nametree.NameError_:
        return
    assert all(part not in (".", "..") and 0 < len(part) <= nametree.MAX_COMPONENT for part in parts)
    assert len(parts) <= nametree.MAX_DEPTH and nametree.normalize(path).startswith("/")
