"""Retransmission timeout computation per RFC 6298."""

from __future__ import annotations

from typing import Final

INITIAL_RTO: Final = 1.0  # RFC 6298 2.1
MIN_RTO: Final = 1.0  # RFC 6298 2.4
MAX_RTO: Final = 60.0  # RFC 6298 2.5 allows an upper bound of at least 60 s
# RFC 6298 5.7: after a SYN was retransmitted, start the data phase with 3 s.
RTO_AFTER_SYN_LOSS: Final = 3.0
_ALPHA: Final = 1 / 8
_BETA: Final = 1 / 4
_K: Final = 4


class RtoEstimator:
    """SRTT/RTTVAR smoothing and exponential backoff.

    Samples must obey Karn's rule (RFC 6298 3): the caller never feeds the RTT of a
    segment that was retransmitted.
    """

    __slots__ = ("srtt", "rttvar", "_base_rto", "rto", "_granularity", "_min_rto", "_max_rto")

    def __init__(
        self,
        *,
        min_rto: float = MIN_RTO,
        max_rto: float = MAX_RTO,
        initial_rto: float = INITIAL_RTO,
        granularity: float = 0.001,
    ) -> None:
        if not 0 < min_rto <= max_rto:
            raise ValueError("need 0 < min_rto <= max_rto")
        self.srtt: float | None = None
        self.rttvar = 0.0
        self._min_rto = min_rto
        self._max_rto = max_rto
        self._granularity = granularity
        self._base_rto = min(max(initial_rto, min_rto), max_rto)
        self.rto = self._base_rto

    def sample(self, rtt: float) -> None:
        """Take one round-trip measurement (RFC 6298 2.2 and 2.3)."""
        rtt = max(rtt, 0.0)
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt
        rto = self.srtt + max(self._granularity, _K * self.rttvar)
        self._base_rto = min(max(rto, self._min_rto), self._max_rto)
        self.rto = self._base_rto

    def back_off(self) -> None:
        """Double the timeout after an expiry (RFC 6298 5.5), up to the maximum."""
        self.rto = min(self.rto * 2, self._max_rto)

    def reset_backoff(self) -> None:
        """New data was acknowledged: return to the computed RTO."""
        self.rto = self._base_rto

    def restart_after_syn_loss(self) -> None:
        """RFC 6298 5.7: no sample yet and the SYN was lost, so begin with 3 s."""
        if self.srtt is None:
            self._base_rto = min(max(RTO_AFTER_SYN_LOSS, self._min_rto), self._max_rto)
            self.rto = self._base_rto
