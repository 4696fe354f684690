"""Starting, talking to and stopping a device host process.

kernelctl starts one device host per virtual device (``python -m vdev.vnic.host``) with one
end of a ``SOCK_SEQPACKET`` socketpair as an inherited descriptor: the management channel
(``vdev.control``: typed records, messages of any size in parts, never a blocking send).
Requests are answered in order; the device host may slip events (a function whose
application went away) in between, which ``request`` hands to a callback. A host that does
not answer within ``REQUEST_TIMEOUT`` is a ``HostError`` for that request, nothing worse.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from kernelctl.names import Topology
from vdev import control
from vdev.vnic.faults import ENV_VAR as FAULTS_ENV_VAR

log = logging.getLogger("kernelctl")
REQUEST_TIMEOUT = 5.0
MAX_PACKET_INS = 1024  # packet-in events held for the OpenFlow switch; more are dropped


class HostError(Exception):
    """The device host refused a request or did not answer."""


def vnic_host(topo: Topology, spin: float | None = None) -> DeviceHostProcess:
    """The VNIC device host, attached to the instance's tap inside the client namespace."""
    args = ["--tap", topo.tap, "--netns", topo.client_netns, "--mac", nic_mac(topo), "--address", topo.vnic_ip]
    if spin is not None:
        args += ["--spin", str(spin)]
    faults = os.environ.get(FAULTS_ENV_VAR, "")
    if faults:
        # Tests ask for a lossy wire this way; the device host checks the value.
        args += ["--faults", faults]
    return DeviceHostProcess(topo, "vdev.vnic.host", args, "vnic-host.log")


def vsic_host(topo: Topology, image: str, spin: float | None = None) -> DeviceHostProcess:
    """The VSIC device host, serving VSAs on ``image`` (the raw image's loop device)."""
    args = ["--image", image]
    if spin is not None:
        args += ["--spin", str(spin)]
    return DeviceHostProcess(topo, "vdev.vsic.host", args, "vsic-host.log")


def nic_mac(topo: Topology) -> str:
    """A stable, locally administered unicast MAC for the instance's VNIC."""
    digest = hashlib.sha256(f"arrakis-vnic-{topo.tag}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, 0xA7, *digest[:4]))


class DeviceHostProcess:
    """One device host: ``module`` run with ``args`` and the management fd appended."""

    def __init__(self, topo: Topology, module: str, args: list[str], log_name: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-m", module, *args, "--mgmt-fd", str(theirs.fileno())]
        with open(topo.run_dir / log_name, "ab") as log_file:
            self.process = subprocess.Popen(
                argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        theirs.close()
        self.sock = ours
        self.channel = control.Channel(ours)
        self._ids = itertools.count(1)
        self.packet_ins: list[control.PacketInEvent] = []
        self.packet_ins_dropped = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        return self.process.poll()

    def request(
        self,
        body: control.Record,
        fds: list[int],
        on_event: Callable[[int], None],
    ) -> Any:
        """Send ``body`` and wait up to ``REQUEST_TIMEOUT`` for its answer; events that come
        first go to ``on_event`` (the function id). HostError: refused, or no answer."""
        request_id = next(self._ids)
        try:
            self.channel.send(control.request_json(request_id, body), fds)
        except control.ChannelFull as exc:
            raise HostError(f"device host is not reading its requests ({exc})") from None
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            try:
                self.channel.flush()
            except OSError as exc:
                raise HostError(f"device host channel: {exc}") from None
            for reply in self._receive(on_event):
                if reply.id == request_id:
                    if not reply.ok:
                        raise HostError(reply.error)
                    return reply.result
                # else: the answer to a request that timed out earlier
            if self.channel.closed:
                raise HostError("device host closed the management channel")
            left = deadline - time.monotonic()
            if left <= 0:
                raise HostError(f"device host did not answer {body.OP!r} within {REQUEST_TIMEOUT:g} s")
            select.select([self.sock], [self.sock] if self.channel.pending else [], [], left)

    def _receive(self, on_event: Callable[[int], None]) -> list[control.Reply]:
        replies = []
        for incoming in self.channel.receive():
            control.close_fds(incoming.fds)  # a device host sends no fds
            if incoming.payload is None:
                log.warning("device host %d: %s", self.pid, incoming.error)
                continue
            try:
                message = control.decode_reply(incoming.payload)
            except control.ProtocolError as exc:
                log.warning("device host %d sent a bad message: %s", self.pid, exc)
                continue
            if isinstance(message, control.FunctionClosed):
                on_event(message.function_id)
            elif isinstance(message, control.PacketInEvent):
                if len(self.packet_ins) < MAX_PACKET_INS:
                    self.packet_ins.append(message)
                else:
                    self.packet_ins_dropped += 1
            else:
                replies.append(message)
        return replies

    def take_packet_ins(self) -> list[control.PacketInEvent]:
        taken, self.packet_ins = self.packet_ins, []
        return taken

    def drain_events(self, on_event: Callable[[int], None]) -> None:
        """Hand the events that came to ``on_event``; late replies are dropped."""
        try:
            self.channel.flush()
        except OSError:
            pass
        self._receive(on_event)

    def flush(self) -> None:
        """Send what an earlier, timed-out request left queued."""
        try:
            self.channel.flush()
        except OSError:
            pass

    def stop(self, timeout: float = 3.0) -> None:
        if self.alive():
            try:
                self.channel.send(control.request_json(0, control.HostShutdown()))
                self.channel.flush()
            except (OSError, control.ChannelFull):
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        else:
            self.process.wait()
        self.channel.close()
