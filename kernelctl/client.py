"""The control plane's client API: what an application (the libOS) and the CLI call.

One request at a time over the daemon's UNIX control socket (``SOCK_SEQPACKET``, one JSON
object per message, file descriptors with SCM_RIGHTS). The daemon identifies the caller by
``SO_PEERCRED``, so nothing here claims an identity: access is checked once, at set-up.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any

from vdev import mgmt


class ControlError(Exception):
    """The control plane refused a request (the message says why) or could not be reached."""


class ControlClient:
    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.path = Path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except OSError as exc:
            self._sock.close()
            raise ControlError(f"cannot reach kernelctl at {self.path}: {exc.strerror}") from None
        self._ids = itertools.count(1)

    def request(self, op: str, **fields: Any) -> tuple[Any, list[int]]:
        request_id = next(self._ids)
        mgmt.send_message(self._sock, {"id": request_id, "op": op, **fields})
        received = mgmt.recv_message(self._sock)
        if received is None:
            raise ControlError("kernelctl closed the control connection")
        reply, fds = received
        if reply.get("id") != request_id:
            for fd in fds:
                os.close(fd)
            raise ControlError("kernelctl answered another request")
        if not reply.get("ok"):
            for fd in fds:
                os.close(fd)
            raise ControlError(str(reply.get("error", "refused")))
        return reply.get("result"), fds

    def open_vnic(
        self,
        filters: list[tuple[str, int]],
        rx_bps: int = 0,
        tx_bps: int = 0,
        name: str = "",
    ) -> tuple[socket.socket, dict[str, Any]]:
        """Claim ports and get a function: the socket to speak vfio-user on, and its facts."""
        result, fds = self.request(
            "open_vnic",
            filters=[{"proto": proto, "port": port} for proto, port in filters],
            rx_bps=rx_bps,
            tx_bps=tx_bps,
            name=name,
        )
        if len(fds) != 1 or not isinstance(result, dict):
            for fd in fds:
                os.close(fd)
            raise ControlError("kernelctl sent no device socket")
        return socket.socket(fileno=fds[0]), result

    def open_vsa(self, name: str, write: bool = True, iops: int = 0, bps: int = 0) -> tuple[socket.socket, dict[str, Any]]:
        """Open a virtual storage area: the socket to speak vfio-user on, and its facts."""
        result, fds = self.request("open_vsa", name=name, write=write, iops=iops, bps=bps)
        if len(fds) != 1 or not isinstance(result, dict):
            for fd in fds:
                os.close(fd)
            raise ControlError("kernelctl sent no device socket")
        return socket.socket(fileno=fds[0]), result

    def add_filter(self, function_id: int, proto: str, port: int) -> None:
        self.request("add_filter", function_id=function_id, proto=proto, port=port)

    def status(self) -> dict[str, Any]:
        result, _fds = self.request("status")
        if not isinstance(result, dict):
            raise ControlError("malformed status reply")
        return result

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
