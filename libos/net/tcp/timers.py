"""The five timers of one connection, by name.

Each is a deadline on the caller's clock, None while stopped:

- ``retransmit``: the retransmission timer (RFC 6298);
- ``probe``: the tail loss probe (RFC 8985 section 7, with SACK only);
- ``delayed_ack``: the delayed ACK (RFC 1122 4.2.3.2);
- ``persist``: zero-window probing (RFC 9293 3.8.6.1);
- ``time_wait``: 2*MSL in TIME-WAIT (RFC 9293 3.4.2).

What runs when one expires is the connection's business (``TcpConnection.on_timer``);
this only keeps the deadlines and says which comes first.
"""

from __future__ import annotations


class Timers:
    """The deadlines of one connection's timers; plain slots, set and cleared directly."""

    __slots__ = ("retransmit", "probe", "delayed_ack", "persist", "time_wait")

    def __init__(self) -> None:
        self.retransmit: float | None = None
        self.probe: float | None = None
        self.delayed_ack: float | None = None
        self.persist: float | None = None
        self.time_wait: float | None = None

    def __repr__(self) -> str:
        armed = ", ".join(
            f"{name}={getattr(self, name)}"
            for name in self.__slots__
            if getattr(self, name) is not None
        )
        return f"Timers({armed})"

    def earliest(self) -> float | None:
        """The earliest armed deadline, or None. Written out field by field: the layer
        asks after every entry point of a connection, so this sits on the per-segment
        path."""
        deadline = self.retransmit
        candidate = self.probe
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        candidate = self.delayed_ack
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        candidate = self.persist
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        candidate = self.time_wait
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        return deadline

    def stop_all(self) -> None:
        self.retransmit = None
        self.probe = None
        self.delayed_ack = None
        self.persist = None
        self.time_wait = None
