"""SEGMENT ARRIVES (RFC 9293 3.10.7) for a connection that exists.

A SYN to a listener (3.10.7.2, the part after the layer found the listener), a segment in
SYN-SENT (3.10.7.3), and the checks in order for SYN-RECEIVED and the synchronized states
(3.10.7.4): acceptability, trimming to the window, RST, SYN, ACK, text, FIN (URG is not
implemented: urgent bytes are delivered in line), with the RFC 5961 defences. The steps
decide; the sender, the receiver and the lifecycle act.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from libos.net.tcp.control_block import DEFAULT_PEER_MSS, ControlBlock
from libos.net.tcp.lifecycle import Lifecycle, Notify
from libos.net.tcp.receiver import Receiver
from libos.net.tcp.sender import Sender
from libos.net.tcp.seq import seq_add, seq_diff, seq_ge, seq_gt, seq_in_window, seq_lt
from libos.net.tcp.timers import Timers
from libos.net.tcp.types import (
    DATA_STATES,
    CloseReason,
    Reset,
    TcpConfig,
    TcpCounters,
    TcpState,
)
from vdev.wire.tcp import ACK, FIN, MAX_WINDOW_SCALE, RST, SYN, TcpSegment

# A peer announcing a tiny MSS would make us send one segment per byte; clamp it.
MIN_PEER_MSS: Final = 64


class Arrival:
    """The segment-arrival steps of one connection."""

    __slots__ = (
        "_tcb",
        "_timers",
        "_sender",
        "_receiver",
        "_lifecycle",
        "_config",
        "_counters",
        "_notify",
        "_allow_challenge_ack",
        "_last_oow_ack",
    )

    def __init__(
        self,
        tcb: ControlBlock,
        timers: Timers,
        sender: Sender,
        receiver: Receiver,
        lifecycle: Lifecycle,
        config: TcpConfig,
        counters: TcpCounters,
        *,
        notify: Notify,
        allow_challenge_ack: Callable[[float], bool],
    ) -> None:
        self._tcb = tcb
        self._timers = timers
        self._sender = sender
        self._receiver = receiver
        self._lifecycle = lifecycle
        self._config = config
        self._counters = counters
        self._notify = notify
        self._allow_challenge_ack = allow_challenge_ack
        self._last_oow_ack = float("-inf")

    def listen_syn(self, syn: TcpSegment, now: float) -> None:
        """A listener got ``syn``: enter SYN-RECEIVED and answer SYN-ACK (RFC 9293 3.10.7.2)."""
        tcb = self._tcb
        self._take_syn_options(syn)
        tcb.irs = syn.seq
        tcb.rcv_nxt = seq_add(syn.seq, 1)
        tcb.snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 2.2)
        tcb.max_snd_wnd = tcb.snd_wnd
        tcb.snd_wl1 = syn.seq
        tcb.snd_wl2 = syn.ack
        tcb.state = TcpState.SYN_RECEIVED
        self._sender.send_syn(now, with_ack=True)

    def _take_syn_options(self, syn: TcpSegment) -> None:
        """What the peer's SYN settles: MSS (RFC 9293 3.7.1), SACK (RFC 2018) and window
        scaling (RFC 7323)."""
        tcb = self._tcb
        config = self._config
        congestion = self._sender.congestion
        options = syn.options
        peer_mss = DEFAULT_PEER_MSS if options.mss is None else options.mss
        tcb.snd_mss = max(min(peer_mss, config.mss), MIN_PEER_MSS)
        congestion.set_mss(tcb.snd_mss)
        tcb.sack_ok = config.sack and options.sack_permitted
        congestion.sack = tcb.sack_ok
        if options.window_scale is None:
            # RFC 7323 1.3: scaling only when both SYNs carry the option.
            tcb.scaling = False
            tcb.snd_shift = 0
            tcb.rcv_shift = 0
        else:
            tcb.scaling = True
            tcb.snd_shift = min(options.window_scale, MAX_WINDOW_SCALE)  # RFC 7323 2.3

    def syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 3.10.7.3."""
        tcb = self._tcb
        sender = self._sender
        flags = seg.flags
        ack_ok = False
        if flags & ACK:
            # First: the ACK must cover our SYN and nothing we did not send.
            if not (seq_gt(seg.ack, tcb.iss) and seq_ge(tcb.snd_max, seg.ack)):
                if not flags & RST:
                    sender.send_rst(seg.ack)
                self._counters.drop_bad_ack += 1
                return
            ack_ok = True
        if flags & RST:
            # Second: an RST is believed only if it acknowledges our SYN.
            if ack_ok:
                self._counters.rst_received += 1
                self._notify(Reset())
                self._lifecycle.terminate(CloseReason.REFUSED, now)
            else:
                self._counters.drop_state += 1
            return
        if not flags & SYN:
            self._counters.drop_state += 1
            return
        self._take_syn_options(seg)
        tcb.irs = seg.seq
        tcb.rcv_nxt = seq_add(seg.seq, 1)
        tcb.rcv_adv = seq_add(tcb.rcv_nxt, self._receiver.syn_window)
        tcb.snd_wnd = seg.window  # unscaled in a SYN (RFC 7323 2.2)
        tcb.max_snd_wnd = tcb.snd_wnd
        tcb.snd_wl1 = seg.seq
        tcb.snd_wl2 = seg.ack
        if ack_ok:
            sender.ack_advanced(seg.ack, now)
            self._establish(now)
            tcb.ack_now = True
        else:
            # Simultaneous open (RFC 9293 3.10.7.3, Figure 8): answer SYN-ACK.
            tcb.state = TcpState.SYN_RECEIVED
            sender.rtt_end = None
            sender.send_syn(now, with_ack=True)

    def synchronized(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 3.10.7.4 for SYN-RECEIVED and the synchronized states."""
        tcb = self._tcb
        flags = seg.flags
        state = tcb.state
        if state == TcpState.SYN_RECEIVED and flags & SYN and seg.seq == tcb.irs:
            if not flags & ACK:
                # The peer did not get our SYN-ACK and repeated its SYN: repeat the
                # SYN-ACK, and take no RTT sample from the handshake (Karn's rule).
                self._sender.send_syn(now, with_ack=True)
                self._sender.rtt_end = None
                return
            # Simultaneous open (RFC 9293 Figure 8, line 6): the peer's SYN-ACK repeats
            # the SYN we already took; what is left is the ACK of ours.
            seg.flags &= ~SYN
            seg.seq = seq_add(seg.seq, 1)
            flags = seg.flags

        # First: is the segment inside the receive window?
        window = max(seq_diff(tcb.rcv_adv, tcb.rcv_nxt), 0)
        if not self._acceptable(seg, window):
            self._counters.drop_out_of_window += 1
            if flags & SYN:
                # RFC 5961 4.2: a SYN gets a challenge ACK whatever its sequence number.
                self._challenge_ack(now)
            elif not flags & RST:
                if state == TcpState.TIME_WAIT and flags & FIN:
                    # A repeated FIN: our last ACK was lost; restart 2*MSL (RFC 9293 3.10.7.4).
                    self._timers.time_wait = now + 2 * self._config.msl
                # RFC 9293 3.10.7.4: answer an unacceptable segment with an ACK. A
                # segment with data gets it at once: it is an old duplicate (a spurious
                # or go-back-N retransmission, a duplicate from the wire), and only our
                # ACK stops the sender from retransmitting it again on a backed-off
                # timer. Segments without data are answered at most once per interval,
                # so that no exchange of unacceptable ACKs can become an ACK storm;
                # Linux draws the same line (tcp_oow_rate_limited).
                if seg.payload or flags & FIN:
                    tcb.ack_now = True
                elif now - self._last_oow_ack >= self._config.out_of_window_ack_interval:
                    self._last_oow_ack = now
                    tcb.ack_now = True
            return
        self._trim(seg, window)

        # Second: RST, per RFC 5961 3.2: exact match resets, otherwise a challenge ACK.
        if flags & RST:
            if seg.seq == tcb.rcv_nxt:
                self._counters.rst_received += 1
                terminate = self._lifecycle.terminate
                if state == TcpState.SYN_RECEIVED and self._lifecycle.passive:
                    terminate(CloseReason.RESET, now)  # back to LISTEN: nobody was told
                elif state == TcpState.SYN_RECEIVED:
                    self._notify(Reset())
                    terminate(CloseReason.REFUSED, now)
                elif state in (TcpState.CLOSING, TcpState.LAST_ACK, TcpState.TIME_WAIT):
                    terminate(CloseReason.NORMAL, now)
                else:
                    self._notify(Reset())
                    terminate(CloseReason.RESET, now)
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
            if not (seq_gt(seg.ack, tcb.snd_una) and seq_ge(tcb.snd_max, seg.ack)):
                self._sender.send_rst(seg.ack)
                self._counters.drop_bad_ack += 1
                return
            tcb.snd_wnd = seg.window << tcb.snd_shift
            tcb.max_snd_wnd = max(tcb.max_snd_wnd, tcb.snd_wnd)
            tcb.snd_wl1 = seg.seq
            tcb.snd_wl2 = seg.ack
            self._establish(now)
            if tcb.fin_seq is not None:
                tcb.state = TcpState.FIN_WAIT_1
        if not self._ack(seg, now):
            return
        if tcb.state == TcpState.CLOSED:
            return

        # Sixth, the URG bit, is not implemented. Seventh: segment text.
        if seg.payload:
            if tcb.state in DATA_STATES:
                self._receiver.receive(seg, now)
            else:
                self._counters.drop_state += 1

        # Eighth: FIN. The segment's flags after trimming, not ``flags``: a FIN past the
        # window (or already taken) was cut with the text around it and must not count,
        # or we would take a FIN at our window's edge and lose the bytes behind it.
        if seg.flags & FIN:
            self._receiver.fin_at(seq_add(seg.seq, len(seg.payload)), now)

    def _acceptable(self, seg: TcpSegment, window: int) -> bool:
        """The four cases of RFC 9293 3.10.7.4 (first check), with two allowances."""
        rcv_nxt = self._tcb.rcv_nxt
        length = seg.seg_len
        if window == 0:
            # "If the RCV.WND is zero, no segments will be acceptable, but special
            # allowance should be made to accept valid ACKs, URGs, and RSTs": a segment
            # at RCV.NXT is taken for its control fields, and ``_trim`` cuts its text.
            # Without this, a peer sending data while our application does not read
            # could never get its ACKs through to us.
            return seg.seq == rcv_nxt
        if length == 0:
            # Up to RCV.NXT+RCV.WND inclusive: a sender that has filled our window sends
            # its ACKs at SND.NXT, which is then exactly our right edge (Linux does so,
            # tcp_acceptable_seq, and accepts the same itself, tcp_sequence). Refusing
            # them would leave that sender's view of our data unacknowledged.
            return seq_in_window(seg.seq, rcv_nxt, window + 1)
        last = seq_add(seg.seq, length - 1)
        return seq_in_window(seg.seq, rcv_nxt, window) or seq_in_window(
            last, rcv_nxt, window
        )

    def _trim(self, seg: TcpSegment, window: int) -> None:
        """Cut what lies before RCV.NXT or past the window (RFC 9293 3.10.7.4)."""
        rcv_nxt = self._tcb.rcv_nxt
        before = seq_diff(rcv_nxt, seg.seq)
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
        excess = seq_diff(seq_add(seg.seq, len(seg.payload)), seq_add(rcv_nxt, window))
        if excess > 0:
            seg.payload = seg.payload[: len(seg.payload) - excess]
            seg.flags &= ~FIN  # the FIN lies past the window
            self._tcb.ack_now = True  # tell the sender where our window really ends

    def _ack(self, seg: TcpSegment, now: float) -> bool:
        """The ACK check of RFC 9293 3.10.7.4 (fifth) with the RFC 5961 5.2 range check.

        Returns False when the segment must be dropped.
        """
        tcb = self._tcb
        ack = seg.ack
        if seq_gt(ack, tcb.snd_max):
            # Acknowledges something never sent: ACK back and drop (RFC 9293, RFC 5961 5.2).
            self._counters.drop_bad_ack += 1
            self._challenge_ack(now)
            return False
        if seq_lt(ack, seq_add(tcb.snd_una, -tcb.max_snd_wnd)):
            # Older than anything the peer could legitimately repeat (RFC 5961 5.2).
            self._counters.drop_bad_ack += 1
            self._challenge_ack(now)
            return False
        if tcb.state == TcpState.TIME_WAIT:
            if seg.flags & FIN:
                tcb.ack_now = True
                self._timers.time_wait = now + 2 * self._config.msl
            return False
        self._sender.on_ack(seg, now)
        if tcb.fin_seq is not None and seq_gt(tcb.snd_una, tcb.fin_seq):
            self._our_fin_acked(now)
        return True

    def _challenge_ack(self, now: float) -> None:
        """RFC 5961 sections 3-5, rate-limited per section 7."""
        if self._allow_challenge_ack(now):
            self._counters.challenge_acks += 1
            self._sender.send_ack()
        else:
            self._counters.challenge_acks_suppressed += 1

    def _establish(self, now: float) -> None:
        self._tcb.state = TcpState.ESTABLISHED
        self._sender.on_established(now)
        self._lifecycle.announce_established()

    def _our_fin_acked(self, now: float) -> None:
        """Our FIN is acknowledged: FIN-WAIT-1, CLOSING and LAST-ACK move on (RFC 9293
        3.10.7.4, fifth check)."""
        tcb = self._tcb
        state = tcb.state
        if state == TcpState.FIN_WAIT_1:
            tcb.state = TcpState.FIN_WAIT_2
        elif state == TcpState.CLOSING:
            self._lifecycle.enter_time_wait(now)
        elif state == TcpState.LAST_ACK:
            self._lifecycle.terminate(CloseReason.NORMAL, now)
