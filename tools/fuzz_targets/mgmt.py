"""The management channel's decoder (``vdev.mgmt.recv_message``), over a real SEQPACKET socketpair.

Kept small and on its own on purpose: the decoder is being replaced by a typed protocol
module. ``DECODE`` and ``CLEAN`` are the only two things that name the current one; point
them at the new decoder (any ``sock -> message | None`` that refuses with ``CLEAN``) and
the harness, its seeds and its saved inputs carry over.

Contract: for any datagram (random bytes, or a JSON-ish document the input describes, deep
nesting included) the decoder returns a dict or raises one of ``CLEAN``; when it refuses,
the fds that came with the message are closed.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

from tools.fuzz_targets import ContractViolation
from tools.fuzz_targets._input import Input
from vdev import mgmt

DECODE: Callable[[socket.socket], Any] = mgmt.recv_message  # vdev.control underneath
CLEAN: tuple[type[BaseException], ...] = (mgmt.MgmtError,)
MAX_DATAGRAM = 200_000  # the socket buffer of the pair is raised to hold this


def _document(inp: Input, depth: int) -> object:
    kind = inp.below(10)
    if kind == 0 or depth > 40:
        return inp.choice((0, 1, -1, 2**31, 2**63))
    if kind == 1:
        return inp.take(inp.below(12)).decode("latin-1")
    if kind == 2:
        return [_document(inp, depth + 1) for _ in range(inp.below(4))]
    if kind == 3:
        return {inp.take(inp.below(6)).decode("latin-1"): _document(inp, depth + 1) for _ in range(inp.below(4))}
    if kind == 4:
        return {"id": inp.interesting(64), "op": inp.take(inp.below(10)).decode("latin-1"), "args": _document(inp, depth + 1)}
    if kind == 5:
        return [None, True, False, 1.5e308][inp.below(4)]
    return inp.u32()


def _datagram(inp: Input) -> bytes:
    kind = inp.below(6)
    if kind == 0:
        return inp.rest()
    if kind == 1:
        # Deep nesting: what json.dumps of a real structure would refuse to produce.
        depth = 1 + inp.u16() * 3
        opener, closer = (b"[", b"]") if inp.flag() else (b'{"a":', b"}")
        return b'{"id":1,"op":"x","args":' + opener * depth + b"0" + closer * depth * inp.below(2) + b"}"
    if kind == 2:
        text = json.dumps(_document(inp, 0)).encode()
        return text[: len(text) - inp.below(3)]
    if kind == 3:
        return json.dumps(_document(inp, 0)).encode() + inp.take(inp.below(4))
    if kind == 4:
        return b'{"id":' + str(inp.interesting(64)).encode() * (1 + inp.below(2000)) + b"}"
    return json.dumps({"id": inp.u32(), "op": "status", "args": _document(inp, 0)}).encode()


def one_input_mgmt_decode(data: bytes) -> None:
    inp = Input(data)
    message = _datagram(inp)[:MAX_DATAGRAM]
    with_fds = inp.below(4) == 0
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sent_fds: list[int] = []
    try:
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_DATAGRAM)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_DATAGRAM)
        if with_fds:
            sent_fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(1 + inp.below(6))]
            socket.send_fds(sender, [message], sent_fds)
        else:
            sender.send(message)
        for fd in sent_fds:
            os.close(fd)
        # The peer says nothing more: a message cut off after a part that promised more must
        # be refused, not waited for (the blocking decoder would wait forever otherwise).
        sender.shutdown(socket.SHUT_WR)
        before = len(os.listdir("/proc/self/fd"))
        try:
            result = DECODE(receiver)
        except CLEAN:
            after = len(os.listdir("/proc/self/fd"))
            if after != before:
                raise ContractViolation(f"a refused message left {after - before} fds open") from None
            return
        if result is None:
            if message:
                raise ContractViolation("a non-empty message decoded as end of channel")
            return
        document, fds = result
        for fd in fds:
            os.close(fd)
        if not isinstance(document, dict):
            raise ContractViolation(f"the decoder returned a {type(document).__name__}, not an object")
    finally:
        sender.close()
        receiver.close()


def seeds_mgmt_decode() -> list[bytes]:
    return [
        b"\x00" + json.dumps({"id": 1, "op": "status"}).encode(),
        b"\x05\x01\x02\x00\x04\x07\x00",
        b"\x01\x10\x27\x01",
        b"\x02\x03\x02\x02\x04\x00",
    ]
