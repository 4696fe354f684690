"""One write transaction on a kernelctl SQLite file (the VSA registry, the name tree)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def immediate(db: sqlite3.Connection, what: str, error: Callable[[str], Exception]) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on ``db``: the write lock is taken up front, so a check and
    the change that depends on it see the same database even with a second writer. SQLite
    failures become ``error("<what>: ...")``; any exception rolls back."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as exc:
        raise error(f"{what} is unusable: {exc}") from exc
    try:
        yield db
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        _rollback(db)
        raise error(f"{what}: {exc}") from exc
    except BaseException:
        _rollback(db)
        raise


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite already rolled back (e.g. after SQLITE_FULL); nothing is committed
