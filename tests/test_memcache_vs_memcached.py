"""The memcache protocol engine against a real memcached 1.6, and under memcaslap.

A real memcached (from /usr/bin) and a tiny test-only server wrapping ``McSession`` and
``McUdpHandler`` listen on 127.0.0.1; the same scripted requests go to both and the
replies are compared after normalising what legitimately differs (cas uniques, the version
string). Then memcaslap drives the test server over TCP and UDP and must report no error.
Processes started here carry the tag "h8" in their argv[0] and environment and are
killed in fixture finalizers.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from libos.apps.memcache import McEngine, McSession, McUdpHandler

TAG = "h8"
MEMCACHED = shutil.which("memcached")
MEMCASLAP = shutil.which("memcaslap")
HEADER = struct.Struct("!HHHH")

pytestmark = pytest.mark.skipif(MEMCACHED is None, reason="memcached is not installed")


def _free_port_pair() -> int:
    """A port number free for both TCP and UDP on 127.0.0.1 (memcaslap -U wants both)."""
    for _ in range(50):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(port)
        finally:
            tcp.close()
            udp.close()
    raise RuntimeError("no free TCP+UDP port pair")


@dataclass
class _Conn:
    sock: socket.socket
    session: McSession
    outbuf: bytearray = field(default_factory=bytearray)


class _TestServer:
    """A test-only TCP + UDP transport for the sans-I/O engine (one selector thread)."""

    def __init__(self) -> None:
        self.engine = McEngine(time.time())
        self.udp_handler = McUdpHandler(self.engine)
        self.tcp, self.udp = self._bind_same_port()
        self.port = self.tcp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._serve, name=f"mc-test-server-{TAG}")

    @staticmethod
    def _bind_same_port() -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind(("127.0.0.1", 0))
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind(("127.0.0.1", tcp.getsockname()[1]))
            except OSError:
                tcp.close()
                udp.close()
                continue
            tcp.listen(64)
            tcp.setblocking(False)
            udp.setblocking(False)
            return tcp, udp
        raise RuntimeError("no free TCP+UDP port pair")

    def start(self) -> None:
        self._selector.register(self.tcp, selectors.EVENT_READ, "accept")
        self._selector.register(self.udp, selectors.EVENT_READ, "udp")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=10)
        for key in list(self._selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()
        self._wake_w.close()

    def _serve(self) -> None:
        while not self._stop:
            for key, mask in self._selector.select(timeout=1.0):
                if key.data == "accept":
                    self._accept()
                elif key.data == "udp":
                    self._on_datagrams()
                elif isinstance(key.data, _Conn):
                    self._on_conn(key.data, mask)

    def _accept(self) -> None:
        try:
            sock, _ = self.tcp.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock, self.engine.open_session(time.time()))
        self._selector.register(sock, selectors.EVENT_READ, conn)

    def _on_datagrams(self) -> None:
        for _ in range(64):
            try:
                data, peer = self.udp.recvfrom(65536)
            except BlockingIOError:
                return
            for datagram in self.udp_handler.handle_datagram(data, time.time()):
                self.udp.sendto(datagram, peer)

    def _on_conn(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(conn)
                return
            if data:
                conn.session.feed(data, time.time())
        self._pump(conn)

    def _pump(self, conn: _Conn) -> None:
        session = conn.session
        while True:
            conn.outbuf += session.take_output()
            if not session.has_backlog or len(conn.outbuf) > (1 << 20):
                break
            session.feed(b"", time.time())
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._close(conn)
                return
        if session.should_close and not conn.outbuf:
            self._close(conn)
            return
        events = selectors.EVENT_READ
        if conn.outbuf or session.has_backlog:
            events |= selectors.EVENT_WRITE
        self._selector.modify(conn.sock, events, conn)

    def _close(self, conn: _Conn) -> None:
        conn.session.close()
        self._selector.unregister(conn.sock)
        conn.sock.close()


@pytest.fixture(scope="module")
def memcached_port() -> Iterator[int]:
    port = _free_port_pair()
    args = [f"memcached-{TAG}", "-l", "127.0.0.1", "-p", str(port), "-U", str(port),
            "-t", "1", "-m", "64"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    env = dict(os.environ, ARX_TEST_TAG=TAG)
    proc = subprocess.Popen(args, executable=MEMCACHED, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"memcached did not start: {proc.stderr!r}")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.fixture(scope="module")
def test_server() -> Iterator[_TestServer]:
    server = _TestServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send a request followed by a no-op marker and read up to the marker's reply."""
    sock.sendall(request + b"version\r\n")
    data = b""
    while not re.search(rb"VERSION \S+\r\n\Z", data):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed; got {data!r}")
        data += chunk
    return re.sub(rb"VERSION \S+\r\n\Z", b"", data)


