"""RESP2 request parsing and reply encoding (libos.apps.kv.resp)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.apps.kv import resp
from libos.apps.kv.resp import (ARG_OVERHEAD, ParserLimits, ProtocolError, QueryBufferLimitError, RequestParser,
                                parse_int64, split_inline)


def parse_all(data: bytes, limits: ParserLimits | None = None) -> tuple[list[list[bytes]], str | None]:
    """Requests parsed from ``data`` fed at once, and the protocol error text if any."""
    parser = RequestParser(limits)
    parser.feed(data)
    out: list[list[bytes]] = []
    try:
        while (argv := parser.next_request()) is not None:
            out.append(argv)
    except ProtocolError as exc:
        return out, exc.message
    return out, None


@pytest.mark.parametrize("text, value", [
    (b"0", 0), (b"1", 1), (b"-1", -1), (b"42", 42), (b"9223372036854775807", 2**63 - 1),
    (b"-9223372036854775808", -(2**63)), (b"9223372036854775808", None),
    (b"-9223372036854775809", None), (b"", None), (b"-", None), (b"-0", None), (b"01", None),
    (b"+1", None), (b" 1", None), (b"1 ", None), (b"1a", None), (b"0x10", None),
    (b"\xd9\xa3", None), (b"1" * 21, None), (b"00", None),
])
def test_parse_int64(text: bytes, value: int | None) -> None:
    assert parse_int64(text) == value


PARSE_CASES = [
    # (input, requests, protocol error or None)
    (b"*1\r\n$4\r\nPING\r\n", [[b"PING"]], None),
    (b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n", [[b"GET", b""]], None),
    (b"*1\r\n$4\r\nPINGxx", [[b"PING"]], None),
    (b"*0\r\n*-1\r\n*-7\r\nPING\r\n", [[b"PING"]], None),
    (b"\r\n\n   \r\nPING\n", [[b"PING"]], None),
    (b"SET a  b\r\n", [[b"SET", b"a", b"b"]], None),
    (b"*1\r\n$3\r\na\r\n\r\n", [[b"a\r\n"]], None),
    (b"*2147483647\r\n", [], None),
    (b"*1\r\n$536870912\r\n", [], None),
    (b"*2147483648\r\n", [], "invalid multibulk length"),
    (b"*abc\r\n", [], "invalid multibulk length"),
    (b"*\r\n", [], "invalid multibulk length"),
    (b"*-0\r\n", [], "invalid multibulk length"),
    (b"*+1\r\n", [], "invalid multibulk length"),
    (b"*01\r\n", [], "invalid multibulk length"),
    (b"*1 \r\n", [], "invalid multibulk length"),
    (b"*1\n$4\nPING\r\n", [], "invalid multibulk length"),
    (b"*99999999999999999999\r\n", [], "invalid multibulk length"),
    (b"*1\r\nfoo\r\n", [], "expected '$', got 'f'"),
    (b"*1\r\n\r\n", [], "expected '$', got ' '"),
    (b"*1\r$4\r\nPING\r\n", [], "expected '$', got '4'"),
    (b"*2\r\n$1\r\na\r\n:1\r\n", [], "expected '$', got ':'"),
    (b"*1\r\n$-1\r\n", [], "invalid bulk length"),
    (b"*1\r\n$-0\r\n", [], "invalid bulk length"),
    (b"*1\r\n$abc\r\n", [], "invalid bulk length"),
    (b"*1\r\n$+4\r\n", [], "invalid bulk length"),
    (b"*1\r\n$04\r\n", [], "invalid bulk length"),
    (b"*1\r\n$ 4\r\n", [], "invalid bulk length"),
    (b"*1\r\n$536870913\r\n", [], "invalid bulk length"),
    (b"*1\r\n$" + b"9" * 25 + b"\r\n", [], "invalid bulk length"),
    (b'PING "a\r\n', [], "unbalanced quotes in request"),
    (b"ECHO 'a'b\r\n", [], "unbalanced quotes in request"),
    (b'ECHO "a"b\r\n', [], "unbalanced quotes in request"),
    (b"x" * 65537, [], "too big inline request"),
    (b"*" + b"1" * 65537, [], "too big mbulk count string"),
    (b"*1\r\n$" + b"1" * 65537, [], "too big bulk count string"),
    (b"PING\r\nECHO x\r\n*1\r\n$x\r\nPING\r\n", [[b"PING"], [b"ECHO", b"x"]], "invalid bulk length"),
    # A NUL before the line end hides the line, as C's strchr does in Redis.
    (b"ECHO a\x00b\r\n", [], None),
    (b"*1\x00\r\n$4\r\nPING\r\n", [], None),
    (b"*1\r\n$3\r\na\x00b\r\n", [[b"a\x00b"]], None),
    # Incomplete input: wait, no error.
    (b"*2\r\n$3\r\nGET\r\n", [], None), (b"*1\r\n$4\r\nPI", [], None), (b"*1\r", [], None),
    (b"PING", [], None), (b"x" * 65536, [], None),
]


@pytest.mark.parametrize("data, requests, error", PARSE_CASES, ids=lambda v: repr(v)[:40])
def test_parse_table(data: bytes, requests: list[list[bytes]], error: str | None) -> None:
    assert parse_all(data) == (requests, error)


@pytest.mark.parametrize("line, args", [
    (b"", []), (b"   ", []), (b"a b  c", [b"a", b"b", b"c"]), (b"a\tb", [b"a", b"b"]),
    (b"a\x0bb", [b"a\x0bb"]), (b'"a b"', [b"a b"]), (b'"\\x41\\x4"', [b"Ax4"]),
    (b'"\\n\\r\\t\\b\\a\\q\\""', [b"\n\r\t\x08\x07q\""]), (b"'a\\'b'", [b"a'b"]),
    (b"'a\\nb'", [b"a\\nb"]), (b'""', [b""]), (b"''", [b""]), (b'x"a b" y', [b"xa b", b"y"]),
    (b'"a', None), (b"'a", None), (b'"a"b', None), (b"'a'b", None), (b'"a\\', None),
    (b"a\x00b", [b"a"]),
])
def test_split_inline(line: bytes, args: list[bytes] | None) -> None:
    assert split_inline(line) == args


PIPELINE = (resp.encode_request([b"SET", b"key", b"va\r\nlue"]) + b"GET key\r\n"
            + resp.encode_request([b"MGET", b"a", b"", b"c"]) + b"*0\r\n" + b'ECHO "x y"\n'
            + resp.encode_request([b"DEL", b"key"]))
PIPELINE_REQUESTS = [[b"SET", b"key", b"va\r\nlue"], [b"GET", b"key"], [b"MGET", b"a", b"", b"c"],
                     [b"ECHO", b"x y"], [b"DEL", b"key"]]


def drain(parser: RequestParser) -> list[list[bytes]]:
    out = []
    while (argv := parser.next_request()) is not None:
        out.append(argv)
    return out


def test_trickle_one_byte_at_a_time() -> None:
    parser = RequestParser()
    got: list[list[bytes]] = []
    for i in range(len(PIPELINE)):
        parser.feed(PIPELINE[i:i + 1])
        got += drain(parser)
    assert got == PIPELINE_REQUESTS
    assert parser.buffered_bytes == 0


def test_pipeline_split_at_every_boundary() -> None:
    for cut in range(len(PIPELINE) + 1):
        parser = RequestParser()
        parser.feed(PIPELINE[:cut])
        got = drain(parser)
        parser.feed(PIPELINE[cut:])
        got += drain(parser)
        assert got == PIPELINE_REQUESTS, cut


def test_failed_parser_stays_failed() -> None:
    parser = RequestParser()
    parser.feed(b"*x\r\n")
    with pytest.raises(ProtocolError) as first:
        parser.next_request()
    parser.feed(b"PING\r\n")
    with pytest.raises(ProtocolError) as again:
        parser.next_request()
    assert again.value is first.value
    assert first.value.reply == b"-ERR Protocol error: invalid multibulk length\r\n"


def test_custom_limits() -> None:
    limits = ParserLimits(max_inline=16, max_multibulk=2, max_bulk=3, max_query_buffer=128)
    assert parse_all(b"*3\r\n", limits)[1] == "invalid multibulk length"
    assert parse_all(b"*1\r\n$4\r\n", limits)[1] == "invalid bulk length"
    assert parse_all(b"x" * 17, limits)[1] == "too big inline request"
    assert parse_all(b"*2\r\n$3\r\nabc\r\n$1\r\nd\r\n", limits) == ([[b"abc", b"d"]], None)
    parser = RequestParser(limits)
    with pytest.raises(QueryBufferLimitError):
        parser.feed(b"*2\r\n$3\r\n" + b"a" * 130)


def test_partial_arguments_count_toward_query_buffer() -> None:
    parser = RequestParser(ParserLimits(max_query_buffer=40 + ARG_OVERHEAD))
    parser.feed(b"*3\r\n$20\r\n" + b"a" * 20 + b"\r\n")
    assert parser.next_request() is None
    assert parser.buffered_bytes == 20 + ARG_OVERHEAD
    with pytest.raises(QueryBufferLimitError):
        parser.feed(b"$20\r\n" + b"b" * 20 + b"\r\n")


@pytest.mark.parametrize("encoded, expected", [
    (resp.simple(b"OK"), b"+OK\r\n"), (resp.simple(b"a\r\nb"), b"+a  b\r\n"),
    (resp.error(b"ERR x"), b"-ERR x\r\n"), (resp.error(b"ERR a\nb"), b"-ERR a b\r\n"),
    (resp.integer(0), b":0\r\n"), (resp.integer(-(2**63)), b":-9223372036854775808\r\n"),
    (resp.bulk(b""), b"$0\r\n\r\n"), (resp.bulk(b"a\r\nb"), b"$4\r\na\r\nb\r\n"),
    (resp.bulk_or_null(None), b"$-1\r\n"), (resp.NULL_ARRAY, b"*-1\r\n"),
    (resp.array([]), b"*0\r\n"), (resp.array([resp.integer(1), resp.NULL_BULK]), b"*2\r\n:1\r\n$-1\r\n"),
    (resp.encode_request([b"GET", b"k"]), b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
])
def test_encoders(encoded: bytes, expected: bytes) -> None:
    assert encoded == expected


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0, max_value=300), max_size=6))
def test_random_bytes_raise_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    parser = RequestParser(ParserLimits(max_inline=64, max_query_buffer=1 << 16))
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    try:
        for start, end in zip(points, points[1:]):
            parser.feed(data[start:end])
            for argv in drain(parser):
                assert argv and all(isinstance(arg, bytes) for arg in argv)
    except ProtocolError as exc:
        assert exc.reply.startswith(b"-ERR Protocol error: ") and exc.reply.endswith(b"\r\n")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.binary(max_size=20), min_size=1, max_size=5), max_size=5),
       st.integers(min_value=1, max_value=7))
def test_encoded_requests_round_trip_in_any_chunking(requests: list[list[bytes]], chunk: int) -> None:
    wire = b"".join(resp.encode_request(argv) for argv in requests)
    parser = RequestParser()
    got: list[list[bytes]] = []
    for i in range(0, len(wire), chunk):
        parser.feed(wire[i:i + chunk])
        got += drain(parser)
    assert got == requests


# The hiredis fast path (canonical requests) against the reference parser alone.


def reference_parser(limits: ParserLimits | None = None) -> RequestParser:
    parser = RequestParser(limits)
    parser._fast = False  # the reference parser only
    return parser


def outcome(parser: RequestParser, chunks: list[bytes]) -> tuple[list[list[bytes]], str | None, int]:
    got: list[list[bytes]] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            got += drain(parser)
    except ProtocolError as exc:
        return got, exc.message, -1
    return got, None, parser.buffered_bytes


def test_fast_path_is_taken_for_canonical_requests() -> None:
    pytest.importorskip("hiredis")
    parser = RequestParser()
    assert parser._fast
    parser.feed(resp.encode_request([b"SET", b"k", b"v"]) + resp.encode_request([b"GET", b"k"]))
    assert parser.next_request() == [b"SET", b"k", b"v"]
    assert parser._reader is not None, "the canonical request did not take the hiredis path"
    assert parser.next_request() == [b"GET", b"k"]
    assert parser.next_request() is None and parser.buffered_bytes == 0


_PIECES = [
    resp.encode_request([b"GET", b"k"]), resp.encode_request([b"SET", b"k", b"v" * 40]),
    resp.encode_request([b"a"] * 12), b"*1\r\n+PING\r\n", b"*1\r\n:1\r\n", b"*1\r\n-ERR\r\n",
    b"*2\r\n*1\r\n$1\r\na\r\n", b"*1\r\n$-1\r\n", b"*0\r\n", b"*-1\r\n", b"PING\r\n", b"\r\n",
    b"*1\r\n$4\r\nPI\x00G\r\n", b"*1\r\n$4\r\nPINGxx", b"*1\r\x00$4\r\x00PING\r\x00", b"*01\r\n$1\r\na\r\n",
    b"*1\r\n$01\r\na\r\n", b"*1\r\n$+1\r\na\r\n", b"*2\r\n$1\r\na\r\n", b"*1\r\n=5\r\ntxt:a\r\n",
    b"*1\r\n_\r\n", b"*1\r\n,1.5\r\n", b"*1\r\n#t\r\n", b"*3\r\n$3\r\nDEL\r\n$0\r\n\r\n$1\r\n\x00\r\n",
]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(_PIECES), st.binary(max_size=12)), max_size=8),
       st.lists(st.integers(min_value=0, max_value=400), max_size=5))
def test_fast_path_matches_the_reference_parser(pieces: list[bytes], cuts: list[int]) -> None:
    data = b"".join(pieces)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:])]
    limits = ParserLimits(max_inline=64)
    assert outcome(RequestParser(limits), chunks) == outcome(reference_parser(limits), chunks)


# Issue 7, defect 16: the query buffer limit bounds what the buffered arguments cost in
# memory, not only their payload bytes.


def test_query_buffer_limit_bounds_memory_of_many_small_arguments() -> None:
    import tracemalloc

    limit = 4 << 20
    chunk = b"$2\r\nab\r\n" * 8192  # 64 KiB of two-byte arguments
    wire_total = 22 << 20
    parser = RequestParser(ParserLimits(max_query_buffer=limit))
    tracemalloc.start()
    try:
        sent = 0
        with pytest.raises(QueryBufferLimitError):
            parser.feed(b"*%d\r\n" % (wire_total // 8))
            while sent < wire_total:
                parser.feed(chunk)
                sent += len(chunk)
                assert parser.next_request() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Each argument costs ~45 bytes of objects for its 8 wire bytes: counted by payload
    # alone the limit would let 22 MiB in (well over 100 MiB of objects).
    assert sent < limit, f"{sent} wire bytes taken before the limit"
    assert peak < 2 * limit, f"the parser held {peak / (1 << 20):.1f} MiB for a {limit >> 20} MiB limit"
