"""Acceptance, as root: real Redis clients against the libOS key-value server on both backends.

The libOS server (``python -m libos.apps.kv``) runs once on the VNIC (``topo.vnic_ip``) and
once on the Linux baseline (``topo.linux_ip``); a real redis-server 7 runs beside them on
loopback in the client namespace, port 6379 like ours (so INFO's tcp_port agrees) and with
``--databases 1`` (ours has one database, so SELECT answers alike). Every client runs in
the instance's client namespace and reaches our servers over the bridge: the real path.

The issue asks for ``redis-benchmark -n 100000``; on this project's 2-core box the VNIC
server does a few thousand requests a second, so six tests of 100000 would take minutes
per run. The test uses ``-n 3000`` (every test of the run still goes through 50
connections); the issue's numbers were run by hand (see the benchmark report).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Union

import pytest

from kernelctl.names import Topology
from tests.helpers import App, run_in_netns

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        not all(shutil.which(tool) for tool in ("redis-server", "redis-cli", "redis-benchmark")),
        reason="needs redis-server, redis-cli and redis-benchmark (Redis 7)",
    ),
]

PORT = 6379
LOOPBACK = "127.0.0.1"
BACKENDS = ("vnic", "linux")
BENCH_REQUESTS = 3000  # the 100000 takes minutes on the VNIC here; see the docstring

Address = tuple[str, int]
Resp = Union[bytes, int, None, "RespError", list[Any]]


class RespError(str):
    """An error reply, kept apart from a simple string."""


# ---- processes ----------------------------------------------------------------------


def _in_netns(topo: Topology, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", topo.client_netns, *argv]


def _redis_cli(topo: Topology, address: Address, *argv: str, stdin: str | None = None,
               raw: bool = False, timeout: float = 30.0) -> str:
    mode = "--raw" if raw else "--no-raw"
    done = subprocess.run(
        _in_netns(topo, "redis-cli", mode, "-h", address[0], "-p", str(address[1]), *argv),
        input=stdin, capture_output=True, text=True, timeout=timeout,
    )
    if done.returncode != 0:
        raise AssertionError(f"redis-cli against {address} failed: {done.stdout}{done.stderr}")
    return done.stdout


@contextlib.contextmanager
def real_redis(topo: Topology) -> Iterator[Address]:
    """redis-server 7 on loopback in the client namespace; killed on the way out.

    It carries the instance tag in its environment, and the namespace it runs in is the
    instance's own, so whoever looks for leftovers can tell it is ours.
    """
    workdir = tempfile.mkdtemp(prefix=f"arx-{topo.tag}-redis-")
    process = subprocess.Popen(
        _in_netns(topo, "redis-server", "--port", str(PORT), "--bind", LOOPBACK, "--save", "",
                  "--appendonly", "no", "--databases", "1", "--dir", workdir),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, ARX_TEST_TAG=topo.tag),
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            probe = subprocess.run(_in_netns(topo, "redis-cli", "-h", LOOPBACK, "-p", str(PORT), "PING"),
                                   capture_output=True, text=True, timeout=10)
            if probe.stdout.strip() == "PONG":
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"redis-server did not start: {probe.stdout}{probe.stderr}")
            time.sleep(0.1)
        yield (LOOPBACK, PORT)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def our_app(module: str, backend: str, topo: Topology, port: int, *extra: str) -> Iterator[App]:
    """One of our apps (``extra``: more arguments); on the way out it must stop cleanly
    (exit 0, no traceback)."""
    app = App(module, "--backend", backend, "--instance", topo.tag, "--port", str(port), *extra)
    clean = False
    try:
        yield app
        clean = True
    finally:
        err = app.stop()
        if clean:
            # Checked only when the test body passed, so a failure there is not masked.
            assert app.process.returncode == 0 and "Traceback" not in err, (
                f"{module} on {backend} did not stop cleanly (rc {app.process.returncode}):\n{err}")


@contextlib.contextmanager
def kv_servers(topo: Topology, *, with_real: bool) -> Iterator[dict[str, Address]]:
    """Our server on both backends (and the real one): name -> address seen by clients."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, Address] = {}
        for backend, ip in zip(BACKENDS, (topo.vnic_ip, topo.linux_ip)):
            stack.enter_context(our_app("libos.apps.kv", backend, topo, PORT))
            servers[backend] = (ip, PORT)
        if with_real:
            servers["real"] = stack.enter_context(real_redis(topo))
        yield servers


