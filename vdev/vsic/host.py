"""The VSIC device host: one process per virtual storage controller.

Started by kernelctl (``python -m vdev.vsic.host --image PATH --mgmt-fd N``) with the
management socket (``vdev.control``) as an inherited fd. It opens the image and runs one loop,
``vdev.hostloop``, as the VNIC host does:

* **busy**: while requests keep coming it polls every request ring and its sockets without
  sleeping, so a busy application never needs a doorbell (a system call);
* **asleep**: after ``spin`` seconds without work it tells every ring it is asleep, looks at
  the rings once more, and blocks in epoll until a doorbell (a trapped REGION_WRITE on a
  vfio-user socket), a management message, or the moment a rate-limited ring may go on.

Management requests (records of ``vdev.control.VSIC_MGMT``)::

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
from collections.abc import Callable
from typing import Any

from vdev import control
from vdev.hostloop import MAX_FUNCTIONS, DeviceHostBase, serve
from vdev.vfio_user.server import VfioUserServerConnection
from vdev.vsic.device import BackingStore, VsicDevice
from vdev.vsic.function import FunctionConfig, VsicFunction

DEFAULT_SPIN = 0.002  # seconds of polling after the last work before sleeping


def _int_field(message: dict[str, Any], key: str, default: int | None = None, high: int = control.U64) -> int:
    """A non-negative JSON integer at most ``high`` (ValueError, KeyError otherwise); the
    same check ``vdev.control`` makes of every integer field."""
    value = message.get(key, default)
    if value is None:
        raise KeyError(f"missing field {key!r}")
    return int(control.check_value(value, int, control.Bound(high=high), key))


def _extents_field(message: dict[str, Any]) -> list[tuple[int, int]]:
    """The extents of a create_function request, checked as ``VsicCreateFunction`` does."""
    if "extents" not in message:
        raise KeyError("missing field 'extents'")
    checked = control.VsicCreateFunction.from_fields({"function_id": 0, "extents": message["extents"]})
    return list(checked.extents)


class DeviceHost(DeviceHostBase):
    """The VSIC's device host: ``DeviceHostBase`` plus the storage controller's own
    management requests (limits); every field of a request is checked for type and range."""

    PROTOCOL = control.VSIC_MGMT
    device: VsicDevice

    def __init__(self, device: VsicDevice, mgmt_sock: socket.socket, spin: float = DEFAULT_SPIN) -> None:
        super().__init__(device, mgmt_sock, spin)

    def _deadline(self) -> float | None:
        return self.device.deadline

    def _has_work(self, now: float) -> bool:
        return self.device.has_work(now)

    def _poll(self, now: float) -> int:
        return self.device.poll(now)

    def _device_handlers(self) -> dict[type[control.Record], Callable[[Any, list[int]], object]]:
        return {control.VsicCreateFunction: self._create_function, control.SetLimits: self._set_limits}

    def _set_limits(self, body: control.SetLimits, fds: list[int]) -> object:
        self._function(body.function_id).set_limits(body.iops, body.bps, time.monotonic())
        return None

    def _function(self, function_id: int) -> VsicFunction:
        function = self.device.functions.get(function_id)
        if function is None:
            raise KeyError(f"no function {function_id}")
        return function

    def _create_function(self, body: control.VsicCreateFunction, fds: list[int]) -> object:
        if len(self.device.functions) >= MAX_FUNCTIONS:
            raise ValueError(f"the device has {MAX_FUNCTIONS} functions already")
        config = FunctionConfig(
            function_id=body.function_id,
            extents=list(body.extents),
            read_only=body.read_only,
            num_queues=body.queues,
            iops=body.iops,
            bps=body.bps,
            owner_pid=body.owner_pid,
            owner_uid=body.owner_uid,
            name=body.name,
        )
        # On any refusal the fd stays unowned here (detach), and the loop closes it once.
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
