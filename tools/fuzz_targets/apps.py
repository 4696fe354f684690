"""The application protocol parsers: RESP (``libos.apps.kv.resp``) and memcached
(``libos.apps.memcache.protocol`` and ``.udp``).

RESP contract: ``RequestParser`` raises only ``ProtocolError`` or ``QueryBufferLimitError``;
what it returns does not depend on how the bytes were chunked (except where Redis itself
judges a partial line: the "too big" inline/count errors); a request encoded with
``encode_request`` parses back to its arguments.

memcached contract: ``McSession.feed`` and ``McUdpHandler.handle_datagram`` never raise; a
session's replies and its decision to close do not depend on the chunking; every reply
datagram carries the request id, its sequence number and the right total.
"""

from __future__ import annotations

import re

from tools.fuzz_targets import ContractViolation
from tools.fuzz_targets._input import Input
from libos.apps.kv import resp
from libos.apps.memcache.protocol import McEngine
from libos.apps.memcache.store import McStore
from libos.apps.memcache.udp import UDP_FRAME_HEADER, McUdpHandler

# ---- RESP ---------------------------------------------------------------------------------

_LIMITS = resp.ParserLimits(max_inline=512, max_multibulk=64, max_bulk=2048, max_query_buffer=1 << 20)


def _resp_stream(inp: Input) -> bytes:
    parts: list[bytes] = []
    while not inp.exhausted and len(parts) < 24:
        kind = inp.below(8)
        if kind == 0:
            parts.append(inp.blob(64))
        elif kind == 1:
            parts.append(b"*" + inp.choice((0, 1, 2, -1, 65, 3)).__str__().encode() + b"\r\n")
        elif kind == 2:
            length = inp.choice((0, 1, 3, -1, 2049, 10))
            parts.append(b"$" + str(length).encode() + b"\r\n" + inp.take(max(0, length)) + inp.take(2))
        elif kind == 3:
            parts.append(b'SET "a\\x4' + inp.blob(8) + b"\" 'b\\'c' " + inp.blob(8) + b"\r\n")
        else:
            argv = [inp.blob(12) for _ in range(inp.below(5))]
            parts.append(resp.encode_request(argv))
    return b"".join(parts)


def _parse(data: bytes, cuts: list[int]) -> tuple[list[list[bytes]], str | None]:
    parser = resp.RequestParser(_LIMITS)
    requests: list[list[bytes]] = []
    position = 0
    for cut in cuts + [len(data)]:
        chunk = data[position:cut]
        position = max(position, cut)
        try:
            parser.feed(chunk)
        except resp.QueryBufferLimitError:
            return requests, "limit"
        try:
            while (request := parser.next_request()) is not None:
                if not request:
                    raise ContractViolation("the parser returned an empty request")
                requests.append(request)
        except resp.ProtocolError as exc:
            if not exc.reply.startswith(b"-ERR Protocol error: ") or not exc.reply.endswith(b"\r\n"):
                raise ContractViolation(f"malformed error reply {exc.reply!r}") from None
            return requests, exc.message
    if parser.buffered_bytes < 0:
        raise ContractViolation("negative buffered byte count")
    return requests, None


def one_input_resp(data: bytes) -> None:
    inp = Input(data)
    mode = inp.below(3)
    if mode == 2:
        argv = [inp.blob(40) for _ in range(1 + inp.below(6))]
        requests, error = _parse(resp.encode_request(argv), [])
        if requests != [argv] or error is not None:
            raise ContractViolation(f"{argv!r} did not round-trip: {requests!r} {error}")
        return
    cut_count = inp.below(8)
    cuts = sorted(inp.u16() for _ in range(cut_count))
    stream = inp.rest() if mode == 0 else _resp_stream(inp)
    whole, whole_error = _parse(stream, [])
    chunked, chunked_error = _parse(stream, [cut % (len(stream) + 1) for cut in cuts])
    judged_partial = any(e is not None and e.startswith("too big") for e in (whole_error, chunked_error))
    if judged_partial:
        shorter, longer = sorted((whole, chunked), key=len)
        if longer[: len(shorter)] != shorter:
            raise ContractViolation("chunking changed the requests before a 'too big' error")
        return
    if (whole, whole_error) != (chunked, chunked_error):
        raise ContractViolation(f"chunking changed the result: {whole!r} {whole_error} vs {chunked!r} {chunked_error}")


def seeds_resp() -> list[bytes]:
    return [
        b"\x00\x00" + resp.encode_request([b"SET", b"k", b"v"]) + b"PING\r\n",
        b"\x01\x02\x05\x00\x09\x00\x04\x02abc\x05\x03\x01\x02\x01\x00",
        b"\x02\x03\x03SET\x01k\x01v",
        b"\x00\x01\x03\x00*2\r\n$3\r\nGET\r\n$1\r\nk\r\n\"unbalanced\r\n",
    ]


# ---- memcached ----------------------------------------------------------------------------

_NUMBERS = (b"0", b"1", b"5", b"-1", b"18446744073709551615", b"18446744073709551616", b"+3", b"00012", b"x", b"4294967296", b"2147483647")


def _number(inp: Input) -> bytes:
    return _NUMBERS[inp.below(len(_NUMBERS))] if inp.below(4) else str(inp.interesting(64)).encode()


