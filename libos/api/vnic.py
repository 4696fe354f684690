"""The ``vnic`` backend: the bypass path.

The application asks the control plane once for a VNIC function with filters for its ports
(access is checked there, at set-up), then drives the function's rings itself: received
frames go through the libOS network stack in this process, replies go straight onto the TX
ring. While traffic flows the runtime polls the ring (no system calls at all); after
``poll_window`` seconds without work it asks for an interrupt and sleeps on the queue's
eventfd, so an idle application uses no CPU.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from kernelctl.client import ControlClient
from libos.api.queues import PollingRuntime, QueueTable
from libos.api.types import Address, LibOSError, Opcode, SocketKind
from libos.driver.vnic import VnicDriver
from libos.net.events import UdpDatagram
from libos.net.stack import NetStack

DEFAULT_POLL_WINDOW = 0.02  # seconds of polling after the last work before sleeping
MAX_SLEEP = 0.05  # bounded so a lost wakeup costs latency, never progress


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
    ) -> None:
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

    # ---- set-up ----------------------------------------------------------------------

    def socket(self, kind: SocketKind) -> int:
        if kind is not SocketKind.UDP:
            raise LibOSError("the vnic backend offers UDP queues so far")
        return self.table.new_queue(kind)

    def bind(self, qd: int, address: Address) -> None:
        self.table.check(qd)
        if qd in self._ports:
            raise LibOSError(f"queue {qd} is already bound")
        _host, port = address
        if not 0 < port < 65536:
            raise LibOSError(f"bad port {port}")
        if port in self._qd_by_port:
            raise LibOSError(f"port {port} is already bound in this application")
        if self.driver is None:
            self._open_function(port)
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

    def _open_function(self, port: int) -> None:
        try:
            control = ControlClient(self._control_path)
            sock, info = control.open_vnic([("udp", port)], self._rx_bps, self._tx_bps, self._name)
        except Exception as exc:
            raise LibOSError(str(exc)) from None
        self._control = control
        try:
            self.driver = VnicDriver(sock)
        except Exception:
            sock.close()
            control.close()
            raise
        self.function_id = int(info.get("function_id", -1))
        self.stack = NetStack(self.driver.mac, self.driver.ipv4, self._prefix_len)

    # ---- data path -------------------------------------------------------------------

    def pop(self, qd: int) -> int:
        return self.table.pop(qd)

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
        driver.transmit(frames)

    def _progress(self, now: float) -> int:
        driver = self.driver
        stack = self.stack
        if driver is None or stack is None:
            return 0
        frames = driver.receive()
        work = len(frames)
        if frames:
            receive = stack.receive
            for frame in frames:
                receive(frame, now)
            self._deliver_events()
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
        if now - self._last_work < self.poll_window:
            return  # keep polling: work is likely to come back soon
        limit = min(timeout, MAX_SLEEP)
        stack = self.stack
        if stack is not None:
            deadline = stack.next_deadline()
            if deadline is not None:
                limit = max(0.0, min(limit, deadline - now))
        driver.check_errors()
        driver.wait(limit)

    def close(self, qd: int) -> None:
        self.table.drop_queue(qd)
        port = self._ports.pop(qd, None)
        if port is not None:
            del self._qd_by_port[port]
            if self.stack is not None:
                self.stack.udp_unbind(port)

    def shutdown(self) -> None:
        for qd in list(self.table.kinds):
            self.close(qd)
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
        return result
