"""The ``vnic`` backend: the bypass path.

The application asks the control plane once for a VNIC function with filters for its ports
(access is checked there, at set-up), then drives the function's rings itself: received
frames go through the libOS network stack in this process, replies go straight onto the TX
ring. While traffic flows the runtime polls the ring (no system calls at all); after
``poll_window`` seconds without work it asks for an interrupt and sleeps on the queue's
eventfd, so an idle application uses no CPU.

TCP queues (``libos.api.vnic_tcp``) run the libOS's own TCP over the same stack. A port
is claimed from the control plane as ``tcp/<port>`` when a queue binds it, and a client
``connect`` claims an ephemeral port the same way (RFC 6056's range). The control plane
has no call to give one filter back while the function lives, so claimed ephemeral ports
are kept and reused for later connections (a 4-tuple in TIME-WAIT is skipped); a function
holds at most 64 claims.
"""

from __future__ import annotations

import random
import os
import socket
import time
from collections import deque
from pathlib import Path

from kernelctl.client import ControlClient
from libos.api.queues import PollingRuntime, QueueTable
from libos.api.types import Address, LibOSError, Opcode, SocketKind
from libos.api.vnic_tcp import VnicStreams
from libos.driver.vnic import VnicDriver
from libos.net.events import UdpDatagram
from libos.net.stack import NetStack
from libos.net.tcp import EPHEMERAL_PORTS, TcpConfig
from vdev import layout
from vdev.wire.ipv4 import PROTO_TCP

YIELD_AFTER = 0.005  # seconds of idle polling between two sched_yield calls
# The same for a worker of several (``become_worker``): the workers of one app are more
# pollers than the machine may have free cores for, and a worker that holds a core shared
# with the client or the device host for 5 ms at a time starves them. Measured with
# memcaslap on 2 cores (tools/scaling.py), 2 workers: 5,572 ops/s at 5 ms, 13,333 at
# 100 us; one worker: 16,637 and 15,947 (noise). A single app keeps 5 ms so that a steady
# request stream at a few thousand per second costs it no system call.
WORKER_YIELD_AFTER = 0.0001
DEFAULT_POLL_WINDOW = 0.02  # seconds of polling after the last work before sleeping
MAX_SLEEP = 0.05  # bounded so a lost wakeup costs latency, never progress
# Frames that found the TX ring full wait for the next turn of the loop, up to this many;
# beyond, the oldest are dropped (TCP retransmits them) so a stuck device costs no memory.
MAX_TX_BACKLOG = 4096
TX_BACKLOG_SLEEP = 0.0005  # the device drains the ring within this, while it is busy
CLAIM_ATTEMPTS = 16
MAX_WORKER_QUEUES = 16  # queue pairs (worker processes) one application may ask for
# RFC 6298 2.4 asks for at least one second; Linux (TCP_RTO_MIN) and most stacks use
# 200 ms, and a one-second floor would make every lost tail segment cost a second here
# where the Linux baseline pays 200 ms. Everything else keeps the RFC defaults.
TCP_CONFIG = TcpConfig(min_rto=0.2)
# A worker re-learns a peer's MAC from its frames at most this often (see _learn_neighbours).
GLEAN_REFRESH = 1.0


