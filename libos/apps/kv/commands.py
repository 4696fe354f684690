"""The command table and its handlers: Redis 7.0 semantics and error wording.

``KvEngine.execute(argv, now, client)`` runs one request and returns its encoded
reply. Write commands that changed the keyspace are handed to the optional
``on_write`` hook *before* the reply is returned, in a deterministic form: relative
expiry is rewritten to absolute deadlines (SET ... PXAT, PEXPIREAT) and an expiry in
the past becomes DEL, the way Redis rewrites what it propagates to its AOF. The hook
returns None when the write is already durable (or nothing is logged), or an opaque
increasing log position; the caller must hold that reply, and every later reply on
the same connection, until the log reports the position durable (see
``KvSession.release_durable``). ``KvEngine.replay(argv)`` applies a logged command with
lazy expiry off, as Redis does while loading its AOF, so replaying a log gives back
the keyspace whenever it happens.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable, Final, Iterable, Mapping, NamedTuple, Sequence

from libos.apps.kv import resp
from libos.apps.kv.resp import INT64_MAX, INT64_MIN, parse_int64
from libos.apps.kv.store import Keyspace, to_ms

WriteHook = Callable[[list[bytes]], "int | None"]

SERVER_VERSION: Final = b"7.0.15"

_ERR_SYNTAX: Final = resp.error(b"ERR syntax error")
_ERR_NOT_INT: Final = resp.error(b"ERR value is not an integer or out of range")
_ERR_OVERFLOW: Final = resp.error(b"ERR increment or decrement would overflow")

# Config values CONFIG GET reports; redis-benchmark asks for "save" and "appendonly".
DEFAULT_CONFIG: Final[Mapping[bytes, bytes]] = {
    b"save": b"",
    b"appendonly": b"no",
    b"appendfsync": b"everysec",
    b"databases": b"1",
    b"maxmemory": b"0",
    b"maxmemory-policy": b"noeviction",
    b"maxclients": b"10000",
    b"timeout": b"0",
    b"proto-max-bulk-len": b"536870912",
    b"client-query-buffer-limit": b"1073741824",
    b"port": b"6379",
    b"bind": b"",
    b"hz": b"10",
}


@dataclass
class ClientState:
    """What the engine keeps per connection."""

    db: int = 0
    close_after_reply: bool = False


class Executed(NamedTuple):
    reply: bytes
    # Log position the reply must wait for; None: release it at once.
    wait_for: int | None


Handler = Callable[["KvEngine", list[bytes], float, ClientState], tuple[bytes, "list[bytes] | None"]]


@dataclass(frozen=True)
class CommandSpec:
    name: str
    arity: int
    flags: tuple[str, ...]
    first_key: int
    last_key: int
    key_step: int
    acl: tuple[str, ...]
    group: str
    summary: str
    handler: Handler | None
    subcommands: Mapping[str, "CommandSpec"] = field(default_factory=dict)

    def arity_ok(self, argc: int) -> bool:
        return argc == self.arity if self.arity > 0 else argc >= -self.arity


@dataclass
class Stats:
    total_connections_received: int = 0
    connected_clients: int = 0
    total_commands_processed: int = 0
    total_error_replies: int = 0
    keyspace_hits: int = 0
    keyspace_misses: int = 0


def glob_match(pattern: bytes, text: bytes, nocase: bool = False) -> bool:
    """Redis-style glob: ``*``, ``?``, ``[abc]``, ``[^a-z]``, backslash escapes."""
    if nocase:
        pattern, text = pattern.lower(), text.lower()
    p = t = 0
    star_p = star_t = -1
    while t < len(text):
        if p < len(pattern):
            c = pattern[p]
            if c == 0x2A:
                star_p, star_t = p, t
                p += 1
                continue
            matched, width = _match_one(pattern, p, text[t])
            if matched:
                p += width
                t += 1
                continue
        if star_p < 0:
            return False
        # Backtrack: let the last '*' swallow one more byte.
        star_t += 1
        t = star_t
        p = star_p + 1
    while p < len(pattern) and pattern[p] == 0x2A:
        p += 1
    return p == len(pattern)


def _match_one(pattern: bytes, p: int, ch: int) -> tuple[bool, int]:
    """Does pattern element at ``p`` match byte ``ch``; and the element's width."""
    c = pattern[p]
    if c == 0x3F:
        return True, 1
    if c == 0x5C and p + 1 < len(pattern):
        return pattern[p + 1] == ch, 2
    if c != 0x5B:
        return c == ch, 1
    i = p + 1
    negate = i < len(pattern) and pattern[i] == 0x5E
    if negate:
        i += 1
    found = False
    while i < len(pattern) and pattern[i] != 0x5D:
        if pattern[i] == 0x5C and i + 1 < len(pattern):
            found |= pattern[i + 1] == ch
            i += 2
        elif i + 2 < len(pattern) and pattern[i + 1] == 0x2D and pattern[i + 2] != 0x5D:
            lo, hi = sorted((pattern[i], pattern[i + 2]))
            found |= lo <= ch <= hi
            i += 3
        else:
            found |= pattern[i] == ch
            i += 1
    # An unterminated class matches up to the end of the pattern, like Redis.
    width = i - p + (1 if i < len(pattern) else 0)
    return found != negate, width


