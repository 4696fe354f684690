"""The memcached ASCII protocol, sans-I/O.

``McEngine`` is one server instance: the store, the counters behind ``stats``, the
settings. ``McSession`` is one client connection: the transport feeds it the bytes it
received (``feed(data, now)``), sends what ``take_output()`` returns, and closes the
connection once ``should_close`` is true and the output is sent. Nothing here touches a
socket or a clock.

The replies match memcached 1.6 byte for byte where a client can see them; the cases
were checked against a real memcached 1.6.18 (tests/test_memcache_vs_memcached.py):

* a command line ends at LF, one CR before it is dropped; tokens are separated by spaces
  only (a tab is part of a token); the command name is case-sensitive;
* a wrong number of tokens or an unknown command gives ``ERROR``; a malformed number or an
  overlong key gives ``CLIENT_ERROR bad command line format`` and, like memcached, the data
  block of a rejected storage command is then read as command lines;
* a data block is exactly <bytes> bytes and CRLF; anything else there is
  ``CLIENT_ERROR bad data chunk``, and parsing resumes right after those <bytes>+2 bytes;
* a value too big for an item gives ``SERVER_ERROR object too large for cache``; its data
  block is swallowed, and a ``set`` also drops the key's old value so that it cannot be
  read stale;
* ``noreply`` as the last token silences every reply of that command, errors included;
* a command line longer than ``MAX_LINE`` bytes closes the connection without a reply,
  as memcached does; ``get``/``gets`` lines may be up to ``MAX_GET_LINE`` (large
  multi-gets). Unlike memcached, whose check depends on how the bytes were chunked into
  reads, the limit here applies to the whole line whatever the chunking.

Work per ``feed`` is bounded: at most ``max_requests_per_feed`` commands (each key of a
multi-get counts as one), and no new command once ``output_high_water`` bytes of replies
wait to be taken. ``has_backlog`` then says that the transport should call
``feed(b"", now)`` again after sending the output, before it reads more from the socket.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from libos.apps.memcache.store import (
    FLAGS_MAX,
    KEY_MAX_LENGTH,
    U64_MASK,
    McStore,
    NonNumericValue,
    StoreResult,
)

SERVER_VERSION = "1.6.0-arrakis"
MAX_LINE = 2048
MAX_GET_LINE = 256 * 1024
# memcached refuses a data length above INT_MAX - 2 (it adds the CRLF to it).
MAX_VALUE_LENGTH = 0x7FFF_FFFF - 2
DEFAULT_MAX_REQUESTS_PER_FEED = 64
DEFAULT_OUTPUT_HIGH_WATER = 4 * 1024 * 1024
# A transport that keeps feeding while has_backlog is set would grow the input without
# bound; past this many unprocessed bytes the session gives up on the client.
DEFAULT_MAX_INPUT_BACKLOG = 8 * 1024 * 1024

_UNSIGNED = re.compile(rb"\+?[0-9]+\Z")
_SIGNED = re.compile(rb"[+-]?[0-9]+\Z")
_I64_MAX = 0x7FFF_FFFF_FFFF_FFFF
# More digits than any u64/i64 needs, leading zeros aside; keeps int() on short strings.
_MAX_NUMBER_DIGITS = 20

_ERROR = b"ERROR\r\n"
_BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
_BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
_TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
_NO_MEMORY = b"SERVER_ERROR out of memory storing object\r\n"
_NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
_BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
_BAD_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
_DELETE_USAGE = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
_STORE_REPLIES = {
    StoreResult.STORED: b"STORED\r\n",
    StoreResult.NOT_STORED: b"NOT_STORED\r\n",
    StoreResult.EXISTS: b"EXISTS\r\n",
    StoreResult.NOT_FOUND: b"NOT_FOUND\r\n",
    StoreResult.TOO_LARGE: _NO_MEMORY,
}
_STORAGE_MODES = {
    b"set": "set",
    b"add": "add",
    b"replace": "replace",
    b"append": "append",
    b"prepend": "prepend",
    b"cas": "cas",
}


def parse_unsigned(token: bytes, maximum: int) -> int | None:
    """A decimal number in 0..maximum (memcached's safe_strtoul family), else None."""
    if not _UNSIGNED.match(token):
        return None
    digits = token.lstrip(b"+").lstrip(b"0") or b"0"
    if len(digits) > _MAX_NUMBER_DIGITS:
        return None
    value = int(digits)
    return value if value <= maximum else None


def parse_signed(token: bytes) -> int | None:
    """A decimal i64 (memcached's safe_strtol on a 64-bit long), else None."""
    if not _SIGNED.match(token):
        return None
    negative = token.startswith(b"-")
    digits = token.lstrip(b"+-").lstrip(b"0") or b"0"
    if len(digits) > _MAX_NUMBER_DIGITS:
        return None
    value = int(digits)
    if value > _I64_MAX:
        return None
    return -value if negative else value


@dataclass(slots=True)
class McCounters:
    """The command counters reported by ``stats`` (names as memcached's)."""

    curr_connections: int = 0
    total_connections: int = 0
    cmd_get: int = 0
    cmd_set: int = 0
    cmd_flush: int = 0
    cmd_touch: int = 0
    get_hits: int = 0
    get_misses: int = 0
    delete_misses: int = 0
    delete_hits: int = 0
    incr_misses: int = 0
    incr_hits: int = 0
    decr_misses: int = 0
    decr_hits: int = 0
    cas_misses: int = 0
    cas_hits: int = 0
    cas_badval: int = 0
    touch_hits: int = 0
    touch_misses: int = 0
    store_too_large: int = 0
    store_no_memory: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    # Ours, not memcached's: connections closed for an overlong line or input backlog.
    conn_closed_bad_input: int = 0


class McEngine:
    """One memcached-compatible server: shared by all of its sessions (TCP and UDP)."""

    def __init__(
        self,
        now: float,
        store: McStore | None = None,
        *,
        version: str = SERVER_VERSION,
        pid: int | None = None,
        max_requests_per_feed: int = DEFAULT_MAX_REQUESTS_PER_FEED,
        output_high_water: int = DEFAULT_OUTPUT_HIGH_WATER,
        max_input_backlog: int = DEFAULT_MAX_INPUT_BACKLOG,
    ) -> None:
        if max_requests_per_feed < 1 or output_high_water < 1 or max_input_backlog < 1:
            raise ValueError("work bounds must be positive")
        if not version or any(c in version for c in " \r\n"):
            raise ValueError("version must be one token")
        self.store = store if store is not None else McStore(started_at=now)
        self.version = version
        self.pid = os.getpid() if pid is None else pid
        self.started_at = now
        self.max_requests_per_feed = max_requests_per_feed
        self.output_high_water = output_high_water
        self.max_input_backlog = max_input_backlog
        self.verbosity = 0
        self.counters = McCounters()

    def open_session(self, now: float) -> McSession:
        """A session for a new client connection (counted in curr_connections)."""
        return McSession(self, now)

    def stats(self, now: float) -> list[tuple[str, str]]:
        """The general ``stats`` reply as (name, value) pairs, in memcached's order."""
        counters = self.counters
        store = self.store
        return [
            ("pid", str(self.pid)),
            ("uptime", str(max(0, int(now - self.started_at)))),
            ("time", str(int(now))),
            ("version", self.version),
            ("pointer_size", "64"),
            ("curr_connections", str(counters.curr_connections)),
            ("total_connections", str(counters.total_connections)),
            ("cmd_get", str(counters.cmd_get)),
            ("cmd_set", str(counters.cmd_set)),
            ("cmd_flush", str(counters.cmd_flush)),
            ("cmd_touch", str(counters.cmd_touch)),
            ("get_hits", str(counters.get_hits)),
            ("get_misses", str(counters.get_misses)),
            ("delete_misses", str(counters.delete_misses)),
            ("delete_hits", str(counters.delete_hits)),
            ("incr_misses", str(counters.incr_misses)),
            ("incr_hits", str(counters.incr_hits)),
            ("decr_misses", str(counters.decr_misses)),
            ("decr_hits", str(counters.decr_hits)),
            ("cas_misses", str(counters.cas_misses)),
            ("cas_hits", str(counters.cas_hits)),
            ("cas_badval", str(counters.cas_badval)),
            ("touch_hits", str(counters.touch_hits)),
            ("touch_misses", str(counters.touch_misses)),
            ("store_too_large", str(counters.store_too_large)),
            ("store_no_memory", str(counters.store_no_memory)),
            ("bytes_read", str(counters.bytes_read)),
            ("bytes_written", str(counters.bytes_written)),
            ("limit_maxbytes", str(store.max_bytes)),
            ("threads", "1"),
            ("bytes", str(store.bytes_used)),
            ("curr_items", str(store.curr_items)),
            ("total_items", str(store.counters.total_items)),
            ("evictions", str(store.counters.evictions)),
            ("reclaimed", str(store.counters.reclaimed)),
        ]

    def settings(self) -> list[tuple[str, str]]:
        """A subset of ``stats settings``."""
        return [
            ("maxbytes", str(self.store.max_bytes)),
            ("verbosity", str(self.verbosity)),
            ("evictions", "on"),
            ("cas_enabled", "yes"),
            ("item_size_max", str(self.store.item_size_max)),
            ("reqs_per_event", str(self.max_requests_per_feed)),
        ]

    def reset_stats(self) -> None:
        """``stats reset``: zero the counters, keep the gauges (connections, items)."""
        kept = self.counters.curr_connections
        self.counters = McCounters(curr_connections=kept)
        store_counters = self.store.counters
        store_counters.total_items = 0
        store_counters.evictions = 0
        store_counters.reclaimed = 0


@dataclass(slots=True)
class _PendingStore:
    mode: str
    key: bytes
    flags: int
    exptime: int
    length: int
    cas_unique: int
    noreply: bool


@dataclass(slots=True)
class _PendingGet:
    keys: list[bytes]
    next_index: int
    with_cas: bool


class McSession:
    """One client connection's protocol state: bytes in, bytes out."""

    def __init__(self, engine: McEngine, now: float, *, datagram: bool = False) -> None:
        self._engine = engine
        self._datagram = datagram
        self._inbuf = bytearray()
        self._pos = 0
        self._scan_from = 0
        self._out = bytearray()
        self._pending_store: _PendingStore | None = None
        self._pending_get: _PendingGet | None = None
        self._swallow_left = 0
        self._backlog = False
        self._should_close = False
        self._counted = not datagram
        self.close_reason: str | None = None
        self.opened_at = now
        if self._counted:
            engine.counters.curr_connections += 1
            engine.counters.total_connections += 1

    @property
    def should_close(self) -> bool:
        """The transport should send the pending output, then close the connection."""
        return self._should_close

    @property
    def has_backlog(self) -> bool:
        """The last feed stopped on its work bound; call ``feed(b"", now)`` again."""
        return self._backlog

    @property
    def buffered_input(self) -> int:
        """Bytes received and not yet consumed (a partial command or data block)."""
        return len(self._inbuf) - self._pos

    def close(self) -> None:
        """The transport closed the connection: stop counting it. Idempotent."""
        if self._counted:
            self._engine.counters.curr_connections -= 1
            self._counted = False
        self._should_close = True
        self._inbuf.clear()
        self._pos = self._scan_from = 0

    def take_output(self) -> bytes:
        """All reply bytes produced so far; the session forgets them."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        self._engine.counters.bytes_written += len(out)
        return out

    def feed(self, data: bytes, now: float) -> None:
        """Take received bytes and run the commands they complete (boundedly)."""
        if self._should_close:
            return
        if data:
            self._engine.counters.bytes_read += len(data)
            data = self._swallow(data)
            self._inbuf += data
        self._run(now)
        if self.buffered_input > self._engine.max_input_backlog:
            self._close_for("input backlog over limit")
        self._compact()

    def _swallow(self, data: bytes) -> bytes:
        # A refused value is dropped as it arrives, never buffered: it may be ~2 GiB.
        if not self._swallow_left or self._pos < len(self._inbuf):
            return data
        taken = min(self._swallow_left, len(data))
        self._swallow_left -= taken
        return data[taken:]

    def _run(self, now: float) -> None:
        engine = self._engine
        budget = engine.max_requests_per_feed
        self._backlog = False
        while not self._should_close:
            if budget <= 0 or len(self._out) >= engine.output_high_water:
                self._backlog = self._pending_get is not None or self.buffered_input > 0
                return
            if self._pending_get is not None:
                budget -= self._continue_get(budget, now)
                continue
            if self._swallow_left:
                taken = min(self._swallow_left, self.buffered_input)
                self._pos += taken
                self._swallow_left -= taken
                if self._swallow_left:
                    return
                continue
            pending = self._pending_store
            if pending is not None:
                if self.buffered_input < pending.length + 2:
                    return
                self._complete_store(pending, now)
                budget -= 1
                continue
            line = self._next_line()
            if line is None:
                return
            self._dispatch(line, now)
            budget -= 1

    def _next_line(self) -> bytes | None:
        buf = self._inbuf
        newline = buf.find(b"\n", max(self._scan_from, self._pos))
        if newline < 0:
            self._scan_from = len(buf)
            pending = self.buffered_input
            if pending > MAX_LINE and pending > self._line_limit():
                self._close_for("line too long")
            return None
        length = newline - self._pos
        if length > MAX_LINE and length > self._line_limit():
            self._close_for("line too long")
            return None
        line = bytes(buf[self._pos : newline])
        self._pos = self._scan_from = newline + 1
        return line[:-1] if line.endswith(b"\r") else line

    def _line_limit(self) -> int:
        # memcached lets a line grow past MAX_LINE only for a large multi-get.
        head = bytes(self._inbuf[self._pos : self._pos + 128]).lstrip(b" ")
        return MAX_GET_LINE if head.startswith((b"get ", b"gets ")) else MAX_LINE

    def _close_for(self, reason: str) -> None:
        self._engine.counters.conn_closed_bad_input += 1
        self.close_reason = reason
        self._should_close = True

    def _compact(self) -> None:
        if self._pos and (self._pos >= len(self._inbuf) or self._pos > 65536):
            del self._inbuf[: self._pos]
            self._scan_from = max(0, self._scan_from - self._pos)
            self._pos = 0

    def _reply(self, reply: bytes, noreply: bool = False) -> None:
        if not noreply:
            self._out += reply

    def _dispatch(self, line: bytes, now: float) -> None:
        tokens = [token for token in line.split(b" ") if token]
        if not tokens:
            self._reply(_ERROR)
            return
        handler = _COMMANDS.get(tokens[0])
        if handler is None:
            self._reply(_ERROR)
            return
        handler(self, tokens, now)

    def _cmd_get(self, tokens: list[bytes], now: float) -> None:
        if len(tokens) < 2:
            self._reply(_ERROR)
            return
        keys = tokens[1:]
        # memcached discards the whole reply when any key is bad: check before output.
        if any(len(key) > KEY_MAX_LENGTH for key in keys):
            self._reply(_BAD_FORMAT)
            return
        self._pending_get = _PendingGet(keys, 0, tokens[0] == b"gets")

    def _continue_get(self, budget: int, now: float) -> int:
        pending = self._pending_get
        if pending is None:
            return 0
        store = self._engine.store
        counters = self._engine.counters
        high_water = self._engine.output_high_water
        out = self._out
        done = 0
        while pending.next_index < len(pending.keys):
            if done >= budget or len(out) >= high_water:
                return max(done, 1)
            key = pending.keys[pending.next_index]
            pending.next_index += 1
            done += 1
            counters.cmd_get += 1
            item = store.get(key, now)
            if item is None:
                counters.get_misses += 1
                continue
            counters.get_hits += 1
            if pending.with_cas:
                out += b"VALUE %s %d %d %d\r\n" % (key, item.flags, len(item.value), item.cas)
            else:
                out += b"VALUE %s %d %d\r\n" % (key, item.flags, len(item.value))
            out += item.value
            out += b"\r\n"
        out += b"END\r\n"
        self._pending_get = None
        return max(done, 1)

    def _cmd_store(self, tokens: list[bytes], now: float) -> None:
        mode = _STORAGE_MODES[tokens[0]]
        base = 6 if mode == "cas" else 5
        if len(tokens) not in (base, base + 1):
            self._reply(_ERROR)
            return
        noreply = len(tokens) == base + 1 and tokens[-1] == b"noreply"
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            self._reply(_BAD_FORMAT, noreply)
            return
        # Flags are u32 in protocol.txt; memcached 1.6 silently truncates larger ones,
        # here they are refused.
        flags = parse_unsigned(tokens[2], FLAGS_MAX)
        exptime = parse_signed(tokens[3])
        length = parse_signed(tokens[4])
        cas_unique = parse_unsigned(tokens[5], U64_MASK) if mode == "cas" else 0
        if flags is None or exptime is None or length is None or cas_unique is None:
            self._reply(_BAD_FORMAT, noreply)
            return
        if not 0 <= length <= MAX_VALUE_LENGTH:
            self._reply(_BAD_FORMAT, noreply)
            return
        store = self._engine.store
        if store.too_large(len(key), length):
            self._engine.counters.store_too_large += 1
            if mode == "set":
                store.delete(key, now)
            self._reply(_TOO_LARGE, noreply)
            self._swallow_left = length + 2
            return
        self._pending_store = _PendingStore(
            mode, key, flags, exptime, length, cas_unique, noreply
        )

    def _complete_store(self, pending: _PendingStore, now: float) -> None:
        self._pending_store = None
        start = self._pos
        end = start + pending.length
        self._pos = end + 2
        if self._inbuf[end : end + 2] != b"\r\n":
            self._reply(_BAD_CHUNK, pending.noreply)
            return
        value = bytes(self._inbuf[start:end])
        counters = self._engine.counters
        counters.cmd_set += 1
        result = self._engine.store.store(
            pending.mode, pending.key, value, pending.flags, pending.exptime, now,
            pending.cas_unique,
        )
        if pending.mode == "cas":
            if result is StoreResult.STORED:
                counters.cas_hits += 1
            elif result is StoreResult.EXISTS:
                counters.cas_badval += 1
            elif result is StoreResult.NOT_FOUND:
                counters.cas_misses += 1
        if result is StoreResult.TOO_LARGE:
            counters.store_no_memory += 1
        self._reply(_STORE_REPLIES[result], pending.noreply)

    def _cmd_delete(self, tokens: list[bytes], now: float) -> None:
        count = len(tokens)
        if not 2 <= count <= 4:
            self._reply(_ERROR)
            return
        noreply = count >= 3 and tokens[-1] == b"noreply"
        if count >= 3:
            # Old clients send "delete <key> 0" (a hold time, long removed); memcached
            # still accepts a literal 0 there and nothing else.
            hold_is_zero = tokens[2] == b"0"
            valid = (count == 3 and (hold_is_zero or noreply)) or (
                count == 4 and hold_is_zero and noreply
            )
            if not valid:
                self._reply(_DELETE_USAGE, noreply)
                return
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            self._reply(_BAD_FORMAT, noreply)
            return
        counters = self._engine.counters
        if self._engine.store.delete(key, now):
            counters.delete_hits += 1
            self._reply(b"DELETED\r\n", noreply)
        else:
            counters.delete_misses += 1
            self._reply(b"NOT_FOUND\r\n", noreply)

    def _cmd_arith(self, tokens: list[bytes], now: float) -> None:
        if len(tokens) not in (3, 4):
            self._reply(_ERROR)
            return
        noreply = len(tokens) == 4 and tokens[3] == b"noreply"
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            self._reply(_BAD_FORMAT, noreply)
            return
        delta = parse_unsigned(tokens[2], U64_MASK)
        if delta is None:
            self._reply(_BAD_DELTA, noreply)
            return
        incr = tokens[0] == b"incr"
        counters = self._engine.counters
        try:
            result = self._engine.store.incr_decr(key, delta, incr, now)
        except NonNumericValue:
            self._reply(_NON_NUMERIC, noreply)
            return
        if result is None:
            if incr:
                counters.incr_misses += 1
            else:
                counters.decr_misses += 1
            self._reply(b"NOT_FOUND\r\n", noreply)
            return
        if incr:
            counters.incr_hits += 1
        else:
            counters.decr_hits += 1
        self._reply(b"%d\r\n" % result, noreply)

    def _cmd_touch(self, tokens: list[bytes], now: float) -> None:
        if len(tokens) not in (3, 4):
            self._reply(_ERROR)
            return
        noreply = len(tokens) == 4 and tokens[3] == b"noreply"
        key = tokens[1]
        if len(key) > KEY_MAX_LENGTH:
            self._reply(_BAD_FORMAT, noreply)
            return
        exptime = parse_signed(tokens[2])
        if exptime is None:
            self._reply(_BAD_EXPTIME, noreply)
            return
        counters = self._engine.counters
        counters.cmd_touch += 1
        if self._engine.store.touch(key, exptime, now):
            counters.touch_hits += 1
            self._reply(b"TOUCHED\r\n", noreply)
        else:
            counters.touch_misses += 1
            self._reply(b"NOT_FOUND\r\n", noreply)

    def _cmd_flush_all(self, tokens: list[bytes], now: float) -> None:
        count = len(tokens)
        if count > 3:
            self._reply(_ERROR)
            return
        noreply = count >= 2 and tokens[-1] == b"noreply"
        delay = 0
        if count == 3 or (count == 2 and not noreply):
            parsed = parse_signed(tokens[1])
            if parsed is None:
                self._reply(_BAD_EXPTIME, noreply)
                return
            delay = parsed
        self._engine.counters.cmd_flush += 1
        self._engine.store.flush_all(delay, now)
        self._reply(b"OK\r\n", noreply)

    def _cmd_verbosity(self, tokens: list[bytes], now: float) -> None:
        if len(tokens) not in (2, 3):
            self._reply(_ERROR)
            return
        noreply = tokens[-1] == b"noreply"
        level = parse_unsigned(tokens[1], FLAGS_MAX)
        if level is None:
            self._reply(_BAD_FORMAT, noreply)
            return
        self._engine.verbosity = level
        self._reply(b"OK\r\n", noreply)

    def _cmd_version(self, tokens: list[bytes], now: float) -> None:
        self._reply(b"VERSION %s\r\n" % self._engine.version.encode())

    def _cmd_quit(self, tokens: list[bytes], now: float) -> None:
        self.close_reason = "quit"
        self._should_close = True

    def _cmd_stats(self, tokens: list[bytes], now: float) -> None:
        engine = self._engine
        if len(tokens) == 1:
            lines = engine.stats(now)
        elif tokens[1] == b"reset":
            engine.reset_stats()
            self._reply(b"RESET\r\n")
            return
        elif tokens[1] == b"settings":
            lines = engine.settings()
        else:
            self._reply(_ERROR)
            return
        for name, value in lines:
            self._out += b"STAT %s %s\r\n" % (name.encode(), value.encode())
        self._out += b"END\r\n"


_Handler = Callable[[McSession, list[bytes], float], None]
_COMMANDS: dict[bytes, _Handler] = {
    b"get": McSession._cmd_get,
    b"gets": McSession._cmd_get,
    b"set": McSession._cmd_store,
    b"add": McSession._cmd_store,
    b"replace": McSession._cmd_store,
    b"append": McSession._cmd_store,
    b"prepend": McSession._cmd_store,
    b"cas": McSession._cmd_store,
    b"delete": McSession._cmd_delete,
    b"incr": McSession._cmd_arith,
    b"decr": McSession._cmd_arith,
    b"touch": McSession._cmd_touch,
    b"flush_all": McSession._cmd_flush_all,
    b"verbosity": McSession._cmd_verbosity,
    b"version": McSession._cmd_version,
    b"quit": McSession._cmd_quit,
    b"stats": McSession._cmd_stats,
}

__all__ = [
    "MAX_GET_LINE",
    "MAX_LINE",
    "SERVER_VERSION",
    "McCounters",
    "McEngine",
    "McSession",
    "parse_signed",
    "parse_unsigned",
]
