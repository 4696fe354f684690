"""The global name tree: paths such as ``/apps/kv-6379/keys``, kept in SQLite.

Arrakis keeps global naming in the kernel ("virtual file system still in kernel, storage
implementation in applications"). Here kernelctl is that kernel: this module holds every
name with its owner, mode and kind, and decides access, once, when a name is opened. What
a name leads to is the kind's business:

* ``dir``: a directory of names;
* ``served``: a file a live application serves (way 1, the file server RPC): the daemon
  hands an opener a connected socket to the application and steps off the path;
* ``store``: a file in the file store on a VSA (way 2, a shared VSA): the opener maps the
  VSA itself, and the VSA's grants decide as they always do;
* ``vsa``: the VSA itself, under ``/vsa/<name>``. These names are not stored: they are the
  VSA registry seen as a directory, so they can never disagree with it.

Names of kind ``served`` and the directories an application made to hold them belong to a
*server* (a number the daemon gives each live file server). They are withdrawn whole when
the server goes away, and on start-up, since no server outlives the daemon that knew it.
Names of kind ``store`` and directories made by hand stay until ``rm`` or ``down --purge``.

Access follows POSIX: root may do anything; the owner's, the group's or the others' bits
of ``mode`` apply, in that order; every directory on the way needs its ``x`` bit; making or
removing a name needs ``w`` (and ``x``) on its directory, and in a sticky directory (``/apps``
is ``1777``, like ``/tmp``) only the name's owner may remove it.

The database is input like any other: every row read back is checked and a bad one is a
``NameError_``, never a crash of the daemon. Bounds: ``MAX_PATH``, ``MAX_COMPONENT``,
``MAX_DEPTH``, ``MAX_NAMES_PER_UID`` (root is bounded only by ``MAX_NAMES``), ``MAX_LIST``.
"""

from __future__ import annotations

import builtins
import re
import sqlite3
import stat as statmod
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kernelctl.sqlite_tx import immediate

Kind = Literal["dir", "served", "store", "vsa"]
KINDS: tuple[str, ...] = ("dir", "served", "store", "vsa")
STORED_KINDS: tuple[str, ...] = ("dir", "served", "store")

MAX_PATH = 1024  # characters of a whole path
MAX_COMPONENT = 128  # characters of one component
MAX_DEPTH = 16  # components of a path
MAX_NAMES_PER_UID = 20_000  # names one uid (not root) may hold
MAX_NAMES = 200_000  # names in all
MAX_LIST = 20_000  # entries one listing returns: a reply stays under ~4 MiB (the daemon holds one per caller)
MAX_TARGET = 256  # characters of a store name's target
MODE_BITS = 0o7777
ROOT_UID = 0
MAX_UID = 2**32 - 2
VSA_DIR = "/vsa"
APPS_DIR = "/apps"

R, W, X = 4, 2, 1

_COMPONENT = re.compile(r"[A-Za-z0-9._+@:,=-]{1,%d}" % MAX_COMPONENT)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS name_entry (path TEXT PRIMARY KEY, parent TEXT NOT NULL,"
    " kind TEXT NOT NULL, owner_uid INTEGER NOT NULL, owner_gid INTEGER NOT NULL,"
    " mode INTEGER NOT NULL, target TEXT NOT NULL, server INTEGER NOT NULL, mtime REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS name_entry_parent ON name_entry (parent)",
    "CREATE INDEX IF NOT EXISTS name_entry_server ON name_entry (server)",
)
# The names every tree starts with: root-owned; /apps is sticky and world-writable so any
# application may make its own directory there, and only remove its own.
_BASE = (("/", 0o755), (APPS_DIR, 0o1777), (VSA_DIR, 0o755))


class NameError_(Exception):
    """A name request that is refused; ``errno_name`` says which errno it maps to."""

    errno_name = "EINVAL"


class NoSuchName(NameError_):
    errno_name = "ENOENT"


class NameExists(NameError_):
    errno_name = "EEXIST"


class NameDenied(NameError_):
    errno_name = "EACCES"


class NameQuota(NameError_):
    errno_name = "EDQUOT"


class NotEmpty(NameError_):
    errno_name = "ENOTEMPTY"


@dataclass(frozen=True)
class Caller:
    uid: int
    gid: int


