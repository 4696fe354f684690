"""Helpers for tests: run client code inside a namespace, start and stop apps, and an
in-memory fake of the queue API (``FakeLibOS``) that the server loops are tested against."""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libos.api import Address, LibOSError, Opcode, QResult, SocketKind
from tools import nsrun

REPO = Path(__file__).resolve().parent.parent


def run_in_netns(netns: str, fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """``fn(*args)`` in a child inside ``netns``; a failure there fails the test here."""
    try:
        return nsrun.run_in_netns(netns, fn, *args, timeout=timeout)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None


class App:
    """An application process (e.g. ``libos.apps.echo``) that prints a ready line."""

    def __init__(self, module: str, *args: str, ready: str = "ready", timeout: float = 30.0) -> None:
        self.argv = [sys.executable, "-u", "-m", module, *args]
        self.process = subprocess.Popen(
            self.argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        if not self._wait_for(ready, timeout):
            err = self.stop()
            raise AssertionError(f"{module} did not become ready: {self.lines} {err}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_for(self, text: str, timeout: float) -> bool:
        stdout = self.process.stdout
        if stdout is None:
            return False
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], 0.2)
            if ready:
                line = stdout.readline()
                if not line:
                    return False
                self.lines.append(line.rstrip())
                if text in line:
                    return True
            elif self.process.poll() is not None:
                return False
        return False

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop it; returns what it printed on stderr."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            out, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        self.lines += out.splitlines()
        return err

    def stats(self) -> dict[str, Any]:
        for line in reversed(self.lines):
            if line.startswith("echo: stats "):
                return json.loads(line[len("echo: stats ") :])
        raise AssertionError(f"no stats line in {self.lines}")

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def echo_app(backend: str, tag: str, port: int, *extra: str) -> App:
    return App("libos.apps.echo", "--backend", backend, "--instance", tag, "--port", str(port), *extra)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def linux_has_tcp() -> bool:
    from libos.api.linux import LinuxLibOS

    return hasattr(LinuxLibOS, "listen")


def stats_of(app: App, prefix: str) -> dict[str, object]:
    for line in reversed(app.lines):
        if line.startswith(prefix):
            loaded: dict[str, object] = json.loads(line[len(prefix):])
            return loaded
    raise AssertionError(f"no {prefix!r} line in {app.lines}")


def vnic_has_tcp() -> bool:
    from libos.api.vnic import VnicLibOS

    return hasattr(VnicLibOS, "listen")


@dataclass
class FakePeer:
    """The client end of one fake TCP connection."""

    qd: int
    inbound: deque[bytes] = field(default_factory=deque)  # client -> server, not yet popped
    received: bytearray = field(default_factory=bytearray)  # server -> client
    eof_sent: bool = False
    closed_by_server: bool = False
    stalled: bool = False  # the client does not read: pushes do not complete
    reset: bool = False


class FakeLibOS:
    """Just enough of the LibOS protocol, completing tokens in memory; never sleeps."""

    backend = "fake"

    def __init__(self) -> None:
        self._tokens = itertools.count(1)
        self._qds = itertools.count(3)
        self.kinds: dict[int, SocketKind] = {}
        self.bound: dict[int, Address] = {}
        self.listening: set[int] = set()
        self.done: dict[int, QResult] = {}
        self.waiting: dict[int, tuple[str, int]] = {}  # token -> (operation, qd)
        self.pushes: dict[int, tuple[int, bytes]] = {}  # stalled push token -> (qd, data)
        self.backlog: deque[int] = deque()  # accepted-by-the-stack connections
        self.peers: dict[int, FakePeer] = {}
        self.udp_in: dict[int, deque[tuple[bytes, Address]]] = {}
        self.udp_out: list[tuple[bytes, Address]] = []
        self.udp_stalled = False
        self.pops_issued: dict[int, int] = {}
        self.fail_accepts = 0

    def _token(self) -> int:
        return next(self._tokens)

    def socket(self, kind: SocketKind) -> int:
        qd = next(self._qds)
        self.kinds[qd] = kind
        if kind is SocketKind.UDP:
            self.udp_in[qd] = deque()
        return qd

    def _check(self, qd: int) -> SocketKind:
        kind = self.kinds.get(qd)
        if kind is None:
            raise LibOSError(f"bad queue descriptor {qd}")
        return kind

    def bind(self, qd: int, address: Address) -> None:
        kind = self._check(qd)
        if any(a == address and self.kinds.get(q) is kind for q, a in self.bound.items()):
            raise LibOSError("address in use")
        self.bound[qd] = address

    def listen(self, qd: int, backlog: int) -> None:
        self._check(qd)
        self.listening.add(qd)

    def accept(self, qd: int) -> int:
        if qd not in self.listening:
            raise LibOSError("not listening")
        token = self._token()
        self.waiting[token] = ("accept", qd)
        self._progress()
        return token

    def connect(self, qd: int, address: Address) -> int:
        raise LibOSError("not in the fake")

    def pop(self, qd: int) -> int:
        self._check(qd)
        self.pops_issued[qd] = self.pops_issued.get(qd, 0) + 1
        token = self._token()
        self.waiting[token] = ("pop", qd)
        self._progress()
        return token

    def push(self, qd: int, data: bytes) -> int:
        self._check(qd)
        token = self._token()
        peer = self.peers[qd]
        if peer.stalled:
            self.pushes[token] = (qd, data)
        else:
            peer.received += data
            self.done[token] = QResult(Opcode.PUSH, qd)
        return token

    def pushto(self, qd: int, data: bytes, address: Address) -> int:
        self._check(qd)
        token = self._token()
        if self.udp_stalled:
            self.pushes[token] = (qd, data)
        else:
            self.udp_out.append((data, address))
            self.done[token] = QResult(Opcode.PUSH, qd)
        return token

    def _progress(self) -> None:
        for token, (operation, qd) in list(self.waiting.items()):
            if operation == "accept":
                if self.fail_accepts:
                    self.fail_accepts -= 1
                    self.done[token] = QResult(Opcode.FAILED, qd, error="aborted")
                elif self.backlog:
                    new_qd = self.backlog.popleft()
                    self.done[token] = QResult(Opcode.ACCEPT, qd, new_qd=new_qd)
                else:
                    continue
            elif qd in self.udp_in:
                if not self.udp_in[qd]:
                    continue
                data, address = self.udp_in[qd].popleft()
                self.done[token] = QResult(Opcode.POP, qd, data, address)
            else:
                peer = self.peers[qd]
                if peer.reset:
                    self.done[token] = QResult(Opcode.FAILED, qd, error="connection reset")
                elif peer.inbound:
                    self.done[token] = QResult(Opcode.POP, qd, peer.inbound.popleft())
                elif peer.eof_sent:
                    self.done[token] = QResult(Opcode.POP, qd, b"")
                else:
                    continue
            del self.waiting[token]

    def wait_any(self, tokens: list[int], timeout: float | None = None) -> tuple[int, QResult] | None:
        self._progress()
        for index, token in enumerate(tokens):
            result = self.done.pop(token, None)
            if result is not None:
                return index, result
        for token in tokens:
            if token not in self.waiting and token not in self.pushes:
                raise LibOSError(f"unknown token {token}")
        return None

    def wait_many(self, tokens: Collection[int], timeout: float | None = None) -> list[tuple[int, QResult]]:
        self._progress()
        found = [(token, self.done.pop(token)) for token in list(self.done) if token in tokens]
        if not found:
            for token in tokens:
                if token not in self.waiting and token not in self.pushes:
                    raise LibOSError(f"unknown token {token}")
        return found

    def take_done(self, token: int) -> QResult | None:
        result = self.done.pop(token, None)
        if result is None and token not in self.waiting and token not in self.pushes:
            raise LibOSError(f"unknown token {token}")
        return result

    def wait(self, token: int, timeout: float | None = None) -> QResult | None:
        found = self.wait_any([token], timeout)
        return None if found is None else found[1]

    def close(self, qd: int) -> None:
        self._check(qd)
        del self.kinds[qd]
        self.listening.discard(qd)
        self.bound.pop(qd, None)
        if qd in self.peers:
            self.peers[qd].closed_by_server = True
        for token, (_, owner) in list(self.waiting.items()):
            if owner == qd:
                del self.waiting[token]
                self.done[token] = QResult(Opcode.FAILED, qd, error="queue closed")
        for token, (owner, _) in list(self.pushes.items()):
            if owner == qd:
                del self.pushes[token]
                self.done[token] = QResult(Opcode.FAILED, qd, error="queue closed")

    def shutdown(self) -> None:
        for qd in list(self.kinds):
            self.close(qd)

    def stats(self) -> dict[str, object]:
        return {"backend": self.backend}

    # The client side, for tests.

    def connect_client(self) -> FakePeer:
        qd = self.socket(SocketKind.TCP)
        peer = FakePeer(qd)
        self.peers[qd] = peer
        self.backlog.append(qd)
        return peer

    def send(self, peer: FakePeer, data: bytes) -> None:
        peer.inbound.append(data)

    def unstall(self, peer: FakePeer) -> None:
        peer.stalled = False
        for token, (qd, data) in list(self.pushes.items()):
            if qd == peer.qd:
                del self.pushes[token]
                peer.received += data
                self.done[token] = QResult(Opcode.PUSH, qd)

    def send_udp(self, qd: int, data: bytes, address: Address) -> None:
        self.udp_in[qd].append((data, address))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sanitized_vfast_env() -> dict[str, str]:
    """Build the VNIC fast path's ASan/UBSan module (the set-up builds only the plain one) and
    return an environment that loads it: ARRAKIS_VDEV_FAST=asan, libasan preloaded, any
    report fatal."""
    repo = Path(__file__).resolve().parent.parent
    built = subprocess.run([sys.executable, "-m", "vdev.fast.build", "--sanitize"], cwd=repo, capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.exists(libasan), "gcc's libasan.so is missing"
    env = dict(os.environ, ARRAKIS_VDEV_FAST="asan", LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env.pop("ARRAKIS_PURE", None)
    return env


def module_loaded(env: dict[str, str], expression: str, import_line: str) -> str:
    """What ``print(EXPRESSION)`` shows after ``IMPORT_LINE`` in a child with ``env``: which
    compiled module the code would really use there."""
    repo = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-c", f"{import_line}; print({expression})"],
                          cwd=repo, env=env, capture_output=True, text=True).stdout


def scattered_extents(draw: Any, max_extent: int, max_gap: int) -> list[tuple[int, int]]:
    """For hypothesis: 1..6 disjoint (start, blocks) extents of a store, with gaps of up to
    ``max_gap`` blocks between them, in any order (a VSA's order need not be the store's)."""
    from hypothesis import strategies as st

    sizes = draw(st.lists(st.integers(1, max_extent), min_size=1, max_size=6))
    gaps = draw(st.lists(st.integers(0, max_gap), min_size=len(sizes), max_size=len(sizes)))
    extents, position = [], 0
    for size, gap in zip(sizes, gaps):
        position += gap
        extents.append((position, size))
        position += size
    return list(draw(st.permutations(extents)))


def run_sanitized_pytest(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``pytest -q ARGS`` in a child with ``env`` (a sanitizer build preloaded); fails the
    calling test with the child's output unless it passed.

    ``--noconftest``: the suite's session hooks run system tools, which must not inherit the
    libasan preload (they hang under it); the modules run this way need no fixture from
    there. ``-o addopts=``: no durations table in the output that is searched.
    """
    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", *args, "-o", "addopts="],
        cwd=repo, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result
