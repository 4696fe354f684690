"""Blocking helpers for one message on a control or management socket.

The protocol itself (records, checks, framing) is ``vdev.control``; the device hosts and the
daemon use its non-blocking ``Channel``. These two functions are for a peer that waits for
its answer: ``kernelctl.client``, ``kernelctl.hostproc`` and test rigs. A message is one JSON
object, cut into parts when it does not fit one datagram; fds ride on its first datagram.
"""

from __future__ import annotations

import socket
from typing import Any

from vdev import control

MAX_MESSAGE = control.MAX_MESSAGE
MAX_FDS = control.MAX_FDS
MgmtError = control.ProtocolError


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    control.send_blocking(sock, control.encode_json(message), fds or ())


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One message and the fds that came with it; None when the peer closed the channel."""
    received = control.recv_blocking(sock)
    if received is None:
        return None
    payload, fds = received
    try:
        return control.decode_json(payload), fds
    except control.ProtocolError:
        control.close_fds(fds)
        raise
