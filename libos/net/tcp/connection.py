"""One TCP connection as a sans-I/O state machine (RFC 9293).

The connection never touches a socket or a clock: ``TcpLayer`` hands it parsed segments
with the time they arrived, calls ``on_timer(now)`` at ``next_deadline()``, and carries
the segments it emits to the IP layer. Events go to the layer's event queue.

``TcpConnection`` is the public face; the work is done by its parts, which share one
``ControlBlock``: ``Sender`` (sending, retransmission, SACK recovery, probes),
``Receiver`` (receive buffer, reassembly, FIN, the window we offer), ``Arrival`` (the
segment-arrival steps of RFC 9293 3.10.7), ``Lifecycle`` (the Connected and Closed events,
TIME-WAIT, CLOSED) and ``Timers`` (retransmission, tail loss probe, delayed ACK, persist
and TIME-WAIT deadlines). Each part reaches only those below it; this class wires them
to the layer and runs the timers.

Selective acknowledgments (RFC 2018) are offered and used when the peer offers them too:
the receiver reports its out-of-order blocks, the sender keeps a scoreboard and recovers
losses by RFC 6675 (``sack``); without them NewReno (RFC 6582) does.

Not implemented: Nagle's algorithm (small writes go out at once), D-SACK, timestamps,
urgent data (URG is ignored and its bytes are delivered in line), ECN, reuse of a
TIME-WAIT 4-tuple by a new SYN (RFC 6191: such a SYN gets a challenge ACK).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Final, Protocol

from libos.net.tcp.arrival import Arrival
from libos.net.tcp.congestion import NewReno
from libos.net.tcp.control_block import ControlBlock, SharedControlBlock
from libos.net.tcp.lifecycle import Lifecycle, Notice
from libos.net.tcp.reassembly import Reassembler
from libos.net.tcp.receiver import Receiver, window_shift
from libos.net.tcp.sender import Sender
from libos.net.tcp.timers import Timers
from libos.net.tcp.types import (
    SENDABLE_STATES,
    SYNCHRONIZED_STATES,
    CloseReason,
    TcpConfig,
    TcpCounters,
    TcpEvent,
    TcpState,
)
from vdev.wire.tcp import TcpSegment

# arx_fast.h's ARX_PREDICT_WINDOW_UPDATE (the layer checks that they agree).
PREDICT_WINDOW_UPDATE: Final = 1


class StackHooks(Protocol):
    """What a connection needs from the layer that owns it."""

    counters: TcpCounters

    def transmit(self, local_ip: bytes, remote_ip: bytes, segment: TcpSegment) -> None: ...

    def transmit_fields(
        self,
        local_ip: bytes,
        remote_ip: bytes,
        src_port: int,
        dst_port: int,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes | memoryview,
    ) -> None: ...

    def post_event(self, conn: TcpConnection, event: TcpEvent) -> None: ...

    def mark_dirty(self, conn: TcpConnection) -> None: ...

    def reschedule(self, conn: TcpConnection, deadline: float | None) -> None: ...

    def allow_challenge_ack(self, now: float) -> bool: ...

    def connection_established(self, conn: TcpConnection) -> None: ...

    def connection_closed(self, conn: TcpConnection) -> None: ...


class TcpConnection:
    """A TCP connection; create it through ``TcpLayer.connect`` or ``TcpLayer.listen``."""

    def __init__(
        self,
        stack: StackHooks,
        config: TcpConfig,
        local_ip: bytes,
        local_port: int,
        remote_ip: bytes,
        remote_port: int,
        iss: int,
        *,
        passive: bool,
        shared: Any = None,
    ) -> None:
        """``shared``: a cffi ``struct arx_tcb *`` to hold the sequence variables, on the
        compiled path (header prediction); None keeps them in Python."""
        self._stack = stack
        self.local_ip = local_ip
        self.local_port = local_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.passive = passive
        counters = stack.counters
        shift = window_shift(config.recv_buffer)
        tcb = ControlBlock(iss, shift) if shared is None else SharedControlBlock(iss, shift, shared)
        timers = Timers()
        # What the parts leave for the layer during an entry point, in order; handed on
        # by ``_tell_layer`` before the entry point returns. (The parts do not hold this
        # connection: see ``lifecycle``.)
        self._notices: list[TcpEvent | Notice] = []
        notify = self._notices.append
        # Owned by the sender and the receiver; the lifecycle releases them at the end.
        send_buffer = bytearray()
        reassembly = Reassembler(config.max_ooo_fragments)
        lifecycle = Lifecycle(
            tcb,
            timers,
            config,
            send_buffer,
            reassembly,
            passive=passive,
            notify=notify,
        )
        receiver = Receiver(tcb, timers, config, counters, lifecycle, reassembly, notify=notify)
        sender = Sender(
            tcb,
            timers,
            receiver,
            config,
            counters,
            lifecycle,
            send_buffer,
            local_port=local_port,
            remote_port=remote_port,
            transmit=partial(stack.transmit, local_ip, remote_ip),
            transmit_fields=partial(stack.transmit_fields, local_ip, remote_ip, local_port, remote_port),
            notify=notify,
        )
        self._tcb = tcb
        self._shared = shared
        self._timers = timers
        self._lifecycle = lifecycle
        self._receiver = receiver
        self._sender = sender
        self._arrival = Arrival(
            tcb,
            timers,
            sender,
            receiver,
            lifecycle,
            config,
            counters,
            notify=notify,
            allow_challenge_ack=stack.allow_challenge_ack,
        )
        self.congestion: NewReno = sender.congestion

    def __repr__(self) -> str:
        tcb = self._tcb
        return (
            f"TcpConnection({self.local_port}->{self.remote_port} {tcb.state.value} "
            f"una={tcb.snd_una} nxt={tcb.snd_nxt} rcv_nxt={tcb.rcv_nxt})"
        )

    # The control block, read-only from outside.

    @property
    def state(self) -> TcpState:
        return self._tcb.state

    @property
    def close_reason(self) -> CloseReason | None:
        return self._tcb.close_reason

    @property
    def iss(self) -> int:
        return self._tcb.iss

    @property
    def irs(self) -> int:
        return self._tcb.irs

    @property
    def snd_una(self) -> int:
        return self._tcb.snd_una

    @property
    def snd_nxt(self) -> int:
        return self._tcb.snd_nxt

    @property
    def snd_max(self) -> int:
        return self._tcb.snd_max

    @property
    def snd_wnd(self) -> int:
        return self._tcb.snd_wnd

    @property
    def max_snd_wnd(self) -> int:
        return self._tcb.max_snd_wnd

    @property
    def snd_mss(self) -> int:
        return self._tcb.snd_mss

    @property
    def rcv_nxt(self) -> int:
        return self._tcb.rcv_nxt

    @property
    def fin_received(self) -> bool:
        return self._tcb.fin_received

    # The application's calls.

    @property
    def four_tuple(self) -> tuple[bytes, int, bytes, int]:
        return (self.local_ip, self.local_port, self.remote_ip, self.remote_port)

    @property
    def readable(self) -> int:
        """Bytes ready for recv()."""
        return len(self._receiver.buffer)

    @property
    def eof(self) -> bool:
        """True once the peer's FIN arrived and every byte before it was read."""
        return self._tcb.fin_received and not self._receiver.buffer

    @property
    def send_space(self) -> int:
        """How many bytes send() would accept now."""
        tcb = self._tcb
        if tcb.state not in SENDABLE_STATES or tcb.fin_seq is not None:
            return 0
        return self._sender.space()

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to the free send-buffer space; returns how many bytes were taken.

        Transmission happens on the layer's next ``on_timer``/``flush`` (the layer's
        deadline becomes due at once), so ``send`` needs no clock.
        """
        tcb = self._tcb
        if tcb.state not in SENDABLE_STATES or tcb.fin_seq is not None:
            if tcb.close_reason == CloseReason.RESET:
                raise ConnectionResetError("connection reset by peer")
            raise BrokenPipeError("connection is closed for sending")
        count = self._sender.write(data)
        if count:
            self._stack.mark_dirty(self)  # the layer flushes us on its next turn
        return count

    def recv(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` received bytes; b"" when none are ready (see ``eof``)."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        data = self._receiver.read(max_bytes)
        if self._notices:
            self._tell_layer()
        return data

    def close(self, now: float) -> None:
        """Graceful close: FIN after the queued data (RFC 9293 3.10.4)."""
        tcb = self._tcb
        state = tcb.state
        if state == TcpState.SYN_SENT:
            self._lifecycle.terminate(CloseReason.NORMAL, now)
            self._tell_layer()
        elif state in (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            self._sender.queue_fin()
            if state == TcpState.ESTABLISHED:
                tcb.state = TcpState.FIN_WAIT_1
            elif state == TcpState.CLOSE_WAIT:
                tcb.state = TcpState.LAST_ACK
            # In SYN-RECEIVED the FIN waits for ESTABLISHED (RFC 9293 3.10.4).
            self._sender.output(now)
            self._report_timers()
        if self._notices:
            self._tell_layer()

    def abort(self, now: float) -> None:
        """Send RST if synchronized and forget the connection (RFC 9293 3.10.5)."""
        state = self._tcb.state
        if state == TcpState.SYN_RECEIVED or (
            state in SYNCHRONIZED_STATES and state != TcpState.TIME_WAIT
        ):
            # Not a rewound SND.NXT: the peer may hold bytes up to SND.MAX, and an RST
            # below its RCV.NXT would be ignored (RFC 5961 3.2); nor past its window.
            self._sender.send_rst(self._sender.control_seq())
        self._lifecycle.terminate(CloseReason.ABORTED, now)
        self._tell_layer()

    # The layer's calls.

    def next_deadline(self) -> float | None:
        """The earliest armed timer, or None."""
        return self._timers.earliest()

    def _tell_layer(self) -> None:
        """Hand the layer the events and notices the parts left, in the order they left
        them: the same calls, in the same order, as if the parts had made them."""
        stack = self._stack
        notices = self._notices
        for notice in notices:
            # One type check first: DataReadable is the common case, and each comparison
            # with an enum member costs a class attribute lookup.
            if isinstance(notice, Notice):
                if notice is Notice.OUTPUT_DUE:
                    stack.mark_dirty(self)
                elif notice is Notice.ESTABLISHED:
                    stack.connection_established(self)
                else:
                    stack.connection_closed(self)
            else:
                stack.post_event(self, notice)
        notices.clear()

    def _report_timers(self) -> None:
        """Tell the layer where the earliest timer now lies. Every public entry point that
        may move a timer ends with this: the layer keeps no other view of our timers."""
        self._stack.reschedule(self, self._timers.earliest())

    def open_active(self, now: float) -> None:
        """Send SYN (RFC 9293 3.10.1 active OPEN)."""
        self._tcb.state = TcpState.SYN_SENT
        self._sender.send_syn(now, with_ack=False)
        self._report_timers()

    def open_passive(self, syn: TcpSegment, now: float) -> None:
        """A listener got ``syn``: enter SYN-RECEIVED and answer SYN-ACK (RFC 9293 3.10.7.2)."""
        self._arrival.listen_syn(syn, now)
        self._report_timers()

    def segment_arrived(self, seg: TcpSegment, now: float) -> None:
        """Process one parsed segment for this connection (RFC 9293 3.10.7)."""
        tcb = self._tcb
        state = tcb.state
        if state == TcpState.CLOSED:
            return
        if state == TcpState.SYN_SENT:
            self._arrival.syn_sent(seg, now)
        else:
            self._arrival.synchronized(seg, now)
        if tcb.state != TcpState.CLOSED:
            self._sender.output(now)
            self._stack.reschedule(self, self._timers.earliest())
        if self._notices:
            self._tell_layer()

    def predicted_arrival(self, frame: bytes, predict: Any, summary: Any, now: float) -> bool:
        """Header prediction (the compiled path): ``predict`` is ``arx_tcp_predict``, which
        takes the segment in ``frame`` if it is the common case of RFC 9293 3.10.7.4 and
        leaves ``summary``; the rest of what ``segment_arrived`` would do for it happens
        here, in the same order. False when the segment must take ``segment_arrived``.

        Prediction needs a ``shared`` control block; what only Python knows is checked
        first (C sees just the struct): no reassembly, SACK scoreboard, recovery or FIN.
        """
        receiver = self._receiver
        sender = self._sender
        if self._shared is None or not (receiver.prediction_ok() and sender.prediction_ok()):
            return False
        if not predict(self._shared, frame, len(frame), summary):
            return False
        sender.predicted_ack(summary.ack, summary.acked, summary.flags & PREDICT_WINDOW_UPDATE, now)
        length = summary.payload_len
        if length:
            receiver.predicted_text(frame, summary.payload_offset, length, now)
        sender.output(now)
        self._stack.reschedule(self, self._timers.earliest())
        if self._notices:
            self._tell_layer()
        return True

    def flush(self, now: float) -> None:
        """Send what the application queued since the last call."""
        if self._tcb.state != TcpState.CLOSED:
            self._sender.output(now)
            self._report_timers()

    def on_timer(self, now: float) -> None:
        """Run whatever timers are due at ``now``."""
        self._run_timers(now)
        if self._tcb.state != TcpState.CLOSED:
            self._report_timers()
        if self._notices:
            self._tell_layer()

    def _run_timers(self, now: float) -> None:
        """The due timers in a fixed order: TIME-WAIT ends everything; a retransmission
        timeout supersedes the tail loss probe; a due delayed ACK rides on the output."""
        tcb = self._tcb
        timers = self._timers
        sender = self._sender
        if timers.time_wait is not None and now >= timers.time_wait:
            timers.time_wait = None
            self._lifecycle.terminate(CloseReason.NORMAL, now)
            return
        if timers.retransmit is not None and now >= timers.retransmit:
            timers.retransmit = None
            timers.probe = None
            sender.on_retransmit_timeout(now)
            if tcb.state == TcpState.CLOSED:
                return
        if timers.probe is not None and now >= timers.probe:
            timers.probe = None
            sender.on_probe_timeout(now)
        if timers.persist is not None and now >= timers.persist:
            timers.persist = None
            sender.on_persist_timeout(now)
            if tcb.state == TcpState.CLOSED:
                return
        if timers.delayed_ack is not None and now >= timers.delayed_ack:
            timers.delayed_ack = None
            tcb.ack_now = True
        sender.output(now)
