"""The control plane's client API: what an application (the libOS) and the CLI call.

One request at a time over the daemon's UNIX control socket (``SOCK_SEQPACKET``; the
messages, their checks and their framing are ``vdev.control``; file descriptors come with
SCM_RIGHTS). The daemon identifies the caller by
``SO_PEERCRED``, so nothing here claims an identity: access is checked once, at set-up.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path
from typing import Any

from vdev import control


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
        """Any request by name; the daemon checks it (``vdev.control.CONTROL``)."""
        request_id = next(self._ids)
        try:
            payload = control.raw_request_json(request_id, op, fields)
        except control.ProtocolError as exc:
            raise ControlError(str(exc)) from None
        return self._exchange(request_id, payload)

    def call(self, body: control.Record, fds: list[int] | None = None) -> tuple[Any, list[int]]:
        """A typed request (with the fds it takes): checked here as the daemon will check it, then sent."""
        request_id = next(self._ids)
        return self._exchange(request_id, control.request_json(request_id, body), fds or [])

    def _exchange(self, request_id: int, payload: bytes, fds: list[int] | None = None) -> tuple[Any, list[int]]:
        try:
            control.send_blocking(self._sock, payload, fds or ())
        except OSError as exc:
            # The daemon may have refused the connection with a reason (too many of them).
            raise ControlError(self._refusal() or f"cannot send to kernelctl: {exc.strerror or exc}") from None
        try:
            received = control.recv_blocking(self._sock)
        except TimeoutError:
            raise ControlError("kernelctl did not answer in time") from None
        except ConnectionResetError:
            # A refused connection: the reset is reported before the reason queued with it.
            raise ControlError(self._refusal() or "kernelctl reset the control connection") from None
        except (OSError, control.ProtocolError) as exc:
            raise ControlError(f"bad answer from kernelctl: {exc}") from None
        if received is None:
            raise ControlError("kernelctl closed the control connection")
        data, fds = received
        try:
            reply = control.decode_reply(data)
            if not isinstance(reply, control.Reply):
                raise control.ProtocolError("an event on the control channel")
        except control.ProtocolError as exc:
            control.close_fds(fds)
            raise ControlError(f"bad answer from kernelctl: {exc}") from None
        if not reply.ok:
            control.close_fds(fds)
            raise ControlError(reply.error)
        if reply.id != request_id:
            control.close_fds(fds)
            raise ControlError("kernelctl answered another request")
        return reply.result, fds

    def _refusal(self) -> str:
        try:
            data = self._sock.recv(control.CHUNK + 1, socket.MSG_DONTWAIT)
            reply = control.decode_reply(data)
        except (OSError, control.ProtocolError):
            return ""
        return reply.error if isinstance(reply, control.Reply) and not reply.ok else ""

    def open_vnic(
        self,
        filters: list[tuple[str, int]],
        rx_bps: int = 0,
        tx_bps: int = 0,
        name: str = "",
        queues: int = 1,
    ) -> tuple[socket.socket, dict[str, Any]]:
        """Claim ports and get a function of ``queues`` queue pairs: the socket to speak
        vfio-user on, and its facts."""
        try:
            body = control.OpenVnic(
                filters=tuple(control.Filter(proto, port) for proto, port in filters),
                rx_bps=rx_bps,
                tx_bps=tx_bps,
                name=name,
                queues=queues,
            )
        except control.ProtocolError as exc:
            raise ControlError(f"open_vnic: {exc}") from None
        result, fds = self.call(body)
        if len(fds) != 1 or not isinstance(result, dict):
            control.close_fds(fds)
            raise ControlError("kernelctl sent no device socket")
        return socket.socket(fileno=fds[0]), result

    def open_vsa(self, name: str, write: bool = True, iops: int = 0, bps: int = 0) -> tuple[socket.socket, dict[str, Any]]:
        """Open a virtual storage area: the socket to speak vfio-user on, and its facts."""
        try:
            body = control.OpenVsa(name=name, write=write, iops=iops, bps=bps)
        except control.ProtocolError as exc:
            raise ControlError(f"open_vsa: {exc}") from None
        result, fds = self.call(body)
        if len(fds) != 1 or not isinstance(result, dict):
            control.close_fds(fds)
            raise ControlError("kernelctl sent no device socket")
        return socket.socket(fileno=fds[0]), result

    def add_filter(self, function_id: int, proto: str, port: int) -> None:
        try:
            body = control.AddFilter(function_id=function_id, proto=proto, port=port)
        except control.ProtocolError as exc:
            raise ControlError(f"add_filter: {exc}") from None
        self.call(body)

    def status(self) -> dict[str, Any]:
        result, _fds = self.call(control.Status())
        if not isinstance(result, dict):
            raise ControlError("malformed status reply")
        return result

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
