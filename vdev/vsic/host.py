"""The VSIC device host: one process per virtual storage controller.

Started by kernelctl (``python -m vdev.vsic.host --image PATH --mgmt-fd N``) with the
management socket (``vdev.mgmt``) as an inherited fd. It opens the image and runs one loop,
``vdev.hostloop``, as the VNIC host does:

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
import signal
import socket
import sys
import time
from typing import Any

from vdev.hostloop import MAX_FUNCTIONS, DeviceHostBase, serve
from vdev.vfio_user.server import VfioUserServerConnection
from vdev.vsic.device import BackingStore, VsicDevice
from vdev.vsic.function import MAX_EXTENTS, FunctionConfig, VsicFunction

DEFAULT_SPIN = 0.002  # seconds of polling after the last work before sleeping
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


class DeviceHost(DeviceHostBase):
    """The VSIC's device host: ``DeviceHostBase`` plus the storage controller's own
    management requests (limits); every field of a request is checked for type and range."""

    device: VsicDevice

    def __init__(self, device: VsicDevice, mgmt_sock: socket.socket, spin: float = DEFAULT_SPIN) -> None:
        super().__init__(device, mgmt_sock, spin)

    def _deadline(self) -> float | None:
        return self.device.deadline

    def _has_work(self, now: float) -> bool:
        return self.device.has_work(now)

    def _poll(self, now: float) -> int:
        return self.device.poll(now)

    def _function_id(self, message: dict[str, Any]) -> int:
        return _int_field(message, "function_id", high=_U32)

    def _handle_device_op(self, op: object, message: dict[str, Any]) -> object:
        if op == "set_limits":
            function = self._function(message)
            function.set_limits(_int_field(message, "iops", 0), _int_field(message, "bps", 0), time.monotonic())
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
        self._add_session(conn, config.function_id)
        return {"function_id": config.function_id, "capacity_blocks": function.vsa.capacity_blocks}


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
    serve(host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
