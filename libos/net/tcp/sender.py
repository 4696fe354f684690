"""The sending half of a connection: the send buffer, segment building, acknowledgment
of our data, retransmission (RFC 6298, RFC 5681, NewReno of RFC 6582), SACK loss recovery
(RFC 6675), the tail loss probe (RFC 8985 section 7) and zero-window probes (RFC 9293
3.8.6.1).

Every segment the connection sends leaves here, ACKs included: the receiver only asks for
them (``ControlBlock.ack_now``) and supplies the window and the SACK blocks they carry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from libos.net.tcp.congestion import NewReno
from libos.net.tcp.control_block import DEFAULT_PEER_MSS, ControlBlock
from libos.net.tcp.lifecycle import Lifecycle, Notice, Notify
from libos.net.tcp.receiver import Receiver
from libos.net.tcp.rto import RtoEstimator
from libos.net.tcp.sack import DUPTHRESH, SackScoreboard
from libos.net.tcp.seq import SEQ_MASK, seq_add, seq_diff, seq_ge, seq_gt, seq_lt
from libos.net.tcp.timers import Timers
from libos.net.tcp.types import (
    OUTPUT_STATES,
    SYNCHRONIZED_STATES,
    CloseReason,
    TcpConfig,
    TcpCounters,
    TcpState,
)
from vdev.wire.tcp import ACK, FIN, NO_OPTIONS, PSH, RST, SYN, TcpOptions, TcpSegment

_MAX_RXT_MARKS: Final = 256
# RFC 8985 7.2 suggests no floor; ours keeps a probe from racing a scheduling hiccup.
MIN_PROBE_TIMEOUT: Final = 0.010
WORST_CASE_DELAYED_ACK: Final = 0.200


def _options_length(options: TcpOptions) -> int:
    """Header bytes the options of a data or ACK segment take (only SACK is sent there)."""
    blocks = len(options.sack_blocks)
    return 4 + 8 * blocks if blocks else 0


class Sender:
    """Send buffer, retransmission and recovery state of one connection."""

    __slots__ = (
        "_tcb",
        "_timers",
        "_receiver",
        "_config",
        "_counters",
        "_lifecycle",
        "_local_port",
        "_remote_port",
        "_transmit",
        "_transmit_fields",
        "_notify",
        "buffer",
        "buffer_seq",
        "rto",
        "congestion",
        "rtt_end",
        "_rtt_start",
        "_retries",
        "_syn_lost",
        "_syn_acked",
        "_tlp_sent",
        "_persist_interval",
        "_persist_probes",
        "_scoreboard",
        "_sacked",
        "_high_rxt",
        "_rxt_marks",
    )

    def __init__(
        self,
        tcb: ControlBlock,
        timers: Timers,
        receiver: Receiver,
        config: TcpConfig,
        counters: TcpCounters,
        lifecycle: Lifecycle,
        send_buffer: bytearray,
        *,
        local_port: int,
        remote_port: int,
        transmit: Callable[[TcpSegment], None],
        transmit_fields: Callable[[int, int, int, int, bytes | memoryview], None],
        notify: Notify,
    ) -> None:
        """``transmit`` hands a segment to the layer at once: its payload is a view of
        the send buffer, valid only during the call. ``transmit_fields`` does the same
        for a segment without options, given as (seq, ack, flags, window, payload): the
        common data and ACK segments then need no segment object."""
        self._tcb = tcb
        self._timers = timers
        self._receiver = receiver
        self._config = config
        self._counters = counters
        self._lifecycle = lifecycle
        self._local_port = local_port
        self._remote_port = remote_port
        self._transmit = transmit
        self._transmit_fields = transmit_fields
        self._notify = notify
        # Bytes written by the application and not yet acknowledged; buffer_seq is the
        # sequence number of buffer[0]. Only ever changed in place: the lifecycle holds
        # the same bytearray to release it.
        self.buffer = send_buffer
        self.buffer_seq = seq_add(tcb.iss, 1)
        self.rto = RtoEstimator(min_rto=config.min_rto, max_rto=config.max_rto)
        self.congestion = NewReno(DEFAULT_PEER_MSS, tcb.iss)
        # The RTT sample in progress: the segment end whose ACK completes it, None if none.
        self.rtt_end: int | None = None
        self._rtt_start = 0.0
        self._retries = 0
        self._syn_lost = False
        self._syn_acked = False
        self._tlp_sent = False
        self._persist_interval = 0.0
        self._persist_probes = 0
        # SACK (RFC 2018) as sender: the scoreboard and HighRxt of RFC 6675.
        self._scoreboard = SackScoreboard()
        self._sacked = self._scoreboard.ranges  # the same list, always: empty = no SACK state
        self._high_rxt = tcb.iss
        # Retransmissions of this recovery: sequence number -> SND.MAX when it was sent.
        # Data sent after a retransmission and SACKed before it means the retransmission
        # itself was lost (the idea of RACK, RFC 8985, for the head of the queue).
        self._rxt_marks: dict[int, int] = {}

    # The application's side.

    def space(self) -> int:
        """Free bytes in the send buffer."""
        return max(self._config.send_buffer - len(self.buffer), 0)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to the free space; returns how many bytes were taken. Sends nothing:
        the connection asks the layer for a flush."""
        buffer = self.buffer
        count = min(len(data), self._config.send_buffer - len(buffer))
        if count <= 0:
            return 0
        with memoryview(data) as view:
            buffer += view[:count]
        return count

    def queue_fin(self) -> None:
        """Our FIN follows the data queued so far (RFC 9293 3.10.4)."""
        tcb = self._tcb
        if tcb.fin_seq is None:
            tcb.fin_seq = seq_add(self.buffer_seq, len(self.buffer))

    # Output.

    def send_syn(self, now: float, *, with_ack: bool) -> None:
        """Send our SYN, or SYN-ACK (RFC 9293 3.10.1, 3.10.7.2)."""
        tcb = self._tcb
        config = self._config
        syn_window = self._receiver.syn_window
        # A SYN always offers scaling; a SYN-ACK only answers an offer (RFC 7323 1.3).
        offer_scale = not with_ack or tcb.scaling
        options = TcpOptions(
            mss=config.mss,
            window_scale=tcb.rcv_shift if offer_scale else None,
            sack_permitted=config.sack and (not with_ack or tcb.sack_ok),
        )
        segment = TcpSegment(
            self._local_port,
            self._remote_port,
            tcb.iss,
            tcb.rcv_nxt if with_ack else 0,
            SYN | ACK if with_ack else SYN,
            syn_window,
            b"",
            options,
        )
        if with_ack:
            tcb.rcv_adv = seq_add(tcb.rcv_nxt, syn_window)
        tcb.snd_nxt = seq_add(tcb.iss, 1)
        tcb.snd_max = tcb.snd_nxt
        if self.rtt_end is None and not self._syn_lost:
            self.rtt_end = tcb.snd_nxt
            self._rtt_start = now
        self._transmit(segment)
        if self._timers.retransmit is None:
            self._timers.retransmit = now + self.rto.rto

    def output(self, now: float) -> None:
        """Send what may go now: data, our FIN, a due ACK; then re-arm the probe timer."""
        tcb = self._tcb
        state = tcb.state
        if state in OUTPUT_STATES:
            snd_nxt = tcb.snd_nxt
            if (
                tcb.fin_seq is not None
                or snd_nxt != tcb.snd_max
                or snd_nxt != (self.buffer_seq + len(self.buffer)) & SEQ_MASK
            ):
                # Else everything written was sent and no FIN is due: the loop would stop
                # at once and the zero-window check find nothing to probe for. That is
                # most calls (each ACK, each received request), so skip the call.
                self._send_data(now)
        if tcb.window_update:
            tcb.window_update = False
            tcb.ack_now = True
        if tcb.ack_now and (state in SYNCHRONIZED_STATES or state == TcpState.SYN_RECEIVED):
            self.send_ack()
        if tcb.sack_ok:
            self._arm_probe(now)

    def _send_data(self, now: float) -> None:
        tcb = self._tcb
        data_end = seq_add(self.buffer_seq, len(self.buffer))
        congestion = self.congestion
        window = min(tcb.snd_wnd, congestion.cwnd)
        options = self._receiver.ack_options()
        # RFC 6691: the MSS bounds the data of a segment without options; options that
        # ride along take their room from the data.
        mss = tcb.snd_mss - _options_length(options)
        scoreboard = self._scoreboard
        sacked = self._sacked
        while True:
            limit = mss
            if sacked and seq_lt(tcb.snd_nxt, tcb.snd_max):
                # Going back over sent data (after a timeout): skip what the peer
                # reported holding, and stop each segment at the next reported block.
                offset = seq_diff(tcb.snd_nxt, tcb.snd_una)
                held = scoreboard.sacked_range_at(offset)
                if held is not None:
                    tcb.snd_nxt = seq_add(tcb.snd_una, held[1])
                    continue
                following = scoreboard.next_sacked_start(offset)
                if following is not None:
                    limit = min(limit, following - offset)
            flight = seq_diff(tcb.snd_nxt, tcb.snd_una)
            unsent = max(seq_diff(data_end, tcb.snd_nxt), 0)
            usable = window - flight
            if sacked and not congestion.in_recovery:
                # SACKed bytes have left the network: they free congestion window (the
                # pipe of RFC 6675), though not the peer's window. Before a loss is
                # declared this is limited transmit (RFC 3042): each ACK that reports
                # more data held lets one more segment out, which keeps the ACKs coming
                # that decide, three segments later, that the hole is a loss.
                usable = min(
                    tcb.snd_wnd - flight,
                    congestion.cwnd - flight + scoreboard.sacked_bytes,
                )
            count = min(limit, unsent, max(usable, 0))
            fin_now = (
                tcb.fin_seq is not None
                and seq_add(tcb.snd_nxt, count) == tcb.fin_seq
                and (usable > 0 or flight == 0)
            )
            if count == 0 and not fin_now:
                break
            if (
                count < unsent
                and count < limit
                and flight > 0
                and count * 2 < tcb.max_snd_wnd
            ):
                # Sender silly-window avoidance (RFC 9293 3.8.6.2.1): wait for a full
                # segment or half the largest window, unless nothing is in flight.
                break
            self._send_segment(now, count, fin_now, count == unsent, options)
            if fin_now:
                break
        timers = self._timers
        if (
            tcb.snd_wnd == 0
            and timers.persist is None
            and timers.retransmit is None
            and (seq_diff(data_end, tcb.snd_nxt) > 0 or self._fin_pending())
        ):
            # Zero window and nothing in flight: probe it (RFC 9293 3.8.6.1).
            self._persist_interval = self.rto.rto
            timers.persist = now + self._persist_interval

    def _fin_pending(self) -> bool:
        fin_seq = self._tcb.fin_seq
        return fin_seq is not None and seq_ge(fin_seq, self._tcb.snd_nxt)

    def _send_segment(
        self, now: float, count: int, fin: bool, push: bool, options: TcpOptions = NO_OPTIONS
    ) -> None:
        tcb = self._tcb
        seq = tcb.snd_nxt
        offset = seq_diff(seq, self.buffer_seq)
        flags = ACK
        if fin:
            flags |= FIN
        if push and count:
            flags |= PSH
        with memoryview(self.buffer) as view:
            if options is NO_OPTIONS:
                payload = view[offset : offset + count]
                self._transmit_fields(seq, tcb.rcv_nxt, flags, self._receiver.window_field(), payload)
                payload.release()  # the send buffer must stay resizable
            else:
                segment = TcpSegment(
                    self._local_port,
                    self._remote_port,
                    seq,
                    tcb.rcv_nxt,
                    flags,
                    self._receiver.window_field(),
                    view[offset : offset + count],
                    options,
                )
                self._transmit(segment)
                segment.payload = b""
        end = seq_add(seq, count + fin)
        if seq_lt(seq, tcb.snd_max):
            self._counters.retransmits += 1
        elif self.rtt_end is None:
            self.rtt_end = end
            self._rtt_start = now
        tcb.snd_nxt = end
        if seq_gt(end, tcb.snd_max):
            tcb.snd_max = end
        self._acked_by_this_segment()
        if self._timers.retransmit is None:
            self._timers.retransmit = now + self.rto.rto

    def retransmit_head(self, now: float) -> None:
        """Resend the first unacknowledged segment, outside the window (RFC 5681 3.2)."""
        state = self._tcb.state
        if state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            self.send_syn(now, with_ack=state == TcpState.SYN_RECEIVED)
            return
        self._send_range(now, self._tcb.snd_una, self._tcb.snd_mss)

    def _retransmit_at(self, now: float, seq: int, max_count: int) -> int:
        """``_send_range`` for a retransmission in SACK recovery, remembering SND.MAX."""
        marks = self._rxt_marks
        if len(marks) >= _MAX_RXT_MARKS:
            marks.clear()  # only the head's mark matters; an overflow just forgets
        marks[seq] = self._tcb.snd_max
        return self._send_range(now, seq, max_count)

    def _send_range(self, now: float, seq: int, max_count: int) -> int:
        """Send one segment of up to ``max_count`` bytes at ``seq`` (already sent or the
        next new byte), the FIN with it if it ends there; returns the bytes of sequence
        space sent. SND.NXT ends past the segment, never behind where it was."""
        tcb = self._tcb
        options = self._receiver.ack_options()
        data_end = seq_add(self.buffer_seq, len(self.buffer))
        count = min(max_count, tcb.snd_mss - _options_length(options))
        count = max(min(count, seq_diff(data_end, seq)), 0)
        fin = tcb.fin_seq is not None and seq_add(seq, count) == tcb.fin_seq
        if not count and not fin:
            return 0
        saved_nxt = tcb.snd_nxt
        tcb.snd_nxt = seq
        self._send_segment(now, count, fin, False, options)
        if seq_gt(saved_nxt, tcb.snd_nxt):
            tcb.snd_nxt = saved_nxt
        return count + fin

    def control_seq(self) -> int:
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
        tcb = self._tcb
        if not self._syn_acked:
            return tcb.snd_max
        edge = seq_add(tcb.snd_una, tcb.snd_wnd)
        return edge if seq_lt(edge, tcb.snd_max) else tcb.snd_max

    def send_ack(self) -> None:
        receiver = self._receiver
        options = receiver.ack_options()
        if options is NO_OPTIONS:
            self._transmit_fields(self.control_seq(), self._tcb.rcv_nxt, ACK, receiver.window_field(), b"")
        else:
            segment = TcpSegment(
                self._local_port,
                self._remote_port,
                self.control_seq(),
                self._tcb.rcv_nxt,
                ACK,
                receiver.window_field(),
                b"",
                options,
            )
            self._transmit(segment)
        self._acked_by_this_segment()

    def send_rst(self, seq: int) -> None:
        segment = TcpSegment(self._local_port, self._remote_port, seq, 0, RST, 0)
        self._counters.rst_sent += 1
        self._transmit(segment)

    def _acked_by_this_segment(self) -> None:
        """Any segment we send carries our ACK and window: nothing more is owed."""
        tcb = self._tcb
        tcb.ack_now = False
        tcb.window_update = False
        tcb.segments_unacked = 0
        self._timers.delayed_ack = None

    # Acknowledgments of our data.

    def on_ack(self, seg: TcpSegment, now: float) -> None:
        """The sender's part of the ACK check (RFC 9293 3.10.7.4, fifth) for an ACK that
        passed the RFC 5961 5.2 range check: SND.UNA, duplicate ACKs, the send window and
        SACK recovery."""
        tcb = self._tcb
        ack = seg.ack
        scaled_window = seg.window << tcb.snd_shift
        self._persist_probes = 0
        advanced = seq_gt(ack, tcb.snd_una)
        if advanced:
            self.ack_advanced(ack, now)
        scoreboard = self._scoreboard
        if tcb.sack_ok:
            scoreboard.update(seg.options.sack_blocks, tcb.snd_una, tcb.snd_max)
        if (
            not advanced
            and ack == tcb.snd_una
            and not scoreboard
            and not seg.payload
            and not seg.flags & (SYN | FIN)
            and scaled_window == tcb.snd_wnd
            and tcb.snd_max != tcb.snd_una
        ):
            # A duplicate ACK in the sense of RFC 5681 section 2.
            flight = seq_diff(tcb.snd_max, tcb.snd_una)
            if self.congestion.on_dup_ack(tcb.snd_una, tcb.snd_max, flight):
                self._counters.fast_retransmits += 1
                self.rtt_end = None  # Karn: no sample across a retransmission
                self.retransmit_head(now)
        # Window update (RFC 9293 3.10.7.4): only from a segment newer than the last one.
        if seq_lt(tcb.snd_wl1, seg.seq) or (tcb.snd_wl1 == seg.seq and seq_ge(ack, tcb.snd_wl2)):
            tcb.snd_wnd = scaled_window
            tcb.max_snd_wnd = max(tcb.max_snd_wnd, scaled_window)
            tcb.snd_wl1 = seg.seq
            tcb.snd_wl2 = ack
            if scaled_window:
                self._timers.persist = None
        if scoreboard and tcb.state in OUTPUT_STATES:
            self._sack_recovery(now)

    def prediction_ok(self) -> bool:
        """Whether an ACK would take only the plain branches of ``on_ack``: no SACK
        scoreboard, no loss recovery, no FIN of ours queued."""
        return not self._sacked and not self.congestion.in_recovery and self._tcb.fin_seq is None

    def predicted_ack(self, ack: int, acked: int, window_updated: bool, now: float) -> None:
        """``on_ack`` for a segment header prediction took (``prediction_ok`` held, the
        window unchanged, SND.WL1 and SND.WL2 already moved by C)."""
        self._persist_probes = 0
        if acked:
            self.ack_advanced(ack, now)
        tcb = self._tcb
        if tcb.sack_ok:
            # What ``update`` does with no blocks; prediction runs only with none held,
            # and then advancing is just moving the base.
            self._scoreboard.base = tcb.snd_una
        if window_updated and tcb.snd_wnd:
            self._timers.persist = None

    def ack_advanced(self, ack: int, now: float) -> None:
        """SND.UNA moves to ``ack``: free buffer, sample RTT, drive NewReno and the RTO."""
        tcb = self._tcb
        acked = seq_diff(ack, tcb.snd_una)
        syn_acked = not self._syn_acked
        self._syn_acked = True
        flight_before = seq_diff(tcb.snd_max, tcb.snd_una)
        data_acked = seq_diff(ack, self.buffer_seq)
        if data_acked > 0:
            data_acked = min(data_acked, len(self.buffer))
            del self.buffer[:data_acked]
            self.buffer_seq = seq_add(self.buffer_seq, data_acked)
        tcb.snd_una = ack
        if seq_lt(tcb.snd_nxt, ack):
            tcb.snd_nxt = ack
        rto = self.rto
        if self.rtt_end is not None and seq_ge(ack, self.rtt_end):
            rto.sample(now - self._rtt_start)
            self.rtt_end = None
        self._retries = 0
        self._tlp_sent = False
        rto.reset_backoff()
        if not syn_acked:
            if self.congestion.on_new_ack(ack, acked, flight_before):
                self.retransmit_head(now)
        # RFC 6298 5.2 and 5.3: stop the timer when all is acknowledged, else restart it.
        self._timers.retransmit = None if ack == tcb.snd_max else now + rto.rto
        if data_acked > 0 and tcb.fin_seq is None:
            self._notify(Notice.OUTPUT_DUE)

    def on_established(self, now: float) -> None:
        """The handshake completed: the RTO after a lost SYN (RFC 6298 5.7) and the
        timer for whatever is still unacknowledged."""
        if self._syn_lost:
            self.rto.restart_after_syn_loss()
        tcb = self._tcb
        self._timers.retransmit = None if tcb.snd_una == tcb.snd_max else now + self.rto.rto

    def _sack_recovery(self, now: float) -> None:
        """Loss recovery by the scoreboard (RFC 6675 section 5), after each ACK."""
        tcb = self._tcb
        congestion = self.congestion
        board = self._scoreboard
        mss = tcb.snd_mss
        if not congestion.in_recovery:
            # Enter when SND.UNA counts as lost (three SACKed segments above it: the SACK
            # form of three duplicate ACKs), unless these ACKs still belong to the loss
            # episode that a timeout or an earlier recovery handled (RFC 6582 section 4).
            if not board.is_lost(0, mss) or not seq_gt(tcb.snd_una, congestion.recover):
                return
            congestion.enter_sack_recovery(seq_diff(tcb.snd_max, tcb.snd_una), tcb.snd_max)
            self._counters.fast_retransmits += 1
            self.rtt_end = None  # Karn: no sample across a retransmission
            self._rxt_marks.clear()
            # Step 4.3: the first lost segment goes at once, whatever the pipe says.
            sent = self._retransmit_at(now, tcb.snd_una, mss)
            self._high_rxt = seq_add(tcb.snd_una, sent)
        else:
            mark = self._rxt_marks.get(tcb.snd_una)
            if (
                mark is not None
                and board.sacked_above(seq_diff(mark, tcb.snd_una)) > (DUPTHRESH - 1) * mss
            ):
                # The head was retransmitted, and three segments' worth sent after it
                # arrived while it did not: that retransmission was lost too. Resend it
                # now rather than wait for the (backed-off) retransmission timer.
                self._counters.lost_retransmits += 1
                self._retransmit_at(now, tcb.snd_una, mss)
        # Step (C): while cwnd - pipe >= 1 SMSS, send NextSeg: a lost segment above
        # HighRxt (rule 1), else new data the peer's window allows (rule 2). Bounded per
        # ACK by what the congestion window lets out.
        data_end = seq_add(self.buffer_seq, len(self.buffer))
        for _ in range(congestion.cwnd // mss + 1):
            base = tcb.snd_una
            high_rxt = seq_diff(self._high_rxt, base)
            pipe = board.pipe(seq_diff(tcb.snd_max, base), high_rxt, mss)
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
            room = seq_diff(seq_add(base, tcb.snd_wnd), tcb.snd_max)
            unsent = seq_diff(data_end, tcb.snd_max)
            if room <= 0 or unsent <= 0:
                return
            if not self._send_range(now, tcb.snd_max, min(room, unsent, mss)):
                return

    # Timers.

    def _arm_probe(self, now: float) -> None:
        """Tail loss probe timer (RFC 8985 7.2): a loss at the end of a flight leaves too
        few segments behind it for SACK to call it lost, and the RTO (200 ms at least)
        is a hundred round trips on a LAN; after two smoothed RTTs without progress, one
        probe segment draws the SACK that starts fast recovery instead."""
        tcb = self._tcb
        timers = self._timers
        srtt = self.rto.srtt
        if (
            self._tlp_sent
            or srtt is None
            or self._retries
            or tcb.snd_una == tcb.snd_max
            or tcb.state not in OUTPUT_STATES
        ):
            timers.probe = None
            return
        deadline = now + max(2 * srtt, MIN_PROBE_TIMEOUT)
        if seq_diff(tcb.snd_max, tcb.snd_una) <= tcb.snd_mss:
            # One segment out: its ACK may be a delayed one (RFC 8985 7.2, WCDelAckT).
            deadline += WORST_CASE_DELAYED_ACK
        rto_deadline = timers.retransmit
        timers.probe = deadline if rto_deadline is None or deadline < rto_deadline else None

    def on_probe_timeout(self, now: float) -> None:
        """RFC 8985 7.3: send new data if the peer's window allows, else the last
        segment again; in SACK recovery, the next lost segment whatever the pipe says."""
        tcb = self._tcb
        if tcb.snd_una == tcb.snd_max or tcb.state not in OUTPUT_STATES:
            return
        self._tlp_sent = True
        self._counters.tail_loss_probes += 1
        mss = tcb.snd_mss
        hole = self._scoreboard.next_lost(seq_diff(self._high_rxt, tcb.snd_una), mss)
        data_end = seq_add(self.buffer_seq, len(self.buffer))
        room = seq_diff(seq_add(tcb.snd_una, tcb.snd_wnd), tcb.snd_max)
        if self.congestion.in_recovery and hole is not None:
            seq = seq_add(tcb.snd_una, hole[0])
            self.rtt_end = None
            sent = self._retransmit_at(now, seq, hole[1])
            self._high_rxt = seq_add(seq, sent)
        elif room > 0 and seq_diff(data_end, tcb.snd_max) > 0:
            self._send_range(now, tcb.snd_max, min(room, mss))
        else:
            flight = seq_diff(tcb.snd_max, tcb.snd_una)
            self.rtt_end = None  # Karn
            self._send_range(now, seq_add(tcb.snd_max, -min(flight, mss)), mss)
        self._timers.retransmit = now + self.rto.rto

    def on_retransmit_timeout(self, now: float) -> None:
        """RFC 6298 5.4-5.7, RFC 5681 3.1 and RFC 6582 section 4; gives up (the connection
        closes) after the configured number of tries."""
        tcb = self._tcb
        config = self._config
        counters = self._counters
        self._retries += 1
        counters.timeouts += 1
        self.rtt_end = None  # Karn's rule
        state = tcb.state
        if state in (TcpState.SYN_SENT, TcpState.SYN_RECEIVED):
            limit = config.max_syn_retries if state == TcpState.SYN_SENT else (
                config.max_synack_retries
            )
            if self._retries > limit:
                if state == TcpState.SYN_RECEIVED and self._lifecycle.passive:
                    counters.syn_received_expired += 1
                else:
                    counters.conn_aborted_timeout += 1
                self._lifecycle.terminate(CloseReason.TIMEOUT, now)
                return
            self._syn_lost = True
            self.rto.back_off()
            counters.retransmits += 1
            self.send_syn(now, with_ack=state == TcpState.SYN_RECEIVED)
            return
        if tcb.snd_una == tcb.snd_max:
            return
        if tcb.snd_wnd == 0:
            # The peer closed its window with data outstanding: probe instead of
            # counting retries, the peer is alive as long as it answers (RFC 9293 3.8.6.1).
            tcb.snd_nxt = tcb.snd_una
            self._retries = 0
            self._persist_interval = self.rto.rto
            self._timers.persist = now + self._persist_interval
            return
        if self._retries > config.max_retries:
            counters.conn_aborted_timeout += 1
            self._lifecycle.terminate(CloseReason.TIMEOUT, now)
            return
        flight = seq_diff(tcb.snd_max, tcb.snd_una)
        self.congestion.on_timeout(flight, tcb.snd_max)
        self.rto.back_off()
        # Go back N: resend from SND.UNA as the (now one-segment) window allows.
        tcb.snd_nxt = tcb.snd_una
        self._send_data(now)
        if self._timers.retransmit is None and tcb.snd_una != tcb.snd_max:
            self._timers.retransmit = now + self.rto.rto

    def on_persist_timeout(self, now: float) -> None:
        """Probe a zero window (RFC 9293 3.8.6.1), backing off; gives up (the connection
        closes) once as many probes as retransmissions went unanswered."""
        tcb = self._tcb
        if tcb.snd_wnd != 0 or tcb.state not in OUTPUT_STATES:
            return
        self._persist_probes += 1
        if self._persist_probes > self._config.max_retries:
            self._counters.conn_aborted_timeout += 1
            self._lifecycle.terminate(CloseReason.TIMEOUT, now)
            return
        # The probe carries SND.UNA - 1, a sequence number the receiver has already
        # seen: an unacceptable segment, which it must answer with an ACK carrying its
        # current window (RFC 9293 3.10.7.4), without us putting new data in flight.
        probe = TcpSegment(
            self._local_port,
            self._remote_port,
            seq_add(tcb.snd_una, -1),
            tcb.rcv_nxt,
            ACK,
            self._receiver.window_field(),
        )
        self._transmit(probe)
        self._acked_by_this_segment()
        self._persist_interval = min(self._persist_interval * 2, self._config.max_rto)
        self._timers.persist = now + self._persist_interval
