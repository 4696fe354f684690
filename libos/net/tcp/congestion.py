"""NewReno congestion control: RFC 5681 (slow start, congestion avoidance, fast
retransmit) with the fast-recovery modification of RFC 6582.

The connection owns sequence numbers and transmission; this class only keeps cwnd,
ssthresh and the recovery point, and tells the connection when to retransmit.

With SACK (``sack`` set once the handshake negotiated it) loss recovery follows RFC 6675
instead: the connection decides when to enter it (``enter_sack_recovery``) and what to
send by its scoreboard's pipe estimate, so cwnd is neither inflated by duplicate ACKs nor
deflated by partial ones; it stays at ssthresh until the recovery point is acknowledged.
"""

from __future__ import annotations

from typing import Final

from libos.net.tcp.seq import seq_gt

DUPACK_THRESHOLD: Final = 3  # RFC 5681 3.2


def initial_window(mss: int) -> int:
    """RFC 5681 3.1 (from RFC 3390): min(4*SMSS, max(2*SMSS, 4380 bytes))."""
    return min(4 * mss, max(2 * mss, 4380))


class NewReno:
    __slots__ = (
        "mss", "cwnd", "ssthresh", "in_recovery", "recover", "dupacks", "sack", "_ca_bytes"
    )

    def __init__(self, mss: int, iss: int) -> None:
        self.mss = mss
        self.cwnd = initial_window(mss)
        # RFC 5681 3.1: ssthresh starts arbitrarily high.
        self.ssthresh = 1 << 30
        self.in_recovery = False
        # RFC 6582 3.2 step 1: recover starts at the initial send sequence number.
        self.recover = iss
        self.dupacks = 0
        self.sack = False
        self._ca_bytes = 0

    def set_mss(self, mss: int) -> None:
        self.mss = mss
        self.cwnd = initial_window(mss)

    def on_new_ack(self, ack: int, acked: int, flight_before: int) -> bool:
        """New data acknowledged. Returns True for a partial ACK in fast recovery, on
        which the connection retransmits the next unacknowledged segment (RFC 6582 3.2
        step 5)."""
        self.dupacks = 0
        if self.in_recovery and self.sack:
            # RFC 6675: recovery ends when the recovery point is acknowledged; until then
            # the pipe estimate, not cwnd arithmetic, paces what is sent.
            if seq_gt(ack, self.recover):
                self.in_recovery = False
                self.cwnd = self.ssthresh
            return False
        if self.in_recovery:
            if seq_gt(ack, self.recover):
                # Full acknowledgment (RFC 6582 3.2 step 3): deflate the window.
                self.in_recovery = False
                flight_after = max(flight_before - acked, 0)
                self.cwnd = min(self.ssthresh, max(flight_after, self.mss) + self.mss)
                return False
            # Partial acknowledgment: deflate by the amount acked, add back one SMSS if
            # at least that much was acked (RFC 6582 3.2 step 5).
            self.cwnd = max(self.cwnd - acked, self.mss)
            if acked >= self.mss:
                self.cwnd += self.mss
            return True
        if self.cwnd < self.ssthresh:
            # Slow start, with appropriate byte counting limited to one SMSS per ACK.
            self.cwnd += min(acked, self.mss)
        else:
            # Congestion avoidance: one SMSS per window of data acknowledged (RFC 5681 3.1).
            self._ca_bytes += acked
            if self._ca_bytes >= self.cwnd:
                self._ca_bytes -= self.cwnd
                self.cwnd += self.mss
        return False

    def on_dup_ack(self, snd_una: int, snd_max: int, flight: int) -> bool:
        """A duplicate ACK (RFC 5681 section 2). Returns True when the connection must
        fast-retransmit the first unacknowledged segment."""
        self.dupacks += 1
        if self.in_recovery and self.sack:
            return False
        if self.in_recovery:
            self.cwnd += self.mss  # RFC 6582 3.2 step 4: inflate for the segment that left
            return False
        if self.dupacks != DUPACK_THRESHOLD:
            return False
        # RFC 6582 3.2 step 2: only enter recovery if the ACK covers more than recover,
        # so that duplicate ACKs from an earlier loss episode do not trigger it again.
        if not seq_gt(snd_una, self.recover):
            return False
        self.ssthresh = max(flight // 2, 2 * self.mss)  # RFC 5681 equation (4)
        self.recover = (snd_max - 1) & 0xFFFFFFFF
        self.in_recovery = True
        self.cwnd = self.ssthresh + DUPACK_THRESHOLD * self.mss
        return True

    def enter_sack_recovery(self, flight: int, snd_max: int) -> None:
        """RFC 6675 section 5 step 4: RecoveryPoint = HighData, cwnd = ssthresh = half
        the flight (RFC 5681 equation (4))."""
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self.recover = (snd_max - 1) & 0xFFFFFFFF
        self.in_recovery = True
        self.dupacks = 0
        self._ca_bytes = 0

    def on_timeout(self, flight: int, snd_max: int) -> None:
        """Retransmission timeout (RFC 5681 3.1 equation (4), loss window of one SMSS)."""
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss
        self.in_recovery = False
        self.dupacks = 0
        self._ca_bytes = 0
        # RFC 6582 section 4: after a timeout, recover is the highest sequence sent.
        self.recover = (snd_max - 1) & 0xFFFFFFFF
