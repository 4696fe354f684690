"""Unit and property tests of the memcache engine: store, ASCII protocol, UDP framing.

All sans-I/O: sessions are fed bytes with a fake clock. The byte-exact expectations come
from a real memcached 1.6.18 (tests/test_memcache_vs_memcached.py re-checks many of them
against the real server).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libos.apps.memcache import (
    MAX_GET_LINE,
    MAX_LINE,
    MalformedFrame,
    McEngine,
    McSession,
    McStore,
    McUdpHandler,
    StoreError,
    StoreResult,
    UdpFrameHeader,
)
from libos.apps.memcache.protocol import parse_signed, parse_unsigned
from libos.apps.memcache.store import REALTIME_MAXDELTA, item_size, parse_numeric_value

NOW = 1_700_000_000.0
HEADER = struct.Struct("!HHHH")


def make_session(**engine_options: int) -> tuple[McEngine, McSession]:
    engine = McEngine(NOW, **engine_options)  # type: ignore[arg-type]
    return engine, engine.open_session(NOW)


def run(request: bytes, session: McSession | None = None, now: float = NOW) -> bytes:
    if session is None:
        _, session = make_session()
    session.feed(request, now)
    out = session.take_output()
    while session.has_backlog:
        session.feed(b"", now)
        out += session.take_output()
    return out


# (case id, request, exact reply) on a fresh engine.
PROTOCOL_CASES: list[tuple[str, bytes, bytes]] = [
    ("set-get", b"set a 5 0 1\r\nx\r\nget a\r\n", b"STORED\r\nVALUE a 5 1\r\nx\r\nEND\r\n"),
    ("gets-cas-unique", b"set a 0 0 1\r\nx\r\ngets a\r\n",
     b"STORED\r\nVALUE a 0 1 1\r\nx\r\nEND\r\n"),
    ("get-miss", b"get nope\r\n", b"END\r\n"),
    ("multi-get-order", b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\nget b x a b\r\n",
     b"STORED\r\nSTORED\r\nVALUE b 0 1\r\n2\r\nVALUE a 0 1\r\n1\r\nVALUE b 0 1\r\n2\r\nEND\r\n"),
    ("lf-only-lines", b"set a 0 0 1\nx\r\nget a\n", b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n"),
    ("extra-spaces", b"  set  a  0  0  1 \r\nx\r\nget  a \r\n",
     b"STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n"),
    ("empty-value", b"set a 0 0 0\r\n\r\nget a\r\n", b"STORED\r\nVALUE a 0 0\r\n\r\nEND\r\n"),
    ("binary-value", b"set a 0 0 4\r\n\r\n\x00\xff\r\nget a\r\n",
     b"STORED\r\nVALUE a 0 4\r\n\r\n\x00\xff\r\nEND\r\n"),
    ("max-flags", b"set a 4294967295 0 1\r\nx\r\nget a\r\n",
     b"STORED\r\nVALUE a 4294967295 1\r\nx\r\nEND\r\n"),
    ("flags-over-u32", b"set a 4294967296 0 1\r\nx\r\n",
     b"CLIENT_ERROR bad command line format\r\nERROR\r\n"),
    ("plus-and-zeros", b"set a +0 00 01\r\nx\r\n", b"STORED\r\n"),
    ("unknown-command", b"foo\r\n", b"ERROR\r\n"),
    ("empty-line", b"\r\n", b"ERROR\r\n"),
    ("uppercase", b"GET a\r\n", b"ERROR\r\n"),
    ("tab-is-not-a-separator", b"set\ta 0 0 1\r\n", b"ERROR\r\n"),
    ("get-no-key", b"get\r\n", b"ERROR\r\n"),
    ("set-too-few", b"set a 0 0\r\n", b"ERROR\r\n"),
    ("set-too-many", b"set a 0 0 1 noreply extra\r\nx\r\n", b"ERROR\r\nERROR\r\n"),
    ("set-unknown-sixth-token", b"set a 0 0 1 foo\r\nx\r\n", b"STORED\r\n"),
    ("bad-flags-then-data-as-command", b"set a b 0 1\r\nx\r\n",
     b"CLIENT_ERROR bad command line format\r\nERROR\r\n"),
    ("negative-length", b"set a 0 0 -1\r\n", b"CLIENT_ERROR bad command line format\r\n"),
    ("length-garbage", b"set a 0 0 1x\r\nx\r\n",
     b"CLIENT_ERROR bad command line format\r\nERROR\r\n"),
    ("key-251", b"set " + b"k" * 251 + b" 0 0 1\r\nx\r\n",
     b"CLIENT_ERROR bad command line format\r\nERROR\r\n"),
    ("key-250", b"set " + b"k" * 250 + b" 0 0 1\r\nx\r\n", b"STORED\r\n"),
    ("get-long-key-discards-all", b"set a 0 0 1\r\nx\r\nget a " + b"k" * 251 + b"\r\n",
     b"STORED\r\nCLIENT_ERROR bad command line format\r\n"),
    ("bad-data-chunk", b"set a 0 0 1\r\nxyz\r\nget a\r\n",
     b"CLIENT_ERROR bad data chunk\r\nERROR\r\nEND\r\n"),
    ("bad-chunk-lf-only", b"set a 0 0 1\nx\nget a\n",
     b"CLIENT_ERROR bad data chunk\r\nERROR\r\n"),
    ("noreply-set", b"set a 0 0 1 noreply\r\nx\r\nget a\r\n", b"VALUE a 0 1\r\nx\r\nEND\r\n"),
    ("noreply-silences-errors", b"set a x 0 1 noreply\r\nx\r\n", b"ERROR\r\n"),
    ("noreply-bad-chunk", b"set a 0 0 1 noreply\r\nxyz\r\n", b"ERROR\r\n"),
    ("add", b"add a 0 0 1\r\nx\r\nadd a 0 0 1\r\ny\r\nget a\r\n",
     b"STORED\r\nNOT_STORED\r\nVALUE a 0 1\r\nx\r\nEND\r\n"),
    ("replace", b"replace a 0 0 1\r\nx\r\nset a 0 0 1\r\nx\r\nreplace a 3 0 1\r\ny\r\nget a\r\n",
     b"NOT_STORED\r\nSTORED\r\nSTORED\r\nVALUE a 3 1\r\ny\r\nEND\r\n"),
    ("append-prepend-keep-flags",
     b"set a 5 0 1\r\nx\r\nappend a 7 0 2\r\nyz\r\nprepend a 9 0 1\r\nw\r\nget a\r\n",
     b"STORED\r\nSTORED\r\nSTORED\r\nVALUE a 5 4\r\nwxyz\r\nEND\r\n"),
    ("append-missing", b"append a 0 0 1\r\nx\r\nprepend a 0 0 1\r\nx\r\n",
     b"NOT_STORED\r\nNOT_STORED\r\n"),
    ("cas-flow",
     b"set a 0 0 1\r\nx\r\ncas a 0 0 1 1\r\ny\r\ncas a 0 0 1 1\r\nz\r\ncas b 0 0 1 1\r\nz\r\n",
     b"STORED\r\nSTORED\r\nEXISTS\r\nNOT_FOUND\r\n"),
    ("cas-too-few", b"cas a 0 0 1\r\nx\r\n", b"ERROR\r\nERROR\r\n"),
    ("cas-bad-unique-noreply", b"cas a 0 0 1 x noreply\r\nx\r\n", b"ERROR\r\n"),
    ("incr-decr", b"set n 0 0 2\r\n10\r\nincr n 5\r\ndecr n 100\r\nincr n 7\r\n",
     b"STORED\r\n15\r\n0\r\n7\r\n"),
    ("incr-wraps", b"set n 0 0 20\r\n18446744073709551615\r\nincr n 2\r\n", b"STORED\r\n1\r\n"),
    ("incr-max-delta", b"set n 0 0 1\r\n0\r\nincr n 18446744073709551615\r\n",
     b"STORED\r\n18446744073709551615\r\n"),
    ("incr-grows-value", b"set n 0 0 2\r\n99\r\nincr n 1\r\nget n\r\n",
     b"STORED\r\n100\r\nVALUE n 0 3\r\n100\r\nEND\r\n"),
    ("decr-pads-in-place", b"set n 0 0 3\r\n100\r\ndecr n 1\r\nget n\r\n",
     b"STORED\r\n99\r\nVALUE n 0 3\r\n99 \r\nEND\r\n"),
    ("incr-whitespace-around", b"set n 0 0 3\r\n 12\r\nincr n 1\r\nset m 0 0 3\r\n12 \r\nincr m 1\r\n",
     b"STORED\r\n13\r\nSTORED\r\n13\r\n"),
    ("incr-non-numeric", b"set a 0 0 1\r\nx\r\nincr a 1\r\n",
     b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ("incr-negative-value", b"set a 0 0 2\r\n-1\r\nincr a 1\r\n",
     b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ("incr-empty-value", b"set a 0 0 0\r\n\r\nincr a 1\r\n",
     b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ("incr-value-over-u64", b"set a 0 0 21\r\n184467440737095516150\r\nincr a 1\r\n",
     b"STORED\r\nCLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    ("incr-bad-delta", b"incr n x\r\nincr n -1\r\nincr n 18446744073709551616\r\n",
     b"CLIENT_ERROR invalid numeric delta argument\r\n" * 3),
    ("incr-missing", b"incr n 1\r\ndecr n 1\r\n", b"NOT_FOUND\r\nNOT_FOUND\r\n"),
    ("incr-arity", b"incr n\r\nincr n 1 2 3\r\n", b"ERROR\r\nERROR\r\n"),
    ("incr-noreply", b"set n 0 0 1\r\n1\r\nincr n 1 noreply\r\nget n\r\n",
     b"STORED\r\nVALUE n 0 1\r\n2\r\nEND\r\n"),
    ("delete", b"set a 0 0 1\r\nx\r\ndelete a\r\ndelete a\r\n",
     b"STORED\r\nDELETED\r\nNOT_FOUND\r\n"),
    ("delete-legacy-zero", b"delete a 0\r\ndelete a 0 noreply\r\n", b"NOT_FOUND\r\n"),
    ("delete-hold-time", b"delete a 1\r\n",
     b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"),
    ("delete-arity", b"delete\r\ndelete a b c d\r\n", b"ERROR\r\nERROR\r\n"),
    ("touch", b"set a 0 0 1\r\nx\r\ntouch a 10\r\ntouch b 10\r\n",
     b"STORED\r\nTOUCHED\r\nNOT_FOUND\r\n"),
    ("touch-bad", b"touch a x\r\ntouch a\r\ntouch a x noreply\r\n",
     b"CLIENT_ERROR invalid exptime argument\r\nERROR\r\n"),
    ("version", b"version\r\nversion extra\r\n", b"VERSION 1.6.0-arrakis\r\n" * 2),
    ("verbosity", b"verbosity 1\r\nverbosity\r\nverbosity 1 noreply\r\nverbosity x\r\n",
     b"OK\r\nERROR\r\nCLIENT_ERROR bad command line format\r\n"),
    ("flush-all", b"set a 0 0 1\r\nx\r\nflush_all\r\nget a\r\n", b"STORED\r\nOK\r\nEND\r\n"),
    ("flush-all-args", b"flush_all 0\r\nflush_all noreply\r\nflush_all x\r\nflush_all 1 2 3\r\n",
     b"OK\r\nCLIENT_ERROR invalid exptime argument\r\nERROR\r\n"),
    ("negative-exptime", b"set a 0 -1 1\r\nx\r\nget a\r\n", b"STORED\r\nEND\r\n"),
    ("stats-unknown", b"stats nonsense\r\n", b"ERROR\r\n"),
    ("stats-reset", b"stats reset\r\n", b"RESET\r\n"),
    ("quit-stops-parsing", b"version\r\nquit\r\nversion\r\n", b"VERSION 1.6.0-arrakis\r\n"),
]


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [case[1:] for case in PROTOCOL_CASES],
    ids=[case[0] for case in PROTOCOL_CASES],
)
def test_protocol_case(request_bytes: bytes, reply: bytes) -> None:
    assert run(request_bytes) == reply


def test_too_large_value_is_swallowed_without_buffering() -> None:
    engine, session = make_session()
    session.feed(b"set a 0 0 1\r\nx\r\n", NOW)
    session.feed(b"set a 0 0 3000000\r\n", NOW)
    assert session.take_output() == b"STORED\r\nSERVER_ERROR object too large for cache\r\n"
    for _ in range(30):
        session.feed(b"w" * 100_000, NOW)
        assert session.buffered_input == 0
    session.feed(b"\r\nget a\r\n", NOW)
    # The old value went with the refused set, as memcached does.
    assert session.take_output() == b"END\r\n"
    assert engine.counters.store_too_large == 1


def test_too_large_append_is_refused() -> None:
    store = McStore(item_size_max=1000)
    engine = McEngine(NOW, store)
    session = engine.open_session(NOW)
    reply = run(b"set a 0 0 900\r\n" + b"x" * 900 + b"\r\nappend a 0 0 100\r\n"
                + b"y" * 100 + b"\r\n", session)
    assert reply == b"STORED\r\nSERVER_ERROR out of memory storing object\r\n"


def test_line_too_long_closes_without_reply_after_earlier_replies() -> None:
    engine, session = make_session()
    session.feed(b"version\r\n" + b"x" * MAX_LINE, NOW)
    assert not session.should_close
    session.feed(b"x", NOW)
    assert session.should_close
    assert session.close_reason == "line too long"
    assert session.take_output() == b"VERSION 1.6.0-arrakis\r\n"
    session.feed(b"\r\nversion\r\n", NOW)
    assert session.take_output() == b""
    assert engine.counters.conn_closed_bad_input == 1


def test_line_limit_does_not_depend_on_chunking() -> None:
    line = b"set a 0 0 1 " + b" " * MAX_LINE + b"\r\nx\r\n"
    _, whole = make_session()
    whole.feed(line, NOW)
    _, split = make_session()
    for byte in range(len(line)):
        split.feed(line[byte : byte + 1], NOW)
    assert whole.should_close and split.should_close
    assert whole.take_output() == split.take_output() == b""


def test_large_multiget_line_is_allowed_up_to_its_limit() -> None:
    keys = b" ".join(b"key%05d" % i for i in range(2000))
    assert MAX_LINE < len(keys) < MAX_GET_LINE
    assert run(b"get " + keys + b"\r\n") == b"END\r\n"
    _, session = make_session()
    session.feed(b"get " + b"k " * MAX_GET_LINE, NOW)
    assert session.should_close


def test_work_per_feed_is_bounded_and_backlog_drains() -> None:
    engine, session = make_session(max_requests_per_feed=10)
    session.feed(b"version\r\n" * 95, NOW)
    assert session.take_output().count(b"VERSION") == 10
    assert session.has_backlog
    total = 10
    rounds = 0
    while session.has_backlog:
        session.feed(b"", NOW)
        total += session.take_output().count(b"VERSION")
        rounds += 1
    assert total == 95
    assert rounds == 9


def test_big_multiget_streams_under_the_output_high_water() -> None:
    engine, session = make_session(output_high_water=10_000)
    run(b"set big 0 0 4000\r\n" + b"b" * 4000 + b"\r\n", session)
    session.feed(b"get " + b"big " * 50 + b"\r\nversion\r\n", NOW)
    first = session.take_output()
    assert len(first) < 10_000 + 4100
    assert session.has_backlog
    rest = run(b"", session)
    whole = first + rest
    assert whole.count(b"VALUE big 0 4000\r\n") == 50
    assert whole.endswith(b"END\r\nVERSION 1.6.0-arrakis\r\n")
    assert engine.counters.get_hits == 50


def test_input_backlog_cap_closes_a_session_fed_without_draining() -> None:
    _, session = make_session(max_requests_per_feed=1, max_input_backlog=1000)
    session.feed(b"version\r\n" * 200, NOW)
    assert session.should_close
    assert session.close_reason == "input backlog over limit"


PIPELINE = (
    b"set a 1 0 3\r\nabc\r\nget a b\r\ngets a\r\nappend a 0 0 2 noreply\r\nde\r\n"
    b"incr a 1\r\nset n 0 0 1\r\n9\r\nincr n 1\r\ndecr n 3\r\ntouch n 5\r\n"
    b"set a 0 0 2\r\nxyz\r\nbogus\r\ndelete n\r\nget n a\r\nversion\r\n"
)


def test_pipeline_split_at_every_byte_boundary() -> None:
    expected = run(PIPELINE)
    assert expected.count(b"\r\n") > 15
    for cut in range(len(PIPELINE) + 1):
        _, session = make_session()
        session.feed(PIPELINE[:cut], NOW)
        out = session.take_output()
        session.feed(PIPELINE[cut:], NOW)
        assert out + session.take_output() == expected, cut


def test_pipeline_fed_byte_by_byte() -> None:
    _, session = make_session()
    out = b""
    for index in range(len(PIPELINE)):
        session.feed(PIPELINE[index : index + 1], NOW)
        out += session.take_output()
    assert out == run(PIPELINE)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(PIPELINE)), max_size=8))
def test_pipeline_any_chunking_gives_the_same_reply(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(PIPELINE)]
    _, session = make_session(max_requests_per_feed=3)
    out = b""
    for start, end in zip(bounds, bounds[1:]):
        session.feed(PIPELINE[start:end], NOW)
        out += session.take_output()
        while session.has_backlog:
            session.feed(b"", NOW)
            out += session.take_output()
    assert out == run(PIPELINE)


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(max_size=300), max_size=10))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    engine, session = make_session(max_requests_per_feed=8)
    for chunk in chunks:
        session.feed(chunk, NOW)
        session.take_output()
    session.close()
    assert engine.counters.curr_connections == 0


_TOKENS = st.sampled_from(
    [b"get", b"gets", b"set", b"add", b"cas", b"append", b"incr", b"decr", b"delete",
     b"touch", b"flush_all", b"stats", b"verbosity", b"noreply", b"a", b"b", b"0", b"1",
     b"-1", b"3", b"18446744073709551616", b"4294967296", b"x", b""]
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.lists(_TOKENS, min_size=1, max_size=7), max_size=12),
       clock=st.floats(min_value=0, max_value=100))
def test_random_command_lines_never_raise(lines: list[list[bytes]], clock: float) -> None:
    engine, session = make_session()
    stream = b"".join(b" ".join(line) + b"\r\n" for line in lines)
    out = run(stream, session, NOW + clock)
    # The reply stream stays well formed whatever was asked (split_replies checks it).
    split_replies(out)
    assert engine.store.bytes_used >= 0


_SIMPLE_REPLIES = (
    b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND", b"DELETED", b"TOUCHED", b"END",
    b"ERROR", b"OK", b"RESET",
)


def split_replies(out: bytes) -> list[bytes]:
    """Cut a reply stream into reply lines, checking that it is well formed."""
    replies = []
    pos = 0
    while pos < len(out):
        end = out.index(b"\r\n", pos)
        line = out[pos:end]
        pos = end + 2
        if line.startswith(b"VALUE "):
            length = int(line.split(b" ")[3])
            if out[pos + length : pos + length + 2] != b"\r\n":
                raise AssertionError(f"bad data block after {line!r}")
            pos += length + 2
        elif not (
            line in _SIMPLE_REPLIES
            or line.isdigit()
            or line.startswith((b"CLIENT_ERROR ", b"SERVER_ERROR ", b"STAT ", b"VERSION "))
        ):
            raise AssertionError(f"unexpected reply line {line!r}")
        replies.append(line)
    return replies


def test_stats_lists_the_expected_fields() -> None:
    engine = McEngine(NOW, pid=4242)
    session = engine.open_session(NOW)
    other = engine.open_session(NOW)
    run(b"set a 0 0 1\r\nx\r\nget a b\r\n", session)
    out = run(b"stats\r\n", session, NOW + 12.5)
    stats = dict(line.split(b" ")[1:3] for line in out.split(b"\r\n") if line.startswith(b"STAT"))
    assert out.endswith(b"END\r\n")
    assert stats[b"pid"] == b"4242"
    assert stats[b"uptime"] == b"12"
    assert stats[b"time"] == b"%d" % int(NOW + 12.5)
    assert stats[b"version"] == b"1.6.0-arrakis"
    assert stats[b"curr_connections"] == b"2"
    assert stats[b"curr_items"] == b"1"
    assert stats[b"total_items"] == b"1"
    assert stats[b"cmd_get"] == b"2"
    assert stats[b"get_hits"] == b"1"
    assert stats[b"get_misses"] == b"1"
    assert stats[b"cmd_set"] == b"1"
    assert stats[b"bytes"] == b"%d" % item_size(1, 1)
    other.close()
    other.close()
    assert engine.counters.curr_connections == 1
    run(b"stats reset\r\n", session)
    assert engine.counters.cmd_get == 0
    assert engine.counters.curr_connections == 1
    settings_out = run(b"stats settings\r\n", session)
    assert b"STAT item_size_max 1048576\r\n" in settings_out


# exptime rules (protocol.txt): (exptime, seconds later, still there?)
EXPIRY_CASES = [
    (0, 10**9, True),
    (10, 9.9, True),
    (10, 10, False),
    (REALTIME_MAXDELTA, REALTIME_MAXDELTA - 1, True),
    (REALTIME_MAXDELTA, REALTIME_MAXDELTA, False),
    (int(NOW) + 100, 99, True),
    (int(NOW) + 100, 100, False),
    (REALTIME_MAXDELTA + 1, 0, False),
    (int(NOW) - 1, 0, False),
    (-1, 0, False),
]


@pytest.mark.parametrize(("exptime", "later", "alive"), EXPIRY_CASES)
def test_exptime_rules(exptime: int, later: float, alive: bool) -> None:
    store = McStore(started_at=NOW - 1000)
    assert store.store("set", b"k", b"v", 0, exptime, NOW) is StoreResult.STORED
    assert (store.get(b"k", NOW + later) is not None) is alive


def test_touch_moves_the_deadline() -> None:
    _, session = make_session()
    run(b"set a 0 10 1\r\nx\r\n", session)
    assert run(b"touch a 100\r\n", session, NOW + 5) == b"TOUCHED\r\n"
    assert run(b"get a\r\n", session, NOW + 50) == b"VALUE a 0 1\r\nx\r\nEND\r\n"
    assert run(b"get a\r\n", session, NOW + 105) == b"END\r\n"


def test_delayed_flush_all() -> None:
    _, session = make_session()
    run(b"set a 0 0 1\r\nx\r\n", session)
    assert run(b"flush_all 10\r\n", session) == b"OK\r\n"
    assert run(b"get a\r\n", session, NOW + 9) == b"VALUE a 0 1\r\nx\r\nEND\r\n"
    run(b"set b 0 0 1\r\ny\r\n", session, NOW + 9)
    assert run(b"get a b\r\n", session, NOW + 10) == b"END\r\n"
    run(b"set c 0 0 1\r\nz\r\n", session, NOW + 11)
    assert run(b"get c\r\n", session, NOW + 12) == b"VALUE c 0 1\r\nz\r\nEND\r\n"


def test_lru_evicts_least_recently_used_within_the_byte_budget() -> None:
    size = item_size(2, 10)
    store = McStore(max_bytes=3 * size)
    for key in (b"k1", b"k2", b"k3"):
        store.store("set", key, b"v" * 10, 0, 0, NOW)
    assert store.get(b"k1", NOW) is not None
    store.store("set", b"k4", b"v" * 10, 0, 0, NOW)
    assert store.peek(b"k2", NOW) is None
    assert all(store.peek(key, NOW) is not None for key in (b"k1", b"k3", b"k4"))
    assert store.counters.evictions == 1
    assert store.bytes_used == 3 * size
    store.store("set", b"k5", b"v" * (2 * size), 0, 0, NOW)
    assert store.bytes_used <= store.max_bytes


def test_expired_items_are_reclaimed_not_counted_as_evictions() -> None:
    size = item_size(2, 1)
    store = McStore(max_bytes=2 * size)
    store.store("set", b"k1", b"v", 0, 5, NOW)
    store.store("set", b"k2", b"v", 0, 0, NOW)
    store.store("set", b"k3", b"v", 0, 0, NOW + 6)
    assert store.counters.evictions == 0
    assert store.counters.reclaimed == 1


def test_cas_uniques_change_on_every_write() -> None:
    store = McStore()
    seen = set()
    for value in (b"1", b"2"):
        store.store("set", b"k", value, 0, 0, NOW)
        item = store.get(b"k", NOW)
        assert item is not None
        seen.add(item.cas)
    store.incr_decr(b"k", 1, True, NOW)
    item = store.get(b"k", NOW)
    assert item is not None and item.cas not in seen and item.value == b"3"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda s: s.store("set", b"", b"v", 0, 0, NOW), StoreError),
        (lambda s: s.store("set", b"k" * 251, b"v", 0, 0, NOW), StoreError),
        (lambda s: s.store("set", b"k", b"v", -1, 0, NOW), StoreError),
        (lambda s: s.store("set", b"k", b"v", 1 << 32, 0, NOW), StoreError),
        (lambda s: s.store("upsert", b"k", b"v", 0, 0, NOW), StoreError),
        (lambda s: s.incr_decr(b"k", 1 << 64, True, NOW), StoreError),
        (lambda s: McStore(max_bytes=0), StoreError),
    ],
)
def test_store_refuses_bad_arguments(call: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        call(McStore())  # type: ignore[operator]


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (b"0", 0), (b"000", 0), (b"42", 42), (b" 42", 42), (b"42 ", 42), (b"+7", 7),
        (b"18446744073709551615", 2**64 - 1), (b"18446744073709551616", None),
        (b"0" * 100_000 + b"5", 5), (b"", None), (b" ", None), (b"-1", None),
        (b"12abc", None), (b"abc", None), (b"1 2", 1),
    ],
)
def test_parse_numeric_value(value: bytes, number: int | None) -> None:
    assert parse_numeric_value(value) == number


@pytest.mark.parametrize(
    ("token", "unsigned", "signed"),
    [
        (b"0", 0, 0), (b"+5", 5, 5), (b"-5", None, -5), (b"007", 7, 7), (b"", None, None),
        (b"1x", None, None), (b"4294967296", None, 4294967296), (b"9" * 30, None, None),
        (b"\xd9\xa1", None, None),
    ],
)
def test_number_tokens(token: bytes, unsigned: int | None, signed: int | None) -> None:
    assert parse_unsigned(token, 0xFFFF_FFFF) == unsigned
    assert parse_signed(token) == signed


def udp_request(request_id: int, payload: bytes, sequence: int = 0, total: int = 1) -> bytes:
    return HEADER.pack(request_id, sequence, total, 0) + payload


def test_udp_reply_split_into_1400_byte_datagrams() -> None:
    engine = McEngine(NOW)
    handler = McUdpHandler(engine)
    value = bytes(range(256)) * 20
    assert handler.handle_datagram(
        udp_request(7, b"set big 0 0 %d\r\n" % len(value) + value + b"\r\n"), NOW
    ) == [HEADER.pack(7, 0, 1, 0) + b"STORED\r\n"]
    datagrams = handler.handle_datagram(udp_request(0xBEEF, b"get big\r\n"), NOW)
    expected = b"VALUE big 0 %d\r\n" % len(value) + value + b"\r\nEND\r\n"
    assert len(datagrams) == -(-len(expected) // 1392) == 4
    assert all(len(datagram) <= 1400 for datagram in datagrams)
    assert [HEADER.unpack(d[:8]) for d in datagrams] == [(0xBEEF, i, 4, 0) for i in range(4)]
    assert b"".join(d[8:] for d in datagrams) == expected
    assert handler.counters.datagrams_out == 5


@pytest.mark.parametrize(
    ("datagram", "counter"),
    [
        (b"", "malformed"),
        (b"\x00\x01\x00\x00\x00\x01\x00", "malformed"),
        (udp_request(1, b"version\r\n", total=0), "malformed"),
        (udp_request(1, b"version\r\n", sequence=1, total=1), "malformed"),
        (udp_request(1, b"version\r\n", sequence=0, total=2), "multi_datagram_requests"),
        (udp_request(1, b"version\r\n", sequence=1, total=2), "multi_datagram_requests"),
    ],
)
def test_udp_bad_headers_are_dropped_and_counted(datagram: bytes, counter: str) -> None:
    handler = McUdpHandler(McEngine(NOW))
    assert handler.handle_datagram(datagram, NOW) == []
    assert getattr(handler.counters, counter) == 1


@pytest.mark.parametrize(
    ("payload", "reply"),
    [
        (b"version\r\nversion\r\n", b"VERSION 1.6.0-arrakis\r\n" * 2),
        (b"version", b""),
        (b"set a 0 0 5\r\nab", b""),
        (b"set a 0 0 1 noreply\r\nx\r\n", b""),
        (b"quit\r\nversion\r\n", b""),
        (b"bogus\r\n", b"ERROR\r\n"),
    ],
)
def test_udp_each_datagram_is_parsed_afresh(payload: bytes, reply: bytes) -> None:
    handler = McUdpHandler(McEngine(NOW))
    got = handler.handle_datagram(udp_request(3, payload), NOW)
    assert b"".join(datagram[8:] for datagram in got) == reply
    # Nothing leaks into the next datagram.
    assert handler.handle_datagram(udp_request(4, b"version\r\n"), NOW) == [
        HEADER.pack(4, 0, 1, 0) + b"VERSION 1.6.0-arrakis\r\n"
    ]
    assert handler.engine.counters.curr_connections == 0


def test_udp_reply_size_is_capped() -> None:
    engine = McEngine(NOW, output_high_water=2000)
    handler = McUdpHandler(engine, max_reply_datagrams=10)
    handler.handle_datagram(udp_request(1, b"set v 0 0 1000\r\n" + b"v" * 1000 + b"\r\n"), NOW)
    assert handler.handle_datagram(udp_request(2, b"get" + b" v" * 500 + b"\r\n"), NOW) == []
    assert handler.counters.replies_too_large == 1
    assert len(handler.handle_datagram(udp_request(3, b"get v v v\r\n"), NOW)) == 3


@settings(max_examples=300, deadline=None)
@given(datagram=st.binary(max_size=200))
def test_udp_random_datagrams_never_raise(datagram: bytes) -> None:
    handler = McUdpHandler(McEngine(NOW))
    for reply in handler.handle_datagram(datagram, NOW):
        assert 8 < len(reply) <= 1400


def test_udp_header_codec() -> None:
    header = UdpFrameHeader(1, 2, 3, 0)
    assert UdpFrameHeader.parse(header.emit() + b"rest") == header
    with pytest.raises(MalformedFrame):
        UdpFrameHeader(1 << 16, 0, 1).emit()
    with pytest.raises(MalformedFrame):
        UdpFrameHeader.parse(b"\x00" * 7)


def test_engine_refuses_bad_settings() -> None:
    with pytest.raises(ValueError):
        McEngine(NOW, max_requests_per_feed=0)
    with pytest.raises(ValueError):
        McEngine(NOW, version="1.0 beta")
    with pytest.raises(ValueError):
        McUdpHandler(McEngine(NOW), max_datagram=8)
