"""RESP2 request parsing and reply encoding, sans-I/O.

The parser mirrors what a Redis 7.0 server accepts (checked against redis-server
7.0.15, see tests/test_kv_vs_redis.py), including its quirks, because clients and
benchmarks are written against that behaviour:

* A request starting with ``*`` is a multibulk request; anything else is an inline
  command, one line split like a shell would (double quotes with C escapes, single
  quotes with only ``\\'``).
* Redis searches header lines with C string functions, so the search for the line end
  stops at the first NUL byte; a NUL before the line end means "no line yet".
* After the ``\\r`` that ends a header line, and after a bulk payload, Redis skips two
  bytes without looking at them; so does this parser.
* Empty requests (a blank inline line, ``*0``, ``*-1``) are skipped without a reply.
* Every protocol error is answered with ``-ERR Protocol error: ...`` and the connection
  is then closed; commands that came before the error in the same buffer still run.

Speed: requests in the canonical form every client library sends (``*N`` with one to nine
arguments, each ``$LEN`` and its bytes) are split by hiredis's C reader; each one it returns
is accepted only if re-encoding it gives back exactly the bytes it came from, so only
canonical requests take that path and they mean the same to both parsers. Everything else
(inline commands, partial requests, anything unusual, every error) goes to the parser
below, which is the reference.

Memory: every argument a request has buffered costs a bytes object and a list slot on top
of its payload, so the query buffer limit counts ``ARG_OVERHEAD`` bytes per argument as well
(without that, 22 MiB of empty arguments cost 169 MiB).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Final, Sequence

try:
    import hiredis

    HAVE_HIREDIS = True
except ImportError:  # the reference parser alone is correct, only slower
    HAVE_HIREDIS = False

CRLF: Final = b"\r\n"
OK: Final = b"+OK\r\n"
PONG: Final = b"+PONG\r\n"
NULL_BULK: Final = b"$-1\r\n"
NULL_ARRAY: Final = b"*-1\r\n"
EMPTY_ARRAY: Final = b"*0\r\n"

INT64_MIN: Final = -(1 << 63)
INT64_MAX: Final = (1 << 63) - 1
# string2ll in Redis refuses strings of 21 characters or more before looking at them.
_MAX_INT_DIGITS: Final = 20


class RespError(Exception):
    """Base class of the errors this module raises."""


class ProtocolError(RespError):
    """The client broke the protocol: reply with ``reply`` and close the connection."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def reply(self) -> bytes:
        return error(b"ERR Protocol error: " + self.message.encode("latin-1"))


# What one parsed argument costs beyond its payload: the bytes object's header and the
# argument list's slot (about 41 bytes on a 64-bit CPython).
ARG_OVERHEAD: Final = sys.getsizeof(b"") + 8
# Bytes of unparsed input handed to hiredis at once; beyond, the reference parser runs (it
# does not copy the buffer).
_FAST_FEED_MAX: Final = 1 << 16


class QueryBufferLimitError(RespError):
    """The client's unparsed input grew past the limit: close without a reply (Redis
    does the same for client-query-buffer-limit)."""


@dataclass(frozen=True)
class ParserLimits:
    """Redis 7.0 defaults. ``max_multibulk`` is INT_MAX there (older servers used
    1024*1024); ``max_query_buffer`` is client-query-buffer-limit."""

    max_inline: int = 64 * 1024
    max_multibulk: int = (1 << 31) - 1
    max_bulk: int = 512 * 1024 * 1024
    max_query_buffer: int = 1024 * 1024 * 1024


def parse_int64(data: bytes) -> int | None:
    """Strict decimal int64 like Redis's string2ll: optional '-', no '+', no spaces,
    no leading zeros, no "-0"; None when ``data`` is not such a number."""
    length = len(data)
    if length == 0 or length > _MAX_INT_DIGITS:
        return None
    if data == b"0":
        return 0
    digits = data[1:] if data[0] == 0x2D else data
    if not digits or not digits.isdigit() or digits[0] == 0x30 or not digits.isascii():
        return None
    value = int(digits)
    if data[0] == 0x2D:
        value = -value
    if value < INT64_MIN or value > INT64_MAX:
        return None
    return value


_SPLIT_SPACE: Final = frozenset(b" \t\n\v\f\r")
_TOKEN_END: Final = frozenset(b" \n\r\t\0")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES: Final = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("b"): 0x08, ord("a"): 0x07}