@dataclass(frozen=True)
class Name:
    path: str
    kind: str
    owner_uid: int
    owner_gid: int
    mode: int
    target: str = ""  # store: "VSA:FILE"; vsa: the VSA's name
    server: int = 0  # served names and their directories: the server that holds them
    mtime: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "name": self.path.rsplit("/", 1)[-1] or "/",
            "kind": self.kind,
            "owner_uid": self.owner_uid,
            "owner_gid": self.owner_gid,
            "mode": self.mode,
            "mode_text": mode_text(self.kind, self.mode),
            "target": self.target,
            "server": self.server,
            "mtime": self.mtime,
        }


def mode_text(kind: str, mode: int) -> str:
    """``drwxr-xr-x`` style, as ls -l prints it."""
    kind_bits = statmod.S_IFDIR if kind == "dir" else statmod.S_IFREG
    return statmod.filemode(kind_bits | (mode & MODE_BITS))


def split_path(path: object) -> tuple[str, ...]:
    """The components of an absolute path, checked; ``()`` for ``/``."""
    if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_PATH:
        raise NameError_(f"a name is an absolute path of at most {MAX_PATH} characters, not {str(path)[:40]!r}")
    parts = tuple(part for part in path.split("/") if part)
    if len(parts) > MAX_DEPTH:
        raise NameError_(f"a name has at most {MAX_DEPTH} components")
    for part in parts:
        if part in (".", "..") or _COMPONENT.fullmatch(part) is None:
            raise NameError_(f"bad name component {part[:40]!r}: 1-{MAX_COMPONENT} of A-Z a-z 0-9 . _ + @ : , = -")
    return parts


def normalize(path: object) -> str:
    return "/" + "/".join(split_path(path))


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def permits(name: Name, caller: Caller, want: int) -> bool:
    """POSIX permission bits: owner, else group, else others; root passes."""
    if caller.uid == ROOT_UID:
        return True
    if caller.uid == name.owner_uid:
        bits = name.mode >> 6
    elif caller.gid == name.owner_gid:
        bits = name.mode >> 3
    else:
        bits = name.mode
    return bits & want == want


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


VsaLookup = Callable[[], Iterable[tuple[str, int]]]  # (name, owner uid) of every VSA