class VnicLibOS(PollingRuntime):
    backend = "vnic"

    def __init__(
        self,
        control_socket: str | Path,
        name: str = "",
        rx_bps: int = 0,
        tx_bps: int = 0,
        poll_window: float = DEFAULT_POLL_WINDOW,
        prefix_len: int = 24,
        queues: int = 1,
    ) -> None:
        if not 1 <= queues <= MAX_WORKER_QUEUES:
            raise LibOSError(f"a function has 1..{MAX_WORKER_QUEUES} queues")
        self.queues = queues
        self.drivers: list[VnicDriver] = []  # one per queue pair; ``driver`` is this process's
        self._glean = False
        self._rss_key = b""
        self._gleaned: dict[bytes, float] = {}
        self.table = QueueTable()
        self._control_path = control_socket
        self._name = name
        self._rx_bps = rx_bps
        self._tx_bps = tx_bps
        self._prefix_len = prefix_len
        self.poll_window = poll_window
        self._control: ControlClient | None = None
        self.driver: VnicDriver | None = None
        self.stack: NetStack | None = None
        self.function_id = -1
        self._ports: dict[int, int] = {}  # qd -> bound local port
        self._qd_by_port: dict[int, int] = {}
        self._last_work = time.monotonic()
        self._last_yield = 0.0
        self.yield_after = YIELD_AFTER
        self.streams: VnicStreams | None = None
        self._tcp_claims: set[int] = set()  # TCP ports this function holds
        self._ephemeral: list[int] = []  # claimed for connect(), reusable
        self._rng = random.Random()
        self.tx_dropped = 0

    # ---- set-up ----------------------------------------------------------------------

    def socket(self, kind: SocketKind) -> int:
        if kind is SocketKind.TCP:
            streams = self.streams
            if streams is None:
                streams = self.streams = VnicStreams(self.table, TCP_CONFIG)
                if self.stack is not None and self.driver is not None:
                    streams.attach(self.stack, self.driver)
            return streams.socket()
        if kind is not SocketKind.UDP:
            raise LibOSError(f"unknown socket kind {kind!r}")
        return self.table.new_queue(kind)

    def bind(self, qd: int, address: Address) -> None:
        self.table.check(qd)
        if self.streams is not None and qd in self.streams:
            self._bind_tcp(qd, address)
            return
        if qd in self._ports:
            raise LibOSError(f"queue {qd} is already bound")
        _host, port = address
        if not 0 < port < 65536:
            raise LibOSError(f"bad port {port}")
        if port in self._qd_by_port:
            raise LibOSError(f"port {port} is already bound in this application")
        if self.driver is None:
            self._open_function("udp", port)
        else:
            control = self._control
            if control is None:
                raise LibOSError("no control connection")
            try:
                control.add_filter(self.function_id, "udp", port)
            except Exception as exc:
                raise LibOSError(str(exc)) from None
        stack = self.stack
        if stack is None:
            raise LibOSError("network stack not started")
        stack.udp_bind(port)
        self._ports[qd] = port
        self._qd_by_port[port] = qd

    def _bind_tcp(self, qd: int, address: Address) -> None:
        streams = self.streams
        if streams is None:
            raise LibOSError("no TCP queues")
        _host, port = _check_address(address, allow_any_port=False)
        if streams.bound_port(qd):
            raise LibOSError(f"queue {qd} is already bound")
        if port in self._tcp_bound_ports():
            raise LibOSError(f"TCP port {port} is already bound in this application")
        self._claim_tcp(port)
        if port in self._ephemeral:
            self._ephemeral.remove(port)
        streams.bind(qd, port)

    def _tcp_bound_ports(self) -> set[int]:
        streams = self.streams
        if streams is None:
            return set()
        return {streams.bound_port(qd) for qd in streams.queues()} - {0}

    def _claim_tcp(self, port: int) -> None:
        """Make the device steer tcp/``port`` to us (once; claims are kept)."""
        if port in self._tcp_claims:
            return
        if self.driver is None:
            self._open_function("tcp", port)
        else:
            control = self._control
            if control is None:
                raise LibOSError("no control connection")
            try:
                control.add_filter(self.function_id, "tcp", port)
            except Exception as exc:
                raise LibOSError(str(exc)) from None
        self._tcp_claims.add(port)

    def _open_function(self, proto: str, port: int) -> None:
        try:
            control = ControlClient(self._control_path)
            sock, info = control.open_vnic([(proto, port)], self._rx_bps, self._tx_bps, self._name, self.queues)
        except Exception as exc:
            raise LibOSError(str(exc)) from None
        self._control = control
        try:
            self.driver = VnicDriver(sock)
            self.drivers = [self.driver]
            for queue in range(1, self.queues):
                self.drivers.append(VnicDriver(sock, queue=queue, client=self.driver.client))
            if self.queues > 1:
                # A fresh secret key per function: a client cannot aim its flows at one queue.
                self._rss_key = os.urandom(layout.RSS_KEY_SIZE)
                self.driver.set_rss(self._rss_key, rss_table(range(self.queues)))
        except Exception:
            for driver in self.drivers[1:]:
                driver.close()
            self.drivers = []
            if self.driver is not None:
                self.driver.close()
                self.driver = None
            sock.close()
            control.close()
            raise
        self.function_id = int(info.get("function_id", -1))
        self.stack = NetStack(self.driver.mac, self.driver.ipv4, self._prefix_len)
        if self.streams is not None:
            self.streams.attach(self.stack, self.driver)

    # ---- worker processes (libos.api.workers) ------------------------------------------

    def become_worker(self, queue: int) -> None:
        """In a forked worker: from now on this process polls queue pair ``queue`` only.

        Everything opened before the fork (the function, its bound ports and listening
        queues) is shared; the network stack and the TCP connections are this process's.
        ARP reaches only queue 0, so every worker learns its peers from their frames.
        """
        if not 0 <= queue < len(self.drivers):
            raise LibOSError(f"no queue {queue}: the function has {len(self.drivers)}")
        driver = self.driver = self.drivers[queue]
        self._glean = True
        if len(self.drivers) > 1:
            self.yield_after = WORKER_YIELD_AFTER
        if self.streams is not None and self.stack is not None:
            self.streams.attach(self.stack, driver)

    def queue_down(self, queue: int, live: list[int]) -> None:
        """In the parent, after the worker of ``queue`` died: steer flows to the ``live``
        queues only and stop the dead queue's rings, so the device drops nothing for it."""
        if self.driver is None or not 0 <= queue < len(self.drivers):
            return
        driver = self.drivers[queue]
        driver.rx.disable()
        driver.tx.disable()
        if live:
            self.driver.set_rss(self._rss_key, rss_table(live))

    def _learn_neighbours(self, frames: list[bytes], now: float) -> None:
        stack = self.stack
        if stack is None:
            return
        gleaned = self._gleaned
        for frame in frames:
            if len(frame) < 34 or frame[12:14] != b"\x08\x00":
                continue
            src_ip = frame[26:30]
            if gleaned.get(src_ip, 0.0) > now:
                continue
            gleaned[src_ip] = now + GLEAN_REFRESH
            stack.learn_neighbour(src_ip, frame[6:12], now)

    # ---- stream queues -----------------------------------------------------------------

    def _streams_of(self, qd: int) -> VnicStreams:
        streams = self.streams
        if streams is None or qd not in streams:
            self.table.check(qd)
            raise LibOSError(f"queue {qd} is not a TCP queue")
        return streams

    def listen(self, qd: int, backlog: int) -> None:
        self._streams_of(qd).listen(qd, backlog)

    def accept(self, qd: int) -> int:
        return self._streams_of(qd).accept(qd)

    def connect(self, qd: int, address: Address) -> int:
        streams = self._streams_of(qd)
        host, remote_port = _check_address(address, allow_any_port=False)
        try:
            remote_ip = socket.inet_aton(host)
        except OSError:
            raise LibOSError(f"bad address {host!r}") from None
        now = time.monotonic()
        bound = streams.bound_port(qd)
        if bound:
            token = self._connect_from(streams, qd, bound, remote_ip, remote_port, now)
            if token is None:
                raise LibOSError(f"port {bound} is already connected to {host}:{remote_port}")
        else:
            token = self._connect_ephemeral(streams, qd, remote_ip, remote_port, now)
        self._tcp_output(now)
        return token

    def _connect_from(
        self, streams: VnicStreams, qd: int, port: int, remote_ip: bytes, remote_port: int, now: float
    ) -> int | None:
        stack = self.stack
        if stack is None:
            raise LibOSError("network stack not started")
        try:
            return streams.connect(qd, stack.ip, port, remote_ip, remote_port, now)
        except OSError:
            return None  # that 4-tuple is in use (perhaps in TIME-WAIT)

    def _connect_ephemeral(
        self, streams: VnicStreams, qd: int, remote_ip: bytes, remote_port: int, now: float
    ) -> int:
        busy = self._tcp_bound_ports()
        for port in self._ephemeral:
            if port not in busy:
                token = self._connect_from(streams, qd, port, remote_ip, remote_port, now)
                if token is not None:
                    return token
        # RFC 6056 3.3.1: a random port from the ephemeral range; a port another
        # application holds is refused by the control plane, so try a few.
        error = "no ephemeral port"
        for _ in range(CLAIM_ATTEMPTS):
            port = self._rng.choice(EPHEMERAL_PORTS)
            if port in self._tcp_claims:
                continue
            try:
                self._claim_tcp(port)
            except LibOSError as exc:
                error = str(exc)
                continue
            self._ephemeral.append(port)
            token = self._connect_from(streams, qd, port, remote_ip, remote_port, now)
            if token is not None:
                return token
        raise LibOSError(f"cannot claim an ephemeral TCP port: {error}")

    def push(self, qd: int, data: bytes) -> int:
        token = self._streams_of(qd).push(qd, data)
        self._tcp_output(time.monotonic())
        return token

    def _tcp_output(self, now: float) -> None:
        """Send at once what the application just queued (no wait for the next poll)."""
        streams = self.streams
        stack = self.stack
        if streams is None or stack is None:
            return
        streams.touched()  # the next poll runs in full: timers, events, writers
        # Only the connections the application wrote to (the layer's dirty set), not a
        # whole poll: a server pushes once per request, and the poll's timer and event
        # passes would run once per request too.
        streams.tcp.flush(now)
        self._send_segments(now)
        self._flush()

    def _send_segments(self, now: float) -> None:
        streams = self.streams
        stack = self.stack
        if streams is None or stack is None:
            return
        send_ip = stack.send_ip
        for dst_ip, _src_ip, segment in streams.tcp.drain_outbox():
            send_ip(dst_ip, PROTO_TCP, segment, now)

    # ---- data path -------------------------------------------------------------------

    def pop(self, qd: int) -> int:
        token = self.table.pop(qd)
        streams = self.streams
        if streams is not None and qd in streams:
            streams.pop_service(qd)
        return token

    def pushto(self, qd: int, data: bytes, address: Address) -> int:
        port = self._ports.get(qd)
        stack = self.stack
        if port is None or stack is None:
            self.table.check(qd)
            raise LibOSError(f"queue {qd} is not bound")
        try:
            dst_ip = socket.inet_aton(address[0])
        except OSError:
            raise LibOSError(f"bad address {address[0]!r}") from None
        stack.send_udp(port, dst_ip, address[1], data, time.monotonic())
        self._flush()
        self.table.counters.pushed += 1
        return self.table.completed(Opcode.PUSH, qd)

    def _flush(self) -> None:
        stack = self.stack
        driver = self.driver
        if stack is None or driver is None or not stack.outbox:
            return
        frames = list(stack.outbox)
        stack.outbox.clear()
        taken = driver.transmit(frames)
        if taken < len(frames):
            # The TX ring is full: keep the rest, in order, for the next turn.
            rest = frames[taken:]
            if len(rest) > MAX_TX_BACKLOG:
                self.tx_dropped += len(rest) - MAX_TX_BACKLOG
                rest = rest[-MAX_TX_BACKLOG:]
            stack.outbox.extend(rest)

    def _progress(self, now: float) -> int:
        driver = self.driver
        stack = self.stack
        if driver is None or stack is None:
            return 0
        frames = driver.receive()
        work = len(frames)
        if frames:
            if self._glean:
                self._learn_neighbours(frames, now)
            stack.receive_burst(frames, driver.rx_kinds, now)
            self._deliver_events()
        streams = self.streams
        if streams is not None:
            work += streams.poll(now)
            self._send_segments(now)
        deadline = stack.next_deadline()
        if deadline is not None and deadline <= now:
            stack.on_timer(now)
            self._deliver_events()
        self._flush()
        if work:
            self._last_work = now
        return work

    def _deliver_events(self) -> None:
        stack = self.stack
        if stack is None:
            return
        events = stack.events
        deliver = self.table.deliver
        qd_by_port = self._qd_by_port
        while events:
            event = events.popleft()
            if type(event) is not UdpDatagram:
                continue  # ICMP errors and ARP failures: a UDP server carries on
            qd = qd_by_port.get(event.local_port)
            if qd is not None:
                deliver(qd, bytes(event.payload), (socket.inet_ntoa(event.src_ip), event.src_port))

    def _sleep(self, timeout: float) -> None:
        driver = self.driver
        now = time.monotonic()
        if driver is None:
            time.sleep(min(timeout, MAX_SLEEP))
            return
        idle = now - self._last_work
        if idle < self.poll_window:
            # Keep polling: work is likely to come back soon. But a poller that never lets
            # go of its CPU starves whatever shares it (on a small machine, the client or the
            # device host), for a whole scheduler slice. So once idle for ``yield_after``, give
            # the CPU away at most once per ``yield_after``: a system call only while there is
            # nothing to do, never on the way of a request that is being served.
            yield_after = self.yield_after
            if idle >= yield_after and now - self._last_yield >= yield_after:
                self._last_yield = now
                os.sched_yield()
            return
        limit = min(timeout, MAX_SLEEP)
        stack = self.stack
        if stack is not None:
            deadline = stack.next_deadline()
            if deadline is not None:
                limit = max(0.0, min(limit, deadline - now))
            if stack.outbox:
                limit = min(limit, TX_BACKLOG_SLEEP)
        streams = self.streams
        if streams is not None and streams.deadline is not None:
            limit = max(0.0, min(limit, streams.deadline - now))
        driver.check_errors()
        driver.wait(limit)

    def close(self, qd: int) -> None:
        streams = self.streams
        if streams is not None and qd in streams:
            now = time.monotonic()
            streams.close(qd, now)
            self._tcp_output(now)
            return
        self.table.drop_queue(qd)
        port = self._ports.pop(qd, None)
        if port is not None:
            del self._qd_by_port[port]
            if self.stack is not None:
                self.stack.udp_unbind(port)

    def shutdown(self) -> None:
        for qd in list(self.table.kinds):
            self.close(qd)
        if self._glean:
            # A worker shares the vfio-user session with its siblings: a request there
            # could take a sibling's reply. The parent tears the function down after all.
            self.driver = None
            self.drivers = []
        for driver in reversed(self.drivers):  # the session's owner, queue 0, last
            driver.close()
        self.drivers = []
        if self.driver is not None:
            self.driver.close()
            self.driver = None
        if self._control is not None:
            self._control.close()
            self._control = None

    def stats(self) -> dict[str, object]:
        result: dict[str, object] = {"backend": self.backend, "queues": self.table.counters.as_dict()}
        if self.driver is not None:
            result["driver"] = self.driver.counters.as_dict()
            result["queue"] = self.driver.queue
        if self.streams is not None:
            result["tcp"] = self.streams.stats()
        if self.tx_dropped:
            result["tx_backlog_dropped"] = self.tx_dropped
        return result


def rss_table(queues: range | list[int]) -> list[int]:
    """An indirection table of the largest size that spreads over ``queues`` round robin."""
    chosen = list(queues)
    return [chosen[index % len(chosen)] for index in range(layout.RSS_TABLE_MAX)]


def _check_address(address: object, *, allow_any_port: bool) -> tuple[str, int]:
    """An application's ``(host, port)``; LibOSError for anything else."""
    if not isinstance(address, tuple) or len(address) != 2:
        raise LibOSError(f"an address is (host, port), got {address!r}")
    host, port = address
    if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
        raise LibOSError(f"an address is (host, port), got {address!r}")
    if not (0 if allow_any_port else 1) <= port <= 0xFFFF:
        raise LibOSError(f"bad port {port}")
    return host, port