def split_inline(line: bytes) -> list[bytes] | None:
    """Split an inline command line the way redis-cli users expect (sdssplitargs
    semantics: a quote may open anywhere in a token, the closing quote must end it);
    None when quotes are unbalanced."""
    args: list[bytes] = []
    i = 0
    n = len(line)
    while True:
        while i < n and line[i] in _SPLIT_SPACE:
            i += 1
        if i >= n or line[i] == 0:
            return args
        token = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    return None
                break
            c = line[i]
            if quote and c == 0:
                return None
            if quote == 0x22:
                if c == 0x5C and i + 1 < n:
                    nxt = line[i + 1]
                    if nxt == 0x78 and i + 3 < n and line[i + 2] in _HEX and line[i + 3] in _HEX:
                        token.append(int(line[i + 2 : i + 4], 16))
                        i += 4
                    else:
                        token.append(_ESCAPES.get(nxt, nxt))
                        i += 2
                    continue
            elif quote == 0x27:
                if c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    token.append(0x27)
                    i += 2
                    continue
            elif c in _TOKEN_END:
                break
            elif c == 0x22 or c == 0x27:
                quote = c
                i += 1
                continue
            if quote and c == quote:
                i += 1
                if i < n and line[i] != 0 and line[i] not in _SPLIT_SPACE:
                    return None
                break
            token.append(c)
            i += 1
        args.append(bytes(token))
        if i < n and line[i] == 0:
            return args