def _c_string(arg: bytes) -> bytes:
    # Redis formats these messages with %s, which stops at a NUL byte.
    nul = arg.find(b"\0")
    return arg if nul < 0 else arg[:nul]


def unknown_command_reply(argv: Sequence[bytes]) -> bytes:
    args = b""
    for arg in argv[1:]:
        if len(args) >= 128:
            break
        args += b"'" + _c_string(arg)[: 128 - len(args)] + b"' "
    return resp.error(b"ERR unknown command '" + _c_string(argv[0])[:128]
                      + b"', with args beginning with: " + args)


def arity_reply(name: str) -> bytes:
    return resp.error(b"ERR wrong number of arguments for '%s' command" % name.encode())


def _invalid_expire(name: str) -> bytes:
    return resp.error(b"ERR invalid expire time in '%s' command" % name.encode())


def _deadline_from(value: int, unit_ms: int, base_ms: int) -> int | None:
    """Absolute deadline in ms for an expire argument, None on int64 overflow (the
    checks Redis makes before it accepts an expire time)."""
    if unit_ms == 1000:
        if value > INT64_MAX // 1000 or value < INT64_MIN // 1000:
            return None
        value *= 1000
    if base_ms and value > INT64_MAX - base_ms:
        return None
    return value + base_ms


class KvEngine:
    """The keyspace, configuration, statistics and command table of one server;
    shared by all its sessions, driven by one event loop."""

    def __init__(self, on_write: WriteHook | None = None, *, now: float = 0.0,
                 config: Mapping[bytes, bytes] | None = None, tcp_port: int = 6379,
                 process_id: int = 0) -> None:
        self.keyspace = Keyspace()
        self.on_write = on_write
        self.stats = Stats()
        self.config = dict(DEFAULT_CONFIG)
        if config:
            self.config.update(config)
        self.config[b"port"] = str(tcp_port).encode()
        self.started_at = now
        self.process_id = process_id
        self.run_id = secrets.token_hex(20)
        self._replaying = False

    @property
    def replaying(self) -> bool:
        return self._replaying

    def client_connected(self) -> None:
        self.stats.total_connections_received += 1
        self.stats.connected_clients += 1

    def client_disconnected(self) -> None:
        self.stats.connected_clients = max(0, self.stats.connected_clients - 1)

    def sweep(self, now: float, budget: int = 200) -> int:
        """Active expiry, bounded by ``budget``; call it from the server loop."""
        return self.keyspace.sweep(now, budget)

    def execute(self, argv: list[bytes], now: float, client: ClientState) -> Executed:
        """Run one non-empty request; never raises on client input."""
        self.stats.total_commands_processed += 1
        spec = COMMANDS.get(argv[0].lower().decode("latin-1"))
        if spec is None:
            return self._error(unknown_command_reply(argv))
        if not spec.arity_ok(len(argv)):
            return self._error(arity_reply(spec.name))
        if spec.subcommands and len(argv) >= 2:
            sub = spec.subcommands.get(argv[1].lower().decode("latin-1"))
            if sub is None:
                return self._error(resp.error(
                    b"ERR unknown subcommand '" + _c_string(argv[1])[:128]
                    + b"'. Try " + spec.name.upper().encode() + b" HELP."))
            if not sub.arity_ok(len(argv)):
                return self._error(arity_reply(sub.name))
            spec = sub
        if spec.handler is None:
            return self._error(arity_reply(spec.name))
        reply, logged = spec.handler(self, argv, now, client)
        if reply[:1] == b"-":
            self.stats.total_error_replies += 1
        wait_for = None
        if logged is not None and self.on_write is not None and not self._replaying:
            wait_for = self.on_write(logged)
        return Executed(reply, wait_for)

    def replay(self, argv: list[bytes]) -> bytes:
        """Apply one logged write. The clock is frozen at the epoch, so no deadline
        has passed while the log is replayed (Redis skips expiry while loading too);
        the logged forms carry only absolute deadlines, so none depends on it."""
        self._replaying = True
        try:
            return self.execute(argv, 0.0, ClientState()).reply
        finally:
            self._replaying = False

    def _error(self, reply: bytes) -> Executed:
        self.stats.total_error_replies += 1
        return Executed(reply, None)


