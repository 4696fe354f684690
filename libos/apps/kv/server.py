"""The Redis-compatible server: a ``KvEngine`` behind the ``StreamServer`` loop
(``libos.apps.streams``), with active expiry run from the loop and, when a command log is
given, writes group-committed once per loop turn before their replies are released.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from libos.api import LibOS
from libos.apps.kv.commands import KvEngine
from libos.apps.kv.durable import CommandLog
from libos.apps.kv.session import KvSession
from libos.apps.streams import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    StreamServer,
    StreamSession,
    open_listener,
)

__all__ = ["DEFAULT_IDLE_TIMEOUT", "DEFAULT_MAX_CLIENTS", "KvConnection", "KvServer"]


class KvConnection:
    """A ``KvSession`` seen as a ``StreamSession``: the session's own methods, bound once
    (the loop calls them for every request; a wrapper method would double each call)."""

    __slots__ = ("kv", "feed", "take_output", "has_backlog", "close")

    def __init__(self, kv: KvSession) -> None:
        self.kv = kv
        self.feed: Callable[[bytes, float], None] = kv.feed
        self.take_output: Callable[[], bytes] = kv.take_output
        self.has_backlog: Callable[[], bool] = kv.has_pending
        self.close: Callable[[], None] = kv.close

    def should_close(self) -> bool:
        return self.kv.should_close


class KvServer:
    """The Redis-compatible server: a ``KvEngine`` behind a ``StreamServer``."""

    def __init__(self, los: LibOS, port: int, *, address: str = "0.0.0.0", backlog: int = 511,
                 clock: Callable[[], float] = time.time, engine: KvEngine | None = None,
                 max_clients: int = DEFAULT_MAX_CLIENTS, command_log: CommandLog | None = None) -> None:
        self.los = los
        self.clock = clock
        self.command_log = command_log
        if engine is None:
            engine = KvEngine(on_write=command_log.record if command_log else None, now=clock(), tcp_port=port)
        self.engine = engine
        self.replayed = command_log.replay(engine) if command_log is not None else 0
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.listen_qd = open_listener(los, address, port, backlog)
        self.server = StreamServer(los, self.listen_qd, self._new_session, clock=clock,
                                   max_clients=max_clients, on_turn=self._sweep,
                                   on_turn_end=self._commit if command_log is not None else None)

    def _new_session(self, now: float) -> StreamSession:
        return KvConnection(KvSession(self.engine))

    def _sweep(self, now: float) -> None:
        # Active expiry, bounded per turn (Redis's activeExpireCycle runs from its loop too).
        self.engine.sweep(now)

    def _commit(self, now: float) -> bool:
        """Group commit: this turn's writes reach stable storage in one log write."""
        if self.command_log is None:
            return False
        durable = self.command_log.commit()
        if durable is None:
            return False
        for conn in self.server.connections.values():
            session = conn.session
            if isinstance(session, KvConnection):
                session.kv.release_durable(durable)
        return True

    def turn(self, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        self.server.turn(idle_timeout)

    def serve(self, should_stop: Callable[[], bool]) -> None:
        self.server.serve(should_stop)

    def stats(self) -> dict[str, object]:
        engine_stats = self.engine.stats
        return {
            "server": self.server.stats(),
            "commands": engine_stats.total_commands_processed,
            "error_replies": engine_stats.total_error_replies,
            "keys": len(self.engine.keyspace),
            "libos": self.los.stats(),
            "log": self.command_log.stats() if self.command_log is not None else None,
            "replayed": self.replayed,
        }