class RequestParser:
    """Incremental RESP2 request parser: ``feed`` bytes, then pull requests with
    ``next_request`` until it returns None (more input needed).

    After a ProtocolError the parser stays failed and raises the same error again.
    """

    def __init__(self, limits: ParserLimits | None = None) -> None:
        self.limits = limits if limits is not None else ParserLimits()
        self._buf = bytearray()
        self._pos = 0
        # Multibulk state: arguments still expected (0: between requests), the
        # arguments read so far, and the length of the bulk being read (-1: header next).
        self._remaining = 0
        self._argv: list[bytes] = []
        self._argv_bytes = 0
        self._bulk_len = -1
        self._failed: ProtocolError | None = None
        # hiredis fast path: a reader that holds exactly self._buf[self._pos:self._fed]
        # and stands at a request boundary there; None when the reference parser runs.
        self._reader: hiredis.Reader | None = None
        self._fed = 0
        limits_fit = self.limits.max_bulk >= ParserLimits.max_bulk and self.limits.max_multibulk >= 9
        self._fast = HAVE_HIREDIS and limits_fit

    @property
    def buffered_bytes(self) -> int:
        """What the client's unparsed input costs: bytes received but not yet returned as
        requests, partial arguments included, with ``ARG_OVERHEAD`` for each argument."""
        return len(self._buf) - self._pos + self._argv_bytes

    def _check_buffer(self) -> None:
        if self.buffered_bytes > self.limits.max_query_buffer:
            raise QueryBufferLimitError(f"query buffer over {self.limits.max_query_buffer} bytes")

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._fed -= self._pos
            self._pos = 0
        self._buf += data
        self._check_buffer()

    def next_request(self) -> list[bytes] | None:
        """The next non-empty request's arguments, or None when more bytes are needed.

        QueryBufferLimitError when the arguments parsed so far cost more than the limit."""
        if self._failed is not None:
            raise self._failed
        if self._fast and self._remaining == 0:
            argv = self._canonical_request()
            if argv is not None:
                return argv
        try:
            while True:
                if self._remaining == 0:
                    if self._pos >= len(self._buf):
                        return None
                    if self._buf[self._pos] == 0x2A:
                        started = self._multibulk_header()
                        if started is None:
                            return None
                        if not started:
                            continue
                    else:
                        inline = self._inline()
                        if inline is None:
                            return None
                        if not inline:
                            continue
                        return inline
                argv = self._bulks()
                if argv is None:
                    return None
                return argv
        except ProtocolError as exc:
            self._failed = exc
            raise

    def _canonical_request(self) -> list[bytes] | None:
        """The next request if hiredis finds it complete and canonical (see the module
        docstring), with the read position past it; None leaves everything to the
        reference parser from the same position."""
        buf = self._buf
        pos = self._pos
        # ``*`` and one digit, then the line end: one to nine arguments, so one request
        # never builds more than nine objects before it is checked.
        if len(buf) - pos < 4 or buf[pos] != 0x2A or buf[pos + 2] != 0x0D:
            self._reader = None
            return None
        reader = self._reader
        if reader is None:
            if len(buf) - pos > _FAST_FEED_MAX:
                return None
            reader = self._reader = hiredis.Reader()
            self._fed = pos
        fed = self._fed
        if fed < len(buf):
            if len(buf) - fed > _FAST_FEED_MAX:
                self._reader = None
                return None
            # hiredis reads any buffer (its stub says bytes); no copy of ``buf`` is made here.
            reader.feed(buf, fed, len(buf) - fed)  # type: ignore[arg-type]
            self._fed = len(buf)
        try:
            argv = reader.gets()
        except Exception:  # hiredis.ProtocolError: the reference parser says what Redis says
            self._reader = None
            return None
        if type(argv) is not list or not argv:
            self._reader = None  # incomplete (False), or not an array of bulk strings
            return None
        for arg in argv:
            if type(arg) is not bytes:
                self._reader = None
                return None
        encoded = b"*%d\r\n" % len(argv) + b"".join([b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in argv])
        if not buf.startswith(encoded, pos):
            self._reader = None
            return None
        self._pos = pos + len(encoded)
        return argv

    def _find_line_end(self, byte: int) -> int:
        """Index of ``byte`` at or after the read position, -1 if absent; like C's
        strchr on Redis's query buffer, the search stops at a NUL byte."""
        buf = self._buf
        idx = buf.find(byte, self._pos)
        if idx < 0:
            return -1
        nul = buf.find(0, self._pos, idx)
        return -1 if nul >= 0 else idx

    def _inline(self) -> list[bytes] | None:
        newline = self._find_line_end(0x0A)
        if newline < 0:
            if len(self._buf) - self._pos > self.limits.max_inline:
                raise ProtocolError("too big inline request")
            return None
        end = newline
        if end > self._pos and self._buf[end - 1] == 0x0D:
            end -= 1
        line = bytes(self._buf[self._pos : end])
        self._pos = newline + 1
        argv = split_inline(line)
        if argv is None:
            raise ProtocolError("unbalanced quotes in request")
        return argv

    def _header_line(self, too_big: str) -> tuple[int, bytes] | None:
        """(index of its '\\r', text after the type byte) of the header line at the read
        position, or None until it is complete."""
        cr = self._find_line_end(0x0D)
        if cr < 0:
            if len(self._buf) - self._pos > self.limits.max_inline:
                raise ProtocolError(too_big)
            return None
        if cr + 1 >= len(self._buf):
            return None
        return cr, bytes(self._buf[self._pos + 1 : cr])

    def _multibulk_header(self) -> bool | None:
        """True: a request with arguments started; False: an empty one was skipped;
        None: wait for more bytes."""
        header = self._header_line("too big mbulk count string")
        if header is None:
            return None
        cr, text = header
        count = parse_int64(text)
        if count is None or count > self.limits.max_multibulk:
            raise ProtocolError("invalid multibulk length")
        self._pos = cr + 2
        if count <= 0:
            return False
        self._remaining = count
        self._argv = []
        self._argv_bytes = 0
        self._bulk_len = -1
        return True

    def _bulks(self) -> list[bytes] | None:
        buf = self._buf
        while self._remaining > 0:
            if self._bulk_len < 0:
                header = self._header_line("too big bulk count string")
                if header is None:
                    return None
                cr, text = header
                first = buf[self._pos]
                if first != 0x24:
                    shown = " " if first in (0x0A, 0x0D) else chr(first)
                    raise ProtocolError(f"expected '$', got '{shown}'")
                length = parse_int64(text)
                if length is None or length < 0 or length > self.limits.max_bulk:
                    raise ProtocolError("invalid bulk length")
                self._pos = cr + 2
                self._bulk_len = length
            if len(buf) - self._pos < self._bulk_len + 2:
                return None
            end = self._pos + self._bulk_len
            arg = bytes(buf[self._pos : end])
            self._argv.append(arg)
            self._pos = end + 2
            self._argv_bytes += len(arg) + ARG_OVERHEAD
            self._check_buffer()
            self._bulk_len = -1
            self._remaining -= 1
        argv = self._argv
        self._argv = []
        self._argv_bytes = 0
        return argv


def _clean(text: bytes) -> bytes:
    # A status or error line cannot carry CR or LF (RESP2); Redis replaces them with
    # spaces, so do we.
    if b"\r" in text or b"\n" in text:
        return text.replace(b"\r", b" ").replace(b"\n", b" ")
    return text


def simple(text: bytes) -> bytes:
    return b"+" + _clean(text) + CRLF


def error(text: bytes) -> bytes:
    """``text`` carries its own code prefix, e.g. b"ERR syntax error"."""
    return b"-" + _clean(text) + CRLF


def integer(value: int) -> bytes:
    return b":%d\r\n" % value


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def bulk_or_null(value: bytes | None) -> bytes:
    return NULL_BULK if value is None else bulk(value)


def array(encoded_items: Sequence[bytes]) -> bytes:
    """An array of already encoded replies."""
    return b"*%d\r\n" % len(encoded_items) + b"".join(encoded_items)


def encode_request(argv: Sequence[bytes]) -> bytes:
    """A request as clients send it (a multibulk of bulks); for tests and tools."""
    return array([bulk(arg) for arg in argv])