Result = tuple[bytes, "list[bytes] | None"]


def _ping(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    if len(argv) > 2:
        return arity_reply("ping"), None
    return (resp.bulk(argv[1]) if len(argv) == 2 else resp.PONG), None


def _echo(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.bulk(argv[1]), None


def _quit(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    client.close_after_reply = True
    return resp.OK, None


def _lookup(engine: KvEngine, key: bytes, now: float) -> bytes | None:
    """A read lookup, counted in keyspace_hits/misses (Redis counts every read-side
    lookup: GET, MGET, EXISTS, TTL, PTTL, TYPE, SET ... GET)."""
    value = engine.keyspace.get(key, now)
    if value is None:
        engine.stats.keyspace_misses += 1
    else:
        engine.stats.keyspace_hits += 1
    return value


def _get(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.bulk_or_null(_lookup(engine, argv[1], now)), None


def _mget(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.array([resp.bulk_or_null(_lookup(engine, key, now)) for key in argv[1:]]), None


_SET_EXPIRE_UNITS: Final = {b"ex": (1000, True), b"px": (1, True), b"exat": (1000, False),
                            b"pxat": (1, False)}


def _set(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    key, value = argv[1], argv[2]
    nx = xx = want_old = keep_ttl = False
    expire_opt: bytes | None = None
    expire_arg = b""
    i = 3
    # Option rules of Redis 7.0: repeats are fine, conflicting ones are a syntax error.
    while i < len(argv):
        opt = argv[i].lower()
        if opt == b"nx" and not xx:
            nx = True
        elif opt == b"xx" and not nx:
            xx = True
        elif opt == b"get":
            want_old = True
        elif opt == b"keepttl" and expire_opt is None:
            keep_ttl = True
        elif (opt in _SET_EXPIRE_UNITS and not keep_ttl and expire_opt in (None, opt)
              and i + 1 < len(argv)):
            expire_opt = opt
            i += 1
            expire_arg = argv[i]
        else:
            return _ERR_SYNTAX, None
        i += 1
    now_ms = to_ms(now)
    deadline: int | None = None
    if expire_opt is not None:
        amount = parse_int64(expire_arg)
        if amount is None:
            return _ERR_NOT_INT, None
        unit, relative = _SET_EXPIRE_UNITS[expire_opt]
        deadline = _deadline_from(amount, unit, now_ms if relative else 0) if amount > 0 else None
        if deadline is None:
            return _invalid_expire("set"), None
    keyspace = engine.keyspace
    old = _lookup(engine, key, now) if want_old else keyspace.get(key, now)
    reply = resp.bulk_or_null(old) if want_old else resp.OK
    if (nx and old is not None) or (xx and old is None):
        return (reply if want_old else resp.NULL_BULK), None
    if deadline is not None and deadline <= now_ms and not engine.replaying:
        # Already past (EXAT/PXAT in the past): Redis stores nothing and logs a DEL.
        keyspace.delete(key, now)
        return reply, [b"DEL", key]
    keyspace.set(key, value, now, deadline, keep_ttl)
    if keep_ttl:
        return reply, [b"SET", key, value, b"KEEPTTL"]
    if deadline is not None:
        return reply, [b"SET", key, value, b"PXAT", b"%d" % deadline]
    return reply, [b"SET", key, value]


def _mset(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    if len(argv) % 2 == 0:
        return arity_reply("mset"), None
    for i in range(1, len(argv), 2):
        engine.keyspace.set(argv[i], argv[i + 1], now)
    return resp.OK, list(argv)


def _del(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    removed = sum(1 for key in argv[1:] if engine.keyspace.delete(key, now))
    return resp.integer(removed), (list(argv) if removed else None)


def _exists(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.integer(sum(1 for key in argv[1:] if _lookup(engine, key, now) is not None)), None


def _incr_by(engine: KvEngine, argv: list[bytes], now: float, delta: int) -> Result:
    key = argv[1]
    current = engine.keyspace.get(key, now)
    base = 0
    if current is not None:
        parsed = parse_int64(current)
        if parsed is None:
            return _ERR_NOT_INT, None
        base = parsed
    result = base + delta
    if result > INT64_MAX or result < INT64_MIN:
        return _ERR_OVERFLOW, None
    engine.keyspace.set(key, b"%d" % result, now, keep_ttl=True)
    return resp.integer(result), list(argv)


def _incr(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return _incr_by(engine, argv, now, 1)


def _decr(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return _incr_by(engine, argv, now, -1)


def _incrby(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    delta = parse_int64(argv[2])
    if delta is None:
        return _ERR_NOT_INT, None
    return _incr_by(engine, argv, now, delta)


def _decrby(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    delta = parse_int64(argv[2])
    if delta is None:
        return _ERR_NOT_INT, None
    if delta == INT64_MIN:
        return resp.error(b"ERR decrement would overflow"), None
    return _incr_by(engine, argv, now, -delta)


def _make_expire(name: str, unit_ms: int, relative: bool) -> Handler:
    def handler(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
        nx = xx = gt = lt = False
        for raw in argv[3:]:
            opt = raw.lower()
            if opt == b"nx":
                nx = True
            elif opt == b"xx":
                xx = True
            elif opt == b"gt":
                gt = True
            elif opt == b"lt":
                lt = True
            else:
                return resp.error(b"ERR Unsupported option " + _c_string(raw)), None
        if nx and (xx or gt or lt):
            return resp.error(b"ERR NX and XX, GT or LT options at the same time are not compatible"), None
        if gt and lt:
            return resp.error(b"ERR GT and LT options at the same time are not compatible"), None
        amount = parse_int64(argv[2])
        if amount is None:
            return _ERR_NOT_INT, None
        now_ms = to_ms(now)
        deadline = _deadline_from(amount, unit_ms, now_ms if relative else 0)
        if deadline is None:
            return _invalid_expire(name), None
        key = argv[1]
        keyspace = engine.keyspace
        if not keyspace.exists(key, now):
            return resp.integer(0), None
        current = keyspace.deadline(key, now)
        # A key without a deadline counts as an infinite TTL for GT and LT.
        if ((nx and current is not None) or (xx and current is None)
                or (gt and (current is None or deadline <= current))
                or (lt and current is not None and deadline >= current)):
            return resp.integer(0), None
        if deadline <= now_ms and not engine.replaying:
            keyspace.delete(key, now)
            return resp.integer(1), [b"DEL", key]
        keyspace.expire_at(key, deadline, now)
        return resp.integer(1), [b"PEXPIREAT", key, b"%d" % deadline]
    return handler


def _ttl_common(engine: KvEngine, key: bytes, now: float, divisor: int) -> bytes:
    keyspace = engine.keyspace
    if _lookup(engine, key, now) is None:
        return resp.integer(-2)
    deadline = keyspace.deadline(key, now)
    if deadline is None:
        return resp.integer(-1)
    left = max(0, deadline - to_ms(now))
    return resp.integer((left + 500) // 1000 if divisor == 1000 else left)


def _ttl(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return _ttl_common(engine, argv[1], now, 1000), None


def _pttl(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return _ttl_common(engine, argv[1], now, 1), None


def _persist(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    if engine.keyspace.persist(argv[1], now):
        return resp.integer(1), list(argv)
    return resp.integer(0), None


def _type(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.simple(b"string" if _lookup(engine, argv[1], now) is not None else b"none"), None


def _dbsize(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.integer(len(engine.keyspace)), None


def _flush(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    if len(argv) > 2 or (len(argv) == 2 and argv[1].lower() not in (b"async", b"sync")):
        return _ERR_SYNTAX, None
    engine.keyspace.flush()
    return resp.OK, [argv[0].upper()]


def _select(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    index = parse_int64(argv[1])
    if index is None:
        return _ERR_NOT_INT, None
    if not -(1 << 31) <= index < (1 << 31):
        return resp.error(b"ERR value is out of range, value must between -2147483648 and 2147483647"), None
    # One database only: every other index is out of range, as on a server
    # started with "databases 1".
    if index != 0:
        return resp.error(b"ERR DB index is out of range"), None
    client.db = 0
    return resp.OK, None


def _config_get(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    items: list[bytes] = []
    seen: set[bytes] = set()
    for pattern in argv[2:]:
        lowered = pattern.lower()
        if not any(ch in lowered for ch in b"*?["):
            # An exact name is echoed as the client spelled it, like Redis does.
            if lowered in engine.config and lowered not in seen:
                seen.add(lowered)
                items += [resp.bulk(pattern), resp.bulk(engine.config[lowered])]
            continue
        for name, value in engine.config.items():
            if name not in seen and glob_match(lowered, name, nocase=True):
                seen.add(name)
                items += [resp.bulk(name), resp.bulk(value)]
    return resp.array(items), None


def _config_resetstat(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    connected = engine.stats.connected_clients
    engine.stats = Stats(connected_clients=connected)
    engine.keyspace.expired_keys = 0
    return resp.OK, None


def _human(size: int) -> bytes:
    for unit, scale in ((b"G", 1 << 30), (b"M", 1 << 20), (b"K", 1 << 10)):
        if size >= scale:
            return b"%.2f%s" % (size / scale, unit)
    return b"%dB" % size


def _info_sections(engine: KvEngine, now: float) -> dict[bytes, list[tuple[bytes, bytes]]]:
    uptime = max(0, int(now - engine.started_at))
    keyspace = engine.keyspace
    # A rough per-key overhead, so used_memory grows with the number of keys too.
    used = 900_000 + keyspace.data_bytes + 64 * len(keyspace)
    stats = engine.stats
    sections: dict[bytes, list[tuple[bytes, bytes]]] = {
        b"server": [
            (b"redis_version", SERVER_VERSION), (b"redis_mode", b"standalone"),
            (b"arrakis_kv", b"1"), (b"arch_bits", b"64"), (b"multiplexing_api", b"libos"),
            (b"process_id", b"%d" % engine.process_id), (b"run_id", engine.run_id.encode()),
            (b"tcp_port", engine.config[b"port"]), (b"uptime_in_seconds", b"%d" % uptime),
            (b"uptime_in_days", b"%d" % (uptime // 86400)), (b"hz", engine.config[b"hz"]),
        ],
        b"clients": [
            (b"connected_clients", b"%d" % stats.connected_clients),
            (b"maxclients", engine.config[b"maxclients"]), (b"blocked_clients", b"0"),
        ],
        b"memory": [
            (b"used_memory", b"%d" % used), (b"used_memory_human", _human(used)),
            (b"maxmemory", b"0"), (b"maxmemory_human", b"0B"),
            (b"maxmemory_policy", engine.config[b"maxmemory-policy"]),
        ],
        b"stats": [
            (b"total_connections_received", b"%d" % stats.total_connections_received),
            (b"total_commands_processed", b"%d" % stats.total_commands_processed),
            (b"expired_keys", b"%d" % keyspace.expired_keys),
            (b"keyspace_hits", b"%d" % stats.keyspace_hits),
            (b"keyspace_misses", b"%d" % stats.keyspace_misses),
            (b"total_error_replies", b"%d" % stats.total_error_replies),
        ],
        b"keyspace": [],
    }
    if len(keyspace):
        sections[b"keyspace"].append(
            (b"db0", b"keys=%d,expires=%d,avg_ttl=0" % (len(keyspace), keyspace.volatile_count)))
    return sections


def info_text(engine: KvEngine, now: float, wanted_sections: Iterable[bytes] = ()) -> bytes:
    """What INFO prints (its bulk string), for the sections asked for (none: the default)."""
    sections = _info_sections(engine, now)
    wanted = {arg.lower() for arg in wanted_sections}
    if not wanted or wanted & {b"default", b"all", b"everything"}:
        wanted = set(sections)
    parts = []
    for name, fields in sections.items():
        if name in wanted:
            title = b"# " + name[:1].upper() + name[1:] + b"\r\n"
            parts.append(title + b"".join(k + b":" + v + b"\r\n" for k, v in fields))
    return b"\r\n".join(parts)


def _info(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.bulk(info_text(engine, now, argv[1:])), None


def _command_info_entry(spec: CommandSpec) -> bytes:
    return resp.array([
        resp.bulk(spec.name.encode()), resp.integer(spec.arity),
        resp.array([resp.simple(f.encode()) for f in spec.flags]),
        resp.integer(spec.first_key), resp.integer(spec.last_key), resp.integer(spec.key_step),
        resp.array([resp.simple(b"@" + c.encode()) for c in spec.acl]),
        resp.EMPTY_ARRAY, resp.EMPTY_ARRAY,
        resp.array([_command_info_entry(sub) for sub in spec.subcommands.values()]),
    ])


def _command_doc_entry(spec: CommandSpec) -> list[bytes]:
    return [resp.bulk(spec.name.encode()), resp.array([
        resp.bulk(b"summary"), resp.bulk(spec.summary.encode()),
        resp.bulk(b"since"), resp.bulk(b"1.0.0"),
        resp.bulk(b"group"), resp.bulk(spec.group.encode()),
    ])]


def _command(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.array([_command_info_entry(spec) for spec in COMMANDS.values()]), None


def _command_count(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    return resp.integer(len(COMMANDS)), None


def _command_info(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    if len(argv) == 2:
        return _command(engine, argv, now, client)
    items = []
    for name in argv[2:]:
        spec = COMMANDS.get(name.lower().decode("latin-1"))
        items.append(resp.NULL_ARRAY if spec is None else _command_info_entry(spec))
    return resp.array(items), None


def _command_docs(engine: KvEngine, argv: list[bytes], now: float, client: ClientState) -> Result:
    if len(argv) == 2:
        specs = list(COMMANDS.values())
    else:
        found = (COMMANDS.get(name.lower().decode("latin-1")) for name in argv[2:])
        specs = [spec for spec in found if spec is not None]
    items: list[bytes] = []
    for spec in specs:
        items += _command_doc_entry(spec)
    return resp.array(items), None


def _spec(name: str, arity: int, flags: str, keys: tuple[int, int, int], acl: str, group: str,
          summary: str, handler: Handler | None,
          subcommands: Sequence[CommandSpec] = ()) -> CommandSpec:
    return CommandSpec(name, arity, tuple(flags.split()), keys[0], keys[1], keys[2],
                       tuple(acl.split()), group, summary, handler,
                       {sub.name.split("|", 1)[1]: sub for sub in subcommands})


_NO_KEYS: Final = (0, 0, 0)
_KEY1: Final = (1, 1, 1)
_ALL_KEYS: Final = (1, -1, 1)

COMMANDS: Final[Mapping[str, CommandSpec]] = {spec.name: spec for spec in [
    _spec("ping", -1, "fast", _NO_KEYS, "fast connection", "connection", "Ping the server", _ping),
    _spec("echo", 2, "loading stale fast", _NO_KEYS, "fast connection", "connection", "Echo the given string", _echo),
    _spec("quit", -1, "noscript loading stale fast no_auth allow_busy", _NO_KEYS, "fast connection",
          "connection", "Close the connection", _quit),
    _spec("select", 2, "loading stale fast", _NO_KEYS, "fast connection", "connection",
          "Change the selected database for the current connection", _select),
    _spec("get", 2, "readonly fast", _KEY1, "read string fast", "string", "Get the value of a key", _get),
    _spec("mget", -2, "readonly fast", _ALL_KEYS, "read string fast", "string",
          "Get the values of all the given keys", _mget),
    _spec("set", -3, "write denyoom", _KEY1, "write string slow", "string",
          "Set the string value of a key", _set),
    _spec("mset", -3, "write denyoom", (1, -1, 2), "write string slow", "string",
          "Set multiple keys to multiple values", _mset),
    _spec("incr", 2, "write denyoom fast", _KEY1, "write string fast", "string",
          "Increment the integer value of a key by one", _incr),
    _spec("decr", 2, "write denyoom fast", _KEY1, "write string fast", "string",
          "Decrement the integer value of a key by one", _decr),
    _spec("incrby", 3, "write denyoom fast", _KEY1, "write string fast", "string",
          "Increment the integer value of a key by the given amount", _incrby),
    _spec("decrby", 3, "write denyoom fast", _KEY1, "write string fast", "string",
          "Decrement the integer value of a key by the given number", _decrby),
    _spec("del", -2, "write", _ALL_KEYS, "keyspace write slow", "generic", "Delete a key", _del),
    _spec("exists", -2, "readonly fast", _ALL_KEYS, "keyspace read fast", "generic",
          "Determine if a key exists", _exists),
    _spec("expire", -3, "write fast", _KEY1, "keyspace write fast", "generic",
          "Set a key's time to live in seconds", _make_expire("expire", 1000, True)),
    _spec("pexpire", -3, "write fast", _KEY1, "keyspace write fast", "generic",
          "Set a key's time to live in milliseconds", _make_expire("pexpire", 1, True)),
    _spec("expireat", -3, "write fast", _KEY1, "keyspace write fast", "generic",
          "Set the expiration for a key as a UNIX timestamp", _make_expire("expireat", 1000, False)),
    _spec("pexpireat", -3, "write fast", _KEY1, "keyspace write fast", "generic",
          "Set the expiration for a key as a UNIX timestamp specified in milliseconds",
          _make_expire("pexpireat", 1, False)),
    _spec("persist", 2, "write fast", _KEY1, "keyspace write fast", "generic",
          "Remove the expiration from a key", _persist),
    _spec("ttl", 2, "readonly fast", _KEY1, "keyspace read fast", "generic",
          "Get the time to live for a key in seconds", _ttl),
    _spec("pttl", 2, "readonly fast", _KEY1, "keyspace read fast", "generic",
          "Get the time to live for a key in milliseconds", _pttl),
    _spec("type", 2, "readonly fast", _KEY1, "keyspace read fast", "generic",
          "Determine the type stored at key", _type),
    _spec("dbsize", 1, "readonly fast", _NO_KEYS, "keyspace read fast", "server",
          "Return the number of keys in the selected database", _dbsize),
    _spec("flushall", -1, "write", _NO_KEYS, "keyspace write slow dangerous", "server",
          "Remove all keys from all databases", _flush),
    _spec("flushdb", -1, "write", _NO_KEYS, "keyspace write slow dangerous", "server",
          "Remove all keys from the current database", _flush),
    _spec("info", -1, "loading stale", _NO_KEYS, "slow dangerous", "server",
          "Get information and statistics about the server", _info),
    _spec("config", -2, "", _NO_KEYS, "slow", "server", "A container for server configuration commands",
          None, [
              _spec("config|get", -3, "admin noscript loading stale", _NO_KEYS, "admin slow dangerous",
                    "server", "Get the values of configuration parameters", _config_get),
              _spec("config|resetstat", 2, "admin noscript loading stale", _NO_KEYS,
                    "admin slow dangerous", "server", "Reset the stats returned by INFO",
                    _config_resetstat),
          ]),
    _spec("command", -1, "loading stale", _NO_KEYS, "slow connection", "server",
          "Get array of Redis command details", _command, [
              _spec("command|count", 2, "loading stale", _NO_KEYS, "slow connection", "server",
                    "Get total number of Redis commands", _command_count),
              _spec("command|info", -2, "loading stale", _NO_KEYS, "slow connection", "server",
                    "Get array of specific Redis command details", _command_info),
              _spec("command|docs", -2, "loading stale", _NO_KEYS, "slow connection", "server",
                    "Get array of specific Redis command documentation", _command_docs),
          ]),
]}

WRITE_COMMANDS: Final = frozenset(name for name, spec in COMMANDS.items() if "write" in spec.flags)