def _key(inp: Input) -> bytes:
    return inp.choice((0, 0, 1, 2)).__str__().encode() * (1 + inp.below(3)) if inp.below(8) else b"k" * (240 + inp.below(20))


def _mc_stream(inp: Input) -> bytes:
    parts: list[bytes] = []
    while not inp.exhausted and len(parts) < 24:
        kind = inp.below(12)
        noreply = b" noreply" if inp.below(6) == 0 else b""
        if kind < 3:
            command = (b"set", b"add", b"replace", b"append", b"prepend", b"cas")[inp.below(6)]
            value = inp.blob(40)
            length = str(len(value)).encode() if inp.below(6) else _number(inp)
            cas = b" " + _number(inp) if command == b"cas" else b""
            parts.append(b"%s %s %s %s %s%s%s\r\n%s\r\n" % (command, _key(inp), _number(inp), _number(inp), length, cas, noreply, value))
        elif kind < 5:
            parts.append((b"get", b"gets")[inp.below(2)] + b"".join(b" " + _key(inp) for _ in range(inp.below(5))) + b"\r\n")
        elif kind == 5:
            parts.append((b"incr", b"decr")[inp.below(2)] + b" " + _key(inp) + b" " + _number(inp) + noreply + b"\r\n")
        elif kind == 6:
            parts.append(b"touch " + _key(inp) + b" " + _number(inp) + noreply + b"\r\n")
        elif kind == 7:
            parts.append(b"delete " + _key(inp) + (b" 0" if inp.flag() else b"") + noreply + b"\r\n")
        elif kind == 8:
            parts.append((b"flush_all", b"version", b"stats", b"stats settings", b"stats reset", b"verbosity 1", b"quit", b"stats items")[inp.below(8)] + noreply + b"\r\n")
        elif kind == 9:
            parts.append(b"get " + b"a" * (inp.u16() * 4) + (b"\r\n" if inp.flag() else b""))
        else:
            parts.append(inp.blob(48))
    return b"".join(parts)


_BYTE_COUNTERS = re.compile(rb"STAT bytes_(read|written) [0-9]+")


def _engine() -> McEngine:
    store = McStore(max_bytes=16 * 1024, item_size_max=1024, started_at=0.0)
    return McEngine(0.0, store, pid=1, max_requests_per_feed=8, output_high_water=4096, max_input_backlog=8 << 20)


def _run_session(data: bytes, cuts: list[int]) -> tuple[bytes, bool]:
    engine = _engine()
    session = engine.open_session(0.0)
    out = bytearray()
    position = 0
    for cut in cuts + [len(data)]:
        chunk = data[position:cut]
        position = max(position, cut)
        session.feed(chunk, 1.0)
        out += session.take_output()
        rounds = 0
        while session.has_backlog and not session.should_close:
            rounds += 1
            if rounds > 10_000:
                raise ContractViolation("the session keeps a backlog forever")
            session.feed(b"", 1.0)
            out += session.take_output()
    closed = session.should_close
    session.close()
    # The byte counters in ``stats`` count what was fed so far: chunking moves them, rightly.
    out = bytearray(_BYTE_COUNTERS.sub(b"STAT bytes_\\1 N", bytes(out)))
    if engine.counters.curr_connections != 0:
        raise ContractViolation("a closed session is still counted")
    return bytes(out), closed


def one_input_memcache(data: bytes) -> None:
    inp = Input(data)
    mode = inp.below(3)
    if mode == 2:
        handler = McUdpHandler(_engine(), max_datagram=64 + inp.below(200), max_reply_datagrams=1 + inp.below(8))
        while not inp.exhausted:
            if inp.flag():
                header = UDP_FRAME_HEADER.pack(inp.u16(), inp.choice((0, 0, 1)), inp.choice((1, 1, 2, 0)), 0)
                datagram = header + _mc_stream(Input(inp.blob(120)))
            else:
                datagram = inp.blob(40)
            replies = handler.handle_datagram(datagram, 1.0)
            for sequence, reply in enumerate(replies):
                if len(reply) > handler.max_datagram:
                    raise ContractViolation(f"reply datagram of {len(reply)} bytes")
                request_id, seq, total, reserved = UDP_FRAME_HEADER.unpack_from(reply)
                if (request_id, seq, total, reserved) != (int.from_bytes(datagram[:2], "big"), sequence, len(replies), 0):
                    raise ContractViolation(f"reply header {(request_id, seq, total, reserved)} for datagram {sequence} of {len(replies)}")
        return
    cuts = sorted(inp.u16() for _ in range(inp.below(8)))
    stream = inp.rest() if mode == 0 else _mc_stream(inp)
    cuts = [cut % (len(stream) + 1) for cut in cuts]
    whole = _run_session(stream, [])
    chunked = _run_session(stream, cuts)
    if whole != chunked:
        raise ContractViolation(f"chunking at {cuts} changed the replies: {whole!r} vs {chunked!r}")


def seeds_memcache() -> list[bytes]:
    return [
        b"\x00\x00set k 0 0 1\r\nv\r\nget k\r\nincr k 1\r\n",
        b"\x01\x02\x04\x00\x10\x00\x00\x01\x00\x00\x00\x03" + bytes(range(60)),
        b"\x02\x01\x01\x00\x00\x01\x00" + bytes(range(30, 120)),
    ]