# ---- a small RESP client, run inside the client namespace -------------------------------


class RespReader:
    """Parses replies (RESP2) off a socket; EOFError when the server closed."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line, self.buf = self.buf[:end], self.buf[end + 2 :]
        return line

    def read(self) -> Resp:
        line = self._line()
        kind, body = line[:1], line[1:]
        if kind == b"+":
            return body
        if kind == b"-":
            return RespError(body.decode("latin-1"))
        if kind == b":":
            return int(body)
        if kind == b"$":
            size = int(body)
            if size < 0:
                return None
            while len(self.buf) < size + 2:
                self._fill()
            data, self.buf = self.buf[:size], self.buf[size + 2 :]
            return data
        if kind == b"*":
            count = int(body)
            return None if count < 0 else [self.read() for _ in range(count)]
        raise ValueError(f"not a RESP reply: {line[:80]!r}")


def encode(*args: str | bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def exchange(address: Address, requests: list[list[str]]) -> list[Resp]:
    """One connection; each request sent and its reply parsed, in turn."""
    with socket.create_connection(address, timeout=10) as conn:
        reader = RespReader(conn)
        replies = []
        for request in requests:
            conn.sendall(encode(*request))
            replies.append(reader.read())
        return replies


def ping_at_once(address: Address) -> Resp:
    """A fresh connection's PING: the server must still be serving."""
    with socket.create_connection(address, timeout=5) as conn:
        conn.sendall(b"PING\r\n")
        return RespReader(conn).read()


