"""Starting, talking to and stopping a device host process.

kernelctl starts one device host per virtual device (``python -m vdev.vnic.host``) with one
end of a ``SOCK_SEQPACKET`` socketpair as an inherited descriptor: the management channel
(``vdev.mgmt``). Requests are answered in order; the device host may slip events (a function
whose application went away) in between, which ``request`` hands to a callback.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from kernelctl.names import Topology
from vdev import mgmt
from vdev.vnic.faults import ENV_VAR as FAULTS_ENV_VAR

REQUEST_TIMEOUT = 5.0


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
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def returncode(self) -> int | None:
        return self.process.poll()

    def request(
        self,
        message: dict[str, Any],
        fds: list[int],
        on_event: Callable[[dict[str, Any]], None],
    ) -> Any:
        request_id = next(self._ids)
        self.sock.setblocking(True)
        mgmt.send_message(self.sock, {**message, "id": request_id}, fds)
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise HostError(f"device host did not answer {message.get('op')!r}")
            received = mgmt.recv_message(self.sock)
            if received is None:
                raise HostError("device host closed the management channel")
            reply, extra_fds = received
            for fd in extra_fds:
                os.close(fd)
            if "event" in reply:
                on_event(reply)
                continue
            if reply.get("id") != request_id:
                continue  # an answer to a request that timed out earlier
            if not reply.get("ok"):
                raise HostError(str(reply.get("error")))
            return reply.get("result")

    def drain_events(self) -> list[dict[str, Any]]:
        events = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    received = mgmt.recv_message(self.sock)
                except BlockingIOError:
                    break
                except mgmt.MgmtError:
                    continue
                if received is None:
                    break
                message, fds = received
                for fd in fds:
                    os.close(fd)
                if "event" in message:
                    events.append(message)
        finally:
            self.sock.setblocking(True)
        return events

    def stop(self, timeout: float = 3.0) -> None:
        if self.alive():
            try:
                self.sock.setblocking(True)
                mgmt.send_message(self.sock, {"id": 0, "op": "shutdown"})
            except OSError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        else:
            self.process.wait()
        self.sock.close()