def _exchange_until_close(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk


def _normalise(reply: bytes) -> bytes:
    reply = re.sub(rb"(?m)^(VALUE \S+ \d+ \d+) \d+\r$", rb"\1 <cas>\r", reply)
    return re.sub(rb"(?m)^VERSION \S+\r$", b"VERSION <v>\r", reply)


def _last_cas(reply: bytes) -> bytes:
    found = re.findall(rb"VALUE \S+ \d+ \d+ (\d+)\r\n", reply)
    if not found:
        raise AssertionError(f"no cas in {reply!r}")
    return bytes(found[-1])


BIG = b"v" * 5000
LONG_KEY = b"k" * 251
MAX_KEY = b"m" * 250

# One request per row, answered on one connection, in order. "{cas}" is replaced by the
# cas unique from the previous gets reply on the same server.
SCRIPT: list[bytes] = [
    b"set a 0 0 1\r\nx\r\n",
    b"get a\r\n",
    b"gets a\r\n",
    b"cas a 0 0 1 {cas}\r\ny\r\n",
    b"cas a 0 0 1 1\r\nz\r\n",
    b"cas nokey 0 0 1 1\r\nz\r\n",
    b"get a nokey a\r\n",
    b"set a 5 0 1 noreply\r\nq\r\nget a\r\n",
    b"add a 0 0 1\r\nx\r\nadd b 0 0 2\r\nbb\r\nreplace c 0 0 1\r\nx\r\nreplace b 3 0 1\r\nB\r\n",
    b"append a 9 0 2\r\nyz\r\nprepend a 9 0 2\r\nuv\r\nappend none 0 0 1\r\nx\r\nget a b\r\n",
    b"set a 0 0 2\r\nxyz\r\nget a\r\n",
    b"set a 0 0 1\nx\r\nget a\n",
    b"set a b 0 1\r\nx\r\n",
    b"set a 0 0 -1\r\n",
    b"set a 0 0\r\nset a 0 0 1 noreply extra\r\nx\r\n",
    b"set " + LONG_KEY + b" 0 0 1\r\nx\r\n",
    b"get a " + LONG_KEY + b"\r\n",
    b"set " + MAX_KEY + b" 7 0 1\r\nm\r\nget " + MAX_KEY + b"\r\n",
    b"set big 0 0 5000\r\n" + BIG + b"\r\nget big\r\n",
    b"set big 0 0 2000000\r\n" + b"w" * 2_000_000 + b"\r\nget big\r\n",
    b"set n 0 0 2\r\n10\r\nincr n 5\r\ndecr n 100\r\nincr n 1\r\nget n\r\n",
    b"set n 0 0 3\r\n100\r\ndecr n 1\r\nget n\r\nincr n 1\r\nincr n 1\r\nget n\r\n",
    b"set n 0 0 20\r\n18446744073709551615\r\nincr n 2\r\nget n\r\n",
    b"incr n x\r\nincr n -1\r\nincr n 18446744073709551616\r\nincr a 1\r\nincr nokey 1\r\n",
    b"incr n 1 noreply\r\nincr n\r\ndecr n 1 2 3\r\nget n\r\n",
    b"set e 0 0 0\r\n\r\nincr e 1\r\nget e\r\n",
    b"delete a\r\ndelete a\r\ndelete b 0\r\ndelete b 1\r\ndelete b noreply\r\ndelete\r\n",
    b"touch n 100\r\ntouch nokey 100\r\ntouch n x\r\ntouch n\r\ntouch n 1 noreply\r\n",
    b"set x 0 -1 1\r\nx\r\nget x\r\n",
    b"verbosity 1\r\nverbosity\r\nverbosity 1 noreply\r\nverbosity x\r\n",
    b"foo\r\n\r\nGET a\r\nget\r\ngets\r\nset\ta 0 0 1\r\n",
    b"flush_all\r\nget n big\r\nflush_all x\r\nflush_all 0 noreply\r\n",
    b"  set  s  1  0  2 \r\nss\r\nget  s \r\n",
    b"get " + b" ".join(b"k%d" % i for i in range(40)) + b" s\r\n",
]


def test_scripted_session_matches_memcached(
    memcached_port: int, test_server: _TestServer
) -> None:
    replies: dict[str, list[bytes]] = {}
    for name, port in (("memcached", memcached_port), ("ours", test_server.port)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            got = []
            last = b""
            for request in SCRIPT:
                if b"{cas}" in request:
                    request = request.replace(b"{cas}", _last_cas(last))
                last = _exchange(sock, request)
                got.append(last)
            replies[name] = got
    for request, theirs, ours in zip(SCRIPT, replies["memcached"], replies["ours"]):
        assert _normalise(ours) == _normalise(theirs), request[:80]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"quit\r\nversion\r\n",
        b"version\r\nquit\r\nversion\r\n",
        b"x" * 3000,
        b"get " + b"k " * 1100 + b"\r\nquit\r\n",
    ],
    # Not compared: replies to commands before an overlong line. memcached drops them
    # with the connection; the engine sends them, then closes (test_memcache_protocol).
    ids=["quit", "reply-then-quit", "line-too-long", "long-multiget-line"],
)
def test_closing_requests_match_memcached(
    memcached_port: int, test_server: _TestServer, request_bytes: bytes
) -> None:
    theirs = _exchange_until_close(memcached_port, request_bytes)
    ours = _exchange_until_close(test_server.port, request_bytes)
    assert _normalise(ours) == _normalise(theirs)


