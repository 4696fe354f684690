"""One TCP connection as a sans-I/O state machine (RFC 9293).

The connection never touches a socket or a clock: ``TcpLayer`` hands it parsed segments
with the time they arrived, calls ``on_timer(now)`` at ``next_deadline()``, and carries
the segments it emits to the IP layer. Events go to the layer's event queue.

Timers kept here: retransmission (RFC 6298), tail loss probe (RFC 8985 section 7, with
SACK), delayed ACK (RFC 1122 4.2.3.2), persist (zero-window probing, RFC 9293 3.8.6.1) and
TIME-WAIT (2*MSL, RFC 9293 3.4.2).

Selective acknowledgments (RFC 2018) are offered and used when the peer offers them too:
the receiver reports its out-of-order blocks, the sender keeps a scoreboard and recovers
losses by RFC 6675 (``sack``); without them NewReno (RFC 6582) does.

Not implemented: Nagle's algorithm (small writes go out at once), D-SACK, timestamps,
urgent data (URG is ignored and its bytes are delivered in line), ECN, reuse of a
TIME-WAIT 4-tuple by a new SYN (RFC 6191: such a SYN gets a challenge ACK).
"""

from __future__ import annotations

from typing import Final, Protocol

from libos.net.tcp.congestion import NewReno
from libos.net.tcp.reassembly import Reassembler
from libos.net.tcp.rto import RtoEstimator
from libos.net.tcp.sack import DUPTHRESH, SackScoreboard
from libos.net.tcp.seq import seq_add, seq_diff, seq_ge, seq_gt, seq_in_window, seq_lt
from libos.net.tcp.types import (
    SYNCHRONIZED_STATES,
    Closed,
    CloseReason,
    Connected,
    DataReadable,
    PeerClosed,
    Reset,
    TcpConfig,
    TcpCounters,
    TcpEvent,
    TcpState,
)
from vdev.wire.tcp import (
    ACK,
    FIN,
    MAX_SACK_BLOCKS,
    MAX_WINDOW_SCALE,
    NO_OPTIONS,
    PSH,
    RST,
    SYN,
    TcpOptions,
    TcpSegment,
)

# RFC 9293 3.7.1: without an MSS option the peer accepts 536-byte segments.
DEFAULT_PEER_MSS: Final = 536
# A peer announcing a tiny MSS would make us send one segment per byte; clamp it.
MIN_PEER_MSS: Final = 64

_DATA_STATES: Final = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
_SENDABLE_STATES: Final = frozenset(
    {TcpState.SYN_SENT, TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT}
)
_OUTPUT_STATES: Final = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT_1,
        TcpState.CLOSE_WAIT,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
    }
)


class StackHooks(Protocol):
    """What a connection needs from the layer that owns it."""

    counters: TcpCounters

    def transmit(self, conn: TcpConnection, segment: TcpSegment) -> None: ...

    def post_event(self, conn: TcpConnection, event: TcpEvent) -> None: ...

    def mark_dirty(self, conn: TcpConnection) -> None: ...

    def reschedule(self, conn: TcpConnection, deadline: float | None) -> None: ...

    def allow_challenge_ack(self, now: float) -> bool: ...

    def connection_established(self, conn: TcpConnection) -> None: ...

    def connection_closed(self, conn: TcpConnection) -> None: ...


def _window_shift(buffer_size: int) -> int:
    """The smallest RFC 7323 shift that lets the 16-bit field cover the whole buffer."""
    shift = 0
    while (buffer_size >> shift) > 0xFFFF and shift < MAX_WINDOW_SCALE:
        shift += 1
    return shift


_MAX_RXT_MARKS: Final = 256
# RFC 8985 7.2 suggests no floor; ours keeps a probe from racing a scheduling hiccup.
MIN_PROBE_TIMEOUT: Final = 0.010
WORST_CASE_DELAYED_ACK: Final = 0.200


