"""Tokens and per-queue buffers shared by both backends.

A backend only has to say how to make progress (``_progress``) and how to sleep until
something may have happened (``_sleep``); this class turns that into PDPIX tokens:
a ``pop`` on a queue that already holds a datagram completes at once, otherwise it waits in
line; a datagram that finds a ``pop`` waiting completes it.

Operations that a backend completes itself later (a stream ``push`` waiting for buffer
space, ``connect``, ``accept``) take a *pending* token with ``pending`` and finish it with
``finish``; closing a queue fails every token still waiting on it.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from libos.api.types import Address, LibOSError, Opcode, QResult, SocketKind

MAX_QUEUED_DATAGRAMS = 1024  # per queue: like a socket's receive buffer, drops beyond
# ``take`` looks the completed tokens up in the caller's list while there are at most this
# many; beyond (an application that leaves results uncollected), it walks the list.
_DIRECT_LOOKUP = 16
# QResult(...) runs the named tuple's __new__, a Python function; building the tuple
# directly (every field given) costs half as much on the per-request paths.
new_result = tuple.__new__
POP = Opcode.POP


@dataclass
class QueueCounters:
    delivered: int = 0
    dropped_full: int = 0
    pushed: int = 0
    push_failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class QueueTable:
    """Queue descriptors, tokens and what arrived for nobody yet.

    On a stream queue the backend calls ``deliver`` only while ``wants_data`` says a
    ``pop`` waits, so unread bytes stay in the transport's receive buffer and its window
    pushes back on the sender.
    """

    def __init__(self) -> None:
        # Tokens are drawn here; a backend that fills in a pop or a push itself on its
        # per-request path (see ``pop`` and ``push_done``) draws them here too.
        self.next_token = itertools.count(1)
        self._next_qd = itertools.count(3)  # like fds: 0-2 look like stdio, avoid them
        self.kinds: dict[int, SocketKind] = {}
        self._arrived: dict[int, deque[tuple[bytes, Address | None]]] = {}
        # qd -> tokens of the pops waiting on it, oldest first (a backend may read these,
        # e.g. to skip reading a stream that nobody waits on; it completes them with deliver)
        self.waiting_pops: dict[int, deque[int]] = {}
        # token -> qd of every pending token (waiting pops included); a backend that completes
        # a waiting pop itself (see ``deliver``) takes its token out of here and of
        # ``waiting_pops`` and puts the result in ``done``
        self.token_qd: dict[int, int] = {}
        self._pending: dict[int, set[int]] = {}  # qd -> backend-completed tokens
        self.done: dict[int, QResult] = {}
        # One immutable "pushed" result per queue, handed out for every successful push
        # (most completions are pushes; none of them needs an object of its own).
        self.pushed_results: dict[int, QResult] = {}
        self.counters = QueueCounters()

    def new_queue(self, kind: SocketKind) -> int:
        qd = next(self._next_qd)
        self.kinds[qd] = kind
        self._arrived[qd] = deque()
        self.waiting_pops[qd] = deque()
        self.pushed_results[qd] = QResult(Opcode.PUSH, qd)
        return qd

    def pushed(self, qd: int) -> QResult:
        """The (shared) result of a successful push on ``qd``."""
        result = self.pushed_results.get(qd)
        return QResult(Opcode.PUSH, qd) if result is None else result

    def check(self, qd: int) -> SocketKind:
        kind = self.kinds.get(qd)
        if kind is None:
            raise LibOSError(f"bad queue descriptor {qd}")
        return kind

    def drop_queue(self, qd: int) -> None:
        self.check(qd)
        del self.kinds[qd]
        del self._arrived[qd]
        self.pushed_results.pop(qd, None)
        for token in self.waiting_pops.pop(qd):
            self.token_qd.pop(token, None)
            self.done[token] = QResult(Opcode.FAILED, qd, error="queue closed")
        for token in self._pending.pop(qd, ()):
            self.token_qd.pop(token, None)
            self.done[token] = QResult(Opcode.FAILED, qd, error="queue closed")

    def pop(self, qd: int) -> int:
        if qd not in self.kinds:
            self.check(qd)  # raises
        token = next(self.next_token)
        arrived = self._arrived[qd]
        if arrived:
            data, address = arrived.popleft()
            self.done[token] = new_result(QResult, (POP, qd, data, address, -1, ""))
        else:
            self.waiting_pops[qd].append(token)
            self.token_qd[token] = qd
        return token

    def completed(self, opcode: Opcode, qd: int, error: str = "") -> int:
        token = next(self.next_token)
        if opcode is Opcode.PUSH and not error:
            self.done[token] = self.pushed(qd)
        else:
            self.done[token] = QResult(opcode, qd, error=error)
        return token

    def push_done(self, qd: int) -> int:
        """A successful push on ``qd``, counted: a token completed with the shared result."""
        token = next(self.next_token)
        self.done[token] = self.pushed_results[qd]
        self.counters.pushed += 1
        return token

    def result(self, result: QResult) -> int:
        """A token already completed with ``result``."""
        token = next(self.next_token)
        self.done[token] = result
        return token

    def pending(self, qd: int) -> int:
        """A token the backend will complete with ``finish`` (or that ``drop_queue`` fails)."""
        self.check(qd)
        token = next(self.next_token)
        self.token_qd[token] = qd
        self._pending.setdefault(qd, set()).add(token)
        return token

    def finish(self, token: int, result: QResult) -> None:
        """Complete a pending token; a token of a closed queue stays failed."""
        qd = self.token_qd.pop(token, None)
        if qd is None:
            return
        tokens = self._pending.get(qd)
        if tokens is not None:
            tokens.discard(token)
        self.done[token] = result

    def fail_pops(self, qd: int, error: str) -> None:
        """Fail every ``pop`` waiting on ``qd`` (a stream that was reset)."""
        waiting = self.waiting_pops.get(qd)
        while waiting:
            token = waiting.popleft()
            self.token_qd.pop(token, None)
            self.done[token] = QResult(Opcode.FAILED, qd, error=error)

    def deliver(self, qd: int, data: bytes, address: Address | None) -> None:
        waiting = self.waiting_pops.get(qd)
        if waiting is None:
            return
        if waiting:
            token = waiting.popleft()
            del self.token_qd[token]
            self.done[token] = new_result(QResult, (POP, qd, data, address, -1, ""))
        else:
            arrived = self._arrived[qd]
            if len(arrived) >= MAX_QUEUED_DATAGRAMS:
                self.counters.dropped_full += 1
                return
            arrived.append((data, address))
        self.counters.delivered += 1

    def wants_data(self, qd: int) -> bool:
        return bool(self.waiting_pops.get(qd))

    def take(self, tokens: list[int]) -> tuple[int, QResult] | None:
        """The first token of ``tokens`` (by position) that completed, with its result,
        taken out; None if none did. LibOSError if a token is unknown."""
        done = self.done
        if done:
            if len(done) <= _DIRECT_LOOKUP:
                found = self._take_by_lookup(tokens)
            else:
                found = self._take_by_scan(tokens)
            if found is not None:
                return found
        token_qd = self.token_qd
        if not all(map(token_qd.__contains__, tokens)):
            for token in tokens:
                if token not in token_qd:
                    raise LibOSError(f"unknown token {token}")
        return None

    def take_many(self, tokens: Collection[int]) -> list[tuple[int, QResult]]:
        """Every completed token of ``tokens`` with its result, taken out (completion
        order); [] if none. LibOSError if a token is neither completed nor pending."""
        found = self.take_completed(tokens)
        if not found:
            self.check_tokens(tokens)
        return found

    def take_completed(self, tokens: Collection[int]) -> list[tuple[int, QResult]]:
        """``take_many`` without the check that every token is known: for a wait that
        already checked them (a token only leaves the table by being taken)."""
        done = self.done
        if done:
            # Walk the shorter side; membership in ``tokens`` is O(1) for a dict or set.
            if len(done) <= len(tokens):
                found = [token for token in done if token in tokens]
                if len(found) == len(done):  # all of them (a server waits on every token)
                    items = list(done.items())
                    done.clear()
                    return items
            else:
                found = [token for token in tokens if token in done]
            if found:
                pop = done.pop
                return [(token, pop(token)) for token in found]
        return []

    def take_done(self, token: int) -> QResult | None:
        """``token``'s result if completed, taken out; None if pending; LibOSError if
        unknown."""
        result = self.done.pop(token, None)
        if result is None and token not in self.token_qd:
            raise LibOSError(f"unknown token {token}")
        return result

    def check_tokens(self, tokens: Collection[int]) -> None:
        """LibOSError unless every token of ``tokens`` is pending (or completed)."""
        token_qd = self.token_qd
        if not all(map(token_qd.__contains__, tokens)):
            for token in tokens:
                if token not in token_qd and token not in self.done:
                    raise LibOSError(f"unknown token {token}")

    def _take_by_lookup(self, tokens: list[int]) -> tuple[int, QResult] | None:
        """Few completions wait (the usual case, a server waiting on one token per
        client): find each in the list (a scan in C) rather than look up every token."""
        best = -1
        for token in self.done:
            if token in tokens:
                index = tokens.index(token)
                if best < 0 or index < best:
                    best = index
        if best < 0:
            return None
        return best, self.done.pop(tokens[best])

    def _take_by_scan(self, tokens: list[int]) -> tuple[int, QResult] | None:
        done = self.done
        for index, token in enumerate(tokens):
            result = done.pop(token, None)
            if result is not None:
                return index, result
        return None


class PollingRuntime:
    """The wait loop: make progress, hand back a finished token, or sleep a while."""

    table: QueueTable

    def _progress(self, now: float) -> int:
        raise NotImplementedError

    def _sleep(self, timeout: float) -> None:
        raise NotImplementedError

    def wait_any(self, tokens: list[int], timeout: float | None = None) -> tuple[int, QResult] | None:
        if not tokens:
            raise LibOSError("wait_any needs at least one token")
        table = self.table
        found = table.take(tokens)
        if found is not None:
            return found
        monotonic = time.monotonic
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            now = monotonic()
            self._progress(now)
            found = table.take(tokens)
            if found is not None:
                return found
            if deadline is not None:
                left = deadline - monotonic()
                if left <= 0:
                    return None
                self._sleep(left)
            else:
                self._sleep(3600.0)

    def wait_many(self, tokens: Collection[int], timeout: float | None = None) -> list[tuple[int, QResult]]:
        """What completed among ``tokens``, all of it: see ``LibOS.wait_many``.

        Completions already there are returned without polling; otherwise one progress
        step, then sleep until the deadline or until something may have happened.
        """
        if not tokens:
            raise LibOSError("wait_many needs at least one token")
        table = self.table
        found = table.take_many(tokens)
        if found:
            return found
        # Every token is known now; until this call returns, one only leaves the table
        # by being taken here, so the loop below need not check them again.
        take = table.take_completed
        monotonic = time.monotonic
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            self._progress(monotonic())
            found = take(tokens)
            if found:
                return found
            if deadline is not None:
                left = deadline - monotonic()
                if left <= 0:
                    return found
                self._sleep(left)
            else:
                self._sleep(3600.0)

    def take_done(self, token: int) -> QResult | None:
        """See ``LibOS.take_done``."""
        result = self.table.done.pop(token, None)
        if result is None:
            return self.table.take_done(token)  # pending (None), or unknown (raises)
        return result

    def wait(self, token: int, timeout: float | None = None) -> QResult | None:
        found = self.wait_any([token], timeout)
        return None if found is None else found[1]