class NameTree:
    """The tree in the SQLite file at ``path`` (the VSA registry's file: one database holds
    everything that must survive ``down``/``up``). ``vsas`` lists the VSAs for ``/vsa``."""

    def __init__(self, path: str | Path, vsas: VsaLookup | None = None, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._vsas = vsas or (lambda: ())
        self._vsa_snapshot: dict[str, int] = {}
        self._clock = clock
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise NameError_(f"cannot open the name tree {self.path}: {exc}") from exc
        try:
            with self._transaction() as db:
                for statement in _SCHEMA:
                    db.execute(statement)
                for base, mode in _BASE:
                    db.execute(
                        "INSERT OR IGNORE INTO name_entry VALUES (?, ?, 'dir', 0, 0, ?, '', 0, ?)",
                        (base, parent_of(base) if base != "/" else "", mode, self._clock()),
                    )
                # No server outlives the daemon that knew it: its names go with it.
                db.execute("DELETE FROM name_entry WHERE server != 0")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return immediate(self._db, f"name tree {self.path}", NameError_)

    # ---- reading -------------------------------------------------------------------------

    def _row(self, row: tuple[object, ...]) -> Name:
        path, kind, uid, gid, mode, target, server, mtime = row
        if not isinstance(path, str) or kind not in STORED_KINDS:
            raise NameError_(f"{self.path}: bad name row {row!r}")
        if not all(_is_int(v) for v in (uid, gid, mode, server)) or not isinstance(target, str):
            raise NameError_(f"{self.path}: bad name row {row!r}")
        if not (0 <= uid <= MAX_UID and 0 <= gid <= MAX_UID and 0 <= mode <= MODE_BITS and server >= 0):  # type: ignore[operator]
            raise NameError_(f"{self.path}: bad name row {row!r}")
        if not isinstance(mtime, (int, float)):
            raise NameError_(f"{self.path}: bad name row {row!r}")
        return Name(path, str(kind), uid, gid, mode, target, server, float(mtime))  # type: ignore[arg-type]

    _COLUMNS = "path, kind, owner_uid, owner_gid, mode, target, server, mtime"

    def _get(self, db: sqlite3.Connection, path: str) -> Name | None:
        if path.startswith(VSA_DIR + "/"):
            return self._vsa_name(path)
        row = db.execute(f"SELECT {self._COLUMNS} FROM name_entry WHERE path = ?", (path,)).fetchone()
        return self._row(row) if row is not None else None

    def _vsa_name(self, path: str) -> Name | None:
        owner = self._vsa_snapshot.get(path[len(VSA_DIR) + 1 :])
        if owner is None:
            return None
        # A VSA is reached through open_vsa, whose grants decide; its name shows the owner's
        # rights only.
        return Name(path, "vsa", owner, owner, 0o600, target=path[len(VSA_DIR) + 1 :])

    @contextmanager
    def _reading(self, path: str) -> Iterator[sqlite3.Connection]:
        """A transaction, with the VSAs read first when ``path`` is under /vsa: the VSA
        registry is another connection to the same file, and asking it from inside our own
        write-locked transaction would wait on ourselves."""
        under_vsa = path == VSA_DIR or path.startswith(VSA_DIR + "/")
        self._vsa_snapshot = dict(self._vsas()) if under_vsa else {}
        with self._transaction() as db:
            yield db

    def _walk(self, db: sqlite3.Connection, path: str, caller: Caller) -> Name:
        """The name at ``path`` after checking ``x`` on every directory above it."""
        parts = split_path(path)
        here = "/"
        for part in parts:
            directory = self._get(db, here)
            if directory is None or directory.kind != "dir":
                raise NoSuchName(f"no such name: {path}")
            if not permits(directory, caller, X):
                raise NameDenied(f"uid {caller.uid} may not search {here}")
            here = here.rstrip("/") + "/" + part
        name = self._get(db, here)
        if name is None:
            raise NoSuchName(f"no such name: {path}")
        return name

    def lookup(self, path: str, caller: Caller) -> Name:
        path = normalize(path)
        with self._reading(path) as db:
            return self._walk(db, path, caller)

    def check_open(self, path: str, caller: Caller, write: bool) -> Name:
        """Access, checked once at open: ``r`` (and ``w`` to write) on the name."""
        name = self.lookup(path, caller)
        want = R | (W if write else 0)
        if name.kind != "vsa" and not permits(name, caller, want):
            raise NameDenied(f"uid {caller.uid} may not {'write' if write else 'read'} {name.path}")
        return name

    def list(self, path: str, caller: Caller) -> tuple[Name, builtins.list[Name]]:
        """A directory and its entries (``r`` on it), or a single name as its own entry."""
        path = normalize(path)
        with self._reading(path) as db:
            name = self._walk(db, path, caller)
            if name.kind != "dir":
                return name, [name]
            if not permits(name, caller, R):
                raise NameDenied(f"uid {caller.uid} may not list {path}")
            if path == VSA_DIR:
                entries = [
                    Name(f"{VSA_DIR}/{v}", "vsa", o, o, 0o600, target=v) for v, o in sorted(self._vsa_snapshot.items())
                ]
            else:
                rows = db.execute(
                    f"SELECT {self._COLUMNS} FROM name_entry WHERE parent = ? ORDER BY path LIMIT ?",
                    (path, MAX_LIST + 1),
                ).fetchall()
                entries = [self._row(row) for row in rows]
        if len(entries) > MAX_LIST:
            raise NameQuota(f"{path} holds more than {MAX_LIST} names; list a subdirectory")
        return name, entries

    def count(self, uid: int | None = None) -> int:
        with self._transaction() as db:
            if uid is None:
                return int(db.execute("SELECT COUNT(*) FROM name_entry").fetchone()[0])
            return int(db.execute("SELECT COUNT(*) FROM name_entry WHERE owner_uid = ?", (uid,)).fetchone()[0])

    # ---- changing ------------------------------------------------------------------------

    def _check_quota(self, db: sqlite3.Connection, caller: Caller, adding: int) -> None:
        total = int(db.execute("SELECT COUNT(*) FROM name_entry").fetchone()[0])
        if total + adding > MAX_NAMES:
            raise NameQuota(f"the name tree holds {total} names (limit {MAX_NAMES})")
        if caller.uid == ROOT_UID:
            return
        held = int(db.execute("SELECT COUNT(*) FROM name_entry WHERE owner_uid = ?", (caller.uid,)).fetchone()[0])
        if held + adding > MAX_NAMES_PER_UID:
            raise NameQuota(f"uid {caller.uid} holds {held} names (limit {MAX_NAMES_PER_UID})")

    def _check_parent(self, db: sqlite3.Connection, path: str, caller: Caller) -> Name:
        if path == "/" or path == VSA_DIR or path.startswith(VSA_DIR + "/"):
            raise NameDenied(f"{path} is not a name one can make")
        parent = self._walk(db, parent_of(path), caller)
        if parent.kind != "dir":
            raise NoSuchName(f"{parent.path} is not a directory")
        if not permits(parent, caller, W | X):
            raise NameDenied(f"uid {caller.uid} may not make names in {parent.path}")
        return parent

    def add(
        self,
        entries: Iterable[tuple[str, str, int, str]],
        caller: Caller,
        server: int = 0,
        replace_own: bool = False,
    ) -> builtins.list[Name]:
        """Make names: ``(path, kind, mode, target)`` each, in order, in one transaction
        (all or none). Parents must exist (an entry may make the parent of a later one).
        ``server`` ties them to a live file server. With ``replace_own`` a name the caller's
        same server already holds is updated instead of refused."""
        made: builtins.list[Name] = []
        batch = list(entries)
        now = self._clock()
        with self._transaction() as db:
            self._check_quota(db, caller, len(batch))
            for path, kind, mode, target in batch:
                path = normalize(path)
                if kind not in STORED_KINDS:
                    raise NameError_(f"kind must be one of {', '.join(STORED_KINDS)}, not {kind!r}")
                if (kind == "served") != (server != 0) and kind != "dir":
                    raise NameError_("served names come from a file server, and only they do")
                if not _is_int(mode) or not 0 <= mode <= MODE_BITS:
                    raise NameError_(f"mode must be in 0..0o7777, not {mode!r}")
                if not isinstance(target, str) or len(target) > MAX_TARGET:
                    raise NameError_(f"a target has at most {MAX_TARGET} characters")
                self._check_parent(db, path, caller)
                existing = self._get(db, path)
                if existing is not None and kind == "dir" and existing.kind == "dir" and existing.owner_uid == caller.uid:
                    continue  # mkdir -p: a directory of one's own is there already (it keeps its owner server)
                if existing is not None:
                    if not (replace_own and server and existing.server == server):
                        raise NameExists(f"{path} exists (owner uid {existing.owner_uid}, {existing.kind})")
                    db.execute("DELETE FROM name_entry WHERE path = ?", (path,))
                name = Name(path, kind, caller.uid, caller.gid, mode, target, server, now)
                db.execute(
                    "INSERT INTO name_entry VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (path, parent_of(path), kind, caller.uid, caller.gid, mode, target, server, now),
                )
                made.append(name)
        return made

    def remove(self, path: str, caller: Caller) -> Name:
        """``rm``: one name (a directory only when empty)."""
        path = normalize(path)
        with self._transaction() as db:
            parent = self._check_parent(db, path, caller)
            name = self._walk(db, path, caller)
            if parent.mode & statmod.S_ISVTX and caller.uid not in (ROOT_UID, name.owner_uid, parent.owner_uid):
                raise NameDenied(f"{parent.path} is sticky: only the owner of {path} may remove it")
            if name.kind == "dir":
                child = db.execute("SELECT 1 FROM name_entry WHERE parent = ? LIMIT 1", (path,)).fetchone()
                if child is not None:
                    raise NotEmpty(f"{path} is not empty")
            db.execute("DELETE FROM name_entry WHERE path = ?", (path,))
        return name

    def withdraw(self, server: int) -> int:
        """Every name of a server that went away; how many."""
        if server == 0:
            return 0
        with self._transaction() as db:
            dirs = [row[0] for row in db.execute(
                "SELECT path FROM name_entry WHERE server = ? AND kind = 'dir'", (server,))]
            removed = db.execute("DELETE FROM name_entry WHERE server = ?", (server,)).rowcount
            # Names others made inside the server's directories would be left without a
            # parent: they go too (they could only be made with the server's leave).
            for path in dirs:
                removed += db.execute(
                    "DELETE FROM name_entry WHERE substr(path, 1, ?) = ?", (len(path) + 1, path + "/")
                ).rowcount
            return removed
