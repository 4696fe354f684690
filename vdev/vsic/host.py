"""The VSIC device host: one process per virtual storage controller.

Started by kernelctl (``python -m vdev.vsic.host --image PATH --mgmt-fd N``) with the
management socket (``vdev.mgmt``) as an inherited fd. It opens the image and runs one loop,
shaped like the VNIC host's:

* **busy**: while requests keep coming it polls every request ring and its sockets without
  sleeping, so a busy application never needs a doorbell (a system call);
* **asleep**: after ``spin`` seconds without work it tells every ring it is asleep, looks at
  the rings once more, and blocks in epoll until a doorbell (a trapped REGION_WRITE on a
  vfio-user socket), a management message, or the moment a rate-limited ring may go on.

Management requests (JSON, see ``vdev.mgmt``)::

    create_function  fd: the device end of the app's vfio-user socket; function_id,
                     extents [[physical_block, count], ...], read_only, queues, iops,
                     bps, name, owner_pid, owner_uid  -> {function_id, capacity_blocks}
    destroy_function function_id
    stats            -> the device snapshot (store, functions, counters)
    set_limits       function_id, iops, bps (0: unlimited)
    shutdown
    event            {"event": "function_closed", "function_id": n} when an app goes away

A misbehaving application can only hurt its own function: a bad request gets an error
completion, a broken ring stops that ring, errors in one vfio-user session close that
session and remove that function.
"""

from __future__ import annotations

import argparse
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
from vdev.vsic.device import BackingStore, VsicDevice
from vdev.vsic.function import MAX_EXTENTS, FunctionConfig, VsicFunction

