"""Small shared types of the TCP stack: states, events, counters and tunables."""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields


class TcpState(enum.Enum):
    """Connection states of RFC 9293 3.3.2 (LISTEN lives in ``TcpListener``)."""

    # Members are singletons compared by identity, so identity hashing is consistent;
    # Enum's own __hash__ is a Python frame, and every ``state in SOME_STATES`` pays it.
    __hash__ = object.__hash__

    CLOSED = "CLOSED"
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"


# States in which both sides' ISNs are known (RFC 9293 3.3.2 "synchronized").
SYNCHRONIZED_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT_1,
        TcpState.FIN_WAIT_2,
        TcpState.CLOSE_WAIT,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
        TcpState.TIME_WAIT,
    }
)
# States in which arriving text is taken into the receive buffer (RFC 9293 3.10.7.4,
# seventh check).
DATA_STATES = frozenset({TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2})
# States in which the application may still queue data (RFC 9293 3.10.2).
SENDABLE_STATES = frozenset(
    {TcpState.SYN_SENT, TcpState.SYN_RECEIVED, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT}
)
# States in which queued data, or our FIN, may still go out.
OUTPUT_STATES = frozenset(
    {
        TcpState.ESTABLISHED,
        TcpState.FIN_WAIT_1,
        TcpState.CLOSE_WAIT,
        TcpState.CLOSING,
        TcpState.LAST_ACK,
    }
)


class CloseReason(enum.Enum):
    """Why a connection ended; the values are the words the API has always reported."""

    NORMAL = "normal"  # both FINs exchanged, or a close before the handshake completed
    RESET = "reset"  # the peer sent RST on an established connection
    REFUSED = "refused"  # the peer answered our SYN with RST
    TIMEOUT = "timeout"  # retransmissions or zero-window probes ran out
    ABORTED = "aborted"  # our application aborted it


@dataclass(frozen=True, slots=True)
class Connected:
    """The three-way handshake completed (for a passive open: ready for accept())."""


@dataclass(frozen=True, slots=True)
class DataReadable:
    """The receive buffer went from empty to non-empty."""


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer sent FIN: recv() returns b"" once the buffer is drained."""


@dataclass(frozen=True, slots=True)
class Reset:
    """The peer reset the connection (RFC 9293 3.10.7.4, RFC 5961 3.2)."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over for the application; emitted exactly once.

    ``reason.value`` gives the reason as a word ("normal", "reset", ...) where a string is
    wanted.
    """

    reason: CloseReason


TcpEvent = Connected | DataReadable | PeerClosed | Reset | Closed


@dataclass(slots=True)
class TcpCounters:
    """Per-layer counters; tests compare them whole."""

    segments_in: int = 0
    segments_out: int = 0
    predicted: int = 0  # of segments_in: taken by header prediction in C (compiled path)
    retransmits: int = 0
    fast_retransmits: int = 0
    lost_retransmits: int = 0  # a retransmission found lost by SACK, resent before the RTO
    tail_loss_probes: int = 0
    timeouts: int = 0
    drop_truncated: int = 0
    drop_checksum: int = 0
    drop_malformed: int = 0
    drop_bad_address: int = 0
    drop_no_listener: int = 0
    drop_backlog_full: int = 0
    drop_out_of_window: int = 0
    drop_bad_ack: int = 0
    drop_state: int = 0
    drop_reassembly_full: int = 0
    rst_sent: int = 0
    rst_received: int = 0
    challenge_acks: int = 0
    challenge_acks_suppressed: int = 0
    conn_aborted_timeout: int = 0
    syn_received_expired: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Tunables; defaults follow the RFCs or common practice, as cited."""

    mss: int = 1460  # what we announce: a 1500-byte Ethernet MTU minus 40 (RFC 9293 3.7.1)
    send_buffer: int = 256 * 1024
    recv_buffer: int = 256 * 1024
    msl: float = 30.0  # TIME-WAIT lasts 2*MSL (RFC 9293 3.4.2)
    delayed_ack: float = 0.040  # well below the 500 ms bound of RFC 1122 4.2.3.2
    max_retries: int = 8  # data retransmissions before giving up (RFC 1122 4.2.3.5 R2)
    max_syn_retries: int = 5
    max_synack_retries: int = 3
    max_ooo_fragments: int = 64
    min_rto: float = 1.0
    max_rto: float = 60.0
    # RFC 5961 section 7: a limit on challenge ACKs per interval, per stack.
    challenge_ack_limit: int = 100
    challenge_ack_interval: float = 1.0
    # At most one ACK per interval in answer to out-of-window segments without data (as
    # Linux); an old duplicate carrying data is always answered at once.
    out_of_window_ack_interval: float = 0.5
    # Offer and use selective acknowledgments (RFC 2018) and SACK-based loss recovery
    # (RFC 6675).
    sack: bool = True

    def __post_init__(self) -> None:
        if not 64 <= self.mss <= 65495:
            raise ValueError("mss out of range")
        if self.send_buffer < 1 or self.recv_buffer < 1 or self.recv_buffer > (1 << 30):
            raise ValueError("buffer sizes must be positive and at most 2**30")
        if self.msl < 0 or self.delayed_ack <= 0:
            raise ValueError("msl must be >= 0 and delayed_ack > 0")
        if self.max_retries < 1 or self.max_syn_retries < 1 or self.max_synack_retries < 1:
            raise ValueError("retry limits must be at least 1")