def _options_length(options: TcpOptions) -> int:
    """Header bytes the options of a data or ACK segment take (only SACK is sent there)."""
    blocks = len(options.sack_blocks)
    return 4 + 8 * blocks if blocks else 0


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
    ) -> None:
        self._stack = stack
        self._config = config
        self._counters = stack.counters
        self.local_ip = local_ip
        self.local_port = local_port
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.passive = passive
        self.state = TcpState.CLOSED
        self.close_reason: CloseReason | None = None
        self.iss = iss
        self.irs = 0
        # Send sequence space (RFC 9293 3.3.1). snd_max is the highest sequence number
        # ever sent: after a timeout snd_nxt goes back to snd_una (go-back-N) while
        # ACKs up to snd_max remain acceptable.
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self._snd_wl1 = 0
        self._snd_wl2 = 0
        self._snd_shift = 0
        self._rcv_shift = _window_shift(config.recv_buffer)
        self._scaling = False
        self.snd_mss = DEFAULT_PEER_MSS
        # Bytes written by the application and not yet acknowledged; _send_seq is the
        # sequence number of _send_buf[0].
        self._send_buf = bytearray()
        self._send_seq = seq_add(iss, 1)
        self._fin_seq: int | None = None
        # Receive sequence space; _rcv_adv is the right edge of the window we offered,
        # which never moves left (RFC 9293 3.8.6.2.2).
        self.rcv_nxt = 0
        self._rcv_adv = 0
        self._syn_window = 0
        self._rcv_buf = bytearray()
        self._reassembly = Reassembler(config.max_ooo_fragments)
        self._ooo_fin_seq: int | None = None
        self.fin_received = False
        self._rto = RtoEstimator(min_rto=config.min_rto, max_rto=config.max_rto)
        self.congestion = NewReno(DEFAULT_PEER_MSS, iss)
        self._rtt_end: int | None = None
        self._rtt_start = 0.0
        self._retries = 0
        self._syn_lost = False
        self._syn_acked = False
        self._rto_deadline: float | None = None
        self._pto_deadline: float | None = None
        self._tlp_sent = False
        self._delack_deadline: float | None = None
        self._persist_deadline: float | None = None
        self._persist_interval = 0.0
        self._persist_probes = 0
        self._timewait_deadline: float | None = None
        self._segments_unacked = 0
        self._ack_now = False
        self._window_update = False
        self._connected_posted = False
        self._closed_posted = False
        self._last_oow_ack = float("-inf")
        # SACK (RFC 2018): negotiated in the handshake. As receiver: the sequence numbers
        # of the latest out-of-order arrivals, newest first (section 4 wants the block of
        # the latest one first). As sender: the scoreboard and HighRxt of RFC 6675.
        self._sack_ok = False
        self._sack_recent: list[int] = []
        self._scoreboard = SackScoreboard()
        self._high_rxt = iss
        # Retransmissions of this recovery: sequence number -> SND.MAX when it was sent.
        # Data sent after a retransmission and SACKed before it means the retransmission
        # itself was lost (the idea of RACK, RFC 8985, for the head of the queue).
        self._rxt_marks: dict[int, int] = {}

    def __repr__(self) -> str:
        return (
            f"TcpConnection({self.local_port}->{self.remote_port} {self.state.value} "
            f"una={self.snd_una} nxt={self.snd_nxt} rcv_nxt={self.rcv_nxt})"
        )


    @property
    def four_tuple(self) -> tuple[bytes, int, bytes, int]:
        return (self.local_ip, self.local_port, self.remote_ip, self.remote_port)

    @property
    def readable(self) -> int:
        """Bytes ready for recv()."""
        return len(self._rcv_buf)

    @property
    def eof(self) -> bool:
        """True once the peer's FIN arrived and every byte before it was read."""
        return self.fin_received and not self._rcv_buf

    @property
    def send_space(self) -> int:
        """How many bytes send() would accept now."""
        if self.state not in _SENDABLE_STATES or self._fin_seq is not None:
            return 0
        return max(self._config.send_buffer - len(self._send_buf), 0)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to the free send-buffer space; returns how many bytes were taken.

        Transmission happens on the layer's next ``on_timer``/``flush`` (the layer's
        deadline becomes due at once), so ``send`` needs no clock.
        """
        if self.state not in _SENDABLE_STATES or self._fin_seq is not None:
            if self.close_reason == CloseReason.RESET:
                raise ConnectionResetError("connection reset by peer")
            raise BrokenPipeError("connection is closed for sending")
        count = min(len(data), self._config.send_buffer - len(self._send_buf))
        if count <= 0:
            return 0
        with memoryview(data) as view:
            self._send_buf += view[:count]
        self._stack.mark_dirty(self)
        return count

    def recv(self, max_bytes: int) -> bytes:
        """Up to ``max_bytes`` received bytes; b"" when none are ready (see ``eof``)."""
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        count = min(max_bytes, len(self._rcv_buf))
        if count == 0:
            return b""
        data = bytes(self._rcv_buf[:count])
        del self._rcv_buf[:count]
        if self.state in _DATA_STATES and self._window_opened():
            self._window_update = True
            self._stack.mark_dirty(self)
        return data

    def close(self, now: float) -> None:
        """Graceful close: FIN after the queued data (RFC 9293 3.10.4)."""
        state = self.state
        if state == TcpState.SYN_SENT:
            self._terminate(CloseReason.NORMAL, now)
        elif state in (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            if self._fin_seq is None:
                self._fin_seq = seq_add(self._send_seq, len(self._send_buf))
            if state == TcpState.ESTABLISHED:
                self.state = TcpState.FIN_WAIT_1
            elif state == TcpState.CLOSE_WAIT:
                self.state = TcpState.LAST_ACK
            # In SYN-RECEIVED the FIN waits for ESTABLISHED (RFC 9293 3.10.4).
            self._output(now)
            self._report_timers()

    def abort(self, now: float) -> None:
        """Send RST if synchronized and forget the connection (RFC 9293 3.10.5)."""
        if self.state == TcpState.SYN_RECEIVED or (
            self.state in SYNCHRONIZED_STATES and self.state != TcpState.TIME_WAIT
        ):
            # Not a rewound SND.NXT: the peer may hold bytes up to SND.MAX, and an RST
            # below its RCV.NXT would be ignored (RFC 5961 3.2); nor past its window.
            self._send_rst(self._control_seq())
        self._terminate(CloseReason.ABORTED, now)

    def next_deadline(self) -> float | None:
        """The earliest armed timer, or None. Written out field by field: the layer asks
        after every entry point, so this sits on the per-segment path."""
        deadline = self._rto_deadline
        candidate = self._pto_deadline
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        candidate = self._delack_deadline
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        candidate = self._persist_deadline
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        candidate = self._timewait_deadline
        if candidate is not None and (deadline is None or candidate < deadline):
            deadline = candidate
        return deadline

    def _report_timers(self) -> None:
        """Tell the layer where the earliest timer now lies. Every public entry point that
        may move a timer ends with this: the layer keeps no other view of our timers."""
        self._stack.reschedule(self, self.next_deadline())

    def open_active(self, now: float) -> None:
        """Send SYN (RFC 9293 3.10.1 active OPEN)."""
        self.state = TcpState.SYN_SENT
        self._send_syn(now, with_ack=False)
        self._report_timers()

    def open_passive(self, syn: TcpSegment, now: float) -> None:
        """A listener got ``syn``: enter SYN-RECEIVED and answer SYN-ACK (RFC 9293 3.10.7.2)."""
        self._take_syn_options(syn)
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self.snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 2.2)
        self.max_snd_wnd = self.snd_wnd
        self._snd_wl1 = syn.seq
        self._snd_wl2 = syn.ack
        self.state = TcpState.SYN_RECEIVED
        self._send_syn(now, with_ack=True)
        self._report_timers()

    def _take_syn_options(self, syn: TcpSegment) -> None:
        options = syn.options
        peer_mss = DEFAULT_PEER_MSS if options.mss is None else options.mss
        self.snd_mss = max(min(peer_mss, self._config.mss), MIN_PEER_MSS)
        self.congestion.set_mss(self.snd_mss)
        self._sack_ok = self._config.sack and options.sack_permitted
        self.congestion.sack = self._sack_ok
        if options.window_scale is None:
            # RFC 7323 1.3: scaling only when both SYNs carry the option.
            self._scaling = False
            self._snd_shift = 0
            self._rcv_shift = 0
        else:
            self._scaling = True
            self._snd_shift = min(options.window_scale, MAX_WINDOW_SCALE)  # RFC 7323 2.3

    def _send_syn(self, now: float, *, with_ack: bool) -> None:
        self._syn_window = min(self._config.recv_buffer, 0xFFFF)
        # A SYN always offers scaling; a SYN-ACK only answers an offer (RFC 7323 1.3).
        offer_scale = not with_ack or self._scaling
        options = TcpOptions(
            mss=self._config.mss,
            window_scale=self._rcv_shift if offer_scale else None,
            sack_permitted=self._config.sack and (not with_ack or self._sack_ok),
        )
        segment = TcpSegment(
            self.local_port,
            self.remote_port,
            self.iss,
            self.rcv_nxt if with_ack else 0,
            SYN | ACK if with_ack else SYN,
            self._syn_window,
            b"",
            options,
        )
        if with_ack:
            self._rcv_adv = seq_add(self.rcv_nxt, self._syn_window)
        self.snd_nxt = seq_add(self.iss, 1)
        self.snd_max = self.snd_nxt
        if self._rtt_end is None and not self._syn_lost:
            self._rtt_end = self.snd_nxt
            self._rtt_start = now
        self._stack.transmit(self, segment)
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto.rto


    def segment_arrived(self, seg: TcpSegment, now: float) -> None:
        """Process one parsed segment for this connection (RFC 9293 3.10.7)."""
        state = self.state
        if state == TcpState.CLOSED:
            return
        if state == TcpState.SYN_SENT:
            self._syn_sent_input(seg, now)
        else:
            self._synchronized_input(seg, now)
        if self.state != TcpState.CLOSED:
            self._output(now)
            self._report_timers()

    def _syn_sent_input(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 3.10.7.3."""
        flags = seg.flags
        ack_ok = False
        if flags & ACK:
            # First: the ACK must cover our SYN and nothing we did not send.
            if not (seq_gt(seg.ack, self.iss) and seq_ge(self.snd_max, seg.ack)):
                if not flags & RST:
                    self._send_rst(seg.ack)
                self._counters.drop_bad_ack += 1
                return
            ack_ok = True
        if flags & RST:
            # Second: an RST is believed only if it acknowledges our SYN.
            if ack_ok:
                self._counters.rst_received += 1
                self._post(Reset())
                self._terminate(CloseReason.REFUSED, now)
            else:
                self._counters.drop_state += 1
            return
        if not flags & SYN:
            self._counters.drop_state += 1
            return
        self._take_syn_options(seg)
        self.irs = seg.seq
        self.rcv_nxt = seq_add(seg.seq, 1)
        self._rcv_adv = seq_add(self.rcv_nxt, self._syn_window)
        self.snd_wnd = seg.window  # unscaled in a SYN (RFC 7323 2.2)
        self.max_snd_wnd = self.snd_wnd
        self._snd_wl1 = seg.seq
        self._snd_wl2 = seg.ack
        if ack_ok:
            self._ack_advanced(seg.ack, now)
            self._establish(now)
            self._ack_now = True
        else:
            # Simultaneous open (RFC 9293 3.10.7.3, Figure 8): answer SYN-ACK.
            self.state = TcpState.SYN_RECEIVED
            self._rtt_end = None
            self._send_syn(now, with_ack=True)

    def _synchronized_input(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 3.10.7.4 for SYN-RECEIVED and the synchronized states."""
        flags = seg.flags
        state = self.state
        if state == TcpState.SYN_RECEIVED and flags & SYN and seg.seq == self.irs:
            if not flags & ACK:
                # The peer did not get our SYN-ACK and repeated its SYN: repeat the
                # SYN-ACK, and take no RTT sample from the handshake (Karn's rule).
                self._send_syn(now, with_ack=True)
                self._rtt_end = None
                return
            # Simultaneous open (RFC 9293 Figure 8, line 6): the peer's SYN-ACK repeats
            # the SYN we already took; what is left is the ACK of ours.
            seg.flags &= ~SYN
            seg.seq = seq_add(seg.seq, 1)
            flags = seg.flags

        # First: is the segment inside the receive window?
        window = max(seq_diff(self._rcv_adv, self.rcv_nxt), 0)
        if not self._acceptable(seg, window):
            self._counters.drop_out_of_window += 1
            if flags & SYN:
                # RFC 5961 4.2: a SYN gets a challenge ACK whatever its sequence number.
                self._challenge_ack(now)
            elif not flags & RST:
                if state == TcpState.TIME_WAIT and flags & FIN:
                    # A repeated FIN: our last ACK was lost; restart 2*MSL (RFC 9293 3.10.7.4).
                    self._timewait_deadline = now + 2 * self._config.msl
                # RFC 9293 3.10.7.4: answer an unacceptable segment with an ACK. A
                # segment with data gets it at once: it is an old duplicate (a spurious
                # or go-back-N retransmission, a duplicate from the wire), and only our
                # ACK stops the sender from retransmitting it again on a backed-off
                # timer. Segments without data are answered at most once per interval,
                # so that no exchange of unacceptable ACKs can become an ACK storm;
                # Linux draws the same line (tcp_oow_rate_limited).
                if seg.payload or flags & FIN:
                    self._ack_now = True
                elif now - self._last_oow_ack >= self._config.out_of_window_ack_interval:
                    self._last_oow_ack = now
                    self._ack_now = True
            return
        self._trim(seg, window)

        # Second: RST, per RFC 5961 3.2: exact match resets, otherwise a challenge ACK.
        if flags & RST:
            if seg.seq == self.rcv_nxt:
                self._counters.rst_received += 1
                if state == TcpState.SYN_RECEIVED and self.passive:
                    self._terminate(CloseReason.RESET, now)  # back to LISTEN: nobody was told
                elif state == TcpState.SYN_RECEIVED:
                    self._post(Reset())
                    self._terminate(CloseReason.REFUSED, now)
                elif state in (TcpState.CLOSING, TcpState.LAST_ACK, TcpState.TIME_WAIT):
                    self._terminate(CloseReason.NORMAL, now)
                else:
                    self._post(Reset())
                    self._terminate(CloseReason.RESET, now)
            else:
                self._challenge_ack(now)
            return

        # Fourth: a SYN in a synchronized state gets a challenge ACK (RFC 5961 4.2).
        if flags & SYN:
            self._challenge_ack(now)
            return

        # Fifth: the ACK field.
        if not flags & ACK:
            self._counters.drop_state += 1
            return
        if state == TcpState.SYN_RECEIVED:
            if not (seq_gt(seg.ack, self.snd_una) and seq_ge(self.snd_max, seg.ack)):
                self._send_rst(seg.ack)
                self._counters.drop_bad_ack += 1
                return
            self.snd_wnd = seg.window << self._snd_shift
            self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
            self._snd_wl1 = seg.seq
            self._snd_wl2 = seg.ack
            self._establish(now)
            if self._fin_seq is not None:
                self.state = TcpState.FIN_WAIT_1
        if not self._process_ack(seg, now):
            return
        if self.state == TcpState.CLOSED:
            return

        # Seventh: segment text.
        if seg.payload:
            if self.state in _DATA_STATES:
                self._receive_data(seg, now)
            else:
                self._counters.drop_state += 1

        # Eighth: FIN.
        if flags & FIN:
            fin_seq = seq_add(seg.seq, len(seg.payload))
            if fin_seq == self.rcv_nxt:
                self._fin_arrived(now)
            elif self.state in _DATA_STATES:
                self._ooo_fin_seq = fin_seq
                self._ack_now = True

    def _acceptable(self, seg: TcpSegment, window: int) -> bool:
        """The four cases of RFC 9293 3.10.7.4 (first check), with two allowances."""
        length = seg.seg_len
        if window == 0:
            # "If the RCV.WND is zero, no segments will be acceptable, but special
            # allowance should be made to accept valid ACKs, URGs, and RSTs": a segment
            # at RCV.NXT is taken for its control fields, and ``_trim`` cuts its text.
            # Without this, a peer sending data while our application does not read
            # could never get its ACKs through to us.
            return seg.seq == self.rcv_nxt
        if length == 0:
            # Up to RCV.NXT+RCV.WND inclusive: a sender that has filled our window sends
            # its ACKs at SND.NXT, which is then exactly our right edge (Linux does so,
            # tcp_acceptable_seq, and accepts the same itself, tcp_sequence). Refusing
            # them would leave that sender's view of our data unacknowledged.
            return seq_in_window(seg.seq, self.rcv_nxt, window + 1)
        last = seq_add(seg.seq, length - 1)
        return seq_in_window(seg.seq, self.rcv_nxt, window) or seq_in_window(
            last, self.rcv_nxt, window
        )

    def _trim(self, seg: TcpSegment, window: int) -> None:
        """Cut what lies before RCV.NXT or past the window (RFC 9293 3.10.7.4)."""
        before = seq_diff(self.rcv_nxt, seg.seq)
        if before > 0:
            if seg.flags & SYN:
                seg.flags &= ~SYN
                before -= 1
                seg.seq = seq_add(seg.seq, 1)
            if before > 0:
                payload_len = len(seg.payload)
                if before > payload_len:
                    seg.flags &= ~FIN  # the FIN itself is old
                    before = payload_len
                seg.payload = seg.payload[before:]
                seg.seq = seq_add(seg.seq, before)
        excess = seq_diff(seq_add(seg.seq, len(seg.payload)), seq_add(self.rcv_nxt, window))
        if excess > 0:
            seg.payload = seg.payload[: len(seg.payload) - excess]
            seg.flags &= ~FIN  # the FIN lies past the window
            self._ack_now = True  # tell the sender where our window really ends

    def _process_ack(self, seg: TcpSegment, now: float) -> bool:
        """ACK processing of RFC 9293 3.10.7.4 with the RFC 5961 5.2 check.

        Returns False when the segment must be dropped.
        """
        ack = seg.ack
        if seq_gt(ack, self.snd_max):
            # Acknowledges something never sent: ACK back and drop (RFC 9293, RFC 5961 5.2).
            self._counters.drop_bad_ack += 1
            self._challenge_ack(now)
            return False
        if seq_lt(ack, seq_add(self.snd_una, -self.max_snd_wnd)):
            # Older than anything the peer could legitimately repeat (RFC 5961 5.2).
            self._counters.drop_bad_ack += 1
            self._challenge_ack(now)
            return False
        if self.state == TcpState.TIME_WAIT:
            if seg.flags & FIN:
                self._ack_now = True
                self._timewait_deadline = now + 2 * self._config.msl
            return False
        scaled_window = seg.window << self._snd_shift
        self._persist_probes = 0
        advanced = seq_gt(ack, self.snd_una)
        if advanced:
            self._ack_advanced(ack, now)
        if self._sack_ok:
            self._scoreboard.update(seg.options.sack_blocks, self.snd_una, self.snd_max)
        if (
            not advanced
            and ack == self.snd_una
            and not self._scoreboard
            and not seg.payload
            and not seg.flags & (SYN | FIN)
            and scaled_window == self.snd_wnd
            and self.snd_max != self.snd_una
        ):
            # A duplicate ACK in the sense of RFC 5681 section 2.
            flight = seq_diff(self.snd_max, self.snd_una)
            if self.congestion.on_dup_ack(self.snd_una, self.snd_max, flight):
                self._counters.fast_retransmits += 1
                self._rtt_end = None  # Karn: no sample across a retransmission
                self._retransmit_head(now)
        # Window update (RFC 9293 3.10.7.4): only from a segment newer than the last one.
        if seq_lt(self._snd_wl1, seg.seq) or (
            self._snd_wl1 == seg.seq and seq_ge(ack, self._snd_wl2)
        ):
            self.snd_wnd = scaled_window
            self.max_snd_wnd = max(self.max_snd_wnd, scaled_window)
            self._snd_wl1 = seg.seq
            self._snd_wl2 = ack
            if scaled_window:
                self._persist_deadline = None
        if self._scoreboard and self.state in _OUTPUT_STATES:
            self._sack_recovery(now)
        if self._fin_seq is not None and seq_gt(self.snd_una, self._fin_seq):
            self._our_fin_acked(now)
        return True

    def _sack_recovery(self, now: float) -> None:
        """Loss recovery by the scoreboard (RFC 6675 section 5), after each ACK."""
        congestion = self.congestion
        board = self._scoreboard
        mss = self.snd_mss
        if not congestion.in_recovery:
            # Enter when SND.UNA counts as lost (three SACKed segments above it: the SACK
            # form of three duplicate ACKs), unless these ACKs still belong to the loss
            # episode that a timeout or an earlier recovery handled (RFC 6582 section 4).
            if not board.is_lost(0, mss) or not seq_gt(self.snd_una, congestion.recover):
                return
            congestion.enter_sack_recovery(seq_diff(self.snd_max, self.snd_una), self.snd_max)
            self._counters.fast_retransmits += 1
            self._rtt_end = None  # Karn: no sample across a retransmission
            self._rxt_marks.clear()
            # Step 4.3: the first lost segment goes at once, whatever the pipe says.
            sent = self._retransmit_at(now, self.snd_una, mss)
            self._high_rxt = seq_add(self.snd_una, sent)
        else:
            mark = self._rxt_marks.get(self.snd_una)
            if (
                mark is not None
                and board.sacked_above(seq_diff(mark, self.snd_una)) > (DUPTHRESH - 1) * mss
            ):
                # The head was retransmitted, and three segments' worth sent after it
                # arrived while it did not: that retransmission was lost too. Resend it
                # now rather than wait for the (backed-off) retransmission timer.
                self._counters.lost_retransmits += 1
                self._retransmit_at(now, self.snd_una, mss)
        # Step (C): while cwnd - pipe >= 1 SMSS, send NextSeg: a lost segment above
        # HighRxt (rule 1), else new data the peer's window allows (rule 2). Bounded per
        # ACK by what the congestion window lets out.
        data_end = seq_add(self._send_seq, len(self._send_buf))
        for _ in range(congestion.cwnd // mss + 1):
            base = self.snd_una
            high_rxt = seq_diff(self._high_rxt, base)
            pipe = board.pipe(seq_diff(self.snd_max, base), high_rxt, mss)
            if congestion.cwnd - pipe < mss:
                return
            hole = board.next_lost(high_rxt, mss)
            if hole is not None:
                seq = seq_add(base, hole[0])
                sent = self._retransmit_at(now, seq, hole[1])
                if not sent:
                    return
                self._high_rxt = seq_add(seq, sent)
                continue
            room = seq_diff(seq_add(base, self.snd_wnd), self.snd_max)
            unsent = seq_diff(data_end, self.snd_max)
            if room <= 0 or unsent <= 0:
                return
            if not self._send_range(now, self.snd_max, min(room, unsent, mss)):
                return

    def _ack_advanced(self, ack: int, now: float) -> None:
        """SND.UNA moves to ``ack``: free buffer, sample RTT, drive NewReno and the RTO."""
        acked = seq_diff(ack, self.snd_una)
        syn_acked = not self._syn_acked
        self._syn_acked = True
        flight_before = seq_diff(self.snd_max, self.snd_una)
        data_acked = seq_diff(ack, self._send_seq)
        if data_acked > 0:
            data_acked = min(data_acked, len(self._send_buf))
            del self._send_buf[:data_acked]
            self._send_seq = seq_add(self._send_seq, data_acked)
        self.snd_una = ack
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack
        if self._rtt_end is not None and seq_ge(ack, self._rtt_end):
            self._rto.sample(now - self._rtt_start)
            self._rtt_end = None
        self._retries = 0
        self._tlp_sent = False
        self._rto.reset_backoff()
        if not syn_acked:
            if self.congestion.on_new_ack(ack, acked, flight_before):
                self._retransmit_head(now)
        # RFC 6298 5.2 and 5.3: stop the timer when all is acknowledged, else restart it.
        self._rto_deadline = None if ack == self.snd_max else now + self._rto.rto
        if data_acked > 0 and self._fin_seq is None:
            self._stack.mark_dirty(self)

    def _establish(self, now: float) -> None:
        self.state = TcpState.ESTABLISHED
        if self._syn_lost:
            self._rto.restart_after_syn_loss()
        self._rto_deadline = None if self.snd_una == self.snd_max else now + self._rto.rto
        self._stack.connection_established(self)
        if not self._connected_posted:
            self._connected_posted = True
            self._post(Connected())

    def _our_fin_acked(self, now: float) -> None:
        state = self.state
        if state == TcpState.FIN_WAIT_1:
            self.state = TcpState.FIN_WAIT_2
        elif state == TcpState.CLOSING:
            self._enter_time_wait(now)
        elif state == TcpState.LAST_ACK:
            self._terminate(CloseReason.NORMAL, now)

    def _receive_data(self, seg: TcpSegment, now: float) -> None:
        offset = seq_diff(seg.seq, self.rcv_nxt)
        payload = seg.payload
        if offset > 0:
            # Out of order: hold it and send a duplicate ACK at once (RFC 5681 4.2).
            if self._reassembly.insert(offset, payload):
                recent = self._sack_recent
                if seg.seq in recent:
                    recent.remove(seg.seq)
                recent.insert(0, seg.seq)
                del recent[MAX_SACK_BLOCKS:]
            else:
                self._counters.drop_reassembly_full += 1
            self._ack_now = True
            return
        was_empty = not self._rcv_buf
        self._rcv_buf += payload
        self.rcv_nxt = seq_add(self.rcv_nxt, len(payload))
        if len(self._reassembly):
            more = self._reassembly.advance(len(payload))
            if more:
                self._rcv_buf += more
                self.rcv_nxt = seq_add(self.rcv_nxt, len(more))
                self._ack_now = True  # a hole was filled: ACK at once (RFC 5681 4.2)
        if self._ooo_fin_seq is not None and self._ooo_fin_seq == self.rcv_nxt:
            self._ooo_fin_seq = None
            self._fin_arrived(now)
        if was_empty:
            self._post(DataReadable())
        # Delayed ACK (RFC 1122 4.2.3.2, RFC 5681 4.2): every second segment at least.
        self._segments_unacked += 1
        if self._segments_unacked >= 2:
            self._ack_now = True
        elif self._delack_deadline is None:
            self._delack_deadline = now + self._config.delayed_ack

    def _fin_arrived(self, now: float) -> None:
        """RFC 9293 3.10.7.4, eighth check."""
        if self.fin_received:
            self._ack_now = True
            return
        self.fin_received = True
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        self._reassembly.clear()
        self._ack_now = True
        self._post(PeerClosed())
        state = self.state
        if state in (TcpState.SYN_RECEIVED, TcpState.ESTABLISHED):
            self.state = TcpState.CLOSE_WAIT
        elif state == TcpState.FIN_WAIT_1:
            # Our FIN is not yet acknowledged (else we would be in FIN-WAIT-2).
            self.state = TcpState.CLOSING
        elif state == TcpState.FIN_WAIT_2:
            self._enter_time_wait(now)


    def flush(self, now: float) -> None:
        """Send what the application queued since the last call."""
        if self.state != TcpState.CLOSED:
            self._output(now)
            self._report_timers()

    def _output(self, now: float) -> None:
        if self.state in _OUTPUT_STATES:
            self._send_data(now)
        if self._window_update:
            self._window_update = False
            self._ack_now = True
        if self._ack_now and (
            self.state in SYNCHRONIZED_STATES or self.state == TcpState.SYN_RECEIVED
        ):
            self._send_ack()
        if self._sack_ok:
            self._arm_probe(now)

    def _arm_probe(self, now: float) -> None:
        """Tail loss probe timer (RFC 8985 7.2): a loss at the end of a flight leaves too
        few segments behind it for SACK to call it lost, and the RTO (200 ms at least)
        is a hundred round trips on a LAN; after two smoothed RTTs without progress, one
        probe segment draws the SACK that starts fast recovery instead."""
        srtt = self._rto.srtt
        if (
            self._tlp_sent
            or srtt is None
            or self._retries
            or self.snd_una == self.snd_max
            or self.state not in _OUTPUT_STATES
        ):
            self._pto_deadline = None
            return
        deadline = now + max(2 * srtt, MIN_PROBE_TIMEOUT)
        if seq_diff(self.snd_max, self.snd_una) <= self.snd_mss:
            # One segment out: its ACK may be a delayed one (RFC 8985 7.2, WCDelAckT).
            deadline += WORST_CASE_DELAYED_ACK
        rto_deadline = self._rto_deadline
        self._pto_deadline = (
            deadline if rto_deadline is None or deadline < rto_deadline else None
        )

    def _on_probe_timeout(self, now: float) -> None:
        """RFC 8985 7.3: send new data if the peer's window allows, else the last
        segment again; in SACK recovery, the next lost segment whatever the pipe says."""
        if self.snd_una == self.snd_max or self.state not in _OUTPUT_STATES:
            return
        self._tlp_sent = True
        self._counters.tail_loss_probes += 1
        mss = self.snd_mss
        hole = self._scoreboard.next_lost(seq_diff(self._high_rxt, self.snd_una), mss)
        data_end = seq_add(self._send_seq, len(self._send_buf))
        room = seq_diff(seq_add(self.snd_una, self.snd_wnd), self.snd_max)
        if self.congestion.in_recovery and hole is not None:
            seq = seq_add(self.snd_una, hole[0])
            self._rtt_end = None
            sent = self._retransmit_at(now, seq, hole[1])
            self._high_rxt = seq_add(seq, sent)
        elif room > 0 and seq_diff(data_end, self.snd_max) > 0:
            self._send_range(now, self.snd_max, min(room, mss))
        else:
            flight = seq_diff(self.snd_max, self.snd_una)
            self._rtt_end = None  # Karn
            self._send_range(now, seq_add(self.snd_max, -min(flight, mss)), mss)
        self._rto_deadline = now + self._rto.rto

    def _send_data(self, now: float) -> None:
        data_end = seq_add(self._send_seq, len(self._send_buf))
        if self._fin_seq is None and self.snd_nxt == data_end == self.snd_max:
            # Everything written was sent and no FIN is due: the loop below would stop at
            # once and the zero-window check find nothing to probe for. This is the case
            # of most calls (each ACK, each received request), so skip the set-up.
            return
        window = min(self.snd_wnd, self.congestion.cwnd)
        options = self._ack_options()
        # RFC 6691: the MSS bounds the data of a segment without options; options that
        # ride along take their room from the data.
        mss = self.snd_mss - _options_length(options)
        scoreboard = self._scoreboard
        while True:
            limit = mss
            if scoreboard and seq_lt(self.snd_nxt, self.snd_max):
                # Going back over sent data (after a timeout): skip what the peer
                # reported holding, and stop each segment at the next reported block.
                offset = seq_diff(self.snd_nxt, self.snd_una)
                held = scoreboard.sacked_range_at(offset)
                if held is not None:
                    self.snd_nxt = seq_add(self.snd_una, held[1])
                    continue
                following = scoreboard.next_sacked_start(offset)
                if following is not None:
                    limit = min(limit, following - offset)
            flight = seq_diff(self.snd_nxt, self.snd_una)
            unsent = max(seq_diff(data_end, self.snd_nxt), 0)
            usable = window - flight
            if scoreboard and not self.congestion.in_recovery:
                # SACKed bytes have left the network: they free congestion window (the
                # pipe of RFC 6675), though not the peer's window. Before a loss is
                # declared this is limited transmit (RFC 3042): each ACK that reports
                # more data held lets one more segment out, which keeps the ACKs coming
                # that decide, three segments later, that the hole is a loss.
                usable = min(
                    self.snd_wnd - flight,
                    self.congestion.cwnd - flight + scoreboard.sacked_bytes,
                )
            count = min(limit, unsent, max(usable, 0))
            fin_now = (
                self._fin_seq is not None
                and seq_add(self.snd_nxt, count) == self._fin_seq
                and (usable > 0 or flight == 0)
            )
            if count == 0 and not fin_now:
                break
            if (
                count < unsent
                and count < limit
                and flight > 0
                and count * 2 < self.max_snd_wnd
            ):
                # Sender silly-window avoidance (RFC 9293 3.8.6.2.1): wait for a full
                # segment or half the largest window, unless nothing is in flight.
                break
            self._send_segment(now, count, fin_now, count == unsent, options)
            if fin_now:
                break
        if (
            self.snd_wnd == 0
            and self._persist_deadline is None
            and self._rto_deadline is None
            and (seq_diff(data_end, self.snd_nxt) > 0 or self._fin_pending())
        ):
            # Zero window and nothing in flight: probe it (RFC 9293 3.8.6.1).
            self._persist_interval = self._rto.rto
            self._persist_deadline = now + self._persist_interval

    def _fin_pending(self) -> bool:
        return self._fin_seq is not None and seq_ge(self._fin_seq, self.snd_nxt)

    def _send_segment(
        self, now: float, count: int, fin: bool, push: bool, options: TcpOptions = NO_OPTIONS
    ) -> None:
        seq = self.snd_nxt
        offset = seq_diff(seq, self._send_seq)
        flags = ACK
        if fin:
            flags |= FIN
        if push and count:
            flags |= PSH
        with memoryview(self._send_buf) as view:
            segment = TcpSegment(
                self.local_port,
                self.remote_port,
                seq,
                self.rcv_nxt,
                flags,
                self._window_field(),
                view[offset : offset + count],
                options,
            )
            self._stack.transmit(self, segment)
            segment.payload = b""
        end = seq_add(seq, count + fin)
        if seq_lt(seq, self.snd_max):
            self._counters.retransmits += 1
        elif self._rtt_end is None:
            self._rtt_end = end
            self._rtt_start = now
        self.snd_nxt = end
        if seq_gt(end, self.snd_max):
            self.snd_max = end
        self._acked_by_this_segment()
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rto.rto

    def _retransmit_head(self, now: float) -> None:
        """Resend the first unacknowledged segment, outside the window (RFC 5681 3.2)."""
        if self.state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            self._send_syn(now, with_ack=self.state == TcpState.SYN_RECEIVED)
            return
        self._send_range(now, self.snd_una, self.snd_mss)

    def _retransmit_at(self, now: float, seq: int, max_count: int) -> int:
        """``_send_range`` for a retransmission in SACK recovery, remembering SND.MAX."""
        marks = self._rxt_marks
        if len(marks) >= _MAX_RXT_MARKS:
            marks.clear()  # only the head's mark matters; an overflow just forgets
        marks[seq] = self.snd_max
        return self._send_range(now, seq, max_count)

    def _send_range(self, now: float, seq: int, max_count: int) -> int:
        """Send one segment of up to ``max_count`` bytes at ``seq`` (already sent or the
        next new byte), the FIN with it if it ends there; returns the bytes of sequence
        space sent. SND.NXT ends past the segment, never behind where it was."""
        options = self._ack_options()
        data_end = seq_add(self._send_seq, len(self._send_buf))
        count = min(max_count, self.snd_mss - _options_length(options))
        count = max(min(count, seq_diff(data_end, seq)), 0)
        fin = self._fin_seq is not None and seq_add(seq, count) == self._fin_seq
        if not count and not fin:
            return 0
        saved_nxt = self.snd_nxt
        self.snd_nxt = seq
        self._send_segment(now, count, fin, False, options)
        if seq_gt(saved_nxt, self.snd_nxt):
            self.snd_nxt = saved_nxt
        return count + fin

    def _control_seq(self) -> int:
        """The sequence number for a segment without data (an ACK, an RST on abort).

        The peer accepts a zero-length segment only inside its receive window, and when
        that window is zero only at exactly its RCV.NXT (RFC 9293 3.10.7.4). SND.NXT is
        not safe: after a timeout rewound it, the peer may hold bytes up to SND.MAX.
        SND.MAX is not safe either: if the last segments were lost and the peer's window
        then closed, SND.MAX lies past its window, every ACK we send is dropped unread and
        the peer retransmits into a void with a backed-off timer (seen against Linux over a
        lossy wire). So take SND.MAX capped at the right edge the peer last offered,
        SND.UNA + SND.WND, as Linux does (tcp_acceptable_seq).
        """
        if not self._syn_acked:
            return self.snd_max
        edge = seq_add(self.snd_una, self.snd_wnd)
        return edge if seq_lt(edge, self.snd_max) else self.snd_max

    def _ack_options(self) -> TcpOptions:
        """SACK blocks while out-of-order data is held (RFC 2018 section 4): the block
        holding the latest arrival first, then the blocks of the arrivals before it, then
        any others, at most four (no timestamps take the room)."""
        if not self._sack_ok or not len(self._reassembly):
            return NO_OPTIONS
        rcv_nxt = self.rcv_nxt
        ranges = self._reassembly.ranges()
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

    def _send_ack(self) -> None:
        segment = TcpSegment(
            self.local_port,
            self.remote_port,
            self._control_seq(),
            self.rcv_nxt,
            ACK,
            self._window_field(),
            b"",
            self._ack_options(),
        )
        self._stack.transmit(self, segment)
        self._acked_by_this_segment()

    def _send_rst(self, seq: int) -> None:
        segment = TcpSegment(self.local_port, self.remote_port, seq, 0, RST, 0)
        self._counters.rst_sent += 1
        self._stack.transmit(self, segment)

    def _acked_by_this_segment(self) -> None:
        self._ack_now = False
        self._window_update = False
        self._segments_unacked = 0
        self._delack_deadline = None

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 sections 3-5, rate-limited per section 7."""
        if self._stack.allow_challenge_ack(now):
            self._counters.challenge_acks += 1
            self._send_ack()
        else:
            self._counters.challenge_acks_suppressed += 1

    def _window_field(self) -> int:
        """The window to advertise, scaled; it never moves the right edge left.

        Receiver silly-window avoidance (RFC 9293 3.8.6.2.2): the offered edge moves
        right only by at least min(buffer/2, MSS). Rounding up to the scale unit may
        offer up to two units more than the free space; the buffer takes that slack.
        """
        shift = self._rcv_shift
        free = self._config.recv_buffer - len(self._rcv_buf)
        current = max(seq_diff(self._rcv_adv, self.rcv_nxt), 0)
        window = current
        if free - current >= min(self._config.recv_buffer // 2, self._config.mss):
            window = free
        field = min((window + (1 << shift) - 1) >> shift, 0xFFFF)
        edge = seq_add(self.rcv_nxt, field << shift)
        if seq_gt(edge, self._rcv_adv):
            self._rcv_adv = edge
        return field

    def _window_opened(self) -> bool:
        """After a read: is the window now worth announcing (as Linux does, when it at
        least doubles and grows by an MSS)?"""
        current = max(seq_diff(self._rcv_adv, self.rcv_nxt), 0)
        free = self._config.recv_buffer - len(self._rcv_buf)
        return free >= 2 * current and free - current >= min(
            self._config.mss, self._config.recv_buffer // 2
        )


    def on_timer(self, now: float) -> None:
        """Run whatever timers are due at ``now``."""
        self._run_timers(now)
        if self.state != TcpState.CLOSED:
            self._report_timers()

    def _run_timers(self, now: float) -> None:
        if self._timewait_deadline is not None and now >= self._timewait_deadline:
            self._timewait_deadline = None
            self._terminate(CloseReason.NORMAL, now)
            return
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._rto_deadline = None
            self._pto_deadline = None
            self._on_retransmit_timeout(now)
            if self.state == TcpState.CLOSED:
                return
        if self._pto_deadline is not None and now >= self._pto_deadline:
            self._pto_deadline = None
            self._on_probe_timeout(now)
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._persist_deadline = None
            self._on_persist_timeout(now)
            if self.state == TcpState.CLOSED:
                return
        if self._delack_deadline is not None and now >= self._delack_deadline:
            self._delack_deadline = None
            self._ack_now = True
        self._output(now)

    def _on_retransmit_timeout(self, now: float) -> None:
        """RFC 6298 5.4-5.7, RFC 5681 3.1 and RFC 6582 section 4."""
        self._retries += 1
        self._counters.timeouts += 1
        self._rtt_end = None  # Karn's rule
        state = self.state
        if state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            limit = self._config.max_syn_retries if state == TcpState.SYN_SENT else (
                self._config.max_synack_retries
            )
            if self._retries > limit:
                if state == TcpState.SYN_RECEIVED and self.passive:
                    self._counters.syn_received_expired += 1
                else:
                    self._counters.conn_aborted_timeout += 1
                self._terminate(CloseReason.TIMEOUT, now)
                return
            self._syn_lost = True
            self._rto.back_off()
            self._counters.retransmits += 1
            self._send_syn(now, with_ack=state == TcpState.SYN_RECEIVED)
            return
        if self.snd_una == self.snd_max:
            return
        if self.snd_wnd == 0:
            # The peer closed its window with data outstanding: probe instead of
            # counting retries, the peer is alive as long as it answers (RFC 9293 3.8.6.1).
            self.snd_nxt = self.snd_una
            self._retries = 0
            self._persist_interval = self._rto.rto
            self._persist_deadline = now + self._persist_interval
            return
        if self._retries > self._config.max_retries:
            self._counters.conn_aborted_timeout += 1
            self._terminate(CloseReason.TIMEOUT, now)
            return
        flight = seq_diff(self.snd_max, self.snd_una)
        self.congestion.on_timeout(flight, self.snd_max)
        self._rto.back_off()
        # Go back N: resend from SND.UNA as the (now one-segment) window allows.
        self.snd_nxt = self.snd_una
        self._send_data(now)
        if self._rto_deadline is None and self.snd_una != self.snd_max:
            self._rto_deadline = now + self._rto.rto

    def _on_persist_timeout(self, now: float) -> None:
        if self.snd_wnd != 0 or self.state not in _OUTPUT_STATES:
            return
        self._persist_probes += 1
        if self._persist_probes > self._config.max_retries:
            self._counters.conn_aborted_timeout += 1
            self._terminate(CloseReason.TIMEOUT, now)
            return
        # The probe carries SND.UNA - 1, a sequence number the receiver has already
        # seen: an unacceptable segment, which it must answer with an ACK carrying its
        # current window (RFC 9293 3.10.7.4), without us putting new data in flight.
        probe = TcpSegment(
            self.local_port,
            self.remote_port,
            seq_add(self.snd_una, -1),
            self.rcv_nxt,
            ACK,
            self._window_field(),
        )
        self._stack.transmit(self, probe)
        self._acked_by_this_segment()
        self._persist_interval = min(self._persist_interval * 2, self._config.max_rto)
        self._persist_deadline = now + self._persist_interval


    def _enter_time_wait(self, now: float) -> None:
        self.state = TcpState.TIME_WAIT
        self._rto_deadline = None
        self._pto_deadline = None
        self._persist_deadline = None
        self._send_buf.clear()
        self._post_closed(CloseReason.NORMAL)
        if self._config.msl <= 0:
            self._terminate(CloseReason.NORMAL, now)
            return
        self._timewait_deadline = now + 2 * self._config.msl

    def _terminate(self, reason: CloseReason, now: float) -> None:
        """Enter CLOSED, release buffers and timers, tell the layer."""
        if self.state == TcpState.CLOSED:
            return
        was_announced = self._connected_posted or not self.passive
        self.state = TcpState.CLOSED
        self.close_reason = self.close_reason or reason
        self._rto_deadline = None
        self._pto_deadline = None
        self._delack_deadline = None
        self._persist_deadline = None
        self._timewait_deadline = None
        self._send_buf.clear()
        self._reassembly.clear()
        if was_announced:
            self._post_closed(reason)
        self._stack.connection_closed(self)

    def _post_closed(self, reason: CloseReason) -> None:
        if not self._closed_posted:
            self._closed_posted = True
            self.close_reason = reason
            self._post(Closed(reason))

    def _post(self, event: TcpEvent) -> None:
        self._stack.post_event(self, event)
