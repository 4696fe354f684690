"""The management channel between the control plane and a device host.

A ``SOCK_SEQPACKET`` socketpair made by kernelctl when it starts the device host: message
boundaries come for free, and file descriptors (the device end of an application's vfio-user
socket) ride along with SCM_RIGHTS. Each message is one JSON object. Requests carry an ``id``
and an ``op``; replies echo the ``id`` with ``ok`` and either ``result`` or ``error``; the device
host also sends unsolicited ``event`` messages (a function whose application went away).

Both ends are trusted, but a message is still checked before it is used: a bug on one side
must show up as a clear error, not as a crash of the other.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

MAX_MESSAGE = 1 << 20
MAX_FDS = 4


class MgmtError(Exception):
    """A management message could not be read or was malformed."""


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise MgmtError("management message too large")
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the fds that came with it; None when the peer closed the channel."""
    data, fds, flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise MgmtError("management message truncated")
        message = json.loads(data)
        if not isinstance(message, dict):
            raise MgmtError("management message is not an object")
    except (ValueError, MgmtError) as exc:
        for fd in fds:
            os.close(fd)
        raise MgmtError(str(exc)) from None
    return message, fds