DEFAULT_SPIN = 0.002  # seconds of polling after the last work before sleeping
MAX_SLEEP = 0.05  # a lost wakeup (see vdev.ring) costs at most this much latency
MAX_FUNCTIONS = 64
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def _int_field(message: dict[str, Any], key: str, default: int | None = None, high: int = _U64) -> int:
    """A non-negative JSON integer (not a bool, a float or a string) at most ``high``."""
    value = message.get(key, default)
    if value is None:
        raise KeyError(f"missing field {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise ValueError(f"{key} must be an integer in [0, {high}], got {value!r}")
    return value


def _bool_field(message: dict[str, Any], key: str) -> bool:
    value = message.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _extents_field(message: dict[str, Any]) -> list[tuple[int, int]]:
    value = message.get("extents")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_EXTENTS:
        raise ValueError(f"extents must be a list of 1..{MAX_EXTENTS} [physical_block, count] pairs")
    extents: list[tuple[int, int]] = []
    for item in value:
        if not isinstance(item, list) or len(item) != 2:
            raise ValueError(f"an extent is [physical_block, count], got {item!r}")
        pair = {"physical_block": item[0], "count": item[1]}
        extents.append((_int_field(pair, "physical_block"), _int_field(pair, "count")))
    return extents


class DeviceHost:
    def __init__(self, device: VsicDevice, mgmt_sock: socket.socket, spin: float = DEFAULT_SPIN) -> None:
        self.device = device
        self.mgmt = mgmt_sock
        self.spin = spin
        self.epoll = select.epoll()
        self.running = True
        self._conns: dict[int, tuple[VfioUserServerConnection, int]] = {}
        self._busy_until = 0.0
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
                if device.deadline is not None:
                    timeout = max(0.0, min(timeout, device.deadline - now))
                device.set_asleep(True)
                device.sync_rings()
                if device.has_work(now):
                    timeout = 0.0  # posted while we were deciding: no sleep after all
            events = poll(timeout)
            now = monotonic()
            if not busy:
                device.set_asleep(False)
                device.sync_rings()
            work = 0
            for fd, mask in events:
                if fd == self.mgmt.fileno():
                    self._on_mgmt()
                else:
                    work += self._on_vfio(fd, mask)
            work += device.poll(now)
            device.raise_irqs()
            if work:
                self._busy_until = now + self.spin

    def wake(self, function: VsicFunction) -> None:
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
        self._send({"event": "function_closed", "function_id": function_id})

    # ---- management --------------------------------------------------------------------

    def _on_mgmt(self) -> None:
        while self.running:
            try:
                received = mgmt.recv_message(self.mgmt)
            except BlockingIOError:
                return
            except mgmt.MgmtError as exc:
                self._reply(None, error=str(exc))
                continue
            except OSError:
                self.running = False
                return
            if received is None:
                # The control plane went away: a device host without one must not linger.
                self.running = False
                return
            message, fds = received
            request_id = message.get("id")
            try:
                result = self._handle(message, fds)
            except (ValueError, KeyError, TypeError, OSError) as exc:
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
            function_id = _int_field(message, "function_id", high=_U32)
            for fd, (_conn, fid) in list(self._conns.items()):
                if fid == function_id:
                    self._drop_session(fd, fid)
            self.device.remove_function(function_id)
            return None
        if op == "stats":
            return self.device.snapshot()
        if op == "set_limits":
            function = self._function(message)
            function.set_limits(_int_field(message, "iops", 0), _int_field(message, "bps", 0), time.monotonic())
            return None
        if op == "shutdown":
            self.running = False
            return None
        raise ValueError(f"unknown op {op!r}")

    def _function(self, message: dict[str, Any]) -> VsicFunction:
        function_id = _int_field(message, "function_id", high=_U32)
        function = self.device.functions.get(function_id)
        if function is None:
            raise KeyError(f"no function {function_id}")
        return function

    def _create_function(self, message: dict[str, Any], fds: list[int]) -> object:
        if len(fds) != 1:
            raise ValueError("create_function takes exactly one fd (the vfio-user socket)")
        if len(self.device.functions) >= MAX_FUNCTIONS:
            raise ValueError("too many functions")
        name = message.get("name", "")
        if not isinstance(name, str):
            raise ValueError("name must be a string")
        config = FunctionConfig(
            function_id=_int_field(message, "function_id", high=_U32),
            extents=_extents_field(message),
            read_only=_bool_field(message, "read_only"),
            num_queues=_int_field(message, "queues", 1, high=_U32),
            iops=_int_field(message, "iops", 0),
            bps=_int_field(message, "bps", 0),
            owner_pid=_int_field(message, "owner_pid", 0, high=_U32),
            owner_uid=_int_field(message, "owner_uid", 0, high=_U32),
            name=name,
        )
        # On any refusal the fd stays unowned here (detach), and _on_mgmt closes it once.
        sock = socket.socket(fileno=fds[0])  # OSError (ENOTSOCK) for anything but a socket
        try:
            if sock.family != socket.AF_UNIX:
                raise ValueError("the vfio-user socket must be AF_UNIX")
            function = self.device.add_function(config, time.monotonic())
        except BaseException:
            sock.detach()
            raise
        function.doorbell_listener = self.wake
        try:
            conn = VfioUserServerConnection(sock, function)
        except Exception as exc:
            sock.detach()
            self.device.remove_function(config.function_id)
            raise ValueError(f"cannot serve the vfio-user socket: {exc}") from exc
        self._conns[conn.fileno()] = (conn, config.function_id)
        self.epoll.register(conn.fileno(), select.EPOLLIN)
        return {"function_id": config.function_id, "capacity_blocks": function.vsa.capacity_blocks}

    def _reply(self, request_id: object, *, result: object = None, error: str | None = None) -> None:
        message: dict[str, Any] = {"id": request_id, "ok": error is None}
        if error is None:
            message["result"] = result
        else:
            message["error"] = error
        self._send(message)

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self.mgmt.setblocking(True)
            mgmt.send_message(self.mgmt, message)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                raise
            self.running = False
        finally:
            try:
                self.mgmt.setblocking(False)
            except OSError:
                pass

    def close(self) -> None:
        for conn, _fid in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        self.device.close()
        self.epoll.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="VSIC device host (started by kernelctl)")
    parser.add_argument("--image", required=True, help="the backing store: a loop device or an image file")
    parser.add_argument("--mgmt-fd", type=int, required=True)
    parser.add_argument("--spin", type=float, default=DEFAULT_SPIN)
    parser.add_argument("--no-direct", action="store_true", help="buffered I/O instead of O_DIRECT")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    device = VsicDevice(BackingStore(args.image, direct=not args.no_direct))
    host = DeviceHost(device, socket.socket(fileno=args.mgmt_fd), spin=args.spin)
    try:
        host.run()
    finally:
        host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
