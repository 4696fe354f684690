"""The receiving half of a connection: the receive buffer, reassembly of out-of-order
text, delivery to the application, the FIN, and the window and SACK blocks we announce.

It sends nothing itself: it asks for an ACK through ``ControlBlock.ack_now`` or the
delayed-ACK timer, and the sender builds the segment with ``window_field`` and
``ack_options``.
"""

from __future__ import annotations

from libos.net.tcp.control_block import ControlBlock
from libos.net.tcp.lifecycle import Lifecycle, Notice, Notify
from libos.net.tcp.reassembly import Reassembler
from libos.net.tcp.seq import seq_add, seq_diff, seq_gt
from libos.net.tcp.timers import Timers
from libos.net.tcp.types import (
    DATA_STATES,
    DataReadable,
    PeerClosed,
    TcpConfig,
    TcpCounters,
    TcpState,
)
from vdev.wire.tcp import MAX_SACK_BLOCKS, MAX_WINDOW_SCALE, NO_OPTIONS, TcpOptions, TcpSegment


def window_shift(buffer_size: int) -> int:
    """The smallest RFC 7323 shift that lets the 16-bit field cover the whole buffer."""
    shift = 0
    while (buffer_size >> shift) > 0xFFFF and shift < MAX_WINDOW_SCALE:
        shift += 1
    return shift


