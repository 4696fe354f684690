"""One client connection of the key-value server, sans-I/O.

The transport feeds received bytes with ``feed(data, now)``, writes out what
``take_output()`` returns, and closes the connection once ``should_close`` is true and
``output_bytes`` is zero (everything, held replies included, was taken and written). Work per call is bounded so one client cannot starve the others:

* at most ``max_commands`` requests run per ``feed`` call; the rest stay buffered and
  ``has_pending()`` says to call ``feed(b"", now)`` again on a later loop turn;
* no more requests run while ``output_high_water`` bytes of replies wait to be taken
  (backpressure on a client that does not read); past ``output_hard_limit`` the client
  is disconnected, as Redis does at its client-output-buffer-limit;
* unparsed input over the parser's ``max_query_buffer`` disconnects without a reply.

Durability: when the engine's write hook returns a log position, that reply and every
later one on this connection are held until ``release_durable(position)``; replies
thus leave in request order and never before the writes they report are durable.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from libos.apps.kv.commands import ClientState, KvEngine
from libos.apps.kv.resp import ParserLimits, ProtocolError, QueryBufferLimitError, RequestParser

DEFAULT_MAX_COMMANDS: Final = 128
DEFAULT_OUTPUT_HIGH_WATER: Final = 1 << 20
DEFAULT_OUTPUT_HARD_LIMIT: Final = 64 << 20


class KvSession:
    def __init__(self, engine: KvEngine, *, limits: ParserLimits | None = None,
                 max_commands: int = DEFAULT_MAX_COMMANDS,
                 output_high_water: int = DEFAULT_OUTPUT_HIGH_WATER,
                 output_hard_limit: int = DEFAULT_OUTPUT_HARD_LIMIT) -> None:
        if max_commands < 1:
            raise ValueError("max_commands must be at least 1")
        if output_hard_limit < output_high_water:
            raise ValueError("output_hard_limit must not be below output_high_water")
        self.engine = engine
        self.client = ClientState()
        self.max_commands = max_commands
        self.output_high_water = output_high_water
        self.output_hard_limit = output_hard_limit
        self._parser = RequestParser(limits)
        self._ready = bytearray()
        # (log position, reply) waiting for the log; positions only grow along it.
        self._held: deque[tuple[int, bytes]] = deque()
        self._held_bytes = 0
        self._barrier = -1
        self._pending = False
        self._closed = False
        # Set when no more requests may run: QUIT, a protocol error, a limit.
        self.should_close = False
        self.close_reason = ""
        engine.client_connected()

    def feed(self, data: bytes, now: float) -> None:
        """Take received bytes and run up to ``max_commands`` requests."""
        if self.should_close:
            return
        if data:
            try:
                self._parser.feed(data)
            except QueryBufferLimitError as exc:
                self._abort(str(exc))
                return
        self._run(now)

    def _run(self, now: float) -> None:
        self._pending = False
        for _ in range(self.max_commands):
            if self.output_bytes >= self.output_high_water:
                self._pending = True
                return
            try:
                argv = self._parser.next_request()
            except ProtocolError as exc:
                self._emit(exc.reply, None)
                self._close_after_reply(f"protocol error: {exc.message}")
                return
            except QueryBufferLimitError as exc:
                # The arguments parsed so far cost more than the limit (their per-argument
                # overhead counts): like Redis at client-query-buffer-limit, drop the client
                # without a reply.
                self._abort(str(exc))
                return
            if argv is None:
                return
            executed = self.engine.execute(argv, now, self.client)
            self._emit(executed.reply, executed.wait_for)
            if self.output_bytes > self.output_hard_limit:
                self._abort("output buffer limit")
                return
            if self.client.close_after_reply:
                self._close_after_reply("quit")
                return
        self._pending = self._parser.buffered_bytes > 0

    def _emit(self, reply: bytes, wait_for: int | None) -> None:
        if wait_for is not None and wait_for > self._barrier:
            self._barrier = wait_for
        if wait_for is None and not self._held:
            self._ready += reply
            return
        self._held.append((self._barrier, reply))
        self._held_bytes += len(reply)

    def release_durable(self, position: int) -> None:
        """The log is durable up to ``position``: release the replies that waited."""
        held = self._held
        while held and held[0][0] <= position:
            _, reply = held.popleft()
            self._held_bytes -= len(reply)
            self._ready += reply

    def _close_after_reply(self, reason: str) -> None:
        self.should_close = True
        self.close_reason = reason

    def _abort(self, reason: str) -> None:
        # Like Redis at its buffer limits: drop what was not sent and disconnect.
        self._ready.clear()
        self._held.clear()
        self._held_bytes = 0
        self._pending = False
        self._close_after_reply(reason)

    def has_pending(self) -> bool:
        """True when buffered requests may be waiting because a bound stopped the
        last call; call ``feed(b"", now)`` again on a later loop turn."""
        return self._pending and not self.should_close

    @property
    def output_bytes(self) -> int:
        """Reply bytes not yet taken, held ones included."""
        return len(self._ready) + self._held_bytes

    def has_held_output(self) -> bool:
        return bool(self._held)

    def take_output(self) -> bytes:
        """The replies that may be sent now, in order."""
        if not self._ready:
            return b""
        out = bytes(self._ready)
        self._ready.clear()
        return out

    def close(self) -> None:
        """The transport closed the connection; call once."""
        if not self._closed:
            self._closed = True
            self.engine.client_disconnected()