def send_and_watch(address: Address, payload: bytes, trickle: bool) -> tuple[bytes, bool]:
    """Send ``payload`` (one byte per segment if ``trickle``); what came back, and closed?

    Reads until the server closes or has been silent for a second after it last spoke
    (every case here either closes at once or answers at once).
    """
    with socket.create_connection(address, timeout=10) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if trickle:
            for index in range(len(payload)):
                conn.sendall(payload[index : index + 1])
                time.sleep(0.002)  # so each byte leaves as its own segment
        else:
            try:
                conn.sendall(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closed mid-request (a too-big request): see what it said
        received = b""
        conn.settimeout(1.0)
        while True:
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                return received, False
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk


# ---- the scripted redis-cli session -----------------------------------------------------

# Each string is fed to one redis-cli (one connection) on stdin, a command per line; a
# float is a pause. Replies must be byte-identical across the three servers.
SESSION: list[Union[str, float]] = [
    "FLUSHALL\nDBSIZE\nPING\nPING \"hello there\"\nPING a b\nECHO \"two words\"\nECHO\n",
    "GET nokey\nGET\nSET k v EX 100\nTTL k\nGET k\nSET k v2 NX\nSET k v3 XX\nGET k\n"
    "SET nk v XX\nGET nk\nSET nx v NX\nSET nx again NX\nGET nx\nSET px v PX 100000\nTTL px\n"
    "SET k v EX 0\nSET k v PX -1\nSET k v PX abc\nSET k v NX XX\nSET k v EX 10 PX 10\nSET k\n",
    "EXISTS k nk px nope k\nDEL k nope\nDEL k\nEXISTS k\n",
    "INCR n\nINCRBY n 41\nDECR n\nINCRBY n -100\nINCR px\nINCRBY n x\nINCRBY n 9223372036854775807\n"
    "SET big 9223372036854775807\nINCR big\nDECR nothere\nINCR\n",
    "MSET a 1 b 2 c 3\nMSET a\nMGET a b nope c\nMGET\nDBSIZE\n",
    "SELECT 0\nSELECT 1\nSELECT x\nCONFIG GET save\nCONFIG GET appendonly\nCONFIG GET\nCOMMAND COUNT x\n",
    "SET e v PX 200\nGET e\n",
    0.5,
    "GET e\nEXISTS e\nDBSIZE\nNOSUCHCOMMAND a b\n",
    "FLUSHALL\nDBSIZE\nMGET a b c\n",
]

# INFO fields whose value is a fact about the configuration or the session, not about the
# process (pids, uptime, memory use and counts since start differ legitimately).
INFO_STABLE = ("redis_version", "redis_mode", "arch_bits", "tcp_port", "hz", "connected_clients",
               "blocked_clients", "maxmemory", "maxmemory_human", "maxmemory_policy")
# Counters compared as deltas over the session: the same commands must count the same.
# (keyspace_hits and keyspace_misses have their own test below.)
INFO_DELTAS = ("expired_keys", "total_error_replies")
# Ours only, or ours with another value by nature.
INFO_OURS_ONLY = ("arrakis_kv",)


def parse_info(text: str) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in text.replace("\r", "").splitlines():
        if line.startswith("# "):
            current = sections.setdefault(line[2:].strip().lower(), {})
        elif ":" in line:
            key, _, value = line.partition(":")
            current[key] = value
    return sections


def flat(sections: dict[str, dict[str, str]]) -> dict[str, str]:
    return {key: value for fields in sections.values() for key, value in fields.items()}


def test_redis_cli_session_matches_real_redis(instance: Topology) -> None:
    with kv_servers(instance, with_real=True) as servers:
        info_before = {name: parse_info(_redis_cli(instance, address, "INFO", raw=True))
                       for name, address in servers.items()}
        transcripts: dict[str, list[str]] = {name: [] for name in servers}
        for step in SESSION:
            if isinstance(step, float):
                time.sleep(step)
                continue
            for name, address in servers.items():
                transcripts[name].append(_redis_cli(instance, address, stdin=step))
        info_after = {name: parse_info(_redis_cli(instance, address, "INFO", raw=True))
                      for name, address in servers.items()}

    real = transcripts["real"]
    assert "(integer) 42" in real[3] and "(nil)" in real[-2], real  # the session did run
    for backend in BACKENDS:
        for step, mine, theirs in zip([s for s in SESSION if isinstance(s, str)], transcripts[backend], real):
            assert mine == theirs, f"{backend}: {step!r}"

    real_sections = info_after["real"]
    for backend in BACKENDS:
        ours = info_after[backend]
        assert set(ours) <= set(real_sections), f"{backend}: INFO sections {set(ours) - set(real_sections)}"
        for section, fields in ours.items():
            unknown = set(fields) - set(real_sections[section]) - set(INFO_OURS_ONLY)
            assert not unknown, f"{backend}: INFO fields Redis does not have in {section}: {unknown}"
        mine_flat, real_flat = flat(ours), flat(real_sections)
        for key in INFO_STABLE:
            assert mine_flat.get(key) == real_flat[key], f"{backend}: INFO {key}"
        before_flat, real_before = flat(info_before[backend]), flat(info_before["real"])
        for key in INFO_DELTAS:
            mine_delta = int(mine_flat[key]) - int(before_flat[key])
            real_delta = int(real_flat[key]) - int(real_before[key])
            assert mine_delta == real_delta, f"{backend}: INFO {key} grew by {mine_delta}, Redis's by {real_delta}"
        # The session ends with an empty keyspace: both list no db0 line.
        assert ours.get("keyspace", {}) == real_sections.get("keyspace", {})


# Reads that Redis 7 counts in keyspace_hits / keyspace_misses (lookupKeyRead): each
# request below touches one present key ("h") or one missing key ("m").
COUNTED_READS: list[list[str]] = [
    ["GET", "h"], ["GET", "m"], ["MGET", "h", "m"], ["TTL", "h"], ["TTL", "m"], ["PTTL", "h"],
    ["EXISTS", "h"], ["EXISTS", "m"], ["TYPE", "h"], ["TYPE", "m"], ["SET", "h", "w", "GET"],
]


def _keyspace_counters(address: Address) -> tuple[int, int]:
    [info] = exchange(address, [["INFO", "stats"]])
    if not isinstance(info, bytes):
        raise AssertionError(f"INFO gave {info!r}")
    fields = flat(parse_info(info.decode()))
    return int(fields["keyspace_hits"]), int(fields["keyspace_misses"])


def count_reads(address: Address) -> tuple[list[Resp], tuple[int, int]]:
    exchange(address, [["FLUSHALL"], ["SET", "h", "v"]])
    before = _keyspace_counters(address)
    replies = exchange(address, COUNTED_READS)
    after = _keyspace_counters(address)
    return replies, (after[0] - before[0], after[1] - before[1])


def test_keyspace_hit_counters_match_real_redis(instance: Topology) -> None:
    with kv_servers(instance, with_real=True) as servers:
        results = {name: run_in_netns(instance.client_netns, count_reads, address)
                   for name, address in servers.items()}
    real_replies, real_counts = results["real"]
    assert real_counts == (7, 5)
    for backend in BACKENDS:
        replies, counts = results[backend]
        assert replies == real_replies, backend
        assert counts == real_counts, f"{backend}: (hits, misses) grew by {counts}, Redis's by {real_counts}"


# ---- COMMAND -------------------------------------------------------------------------------


def command_tables(address: Address, names: list[str] | None) -> tuple[Resp, Resp]:
    """(COMMAND COUNT, COMMAND INFO of ``names``, or the whole COMMAND when None)."""
    request = ["COMMAND"] if names is None else ["COMMAND", "INFO", *names]
    count, table = exchange(address, [["COMMAND", "COUNT"], request])
    return count, table


def _stable_entry(entry: Resp) -> tuple[list[Any], dict[bytes, list[Any]]]:
    """The fields of a COMMAND entry that describe the command, and its subcommands'.

    Kept: name, arity, flags, first key, last key, key step, ACL categories. Left out: the
    tips (8th) and the key specifications (9th), which this server does not describe (an
    empty array each). Subcommands come back by name: ours must be some of Redis's.
    """
    if not isinstance(entry, list) or len(entry) < 10 or not isinstance(entry[9], list):
        raise AssertionError(f"not a COMMAND entry: {entry!r}")
    return list(entry[:7]), {sub[0]: _stable_entry(sub)[0] for sub in entry[9]}


def test_command_info_matches_real_redis(instance: Topology) -> None:
    with kv_servers(instance, with_real=True) as servers:
        ours = {backend: run_in_netns(instance.client_netns, command_tables, servers[backend], None)
                for backend in BACKENDS}
        vnic_table = ours["vnic"][1]
        if not isinstance(vnic_table, list):
            raise AssertionError(f"COMMAND gave {vnic_table!r}")
        names = sorted(entry[0].decode() for entry in vnic_table)
        real_count, real_table = run_in_netns(instance.client_netns, command_tables, servers["real"], names)

    assert {"get", "set", "ping", "mset", "incrby", "command", "config", "info"} <= set(names)
    if not isinstance(real_table, list):
        raise AssertionError(f"COMMAND INFO gave {real_table!r}")
    real_entries = {entry[0]: _stable_entry(entry) for entry in real_table if entry is not None}
    assert len(real_entries) == len(names), "Redis does not know some of our commands"
    for backend in BACKENDS:
        count, table = ours[backend]
        assert isinstance(count, int) and isinstance(table, list)
        assert count == len(table), f"{backend}: COMMAND COUNT disagrees with COMMAND"
        for entry in table:
            fields, subcommands = _stable_entry(entry)
            real_fields, real_subcommands = real_entries[entry[0]]
            assert fields == real_fields, f"{backend}: COMMAND INFO {entry[0]!r}"
            for name, sub_fields in subcommands.items():
                assert sub_fields == real_subcommands.get(name), f"{backend}: COMMAND INFO {name!r}"


def test_command_count_is_what_we_implement(instance: Topology) -> None:
    # We implement a subset of Redis's commands (those the issue lists, and what
    # redis-benchmark and redis-cli need); COMMAND COUNT says exactly how many.
    from libos.apps.kv.commands import COMMANDS

    with kv_servers(instance, with_real=True) as servers:
        counts = {name: run_in_netns(instance.client_netns, exchange, address, [["COMMAND", "COUNT"]])
                  for name, address in servers.items()}
    assert counts["vnic"] == counts["linux"] == [len(COMMANDS)]
    assert counts["real"][0] > len(COMMANDS)


# ---- robustness: the cases of Redis's own protocol tests, over the real path ----------------

# (name, bytes sent, sent one byte per segment). Each server must answer exactly as the
# real one does (an error, a close, or for the harmless ones a normal reply).
ROBUSTNESS: list[tuple[str, bytes, bool]] = [
    ("empty query", b"\r\n\r\nPING\r\n", False),
    ("negative multibulk count", b"*-10\r\nPING\r\n", False),
    ("huge multibulk count", b"*3000000000\r\n", False),
    ("multibulk count over int", b"*2147483648\r\n", False),
    ("missing '$'", b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n", False),
    ("multibulk without bulks", b"*1\r\nfoo\r\n", False),
    ("negative bulk length", b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$-10\r\n", False),
    ("huge bulk length", b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$2000000000\r\n", False),
    ("non-number bulk length", b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$blabla\r\n", False),
    ("unbalanced quotes", b'set """test-key""" test-value\r\nping\r\n', False),
    ("wrong number of arguments", b"ping x y z\r\nPING\r\n", False),
    ("huge inline request", b"x" * 70000, False),
    ("huge multibulk count line", b"*" + b"1" * 70000, False),
    ("trickled pipeline", encode("SET", "trickle", "hello") + b"GET trickle\r\n" + encode("DEL", "trickle"), True),
]


def robustness_client(address: Address) -> list[tuple[bytes, bool, Resp]]:
    """Each case on its own connection, then a fresh connection's PING."""
    return [(*send_and_watch(address, payload, trickle), ping_at_once(address))
            for _name, payload, trickle in ROBUSTNESS]


def test_protocol_robustness_on_both_backends(instance: Topology) -> None:
    with kv_servers(instance, with_real=True) as servers:
        results = {name: run_in_netns(instance.client_netns, robustness_client, address, timeout=180)
                   for name, address in servers.items()}
        still_up = {backend: run_in_netns(instance.client_netns, ping_at_once, servers[backend])
                    for backend in BACKENDS}

    real = results["real"]
    cases = dict(zip([name for name, _, _ in ROBUSTNESS], real))
    assert cases["trickled pipeline"] == (b"+OK\r\n$5\r\nhello\r\n:1\r\n", False, b"PONG")
    assert cases["negative multibulk count"] == (b"+PONG\r\n", False, b"PONG")
    for backend in BACKENDS:
        for (name, _payload, _trickle), mine, theirs in zip(ROBUSTNESS, results[backend], real):
            received, closed, ping = mine
            assert ping == b"PONG", f"{backend}: after {name} a fresh connection got {ping!r}"
            if name not in ("empty query", "negative multibulk count", "trickled pipeline"):
                assert received.startswith(b"-") or closed, f"{backend}: {name}: neither an error nor a close"
            assert mine == theirs, f"{backend}: {name}"
        assert still_up[backend] == b"PONG"


# ---- redis-benchmark ----------------------------------------------------------------------

BENCH_TESTS = ("PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET (10 keys)")


@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark_completes_without_errors(instance: Topology, pipeline: int) -> None:
    with kv_servers(instance, with_real=False) as servers:
        for backend in BACKENDS:
            host, port = servers[backend]
            done = subprocess.run(
                _in_netns(instance, "redis-benchmark", "-h", host, "-p", str(port), "-t", "ping,set,get,incr,mset",
                          "-n", str(BENCH_REQUESTS), "-c", "50", "-P", str(pipeline), "-q"),
                capture_output=True, text=True, timeout=240,
            )
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{backend}: redis-benchmark exited {done.returncode}:\n{output[-3000:]}"
            # redis-benchmark reports server errors and broken connections as "Error ..."
            # lines (and carries on), so their absence is part of the verdict.
            assert "rror" not in output and "WARN" not in output, f"{backend}:\n{output[-3000:]}"
            finished = [line.split(":")[0] for line in output.replace("\r", "\n").splitlines()
                        if "requests per second" in line]
            assert finished == list(BENCH_TESTS), f"{backend}: {finished}\n{output[-3000:]}"
            assert _redis_cli(instance, (host, port), "PING", timeout=10).strip() == "PONG", backend
            assert int(_redis_cli(instance, (host, port), "DBSIZE", raw=True)) > 0, backend  # SETs stayed