def test_stats_deltas_match_memcached(memcached_port: int, test_server: _TestServer) -> None:
    compared = [
        "get_hits", "get_misses", "cmd_get", "delete_hits", "delete_misses",
        "incr_hits", "incr_misses", "decr_hits", "decr_misses", "touch_hits",
        "touch_misses", "cmd_touch", "cas_hits", "cas_badval", "cas_misses",
    ]
    script = (
        b"set sa 0 0 1\r\n1\r\nget sa sb sa\r\nincr sa 2\r\nincr sb 1\r\ndecr sa 1\r\n"
        b"decr sb 1\r\ntouch sa 0\r\ntouch sb 0\r\ncas sa 0 0 1 1\r\nz\r\n"
        b"cas sb 0 0 1 1\r\nz\r\ndelete sa\r\ndelete sa\r\n"
    )

    def stats(sock: socket.socket) -> dict[str, str]:
        reply = _exchange(sock, b"stats\r\n")
        assert reply.endswith(b"END\r\n")
        return {
            name.decode(): value.decode()
            for name, value in re.findall(rb"STAT (\S+) (\S+)\r\n", reply)
        }

    deltas = {}
    for name, port in (("memcached", memcached_port), ("ours", test_server.port)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            before = stats(sock)
            _exchange(sock, script)
            after = stats(sock)
        deltas[name] = {key: int(after[key]) - int(before[key]) for key in compared}
        if name == "ours":
            # Every name we report is one memcached reports too.
            assert set(after) <= set(stats_names_of_memcached(memcached_port))
    assert deltas["ours"] == deltas["memcached"]


def stats_names_of_memcached(port: int) -> set[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        reply = _exchange(sock, b"stats\r\n")
    return {name.decode() for name in re.findall(rb"STAT (\S+) ", reply)}


def _udp_exchange(port: int, datagram: bytes, expect_reply: bool) -> list[bytes]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(datagram, ("127.0.0.1", port))
        got: list[bytes] = []
        # Replies, then silence: wait long for the first datagram, briefly for the rest.
        sock.settimeout(3.0 if expect_reply else 0.3)
        while True:
            try:
                got.append(sock.recv(65536))
            except socket.timeout:
                return got
            sock.settimeout(0.3)


UDP_CASES: list[tuple[bytes, bool]] = [
    (HEADER.pack(1, 0, 1, 0) + b"set ub 0 0 5000\r\n" + BIG + b"\r\n", True),
    (HEADER.pack(2, 0, 1, 0) + b"get ub\r\n", True),
    (HEADER.pack(3, 0, 1, 0) + b"get nokey\r\n", True),
    (HEADER.pack(4, 0, 1, 0) + b"bogus\r\n", True),
    (HEADER.pack(5, 0, 2, 0) + b"get ub\r\n", False),
    (HEADER.pack(6, 0, 0, 0) + b"get ub\r\n", False),
    (b"\x00\x07\x00", False),
    (HEADER.pack(8, 0, 1, 0) + b"set uc 0 0 1 noreply\r\nx\r\n", False),
    (HEADER.pack(10, 0, 1, 0) + b"get uc\r\n", True),
    # Last: memcached keeps this half-read value pending on its one UDP "connection"
    # and eats the next datagram as its data; the engine parses each datagram afresh.
    (HEADER.pack(9, 0, 1, 0) + b"set ud 0 0 5\r\nab", False),
]


def test_udp_matches_memcached(memcached_port: int, test_server: _TestServer) -> None:
    for datagram, expect_reply in UDP_CASES:
        theirs = _udp_exchange(memcached_port, datagram, expect_reply)
        ours = _udp_exchange(test_server.port, datagram, expect_reply)
        # Same datagram count, sizes and headers (ids, sequence numbers, totals).
        assert [(len(d), d[:8]) for d in ours] == [(len(d), d[:8]) for d in theirs]
        assert b"".join(d[8:] for d in ours) == b"".join(d[8:] for d in theirs)
    counters = test_server.udp_handler.counters
    assert counters.malformed >= 2
    assert counters.multi_datagram_requests >= 1


def _run_memcaslap(port: int, udp: bool) -> str:
    args = [f"memcaslap-{TAG}", "-s", f"127.0.0.1:{port}", "-t", "3s", "-c", "4",
            "-v", "0.1"]
    if udp:
        args.append("-U")
    proc = subprocess.run(args, executable=MEMCASLAP, capture_output=True, text=True,
                          timeout=30, env=dict(os.environ, ARX_TEST_TAG=TAG))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output


def _counter(output: str, name: str) -> int:
    found = re.search(rf"^{name}: (\d+)$", output, re.MULTILINE)
    if found is None:
        raise AssertionError(f"{name} missing from memcaslap output:\n{output}")
    return int(found.group(1))


@pytest.mark.skipif(MEMCASLAP is None, reason="memcaslap is not installed")
@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_memcaslap_reports_no_errors(test_server: _TestServer, udp: bool) -> None:
    output = _run_memcaslap(test_server.port, udp)
    assert _counter(output, "cmd_get") > 0
    assert _counter(output, "cmd_set") > 0
    for name in ("get_misses", "verify_misses", "verify_failed"):
        assert _counter(output, name) == 0, output
    if udp:
        for name in ("packet_disorder", "packet_drop", "udp_timeout"):
            assert _counter(output, name) == 0, output
    assert not re.search(r"ERROR|verification failed|Failed", output), output
