"""The queue-descriptor API, in the spirit of Demikernel's PDPIX.

An application names its I/O queues by small integers (queue descriptors, ``qd``). Every
operation that may take time (``pop``, ``push``, ``accept``, ``connect``) returns at once
with a *token*; ``wait`` / ``wait_any`` give back the token's ``QResult`` when it completes.
Applications are written once against ``LibOS`` and run on either backend:

* ``vnic``: the bypass path; the libOS drives its own VNIC function's rings and runs its own
  network stack, with no system call per request;
* ``linux``: the baseline; the same calls over non-blocking kernel sockets and epoll.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import NamedTuple, Protocol

Address = tuple[str, int]


class Opcode(enum.Enum):
    PUSH = "push"
    POP = "pop"
    ACCEPT = "accept"
    CONNECT = "connect"
    FAILED = "failed"


class SocketKind(enum.Enum):
    UDP = "udp"
    TCP = "tcp"


class QResult(NamedTuple):
    """A completed operation. Immutable (a named tuple: one is made per completion, and a
    tuple is built about four times faster than a frozen dataclass); a backend may hand the
    same instance out again, e.g. for every successful push on one queue."""

    opcode: Opcode
    qd: int
    data: bytes = b""
    address: Address | None = None  # POP on a UDP queue: who sent it
    new_qd: int = -1  # ACCEPT: the connection's queue
    error: str = ""


class LibOSError(Exception):
    """A queue operation failed (bad queue descriptor, address in use, ...)."""


class LibOS(Protocol):
    """What an application sees, whichever backend runs it."""

    backend: str

    def socket(self, kind: SocketKind) -> int: ...

    def bind(self, qd: int, address: Address) -> None: ...

    def pop(self, qd: int) -> int:
        """A token for the next datagram (UDP) or the next bytes of the stream (TCP).

        On a TCP queue a POP result with empty ``data`` means the peer closed its side.
        """
        ...

    def pushto(self, qd: int, data: bytes, address: Address) -> int: ...

    # Stream (TCP) queues.

    def listen(self, qd: int, backlog: int) -> None: ...

    def accept(self, qd: int) -> int:
        """A token that completes with ``new_qd``: an established connection's queue."""
        ...

    def connect(self, qd: int, address: Address) -> int:
        """A token that completes (CONNECT, or FAILED with ``error``) once established."""
        ...

    def push(self, qd: int, data: bytes) -> int:
        """A token that completes once all of ``data`` is handed to the stack (not acked)."""
        ...

    def wait(self, token: int, timeout: float | None = None) -> QResult | None: ...

    def wait_any(self, tokens: list[int], timeout: float | None = None) -> tuple[int, QResult] | None: ...

    def wait_many(self, tokens: Collection[int], timeout: float | None = None) -> list[tuple[int, QResult]]:
        """Every token of ``tokens`` that has completed, as (token, result) pairs, each taken
        out; waits until there is at least one, or ``timeout`` passed (then []).

        A server waits on all its pending tokens at once and handles one poll's worth of
        completions per call; ``tokens`` may be any collection, a dict or set is best (its
        membership test is O(1)). LibOSError if a token is unknown.
        """
        ...

    def take_done(self, token: int) -> QResult | None:
        """``token``'s result if it has completed already, taken out (as a wait would);
        None while it is pending. Makes no progress and never sleeps: for a caller that has
        just started an operation that usually completes at once (a push the stack took
        whole), so that it need not wait for it. LibOSError if the token is unknown."""
        ...

    def close(self, qd: int) -> None: ...

    def shutdown(self) -> None: ...

    def stats(self) -> dict[str, object]: ...