class Receiver:
    """Receive buffer, reassembly queue and receive window of one connection."""

    __slots__ = (
        "_tcb",
        "_timers",
        "_config",
        "_counters",
        "_lifecycle",
        "_notify",
        "buffer",
        "reassembly",
        "syn_window",
        "_sack_recent",
        "_ooo_fin_seq",
    )

    def __init__(
        self,
        tcb: ControlBlock,
        timers: Timers,
        config: TcpConfig,
        counters: TcpCounters,
        lifecycle: Lifecycle,
        reassembly: Reassembler,
        *,
        notify: Notify,
    ) -> None:
        self._tcb = tcb
        self._timers = timers
        self._config = config
        self._counters = counters
        self._lifecycle = lifecycle
        self._notify = notify
        # Bytes in order, not yet read by the application.
        self.buffer = bytearray()
        self.reassembly = reassembly
        # The window our SYN or SYN-ACK offers: unscaled there (RFC 7323 2.2).
        self.syn_window = min(config.recv_buffer, 0xFFFF)
        # The sequence numbers of the latest out-of-order arrivals, newest first: RFC 2018
        # section 4 wants the block holding the latest one first.
        self._sack_recent: list[int] = []
        # A FIN that arrived ahead of a hole, taken once the hole is filled.
        self._ooo_fin_seq: int | None = None

    def read(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` in-order bytes for the application (``max_bytes`` > 0)."""
        buffer = self.buffer
        count = min(max_bytes, len(buffer))
        if count == 0:
            return b""
        data = bytes(buffer[:count])
        del buffer[:count]
        if self._tcb.state in DATA_STATES and self.window_opened():
            self._tcb.window_update = True
            self._notify(Notice.OUTPUT_DUE)
        return data

    def receive(self, seg: TcpSegment, now: float) -> None:
        """Take the (trimmed, in-window) text of ``seg``: RFC 9293 3.10.7.4, seventh check."""
        tcb = self._tcb
        offset = seq_diff(seg.seq, tcb.rcv_nxt)
        payload = seg.payload
        if offset > 0:
            # Out of order: hold it and send a duplicate ACK at once (RFC 5681 4.2).
            if self.reassembly.insert(offset, payload):
                recent = self._sack_recent
                if seg.seq in recent:
                    recent.remove(seg.seq)
                recent.insert(0, seg.seq)
                del recent[MAX_SACK_BLOCKS:]
            else:
                self._counters.drop_reassembly_full += 1
            tcb.ack_now = True
            return
        buffer = self.buffer
        was_empty = not buffer
        buffer += payload
        tcb.rcv_nxt = seq_add(tcb.rcv_nxt, len(payload))
        if len(self.reassembly):
            more = self.reassembly.advance(len(payload))
            if more:
                buffer += more
                tcb.rcv_nxt = seq_add(tcb.rcv_nxt, len(more))
                tcb.ack_now = True  # a hole was filled: ACK at once (RFC 5681 4.2)
        if self._ooo_fin_seq is not None and self._ooo_fin_seq == tcb.rcv_nxt:
            self._ooo_fin_seq = None
            self.fin_arrived(now)
        if was_empty:
            self._notify(DataReadable())
        # Delayed ACK (RFC 1122 4.2.3.2, RFC 5681 4.2): every second segment at least.
        tcb.segments_unacked += 1
        if tcb.segments_unacked >= 2:
            tcb.ack_now = True
        elif self._timers.delayed_ack is None:
            self._timers.delayed_ack = now + self._config.delayed_ack

    def prediction_ok(self) -> bool:
        """Whether an in-order segment would take only the plain branch of ``receive``:
        nothing held for reassembly, no FIN waiting behind a hole."""
        return not self.reassembly and self._ooo_fin_seq is None

    def predicted_text(self, frame: bytes, offset: int, length: int, now: float) -> None:
        """``receive`` for text that header prediction found in order (``prediction_ok``
        held) and for which C already moved RCV.NXT: the same buffer, event and ACK
        decisions, without the segment object."""
        buffer = self.buffer
        was_empty = not buffer
        with memoryview(frame) as view:
            buffer += view[offset : offset + length]
        if was_empty:
            self._notify(DataReadable())
        tcb = self._tcb
        tcb.segments_unacked += 1
        if tcb.segments_unacked >= 2:
            tcb.ack_now = True
        elif self._timers.delayed_ack is None:
            self._timers.delayed_ack = now + self._config.delayed_ack

    def fin_at(self, fin_seq: int, now: float) -> None:
        """A FIN occupies ``fin_seq``: RFC 9293 3.10.7.4, eighth check. Taken now if it is
        next in sequence; held if text before it is missing."""
        tcb = self._tcb
        if fin_seq == tcb.rcv_nxt:
            self.fin_arrived(now)
        elif tcb.state in DATA_STATES:
            self._ooo_fin_seq = fin_seq
            tcb.ack_now = True

    def fin_arrived(self, now: float) -> None:
        """The FIN is next in sequence: it takes one sequence number, ends the stream for
        the application and moves the state on (RFC 9293 3.10.7.4, eighth check)."""
        tcb = self._tcb
        if tcb.fin_received:
            tcb.ack_now = True
            return
        tcb.fin_received = True
        tcb.rcv_nxt = seq_add(tcb.rcv_nxt, 1)
        self.reassembly.clear()
        tcb.ack_now = True
        self._notify(PeerClosed())
        state = tcb.state
        if state in (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED):
            tcb.state = TcpState.CLOSE_WAIT
        elif state == TcpState.FIN_WAIT_1:
            # Our FIN is not yet acknowledged (else we would be in FIN-WAIT-2).
            tcb.state = TcpState.CLOSING
        elif state == TcpState.FIN_WAIT_2:
            self._lifecycle.enter_time_wait(now)

    def window_field(self) -> int:
        """The window to advertise, scaled; it never moves the right edge left.

        Receiver silly-window avoidance (RFC 9293 3.8.6.2.2): the offered edge moves
        right only by at least min(buffer/2, MSS). Rounding up to the scale unit may
        offer up to two units more than the free space; the buffer takes that slack.
        """
        tcb = self._tcb
        config = self._config
        shift = tcb.rcv_shift
        rcv_nxt = tcb.rcv_nxt
        free = config.recv_buffer - len(self.buffer)
        current = max(seq_diff(tcb.rcv_adv, rcv_nxt), 0)
        window = current
        if free - current >= min(config.recv_buffer // 2, config.mss):
            window = free
        field = min((window + (1 << shift) - 1) >> shift, 0xFFFF)
        edge = seq_add(rcv_nxt, field << shift)
        if seq_gt(edge, tcb.rcv_adv):
            tcb.rcv_adv = edge
        return field

    def window_opened(self) -> bool:
        """After a read: is the window now worth announcing (as Linux does, when it at
        least doubles and grows by an MSS)?"""
        tcb = self._tcb
        config = self._config
        current = max(seq_diff(tcb.rcv_adv, tcb.rcv_nxt), 0)
        free = config.recv_buffer - len(self.buffer)
        return free >= 2 * current and free - current >= min(
            config.mss, config.recv_buffer // 2
        )

    def ack_options(self) -> TcpOptions:
        """SACK blocks while out-of-order data is held (RFC 2018 section 4): the block
        holding the latest arrival first, then the blocks of the arrivals before it, then
        any others, at most four (no timestamps take the room)."""
        if not self._tcb.sack_ok or not len(self.reassembly):
            return NO_OPTIONS
        rcv_nxt = self._tcb.rcv_nxt
        ranges = self.reassembly.ranges()
        chosen: list[tuple[int, int]] = []
        for seq in self._sack_recent:
            offset = seq_diff(seq, rcv_nxt)
            for start, length in ranges:
                if start <= offset < start + length and (start, length) not in chosen:
                    chosen.append((start, length))
                    break
        for held in ranges:
            if len(chosen) >= MAX_SACK_BLOCKS:
                break
            if held not in chosen:
                chosen.append(held)
        blocks = tuple(
            (seq_add(rcv_nxt, start), seq_add(rcv_nxt, start + length))
            for start, length in chosen[:MAX_SACK_BLOCKS]
        )
        return TcpOptions(sack_blocks=blocks)
