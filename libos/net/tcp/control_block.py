"""The transmission control block of one connection (RFC 9293 3.3.1).

One object holds the connection's state and its sequence variables; the sender, the
receiver, the arrival steps and the connection all hold the same block and read and
write its fields directly. It is plain data in slots, on purpose: a property or a
method here would cost a call per field on every segment, and a compiled path can mirror
a flat record of scalars. What only one component uses stays in that component.

On the compiled path the sequence variables header prediction needs live in a C struct
(``struct arx_tcb`` of ``libos/fast/arx_fast.h``) that it reads and writes in C:
``SharedControlBlock`` is the same block with those fields as properties over that
struct, so C and Python share one copy. The pure path keeps the plain slots: a property
over a cffi struct costs about 5 times a slot read and 8 times a slot write (50 ns and
76 ns against 11 ns and 9 ns, measured), and a segment makes some 50 reads and 13 writes.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Final

from libos.net.tcp.types import CloseReason, TcpState

# RFC 9293 3.7.1: without an MSS option the peer accepts 536-byte segments.
DEFAULT_PEER_MSS: Final = 536


class ControlBlock:
    """State, send and receive sequence space, negotiated options and output requests."""

    __slots__ = (
        "state",
        "close_reason",
        "iss",
        "snd_una",
        "snd_nxt",
        "snd_max",
        "snd_wnd",
        "max_snd_wnd",
        "snd_wl1",
        "snd_wl2",
        "snd_shift",
        "snd_mss",
        "fin_seq",
        "irs",
        "rcv_nxt",
        "rcv_adv",
        "rcv_shift",
        "scaling",
        "sack_ok",
        "fin_received",
        "segments_unacked",
        "ack_now",
        "window_update",
    )

    def __init__(self, iss: int, rcv_shift: int) -> None:
        self.state = TcpState.CLOSED
        self.close_reason: CloseReason | None = None
        # Send sequence space (RFC 9293 3.3.1). snd_max is the highest sequence number
        # ever sent: after a timeout snd_nxt goes back to snd_una (go-back-N) while
        # ACKs up to snd_max remain acceptable.
        self.iss = iss
        self.snd_una = iss
        self.snd_nxt = iss
        self.snd_max = iss
        self.snd_wnd = 0
        self.max_snd_wnd = 0
        self.snd_wl1 = 0
        self.snd_wl2 = 0
        self.snd_shift = 0  # the peer's window scale (RFC 7323 2.3)
        self.snd_mss = DEFAULT_PEER_MSS
        # The sequence number of our FIN, once the application closed (RFC 9293 3.10.4).
        self.fin_seq: int | None = None
        # Receive sequence space; rcv_adv is the right edge of the window we offered,
        # which never moves left (RFC 9293 3.8.6.2.2).
        self.irs = 0
        self.rcv_nxt = 0
        self.rcv_adv = 0
        self.rcv_shift = rcv_shift  # our window scale, 0 unless both SYNs offer one
        # Negotiated in the handshake: window scaling (RFC 7323 1.3) and SACK (RFC 2018).
        self.scaling = False
        self.sack_ok = False
        self.fin_received = False
        # Segments taken since our last ACK: the delayed-ACK count (RFC 1122 4.2.3.2).
        self.segments_unacked = 0
        # Requests to the next output: an ACK is due at once; the window opened enough
        # to announce it. Any segment we send satisfies both.
        self.ack_now = False
        self.window_update = False


# The state as a byte in the C struct: codes are the enum's order (arx_fast.h's
# ARX_TCP_ESTABLISHED must equal the code of ESTABLISHED; the layer checks at set-up).
STATES: Final = tuple(TcpState)
STATE_CODES: Final = {state: code for code, state in enumerate(STATES)}

def _shared_field(name: str) -> property:
    # attrgetter runs in C: a read costs one call instead of a Python frame.
    get = attrgetter(f"shared.{name}")

    def set_(self: SharedControlBlock, value: int) -> None:
        setattr(self.shared, name, value)

    return property(get, set_, doc=f"{name}, in the C struct")


def _set_state(self: SharedControlBlock, value: TcpState) -> None:
    self.shared.state = STATE_CODES[value]
    self.state_enum = value


class SharedControlBlock(ControlBlock):
    """A control block whose sequence variables are in ``shared``, a cffi
    ``struct arx_tcb *`` the caller allocated and keeps alive (the block holds it).

    The state is read on every step and written a few times per connection, and C only
    reads it: so its code lives in the struct and the enum beside it in ``state_enum``,
    both written by the one setter, and Python reads the enum (a slot read, instead of a
    struct read and a table lookup)."""

    __slots__ = ("shared", "state_enum")
    state_enum: TcpState

    def __init__(self, iss: int, rcv_shift: int, shared: Any) -> None:
        self.shared = shared
        super().__init__(iss, rcv_shift)

    state = property(attrgetter("state_enum"), _set_state, doc="the state; its code is in the C struct")
    # The sequence variables header prediction reads or writes. SND.NXT is not among them
    # (C never needs it), so the send path keeps reading it from a slot.
    snd_una = _shared_field("snd_una")
    snd_max = _shared_field("snd_max")
    snd_wnd = _shared_field("snd_wnd")
    snd_wl1 = _shared_field("snd_wl1")
    snd_wl2 = _shared_field("snd_wl2")
    snd_shift = _shared_field("snd_shift")
    rcv_nxt = _shared_field("rcv_nxt")
    rcv_adv = _shared_field("rcv_adv")
