"""How a connection opens and ends, as the application and the layer see it.

The ``Connected`` and ``Closed`` events (each at most once), TIME-WAIT (RFC 9293 3.4.2)
and CLOSED: the state changes that every other part may cause (an ACK of our FIN, a FIN,
an RST, a timer, the application) and that must tell the layer.

Also the one way the parts of a connection speak to the layer on its behalf: they leave
events and ``Notice``s, in order, and the connection hands them on before it returns.
The parts never hold the connection itself, nor a layer method bound to it: that would
close a reference cycle (connection, part, connection), and every finished connection
would then wait for the cyclic garbage collector instead of being freed at once, which
costs a workload of short connections measurably.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from libos.net.tcp.control_block import ControlBlock
from libos.net.tcp.reassembly import Reassembler
from libos.net.tcp.timers import Timers
from libos.net.tcp.types import Closed, CloseReason, Connected, TcpConfig, TcpEvent, TcpState


class Notice(enum.Enum):
    """A call the connection owes the layer (besides posting an event)."""

    ESTABLISHED = "established"  # StackHooks.connection_established
    CLOSED = "closed"  # StackHooks.connection_closed
    OUTPUT_DUE = "output due"  # StackHooks.mark_dirty: flush this connection soon


# How a part leaves an event or a notice for the layer (the connection's list.append).
Notify = Callable[[TcpEvent | Notice], None]


class Lifecycle:
    """The open and close transitions of one connection."""

    __slots__ = (
        "_tcb",
        "_timers",
        "_config",
        "_send_buffer",
        "_reassembly",
        "passive",
        "_notify",
        "_connected_posted",
        "_closed_posted",
    )

    def __init__(
        self,
        tcb: ControlBlock,
        timers: Timers,
        config: TcpConfig,
        send_buffer: bytearray,
        reassembly: Reassembler,
        *,
        passive: bool,
        notify: Notify,
    ) -> None:
        """``send_buffer`` and ``reassembly`` are the very objects the sender and the
        receiver hold (released here when the connection ends)."""
        self._tcb = tcb
        self._timers = timers
        self._config = config
        self._send_buffer = send_buffer
        self._reassembly = reassembly
        self.passive = passive  # opened by a listener (RFC 9293 3.10.7.2)
        self._notify = notify
        self._connected_posted = False
        self._closed_posted = False

    def announce_established(self) -> None:
        """The handshake completed: the layer moves a passive open to its accept queue,
        the application hears ``Connected`` (once, however often the peer repeats)."""
        self._notify(Notice.ESTABLISHED)
        if not self._connected_posted:
            self._connected_posted = True
            self._notify(Connected())

    def enter_time_wait(self, now: float) -> None:
        """Both FINs are acknowledged and we closed first: wait 2*MSL (RFC 9293 3.4.2),
        which for the application is the end of the connection."""
        self._tcb.state = TcpState.TIME_WAIT
        timers = self._timers
        timers.retransmit = None
        timers.probe = None
        timers.persist = None
        self._send_buffer.clear()
        self._post_closed(CloseReason.NORMAL)
        if self._config.msl <= 0:
            self.terminate(CloseReason.NORMAL, now)
            return
        timers.time_wait = now + 2 * self._config.msl

    def terminate(self, reason: CloseReason, now: float) -> None:
        """Enter CLOSED, release buffers and timers, tell the layer."""
        tcb = self._tcb
        if tcb.state == TcpState.CLOSED:
            return
        # A passive open nobody was told about ends silently (back to LISTEN).
        was_announced = self._connected_posted or not self.passive
        tcb.state = TcpState.CLOSED
        tcb.close_reason = tcb.close_reason or reason
        self._timers.stop_all()
        self._send_buffer.clear()
        self._reassembly.clear()
        if was_announced:
            self._post_closed(reason)
        self._notify(Notice.CLOSED)

    def _post_closed(self, reason: CloseReason) -> None:
        if not self._closed_posted:
            self._closed_posted = True
            self._tcb.close_reason = reason
            self._notify(Closed(reason))
