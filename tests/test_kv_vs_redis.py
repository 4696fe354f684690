"""The same scripted sessions against a real redis-server and against KvSession behind
a tiny test-only TCP server; replies must match byte for byte.

Both listen on 127.0.0.1 only. The redis-server runs with --databases 1 so that
SELECT behaves like ours, in a temporary directory tagged h6, killed in a finalizer.
"""

from __future__ import annotations

import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from typing import Iterator, Union

import pytest

from libos.apps.kv import KvEngine, KvSession
from libos.apps.kv.resp import encode_request

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
REDIS_BENCHMARK = shutil.which("redis-benchmark")

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")

Address = tuple[str, int]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(address: Address, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(address, timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(64) == b"+PONG\r\n":
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server at {address} did not come up")


@pytest.fixture(scope="module")
def redis_address() -> Iterator[Address]:
    workdir = tempfile.mkdtemp(prefix="h6-redis-")
    proc: subprocess.Popen[bytes] | None = None
    try:
        port = _free_port()
        proc = subprocess.Popen(
            [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--databases", "1", "--dir", workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ready(("127.0.0.1", port), time.monotonic() + 10)
        yield ("127.0.0.1", port)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


class _Handler(socketserver.BaseRequestHandler):
    server: "_KvTestServer"

    def handle(self) -> None:
        engine, lock = self.server.engine, self.server.lock
        with lock:
            session = KvSession(engine)
        try:
            while True:
                data = self.request.recv(65536)
                if not data:
                    return
                with lock:
                    session.feed(data, time.time())
                    while session.has_pending():
                        session.feed(b"", time.time())
                    out = session.take_output()
                if out:
                    self.request.sendall(out)
                if session.should_close:
                    return
        finally:
            with lock:
                session.close()


class _KvTestServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.engine = KvEngine(now=time.time(), tcp_port=self.server_address[1])


@pytest.fixture(scope="module")
def kv_address() -> Iterator[Address]:
    server = _KvTestServer()
    thread = threading.Thread(target=server.serve_forever, name="h6-kv-test-server", daemon=True)
    thread.start()
    try:
        yield ("127.0.0.1", int(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class _ReplyReader:
    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buf = b""
        self.eof = False

    def _fill(self) -> None:
        chunk = self.conn.recv(65536)
        if not chunk:
            self.eof = True
            raise EOFError
        self.buf += chunk

    def _line(self, pos: int) -> int:
        while True:
            end = self.buf.find(b"\r\n", pos)
            if end >= 0:
                return end
            self._fill()

    def _reply_end(self, pos: int) -> int:
        end = self._line(pos)
        kind, body = self.buf[pos:pos + 1], self.buf[pos + 1:end]
        if kind in (b"+", b"-", b":"):
            return end + 2
        count = int(body)
        if kind == b"$":
            if count < 0:
                return end + 2
            while len(self.buf) < end + 2 + count + 2:
                self._fill()
            return end + 2 + count + 2
        if kind == b"*":
            pos = end + 2
            for _ in range(max(count, 0)):
                pos = self._reply_end(pos)
            return pos
        raise AssertionError(f"bad reply type {kind!r}")

    def reply(self) -> bytes:
        end = self._reply_end(0)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def closed(self) -> bool:
        try:
            while True:
                self._fill()
        except EOFError:
            return True
        except socket.timeout:
            return False


def cmd(*args: Union[str, bytes]) -> bytes:
    return encode_request([a.encode() if isinstance(a, str) else a for a in args])


# A step: (bytes to send, replies to read, then check for close) or a float: sleep.
Step = Union[tuple[bytes, int, bool], float]
_BASIC: list[Step] = [
    (cmd("FLUSHALL"), 1, False),
    (cmd("PING"), 1, False), (cmd("ping", "hello"), 1, False), (cmd("PING", "a", "b"), 1, False),
    (cmd("ECHO", "x\r\ny"), 1, False), (cmd("echo"), 1, False),
    (cmd("GET", "missing"), 1, False), (cmd("GET"), 1, False), (cmd("get", "a", "b"), 1, False),
    (cmd("SET", "k", "v"), 1, False), (cmd("GET", "k"), 1, False), (cmd("SET", "k"), 1, False),
    (cmd("SET", "k", "v2", "GET"), 1, False), (cmd("SET", "k", "v3", "NX"), 1, False),
    (cmd("SET", "k", "v3", "NX", "GET"), 1, False), (cmd("SET", "nk", "v", "XX"), 1, False),
    (cmd("SET", "nk", "v", "XX", "GET"), 1, False), (cmd("SET", "k", "v4", "XX"), 1, False),
    (cmd("SET", "k", "v", "NX", "XX"), 1, False), (cmd("SET", "k", "v", "EX"), 1, False),
    (cmd("SET", "k", "v", "EX", "0"), 1, False), (cmd("SET", "k", "v", "PX", "-5"), 1, False),
    (cmd("SET", "k", "v", "EX", "abc"), 1, False), (cmd("SET", "k", "v", "EX", "10", "PX", "10"), 1, False),
    (cmd("SET", "k", "v", "EX", "10", "KEEPTTL"), 1, False), (cmd("SET", "k", "v", "foo"), 1, False),
    (cmd("SET", "k", "v", "EX", "92233720368547758"), 1, False),
    (cmd("SET", "k", "v", "PX", "9223372036854775807"), 1, False),
    (cmd("SET", "k", "v", "PXAT", "0"), 1, False), (cmd("SET", "k", "v", "EX", "10", "EX", "100"), 1, False),
    (cmd("TTL", "k"), 1, False), (cmd("SET", "k", "v5", "KEEPTTL"), 1, False), (cmd("TTL", "k"), 1, False),
    (cmd("SET", "k", "v6"), 1, False), (cmd("TTL", "k"), 1, False),
    (cmd("SET", "past", "v", "EXAT", "1"), 1, False), (cmd("EXISTS", "past"), 1, False),
    (cmd("INCR", "n"), 1, False), (cmd("INCRBY", "n", "41"), 1, False), (cmd("DECR", "n"), 1, False),
    (cmd("DECRBY", "n", "-10"), 1, False), (cmd("INCRBY", "n", "x"), 1, False),
    (cmd("INCRBY", "n", "9223372036854775808"), 1, False), (cmd("INCR", "k"), 1, False),
    (cmd("SET", "big", "9223372036854775807"), 1, False), (cmd("INCR", "big"), 1, False),
    (cmd("DECRBY", "big", "-1"), 1, False), (cmd("DECRBY", "q", "-9223372036854775808"), 1, False),
    (cmd("SET", "s", " 1"), 1, False), (cmd("INCR", "s"), 1, False), (cmd("SET", "s", "01"), 1, False),
    (cmd("INCR", "s"), 1, False), (cmd("INCR"), 1, False), (cmd("INCRBY", "n"), 1, False),
    (cmd("MSET", "a", "1", "b", "2"), 1, False), (cmd("MSET", "a", "1", "b"), 1, False),
    (cmd("MGET", "a", "b", "nope", "k"), 1, False), (cmd("MGET"), 1, False),
    (cmd("EXISTS", "a", "a", "nope"), 1, False), (cmd("DEL", "a", "nope", "a"), 1, False),
    (cmd("DEL"), 1, False), (cmd("DBSIZE"), 1, False), (cmd("DBSIZE", "x"), 1, False),
    (cmd("TYPE", "b"), 1, False), (cmd("TYPE", "nope"), 1, False),
    (cmd("SELECT", "0"), 1, False), (cmd("SELECT", "1"), 1, False), (cmd("SELECT", "x"), 1, False),
    (cmd("SELECT", "-1"), 1, False), (cmd("SELECT", "2147483648"), 1, False),
    (cmd("EXPIRE", "b", "100"), 1, False), (cmd("TTL", "b"), 1, False), (cmd("EXPIRE", "nope", "10"), 1, False),
    (cmd("EXPIRE", "b", "x"), 1, False), (cmd("EXPIRE", "b", "10", "NX"), 1, False),
    (cmd("EXPIRE", "b", "10", "GT"), 1, False), (cmd("EXPIRE", "b", "1000", "GT"), 1, False),
    (cmd("EXPIRE", "b", "50", "LT"), 1, False), (cmd("EXPIRE", "b", "60", "XX"), 1, False),
    (cmd("EXPIRE", "b", "10", "GT", "LT"), 1, False), (cmd("EXPIRE", "b", "10", "NX", "XX"), 1, False),
    (cmd("EXPIRE", "b", "10", "bogus"), 1, False), (cmd("EXPIRE", "b", "9223372036854775807"), 1, False),
    (cmd("TTL", "b"), 1, False), (cmd("PERSIST", "b"), 1, False), (cmd("TTL", "b"), 1, False),
    (cmd("PERSIST", "b"), 1, False), (cmd("EXPIRE", "b", "-1"), 1, False), (cmd("TTL", "b"), 1, False),
    (cmd("TTL", "nope"), 1, False), (cmd("PTTL", "nope"), 1, False), (cmd("PTTL", "k"), 1, False),
    (cmd("TTL"), 1, False), (cmd("EXPIREAT", "k", "1"), 1, False), (cmd("GET", "k"), 1, False),
    (cmd("CONFIG", "GET", "save"), 1, False), (cmd("CONFIG", "GET", "appendonly"), 1, False),
    (cmd("config", "get", "SAVE"), 1, False),
    # Redis orders several parameters by its hash table, so only one name per request here.
    (cmd("CONFIG", "GET", "save", "save"), 1, False), (cmd("CONFIG", "GET"), 1, False),
    (cmd("CONFIG", "GET", "no-such-thing"), 1, False), (cmd("CONFIG", "bogus"), 1, False),
    (cmd("CONFIG"), 1, False), (cmd("COMMAND", "bogus"), 1, False), (cmd("COMMAND", "COUNT", "x"), 1, False),
    (cmd("COMMAND", "DOCS", "no-such-command"), 1, False),
    (cmd("INFO", "no-such-section"), 1, False),
    (cmd("FLUSHDB", "bogus"), 1, False), (cmd("FLUSHALL", "SYNC", "ASYNC"), 1, False),
    (cmd("foo"), 1, False), (cmd("foo", "a", "b"), 1, False), (cmd("F" * 200, "a" * 100, "b" * 100), 1, False),
    (cmd("foo", *["x"] * 50), 1, False), (cmd("foo", "a\x00b", "c\r\nd"), 1, False),
    (cmd("SET", "x", "1"), 1, False), (cmd("FLUSHDB", "ASYNC"), 1, False), (cmd("DBSIZE"), 1, False),
    # Inline commands and their quoting rules.
    (b'SET inl "a b\\x41\\n"\r\nGET inl\r\n', 2, False), (b"ECHO 'it\\'s'\r\n", 1, False),
    (b"ECHO a\x0bb\r\n", 1, False), (b"\r\n\r\n  \r\nPING\n", 1, False), (b"*0\r\n*-1\r\nPING\r\n", 1, False),
    # Redis skips the two bytes after a bulk without looking at them.
    (b"*1\r\n$4\r\nPINGxx", 1, False),
    # A pipeline in one write.
    (cmd("SET", "p", "1") + cmd("INCR", "p") + cmd("GET", "p") + b"PING\r\n", 4, False),
    (cmd("QUIT", "now"), 1, True),
]

_EXPIRY: list[Step] = [
    (cmd("SET", "e1", "v", "PX", "150"), 1, False), (cmd("GET", "e1"), 1, False),
    (cmd("SET", "e2", "v"), 1, False), (cmd("PEXPIRE", "e2", "150"), 1, False),
    (cmd("SET", "e3", "v", "PX", "100000"), 1, False), (cmd("TTL", "e3"), 1, False),
    0.4,
    (cmd("GET", "e1"), 1, False), (cmd("EXISTS", "e2"), 1, False), (cmd("TTL", "e1"), 1, False),
    (cmd("PTTL", "e2"), 1, False), (cmd("DEL", "e3"), 1, False), (cmd("DBSIZE"), 1, False),
]

_PROTOCOL_ERRORS: list[bytes] = [
    b"*2147483648\r\n", b"*abc\r\n", b"*\r\n", b"*-0\r\n", b"*+1\r\n", b"*01\r\n", b"*1 \r\n",
    b"*99999999999999999999\r\n", b"*1\r\nfoo\r\n", b"*1\r\n\r\n", b"*1\r$4\r\nPING\r\n",
    b"*1\r\n$-1\r\n", b"*1\r\n$abc\r\n", b"*1\r\n$+4\r\n", b"*1\r\n$04\r\n", b"*1\r\n$4 \r\n",
    b"*1\r\n$536870913\r\n", b"*1\r\n$" + b"1" * 25 + b"\r\n", b'PING "a\r\n', b"ECHO 'a'b\r\n",
    b'ECHO "a\nb"\r\n', b"x" * 70000, b"*" + b"1" * 70000, b"*1\r\n$" + b"1" * 70000,
    b"PING\r\nECHO x\r\n*1\r\n$x\r\nPING\r\n",
]


def _run_script(address: Address, steps: list[Step]) -> list[tuple[bytes, ...]]:
    record: list[tuple[bytes, ...]] = []
    with socket.create_connection(address, timeout=5) as conn:
        reader = _ReplyReader(conn)
        for step in steps:
            if isinstance(step, float):
                time.sleep(step)
                continue
            data, replies, expect_close = step
            conn.sendall(data)
            got = tuple(reader.reply() for _ in range(replies))
            if expect_close:
                conn.settimeout(2)
                got += (b"<closed>" if reader.closed() else b"<open>",)
            record.append(got)
    return record


def _mask_varying(record: list[tuple[bytes, ...]], steps: list[Step]) -> list[tuple[bytes, ...]]:
    """PTTL of a live key depends on timing: keep only its sign."""
    sends = [s for s in steps if not isinstance(s, float)]
    out: list[tuple[bytes, ...]] = []
    for step, got in zip(sends, record):
        if b"PTTL" in step[0] and got[0].startswith(b":") and not got[0].startswith(b":-"):
            out.append((b":<positive>",) if int(got[0][1:-2]) > 0 else got)
        else:
            out.append(got)
    return out


def test_basic_session_matches_redis(redis_address: Address, kv_address: Address) -> None:
    ours = _run_script(kv_address, _BASIC)
    theirs = _run_script(redis_address, _BASIC)
    for step, mine, real in zip(_BASIC, _mask_varying(ours, _BASIC), _mask_varying(theirs, _BASIC)):
        assert mine == real, f"request {step!r}"
    assert len(ours) == len(theirs) == len(_BASIC)


def test_expiry_matches_redis(redis_address: Address, kv_address: Address) -> None:
    ours = _run_script(kv_address, _EXPIRY)
    theirs = _run_script(redis_address, _EXPIRY)
    assert ours == theirs
    assert ours[6] == (b"$-1\r\n",)


@pytest.mark.parametrize("request_bytes", _PROTOCOL_ERRORS, ids=lambda b: repr(b[:24]))
def test_protocol_errors_match_redis(redis_address: Address, kv_address: Address,
                                     request_bytes: bytes) -> None:
    def run(address: Address) -> tuple[bytes, bool]:
        with socket.create_connection(address, timeout=5) as conn:
            conn.sendall(request_bytes)
            conn.settimeout(2)
            reader = _ReplyReader(conn)
            closed = reader.closed()
            return reader.buf, closed

    mine, real = run(kv_address), run(redis_address)
    assert mine == real
    assert real[1], "every case here closes the connection"


def test_split_at_every_byte_matches_redis(redis_address: Address, kv_address: Address) -> None:
    pipeline = cmd("SET", "sp", "12") + cmd("INCRBY", "sp", "30") + b"GET sp\r\n" + cmd("DEL", "sp")

    def run(address: Address) -> bytes:
        with socket.create_connection(address, timeout=5) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(len(pipeline)):
                conn.sendall(pipeline[i:i + 1])
            reader = _ReplyReader(conn)
            return b"".join(reader.reply() for _ in range(4))

    assert run(kv_address) == run(redis_address) == b"+OK\r\n:42\r\n$2\r\n42\r\n:1\r\n"


@pytest.mark.skipif(REDIS_CLI is None, reason="redis-cli is not installed")
def test_redis_cli_sees_the_same(redis_address: Address, kv_address: Address) -> None:
    commands = [["SET", "cli", "hello world"], ["GET", "cli"], ["INCR", "cli-n"], ["MGET", "cli", "x"],
                ["CONFIG", "GET", "save"], ["TTL", "cli"], ["DEL", "cli", "cli-n"], ["PING"], ["GET"]]

    def run(address: Address) -> list[bytes]:
        return [subprocess.run([str(REDIS_CLI), "-h", address[0], "-p", str(address[1]), *argv],
                               capture_output=True, timeout=10).stdout for argv in commands]

    mine, real = run(kv_address), run(redis_address)
    assert mine == real
    assert real[1] == b"hello world\n"


@pytest.mark.skipif(REDIS_BENCHMARK is None, reason="redis-benchmark is not installed")
def test_redis_benchmark_runs_against_us(kv_address: Address) -> None:
    done = subprocess.run([str(REDIS_BENCHMARK), "-h", kv_address[0], "-p", str(kv_address[1]),
                           "-n", "200", "-c", "4", "-P", "4", "-t", "set,get", "-q"],
                          capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert b"SET:" in done.stdout and b"GET:" in done.stdout
    assert b"WARNING" not in done.stdout + done.stderr
