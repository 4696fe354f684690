"""The VNIC device host: one process per virtual NIC, like a QEMU device model.

Started by kernelctl (``python -m vdev.vnic.host ...``) with the management socket as an
inherited fd. It attaches to the tap inside the client namespace, then runs one loop:

* **busy**: while frames or descriptors keep coming, it polls the wire, every TX ring and
  its sockets without sleeping, so a busy application never needs a doorbell (a system call);
* **asleep**: after ``spin`` seconds without work it tells every ring it is asleep, looks at
  the rings once more, and blocks in epoll until a frame, a doorbell (a trapped REGION_WRITE
  on a vfio-user socket), a management message or a timer arrives.

An idle device host therefore uses no CPU, and a busy one costs applications nothing.
A misbehaving application can only hurt its own function: errors in one vfio-user session
close that session and remove that function.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import errno
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

from vdev import mgmt
from vdev.vfio_user.server import VfioUserServerConnection
from vdev.vnic.backend import TapBackend, WireBackend
from vdev.vnic.device import VnicDevice
from vdev.vnic.faults import FaultSpec, FaultSpecError, FaultyBackend
from vdev.vnic.filters import FilterConflict, Match
from vdev.vnic.function import FunctionConfig, VnicFunction

# Seconds of polling after the last work before sleeping. While the device polls, an
# application posts work with plain stores; once it sleeps, each post costs the application a
# doorbell (a system call). So the window must outlast the gaps in a steady stream of requests,
# scheduling hiccups on a loaded 2-core machine included.
DEFAULT_SPIN = 0.01
MAX_SLEEP = 0.05  # a lost wakeup (see vdev.ring) costs at most this much latency
MAX_FUNCTIONS = 64

_PROTOCOLS = {"udp": 17, "tcp": 6, "icmp": 1}


def _ip_bytes(text: str) -> bytes:
    return socket.inet_aton(text)


class DeviceHost:
    def __init__(self, device: VnicDevice, mgmt_sock: socket.socket, spin: float = DEFAULT_SPIN) -> None:
        self.device = device
        self.mgmt = mgmt_sock
        self.spin = spin
        self.epoll = select.epoll()
        self.running = True
        self._wire_fds: dict[int, int] = {}
        self._conns: dict[int, tuple[VfioUserServerConnection, int]] = {}
        self._busy_until = 0.0
        for queue, fd in enumerate(device.backend.fds()):
            self._wire_fds[fd] = queue
            self.epoll.register(fd, select.EPOLLIN)
        self.mgmt.setblocking(False)
        self.epoll.register(self.mgmt.fileno(), select.EPOLLIN)

    # ---- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        device = self.device
        poll = self.epoll.poll
        monotonic = time.monotonic
        while self.running:
            now = monotonic()
            busy = now < self._busy_until
            if busy:
                timeout = 0.0
            else:
                timeout = MAX_SLEEP
                if device.tx_deadline is not None:
                    timeout = max(0.0, min(timeout, device.tx_deadline - now))
                device.set_asleep(True)
                device.sync_rings()
                if device.has_tx_work():
                    timeout = 0.0  # posted while we were deciding: no sleep after all
            events = poll(timeout)
            now = monotonic()
            if not busy:
                device.set_asleep(False)
                device.sync_rings()
            work = 0
            for fd, mask in events:
                queue = self._wire_fds.get(fd)
                if queue is not None:
                    work += device.receive_from_wire(queue, now)
                elif fd == self.mgmt.fileno():
                    self._on_mgmt()
                else:
                    work += self._on_vfio(fd, mask)
            work += device.poll_transmit(now)
            device.raise_irqs()
            if work:
                self._busy_until = now + self.spin

    def wake(self, function: VnicFunction) -> None:
        # A doorbell: the driver posted work while we slept. Stay awake to poll its rings.
        self._busy_until = time.monotonic() + self.spin

    # ---- vfio-user sessions ------------------------------------------------------------

    def _on_vfio(self, fd: int, mask: int) -> int:
        entry = self._conns.get(fd)
        if entry is None:
            return 0
        conn, function_id = entry
        try:
            alive = True
            if mask & select.EPOLLOUT:
                alive = conn.on_writable()
            if alive and mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                alive = conn.on_readable()
        except Exception:  # a bug must not take the device host down: drop this session
            traceback.print_exc(file=sys.stderr)
            alive = False
        if not alive:
            self._drop_session(fd, function_id)
        else:
            # Replies that did not fit in the socket wait for EPOLLOUT.
            self.epoll.modify(fd, conn.epoll_events())
        return 1

    def _drop_session(self, fd: int, function_id: int) -> None:
        entry = self._conns.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        if entry is not None:
            entry[0].close()
        self.device.remove_function(function_id)
        self._send_event({"event": "function_closed", "function_id": function_id})

    # ---- management --------------------------------------------------------------------

    def _on_mgmt(self) -> None:
        while True:
            try:
                received = mgmt.recv_message(self.mgmt)
            except BlockingIOError:
                return
            except mgmt.MgmtError as exc:
                self._reply(None, error=str(exc))
                continue
            if received is None:
                # The control plane went away: a device host without one must not linger.
                self.running = False
                return
            message, fds = received
            request_id = message.get("id")
            try:
                result = self._handle(message, fds)
            except (ValueError, KeyError, TypeError, FilterConflict, OSError) as exc:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                self._reply(request_id, error=f"{type(exc).__name__}: {exc}")
            else:
                self._reply(request_id, result=result)

    def _handle(self, message: dict[str, Any], fds: list[int]) -> object:
        op = message.get("op")
        if op == "create_function":
            return self._create_function(message, fds)
        if fds:
            raise ValueError(f"{op} takes no file descriptors")
        if op == "destroy_function":
            function_id = int(message["function_id"])
            for fd, (_conn, fid) in list(self._conns.items()):
                if fid == function_id:
                    self._drop_session(fd, fid)
            self.device.remove_function(function_id)
            return None
        if op == "stats":
            return self.device.snapshot()
        if op == "add_filter":
            function_id = int(message["function_id"])
            function = self.device.functions[function_id]
            match = self._match(message, function.config.ipv4)
            self.device.filters.add_rx(function_id, 0, match)
            self.device.filters.add_tx(function_id, replace(match, ip=function.config.ipv4))
            return None
        if op == "set_rate":
            function = self.device.functions[int(message["function_id"])]
            rx, tx = int(message.get("rx_bps", 0)), int(message.get("tx_bps", 0))
            if rx < 0 or tx < 0:
                raise ValueError("rates are not negative")
            function.set_rates(rx, tx, time.monotonic())
            return None
        if op == "shutdown":
            self.running = False
            return None
        raise ValueError(f"unknown op {op!r}")

    def _create_function(self, message: dict[str, Any], fds: list[int]) -> object:
        if len(fds) != 1:
            raise ValueError("create_function takes exactly one fd (the vfio-user socket)")
        if len(self.device.functions) >= MAX_FUNCTIONS:
            raise ValueError("too many functions")
        function_id = int(message["function_id"])
        ipv4 = _ip_bytes(str(message["ip"]))
        matches = [self._match(spec, ipv4) for spec in message.get("rx_filters", [])]
        config = FunctionConfig(
            function_id=function_id,
            mac=self.device.mac,
            ipv4=ipv4,
            num_queues=int(message.get("queues", 1)),
            rx_rate_bps=int(message.get("rx_bps", 0)),
            tx_rate_bps=int(message.get("tx_bps", 0)),
            owner_pid=int(message.get("owner_pid", 0)),
            owner_uid=int(message.get("owner_uid", 0)),
            name=str(message.get("name", "")),
        )
        function = self.device.add_function(config, matches, time.monotonic())
        function.doorbell_listener = self.wake
        sock = socket.socket(fileno=fds[0])
        try:
            if sock.family != socket.AF_UNIX:
                raise ValueError("the vfio-user socket must be AF_UNIX")
            conn = VfioUserServerConnection(sock, function)
        except Exception:
            sock.close()
            self.device.remove_function(function_id)
            raise
        self._conns[conn.fileno()] = (conn, function_id)
        self.epoll.register(conn.fileno(), select.EPOLLIN)
        return {"function_id": function_id}

    @staticmethod
    def _match(spec: dict[str, Any], ipv4: bytes) -> Match:
        proto = _PROTOCOLS[str(spec["proto"])]
        port = int(spec["port"])
        if not 0 < port < 65536:
            raise ValueError(f"bad port {port}")
        return Match(ethertype=0x0800, ip_proto=proto, ip=ipv4, port=port)

    def _reply(self, request_id: object, *, result: object = None, error: str | None = None) -> None:
        message: dict[str, Any] = {"id": request_id, "ok": error is None}
        if error is None:
            message["result"] = result
        else:
            message["error"] = error
        self._send(message)

    def _send_event(self, message: dict[str, Any]) -> None:
        self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.mgmt.setblocking(True)
            mgmt.send_message(self.mgmt, message)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                raise
            self.running = False
        finally:
            self.mgmt.setblocking(False)

    def close(self) -> None:
        for fd, (conn, _fid) in list(self._conns.items()):
            conn.close()
        self._conns.clear()
        self.device.close()
        self.epoll.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="VNIC device host (started by kernelctl)")
    parser.add_argument("--tap", required=True)
    parser.add_argument("--netns", default="", help="network namespace the tap lives in")
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--mac", required=True)
    parser.add_argument("--address", action="append", default=[], help="addresses of the NIC")
    parser.add_argument("--mgmt-fd", type=int, required=True)
    parser.add_argument("--spin", type=float, default=DEFAULT_SPIN)
    parser.add_argument("--faults", default="", help="tests only: e.g. loss=0.05,dup=0.05,reorder=0.05,seed=1")
    args = parser.parse_args(argv)
    try:
        faults = FaultSpec.parse(args.faults)
    except FaultSpecError as exc:
        parser.error(str(exc))

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.netns:
        from pyroute2 import netns

        netns.setns(args.netns)
    backend: WireBackend = TapBackend(args.tap, args.queues)
    if faults.active:
        print(f"vnic host: injecting faults {faults}", file=sys.stderr, flush=True)
        backend = FaultyBackend(backend, faults)
    mac = bytes.fromhex(args.mac.replace(":", ""))
    device = VnicDevice(backend, mac, [_ip_bytes(a) for a in args.address])
    host = DeviceHost(device, socket.socket(fileno=args.mgmt_fd), spin=args.spin)
    profile_dir = os.environ.get("ARRAKIS_PROFILE_DIR")
    profiler = None
    if profile_dir:
        # tools/bench --profile: where the device host's time goes, for the report.
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        host.run()
    finally:
        host.close()
        if profiler is not None and profile_dir:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"vnic-host-{os.getpid()}.prof"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
