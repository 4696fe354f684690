"""The VNIC device host: one process per virtual NIC, like a QEMU device model.

Started by kernelctl (``python -m vdev.vnic.host ...``) with the management socket as an
inherited fd. It attaches to the tap inside the client namespace, then runs the device host loop of
``vdev.hostloop``:

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
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vdev import control
from vdev.hostloop import MAX_FUNCTIONS, DeviceHostBase, serve
from vdev.vfio_user.server import VfioUserServerConnection
from vdev.vnic.backend import TapBackend, WireBackend
from vdev.vnic.device import VnicDevice
from vdev.vnic.faults import FaultSpec, FaultSpecError, FaultyBackend
from vdev.vnic.filters import FilterConflict, Match, UnknownFilter
from vdev.vnic.function import FunctionConfig, VnicFunction

# Seconds of polling after the last work before sleeping. While the device polls, an
# application posts work with plain stores; once it sleeps, each post costs the application a
# doorbell (a system call). So the window must outlast the gaps in a steady stream of requests,
# scheduling hiccups on a loaded 2-core machine included.
DEFAULT_SPIN = 0.01

_PROTOCOLS = {"udp": 17, "tcp": 6, "icmp": 1}


def _ip_bytes(text: str) -> bytes:
    return socket.inet_aton(text)


class DeviceHost(DeviceHostBase):
    """The VNIC's device host: ``DeviceHostBase`` plus the tap queues and the NIC's own
    management requests (filters, rates)."""

    MGMT_ERRORS = (*DeviceHostBase.MGMT_ERRORS, FilterConflict)
    PROTOCOL = control.VNIC_MGMT
    device: VnicDevice

    def __init__(self, device: VnicDevice, mgmt_sock: socket.socket, spin: float = DEFAULT_SPIN) -> None:
        super().__init__(device, mgmt_sock, spin)
        for queue, fd in enumerate(device.backend.fds()):
            self._wire_fds[fd] = queue
            self.epoll.register(fd, select.EPOLLIN)

    def _deadline(self) -> float | None:
        return self.device.tx_deadline

    def _has_work(self, now: float) -> bool:
        return self.device.has_tx_work()

    def _poll(self, now: float) -> int:
        return self.device.poll_transmit(now)

    def _on_wire(self, queue: int, now: float) -> int:
        received = self.device.receive_from_wire(queue, now)
        if self.device.packet_ins:
            # Frames a controller flow sent to the controller: events on the management
            # channel (bounded by the device's packet-in rate), which kernelctl turns into
            # OpenFlow PACKET_INs.
            for flow_id, total_len, data in self.device.take_packet_ins():
                self._send(control.PacketInEvent(flow_id, total_len, data).to_json())
        return received

    def _device_handlers(self) -> dict[type[control.Record], Callable[[Any, list[int]], object]]:
        return {
            control.VnicCreateFunction: self._create_function,
            control.HostAddFilter: self._add_filter,
            control.HostRemoveFilter: self._remove_filter,
            control.HostSetRate: self._set_rate,
            control.HostAddFlow: self._add_flow,
            control.HostRemoveFlows: self._remove_flows,
            control.HostPacketOut: self._packet_out,
            control.HostSetMeter: self._set_meter,
        }

    def _function(self, function_id: int) -> VnicFunction:
        function = self.device.functions.get(function_id)
        if function is None:
            raise KeyError(f"no function {function_id}")
        return function

    def _add_filter(self, body: control.HostAddFilter, fds: list[int]) -> object:
        function = self._function(body.function_id)
        match = self._match(control.Filter(body.proto, body.port), function.config.ipv4)
        self.device.filters.add_rx(body.function_id, 0, match)
        self.device.filters.add_tx(body.function_id, replace(match, ip=function.config.ipv4))
        return None

    def _remove_filter(self, body: control.HostRemoveFilter, fds: list[int]) -> object:
        removed = self.device.filters.remove_port(body.function_id, _PROTOCOLS[body.proto], body.port)
        if not removed:
            raise KeyError(f"function {body.function_id} has no filter for {body.proto}/{body.port}")
        return {"removed": removed}

    def _set_meter(self, body: control.HostSetMeter, fds: list[int]) -> object:
        self.device.set_meter(body.meter_id, body.rate_kbps, body.burst_kb, time.monotonic())
        return None

    def _add_flow(self, body: control.HostAddFlow, fds: list[int]) -> object:
        if body.meter and body.meter not in self.device.meters:
            raise ValueError(f"no meter {body.meter}")
        fields = {item.name: (item.value, item.mask) for item in body.match}
        if len(fields) != len(body.match):
            raise ValueError("a field appears twice")
        outputs = [(output.function_id, output.queue) for output in body.outputs]
        flow_id = self.device.filters.add_flow(
            body.priority, fields, outputs, body.to_controller, body.controller_len, body.meter
        )
        return {"flow_id": flow_id}

    def _remove_flows(self, body: control.HostRemoveFlows, fds: list[int]) -> object:
        # Unknown ids are skipped, not refused: a flow may already be gone with its device
        # state (a restarted host), and the caller wants it gone either way.
        removed = {}
        for flow_id in body.flow_ids:
            try:
                removed[str(flow_id)] = self.device.filters.remove_flow(flow_id)
            except UnknownFilter:
                continue
        return {"removed": removed}

    def _packet_out(self, body: control.HostPacketOut, fds: list[int]) -> object:
        frame = bytes.fromhex(body.data)  # ValueError for anything but hex: an error reply
        now = time.monotonic()
        device = self.device
        if body.target == "wire":
            device.send_to_wire(frame)
        elif body.target == "table":
            device.receive_from_wire(0, now, [frame])
        elif body.target == "local":
            for reply in device.default.handle(frame, now):
                device.send_to_wire(reply)
        else:
            if not self._function(body.function_id).deliver(body.queue, frame, now):
                raise ValueError(f"function {body.function_id} queue {body.queue} did not take the frame")
            device.raise_irqs_of(body.function_id)
        return None

    def _set_rate(self, body: control.HostSetRate, fds: list[int]) -> object:
        self._function(body.function_id).set_rates(body.rx_bps, body.tx_bps, time.monotonic())
        return None

    def _create_function(self, body: control.VnicCreateFunction, fds: list[int]) -> object:
        # On any refusal the fd stays unowned here (detach): the loop closes it, once.
        if len(self.device.functions) >= MAX_FUNCTIONS:
            raise ValueError(f"the device has {MAX_FUNCTIONS} functions already")
        try:
            ipv4 = socket.inet_aton(body.ip)
        except OSError:
            raise ValueError(f"bad address {body.ip!r}") from None
        matches = [self._match(spec, ipv4) for spec in body.rx_filters]
        config = FunctionConfig(
            function_id=body.function_id,
            mac=self.device.mac,
            ipv4=ipv4,
            num_queues=body.queues,
            rx_rate_bps=body.rx_bps,
            tx_rate_bps=body.tx_bps,
            owner_pid=body.owner_pid,
            owner_uid=body.owner_uid,
            name=body.name,
        )
        sock = socket.socket(fileno=fds[0])  # OSError (ENOTSOCK) for anything but a socket
        try:
            if sock.family != socket.AF_UNIX:
                raise ValueError("the vfio-user socket must be AF_UNIX")
            function = self.device.add_function(config, matches, time.monotonic())
        except BaseException:
            sock.detach()
            raise
        function.doorbell_listener = self.wake
        try:
            conn = VfioUserServerConnection(sock, function)
        except Exception as exc:
            sock.detach()
            self.device.remove_function(body.function_id)
            raise ValueError(f"cannot serve the vfio-user socket: {exc}") from exc
        self._add_session(conn, body.function_id)
        return {"function_id": body.function_id}

    @staticmethod
    def _match(spec: control.Filter, ipv4: bytes) -> Match:
        return Match(ethertype=0x0800, ip_proto=_PROTOCOLS[spec.proto], ip=ipv4, port=spec.port)


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

        netns.setns(args.netns, flags=0)  # never create a namespace that is gone
    backend: WireBackend = TapBackend(args.tap, args.queues)
    if faults.active:
        print(f"vnic host: injecting faults {faults}", file=sys.stderr, flush=True)
        backend = FaultyBackend(backend, faults)
    mac = bytes.fromhex(args.mac.replace(":", ""))
    device = VnicDevice(backend, mac, [_ip_bytes(a) for a in args.address])
    host = DeviceHost(device, socket.socket(fileno=args.mgmt_fd), spin=args.spin)
    serve(host, profile_name="vnic-host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
