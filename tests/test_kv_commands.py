"""Commands, keyspace expiry, the durability hook and sessions, on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.apps.kv import KvEngine, KvSession
from libos.apps.kv.commands import COMMANDS, ClientState, glob_match
from libos.apps.kv.resp import ParserLimits, encode_request
from libos.apps.kv.store import Keyspace

T0 = 1_700_000_000.0


def run(engine: KvEngine, *argv: bytes | str, now: float = T0) -> bytes:
    args = [a.encode() if isinstance(a, str) else a for a in argv]
    return engine.execute(args, now, ClientState()).reply


# Each row runs on a fresh engine after the setup commands.
COMMAND_CASES = [
    ([], ("PING",), b"+PONG\r\n"),
    ([], ("ping", "x"), b"$1\r\nx\r\n"),
    ([], ("ECHO", ""), b"$0\r\n\r\n"),
    ([], ("GET", "k"), b"$-1\r\n"),
    ([("SET", "k", "v")], ("GET", "k"), b"$1\r\nv\r\n"),
    ([("SET", "k", "v")], ("SET", "k", "w", "NX"), b"$-1\r\n"),
    ([("SET", "k", "v")], ("SET", "k", "w", "NX", "GET"), b"$1\r\nv\r\n"),
    ([], ("SET", "k", "w", "XX"), b"$-1\r\n"),
    ([], ("SET", "k", "v", "EX", "10", "KEEPTTL"), b"-ERR syntax error\r\n"),
    ([], ("SET", "k", "v", "EX", "1", "PX", "1"), b"-ERR syntax error\r\n"),
    ([], ("SET", "k", "v", "EX", "x"), b"-ERR value is not an integer or out of range\r\n"),
    ([], ("SET", "k", "v", "PX", "0"), b"-ERR invalid expire time in 'set' command\r\n"),
    ([], ("SET", "k", "v", "EXAT", "9223372036854776"), b"-ERR invalid expire time in 'set' command\r\n"),
    ([("SET", "k", "v", "EX", "100")], ("TTL", "k"), b":100\r\n"),
    ([("SET", "k", "v", "EX", "100")], ("PTTL", "k"), b":100000\r\n"),
    ([("SET", "k", "v", "PX", "1499")], ("TTL", "k"), b":1\r\n"),
    ([("SET", "k", "v", "PX", "1500")], ("TTL", "k"), b":2\r\n"),
    ([("SET", "k", "v")], ("TTL", "k"), b":-1\r\n"),
    ([], ("TTL", "k"), b":-2\r\n"),
    ([("SET", "k", "v", "EX", "100"), ("SET", "k", "w", "KEEPTTL")], ("TTL", "k"), b":100\r\n"),
    ([("SET", "k", "v", "EX", "100"), ("SET", "k", "w")], ("TTL", "k"), b":-1\r\n"),
    ([("SET", "k", "v", "EX", "100"), ("INCR", "n")], ("PERSIST", "k"), b":1\r\n"),
    ([], ("INCR", "n"), b":1\r\n"),
    ([("SET", "n", "9223372036854775807")], ("INCR", "n"), b"-ERR increment or decrement would overflow\r\n"),
    ([("SET", "n", "-9223372036854775808")], ("DECR", "n"), b"-ERR increment or decrement would overflow\r\n"),
    ([], ("DECRBY", "n", "-9223372036854775808"), b"-ERR decrement would overflow\r\n"),
    ([("SET", "n", "1.5")], ("INCR", "n"), b"-ERR value is not an integer or out of range\r\n"),
    ([], ("INCRBY", "n", "-5"), b":-5\r\n"),
    ([("SET", "n", "10")], ("DECRBY", "n", "3"), b":7\r\n"),
    ([("SET", "a", "1")], ("MGET", "a", "b"), b"*2\r\n$1\r\n1\r\n$-1\r\n"),
    ([], ("MSET", "a", "1", "b"), b"-ERR wrong number of arguments for 'mset' command\r\n"),
    ([("MSET", "a", "1", "b", "2")], ("DEL", "a", "b", "c", "a"), b":2\r\n"),
    ([("MSET", "a", "1", "b", "2")], ("EXISTS", "a", "a", "c"), b":2\r\n"),
    ([("MSET", "a", "1", "b", "2")], ("DBSIZE",), b":2\r\n"),
    ([("MSET", "a", "1", "b", "2"), ("FLUSHALL",)], ("DBSIZE",), b":0\r\n"),
    ([], ("FLUSHDB", "LAZY"), b"-ERR syntax error\r\n"),
    ([("SET", "k", "v")], ("TYPE", "k"), b"+string\r\n"),
    ([], ("TYPE", "k"), b"+none\r\n"),
    ([], ("SELECT", "0"), b"+OK\r\n"),
    ([], ("SELECT", "3"), b"-ERR DB index is out of range\r\n"),
    ([], ("SELECT", "2147483648"),
     b"-ERR value is out of range, value must between -2147483648 and 2147483647\r\n"),
    ([("SET", "k", "v")], ("EXPIRE", "k", "10", "XX"), b":0\r\n"),
    ([("SET", "k", "v")], ("EXPIRE", "k", "10", "GT"), b":0\r\n"),
    ([("SET", "k", "v")], ("EXPIRE", "k", "10", "LT"), b":1\r\n"),
    ([("SET", "k", "v", "EX", "5")], ("EXPIRE", "k", "10", "NX"), b":0\r\n"),
    ([("SET", "k", "v", "EX", "5")], ("EXPIRE", "k", "10", "GT"), b":1\r\n"),
    ([], ("EXPIRE", "k", "10", "nx", "lt"),
     b"-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"),
    ([], ("EXPIRE", "k", "10", "soon"), b"-ERR Unsupported option soon\r\n"),
    ([], ("PEXPIRE", "k", "9223372036854775807"), b"-ERR invalid expire time in 'pexpire' command\r\n"),
    ([("SET", "k", "v")], ("EXPIRE", "k", "0"), b":1\r\n"),
    ([("SET", "k", "v"), ("EXPIRE", "k", "0")], ("EXISTS", "k"), b":0\r\n"),
    ([("SET", "k", "v")], ("PEXPIREAT", "k", "%d" % (T0 * 1000 + 5000)), b":1\r\n"),
    ([("SET", "k", "v"), ("PEXPIREAT", "k", "%d" % (T0 * 1000 + 5000))], ("PTTL", "k"), b":5000\r\n"),
    ([], ("CONFIG", "GET", "appendonly"), b"*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"),
    ([], ("CONFIG", "GET", "append*"),
     b"*4\r\n$10\r\nappendonly\r\n$2\r\nno\r\n$11\r\nappendfsync\r\n$8\r\neverysec\r\n"),
    ([], ("CONFIG", "GET", "sav?", "SAVE"), b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"),
    ([], ("CONFIG", "SET", "save", ""), b"-ERR unknown subcommand 'SET'. Try CONFIG HELP.\r\n"),
    ([], ("CONFIG", "GET"), b"-ERR wrong number of arguments for 'config|get' command\r\n"),
    ([], ("COMMAND", "COUNT"), b":%d\r\n" % len(COMMANDS)),
    ([], ("COMMAND", "INFO", "nosuch"), b"*1\r\n*-1\r\n"),
    ([], ("COMMAND", "DOCS", "nosuch"), b"*0\r\n"),
    ([], ("INFO", "nosuch"), b"$0\r\n\r\n"),
    ([], ("nosuch", "a"), b"-ERR unknown command 'nosuch', with args beginning with: 'a' \r\n"),
    ([], ("GET",), b"-ERR wrong number of arguments for 'get' command\r\n"),
    ([], ("ttl", "a", "b"), b"-ERR wrong number of arguments for 'ttl' command\r\n"),
]


@pytest.mark.parametrize("setup, argv, expected", COMMAND_CASES, ids=lambda v: repr(v)[:50])
def test_command_table(setup: list[tuple[str, ...]], argv: tuple[str, ...], expected: bytes) -> None:
    engine = KvEngine(now=T0)
    for step in setup:
        assert not run(engine, *step).startswith(b"-"), step
    assert run(engine, *argv) == expected


def test_command_info_and_docs_shapes() -> None:
    engine = KvEngine(now=T0)
    info = run(engine, "COMMAND", "INFO", "get")
    assert info.startswith(b"*1\r\n*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n")
    docs = run(engine, "COMMAND", "DOCS", "get")
    assert docs.startswith(b"*2\r\n$3\r\nget\r\n*6\r\n$7\r\nsummary\r\n")
    assert run(engine, "COMMAND").startswith(b"*%d\r\n*10\r\n" % len(COMMANDS))


def test_info_sections() -> None:
    engine = KvEngine(now=T0, tcp_port=7000)
    run(engine, "SET", "a", "1", "EX", "100")
    run(engine, "GET", "a")
    run(engine, "GET", "b")
    body = run(engine, "INFO", now=T0 + 90000)
    text = body.split(b"\r\n", 1)[1]
    for title in (b"# Server", b"# Clients", b"# Memory", b"# Stats", b"# Keyspace"):
        assert title + b"\r\n" in text
    assert b"tcp_port:7000\r\n" in text and b"uptime_in_days:1\r\n" in text
    assert b"keyspace_hits:1\r\nkeyspace_misses:1\r\n" in text
    assert b"db0:keys=1,expires=1,avg_ttl=0\r\n" in text
    assert run(engine, "INFO", "keyspace") == b"$44\r\n# Keyspace\r\ndb0:keys=1,expires=1,avg_ttl=0\r\n\r\n"


@pytest.mark.parametrize("pattern, text, nocase, matched", [
    (b"*", b"", False, True), (b"sa*", b"save", False, True), (b"s?ve", b"save", False, True),
    (b"*max-*-entries*", b"hash-max-listpack-entries", False, True), (b"a*b", b"axxbxxc", False, False),
    (b"[sa]ave", b"save", False, True), (b"[^s]ave", b"save", False, False), (b"[a-t]ave", b"save", False, True),
    (b"\\*", b"*", False, True), (b"\\*", b"a", False, False), (b"SAVE", b"save", True, True),
    (b"SAVE", b"save", False, False), (b"a*", b"b", False, False), (b"**a", b"xa", False, True),
])
def test_glob_match(pattern: bytes, text: bytes, nocase: bool, matched: bool) -> None:
    assert glob_match(pattern, text, nocase) is matched


def test_lazy_expiry_on_a_fake_clock() -> None:
    engine = KvEngine(now=T0)
    assert run(engine, "SET", "k", "v", "PX", "100") == b"+OK\r\n"
    # Expired only once now is strictly past the deadline, as in Redis.
    assert run(engine, "GET", "k", now=T0 + 0.1) == b"$1\r\nv\r\n"
    assert run(engine, "PTTL", "k", now=T0 + 0.1) == b":0\r\n"
    assert run(engine, "DBSIZE", now=T0 + 0.2) == b":1\r\n"
    assert run(engine, "GET", "k", now=T0 + 0.101) == b"$-1\r\n"
    assert run(engine, "DBSIZE", now=T0 + 0.2) == b":0\r\n"
    assert engine.keyspace.expired_keys == 1


def test_incr_keeps_the_deadline() -> None:
    engine = KvEngine(now=T0)
    run(engine, "SET", "n", "1", "EX", "10")
    assert run(engine, "INCR", "n", now=T0 + 5) == b":2\r\n"
    assert run(engine, "TTL", "n", now=T0 + 5) == b":5\r\n"


def test_sweep_is_bounded_and_skips_stale_entries() -> None:
    space = Keyspace()
    deadline = int(T0 * 1000) + 10
    for i in range(10):
        space.set(b"k%d" % i, b"v", T0, deadline)
    space.set(b"k0", b"v", T0)  # no longer volatile: its heap entry is stale
    space.expire_at(b"k1", deadline + 10_000, T0)
    # Ties pop in key order: k0 and k1 are stale, so three entries examined remove k2 only.
    assert space.sweep(T0 + 1, 3) == 1
    assert space.sweep(T0 + 1, 100) == 7
    assert space.sweep(T0 + 1, 100) == 0
    assert len(space) == 2 and space.volatile_count == 1
    assert space.next_deadline() == deadline + 10_000
    assert space.sweep(T0 + 11, 100) == 1


def test_heap_of_deadlines_stays_bounded() -> None:
    space = Keyspace()
    space.set(b"k", b"v", T0)
    for i in range(10_000):
        space.expire_at(b"k", int(T0 * 1000) + 1000 + i, T0)
    assert len(space._heap) <= 64


class Log:
    def __init__(self) -> None:
        self.records: list[list[bytes]] = []

    def __call__(self, argv: list[bytes]) -> int:
        self.records.append(argv)
        return len(self.records)


def test_write_hook_gets_deterministic_forms() -> None:
    log = Log()
    engine = KvEngine(log, now=T0)
    ms = int(T0 * 1000)
    run(engine, "SET", "a", "1", "EX", "10")
    run(engine, "SET", "a", "2", "NX")  # nothing changed: not logged
    run(engine, "GET", "a")
    run(engine, "SET", "b", "x", "KEEPTTL")
    run(engine, "EXPIRE", "b", "5")
    run(engine, "EXPIRE", "b", "-1")
    run(engine, "DEL", "nope")
    run(engine, "INCR", "n")
    run(engine, "SET", "c", "v", "PXAT", "1")
    run(engine, "flushdb", "async")
    assert log.records == [
        [b"SET", b"a", b"1", b"PXAT", b"%d" % (ms + 10_000)],
        [b"SET", b"b", b"x", b"KEEPTTL"],
        [b"PEXPIREAT", b"b", b"%d" % (ms + 5000)],
        [b"DEL", b"b"],
        [b"INCR", b"n"],
        [b"DEL", b"c"],
        [b"FLUSHDB"],
    ]


def test_replay_rebuilds_the_keyspace_even_after_deadlines_passed() -> None:
    log = Log()
    engine = KvEngine(log, now=T0)
    run(engine, "SET", "n", "5", "PX", "1000")
    run(engine, "INCR", "n", now=T0 + 0.5)
    run(engine, "MSET", "a", "1", "b", "2")
    run(engine, "PEXPIRE", "a", "100")
    run(engine, "DEL", "b")
    fresh = KvEngine(now=T0)
    for record in log.records:
        assert not fresh.replay(record).startswith(b"-")
    assert len(log.records) == 5
    for key in ("n", "a", "b"):
        for when in (T0 + 0.6, T0 + 2):
            assert run(fresh, "PTTL", key, now=when) == run(engine, "PTTL", key, now=when)
            assert run(fresh, "GET", key, now=when) == run(engine, "GET", key, now=when)


def session_with_log() -> tuple[KvSession, Log]:
    log = Log()
    return KvSession(KvEngine(log, now=T0)), log


def test_replies_wait_for_the_log_in_order() -> None:
    session, log = session_with_log()
    session.feed(b"PING\r\n" + encode_request([b"SET", b"k", b"v"]) + b"GET k\r\nINCR n\r\nPING\r\n", T0)
    assert session.take_output() == b"+PONG\r\n"
    assert session.has_held_output() and session.output_bytes > 0
    session.release_durable(1)
    assert session.take_output() == b"+OK\r\n$1\r\nv\r\n"
    session.release_durable(2)
    assert session.take_output() == b":1\r\n+PONG\r\n"
    assert not session.has_held_output() and session.output_bytes == 0
    assert len(log.records) == 2


def test_bounded_work_per_feed() -> None:
    session = KvSession(KvEngine(now=T0), max_commands=3)
    session.feed(b"INCR n\r\n" * 7, T0)
    assert session.take_output() == b":1\r\n:2\r\n:3\r\n"
    assert session.has_pending()
    session.feed(b"", T0)
    session.feed(b"", T0)
    assert session.take_output() == b":4\r\n:5\r\n:6\r\n:7\r\n"
    assert not session.has_pending()


def test_output_high_water_pauses_until_taken() -> None:
    engine = KvEngine(now=T0)
    run(engine, "SET", "big", "x" * 1000)
    session = KvSession(engine, output_high_water=2500, output_hard_limit=10_000)
    session.feed(b"GET big\r\n" * 5, T0)
    assert session.output_bytes == 3 * 1009 and session.has_pending()
    session.feed(b"", T0)
    assert session.output_bytes == 3 * 1009
    session.take_output()
    session.feed(b"", T0)
    assert session.take_output() == b"$1000\r\n" + b"x" * 1000 + b"\r\n" + b"$1000\r\n" + b"x" * 1000 + b"\r\n"
    assert not session.should_close


def test_output_hard_limit_disconnects() -> None:
    engine = KvEngine(now=T0)
    run(engine, "SET", "big", "x" * 1000)
    session = KvSession(engine, output_high_water=100, output_hard_limit=1500)
    session.feed(b"MGET big big\r\nPING\r\n", T0)
    assert session.should_close and session.take_output() == b""
    assert session.close_reason == "output buffer limit"


def test_query_buffer_limit_disconnects_without_reply() -> None:
    session = KvSession(KvEngine(now=T0), limits=ParserLimits(max_query_buffer=100))
    session.feed(b"*2\r\n$200\r\n" + b"a" * 150, T0)
    assert session.should_close and session.take_output() == b""


def test_quit_and_protocol_errors_close_after_earlier_replies() -> None:
    session = KvSession(KvEngine(now=T0))
    session.feed(b"PING\r\nQUIT\r\nPING\r\n", T0)
    assert session.take_output() == b"+PONG\r\n+OK\r\n" and session.should_close
    session.feed(b"PING\r\n", T0)
    assert session.take_output() == b""
    session = KvSession(KvEngine(now=T0))
    session.feed(b"ECHO a\r\n*1\r\n$-5\r\nPING\r\n", T0)
    assert session.take_output() == b"$1\r\na\r\n-ERR Protocol error: invalid bulk length\r\n"
    assert session.should_close and session.close_reason.startswith("protocol error")


def test_connection_counters() -> None:
    engine = KvEngine(now=T0)
    first, second = KvSession(engine), KvSession(engine)
    first.close()
    first.close()
    assert engine.stats.connected_clients == 1 and engine.stats.total_connections_received == 2
    second.close()
    assert engine.stats.connected_clients == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from([b"SET", b"GET", b"INCR", b"EXPIRE", b"PX", b"10", b"-1", b"k", b"EX",
                              b"NX", b"GET", b"CONFIG", b"COMMAND", b"DEL", b"MSET", b"x\r\n", b""]),
             min_size=1, max_size=5).map(encode_request)), max_size=8))
def test_random_input_gives_only_replies_or_close(chunks: list[bytes]) -> None:
    session = KvSession(KvEngine(now=T0), max_commands=4, limits=ParserLimits(max_inline=128))
    for i, chunk in enumerate(chunks):
        session.feed(chunk, T0 + i)
        while session.has_pending():
            session.feed(b"", T0 + i)
        out = session.take_output()
        assert out == b"" or out.endswith(b"\r\n")
        if session.should_close:
            break
