"""SACK (RFC 2018), SACK-based loss recovery (RFC 6675), tail loss probes (RFC 8985) and the
acceptability rules that keep a Linux peer talking to us over a lossy wire; sans-I/O, on the
packet-script harness of ``test_tcp_scripts`` and on the scoreboard alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libos.net.tcp import TcpConfig, TcpConnection, TcpState
from libos.net.tcp.sack import MAX_SCOREBOARD_BLOCKS, SackScoreboard
from tests.test_tcp_scripts import PEER_ISN, Script, _flag_text
from vdev.wire.tcp import TcpOptions

MSS = 1000
UNA = 0xFFFF_F000  # close to the wrap, so every test crosses it


@pytest.mark.parametrize(
    ("blocks", "snd_max_offset", "expected"),
    [
        pytest.param([(100, 200)], 1000, [(100, 200)], id="one"),
        pytest.param([(300, 400), (100, 200)], 1000, [(100, 200), (300, 400)], id="sorted"),
        pytest.param([(100, 200), (200, 300)], 1000, [(100, 300)], id="adjacent-merge"),
        pytest.param([(100, 250), (200, 300), (50, 120)], 1000, [(50, 300)], id="overlap-merge"),
        pytest.param([(0, 100)], 1000, [], id="reaches-snd-una"),
        pytest.param([(-500, -100)], 1000, [], id="dsack-below-snd-una"),
        pytest.param([(900, 1100)], 1000, [], id="past-snd-max"),
        pytest.param([(300, 300), (400, 350)], 1000, [], id="empty-or-inverted"),
        pytest.param([(900, 1000)], 1000, [(900, 1000)], id="up-to-snd-max"),
    ],
)
def test_scoreboard_takes_only_sane_blocks(
    blocks: list[tuple[int, int]], snd_max_offset: int, expected: list[tuple[int, int]]
) -> None:
    board = SackScoreboard()
    wire_blocks = tuple(((UNA + a) & 0xFFFFFFFF, (UNA + b) & 0xFFFFFFFF) for a, b in blocks)
    board.update(wire_blocks, UNA, (UNA + snd_max_offset) & 0xFFFFFFFF)
    assert board.blocks() == expected
    assert board.sacked_bytes == sum(end - start for start, end in expected)


def test_scoreboard_advances_with_the_cumulative_ack() -> None:
    board = SackScoreboard()
    board.update(((UNA + 1000, UNA + 2000), (UNA + 3000, UNA + 4000)), UNA, UNA + 5000)
    board.advance((UNA + 500) & 0xFFFFFFFF)
    assert board.blocks() == [(500, 1500), (2500, 3500)] and board.sacked_bytes == 2000
    board.advance((UNA + 1500) & 0xFFFFFFFF)  # into a range: the peer would have acked it all
    assert board.blocks() == [(1500, 2500)] and board.sacked_bytes == 1000
    board.advance((UNA + 4000) & 0xFFFFFFFF)
    assert board.blocks() == [] and not board


def test_loss_is_declared_by_three_segments_or_ranges_above() -> None:
    board = SackScoreboard()
    snd_max = (UNA + 10 * MSS) & 0xFFFFFFFF
    board.update(((UNA + MSS, UNA + 3 * MSS),), UNA, snd_max)
    assert not board.is_lost(0, MSS)  # two segments above: could be reordering
    board.update(((UNA + 3 * MSS, UNA + 4 * MSS),), UNA, snd_max)
    assert board.is_lost(0, MSS)  # three (RFC 6675 IsLost)
    assert board.next_lost(0, MSS) == (0, MSS)
    # SetPipe: 10 segments out, 3 SACKed, the lost one not yet resent: 6 in the network.
    assert board.pipe(10 * MSS, 0, MSS) == 6 * MSS
    assert board.pipe(10 * MSS, MSS, MSS) == 7 * MSS  # once resent, it counts again
    assert board.next_lost(MSS, MSS) is None
    # Three separate ranges above a hole count as three segments too.
    board = SackScoreboard()
    board.update(tuple((UNA + k, UNA + k + 10) for k in (2000, 4000, 6000)), UNA, snd_max)
    assert board.is_lost(0, MSS) and board.next_lost(0, MSS) == (0, MSS)
    assert not board.is_lost(2010, MSS)  # only two ranges above it


def test_scoreboard_is_bounded() -> None:
    board = SackScoreboard()
    snd_max = (UNA + 1_000_000) & 0xFFFFFFFF
    for k in range(MAX_SCOREBOARD_BLOCKS + 20):
        board.update(((UNA + 100 + 20 * k, UNA + 110 + 20 * k),), UNA, snd_max)
    assert len(board) == MAX_SCOREBOARD_BLOCKS


_blocks = st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF)), max_size=4)


@given(st.lists(st.tuples(_blocks, st.integers(0, 70_000)), max_size=30), st.integers(0, 0xFFFFFFFF))
@settings(max_examples=200, deadline=None)
def test_hostile_sack_blocks_keep_the_scoreboard_sane(
    acks: list[tuple[list[tuple[int, int]], int]], una: int
) -> None:
    board = SackScoreboard()
    flight = 60_000
    for blocks, advance in acks:
        una = (una + advance % 3000) & 0xFFFFFFFF
        board.update(tuple(blocks), una, (una + flight) & 0xFFFFFFFF)
        ranges = board.blocks()
        assert len(ranges) <= MAX_SCOREBOARD_BLOCKS
        assert all(0 < start < end <= flight for start, end in ranges)
        assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))  # sorted, apart
        assert board.sacked_bytes == sum(end - start for start, end in ranges)
        assert 0 <= board.pipe(flight, 0, MSS) <= flight
        hole = board.next_lost(0, MSS)
        assert hole is None or (hole[1] > 0 and board.sacked_range_at(hole[0]) is None)


def sack_script(config: TcpConfig = TcpConfig(recv_buffer=65535, msl=10.0)) -> tuple[Script, TcpConnection]:
    """An established connection whose peer offered SACK and an MSS of 1000."""
    script = Script(config)
    script.layer.listen(80, backlog=4)
    script.inject("S", PEER_ISN, options=TcpOptions(mss=MSS, window_scale=0, sack_permitted=True))
    (syn_ack,) = script.output()
    assert syn_ack.options.sack_permitted  # answered, since it was offered
    script.iss = syn_ack.seq
    script.inject(".", PEER_ISN + 1, script.iss + 1)
    conn = script.layer.accept(80)
    assert conn is not None
    script.layer.pop_events()
    return script, conn


def sacks(*ranges: tuple[int, int], base: int) -> TcpOptions:
    return TcpOptions(sack_blocks=tuple((base + a, base + b) for a, b in ranges))


def test_receiver_reports_out_of_order_blocks_latest_first() -> None:
    script, conn = sack_script()
    seq = PEER_ISN + 1
    una = script.iss + 1
    script.inject(".", seq + 1000, una, payload=b"b" * 500)
    (ack,) = script.expect((".", una, seq))
    assert ack.options.sack_blocks == ((seq + 1000, seq + 1500),)
    script.inject(".", seq + 3000, una, payload=b"d" * 500)
    (ack,) = script.expect((".", una, seq))
    assert ack.options.sack_blocks == ((seq + 3000, seq + 3500), (seq + 1000, seq + 1500))
    script.inject(".", seq + 1500, una, payload=b"c" * 500)  # extends the first block
    (ack,) = script.expect((".", una, seq))
    assert ack.options.sack_blocks == ((seq + 1000, seq + 2000), (seq + 3000, seq + 3500))
    script.inject(".", seq, una, payload=b"a" * 1000)  # fills the first hole
    (ack,) = script.expect((".", una, seq + 2000))
    assert ack.options.sack_blocks == ((seq + 3000, seq + 3500),)
    assert conn.recv(10_000) == b"a" * 1000 + b"b" * 500 + b"c" * 500


def test_no_sack_without_the_peers_offer() -> None:
    script = Script()
    conn = script.passive_open()
    seq = PEER_ISN + 1
    script.inject(".", seq + 1000, script.iss + 1, payload=b"b" * 500)
    (ack,) = script.expect((".", script.iss + 1, seq))
    assert ack.options.sack_blocks == () and conn.readable == 0


def test_sack_recovery_limited_transmit_then_fast_retransmit_then_holes() -> None:
    script, conn = sack_script()
    conn.send(b"x" * 20_000)
    script.advance(0.0)
    una = script.iss + 1
    ack_seq = PEER_ISN + 1
    script.expect(*[(".", una + MSS * i, ack_seq, MSS) for i in range(4)])
    # Segment 0 is lost. Each SACK of a later one lets a new segment out (RFC 3042) ...
    script.inject(".", ack_seq, una, options=sacks((1000, 2000), base=una))
    script.expect((".", una + 4000, ack_seq, MSS))
    script.inject(".", ack_seq, una, options=sacks((1000, 3000), base=una))
    script.expect((".", una + 5000, ack_seq, MSS))
    assert not conn.congestion.in_recovery
    # ... and the third declares segment 0 lost: resent at once (RFC 6675 step 4.3).
    script.inject(".", ack_seq, una, options=sacks((1000, 4000), base=una))
    script.expect((".", una, ack_seq, MSS))
    assert conn.congestion.in_recovery and script.layer.counters.fast_retransmits == 1
    # Segment 4 was lost too: once three segments above it are SACKed, it goes next.
    script.inject(".", ack_seq, una, options=sacks((1000, 4000), (5000, 6000), base=una))
    script.inject(".", ack_seq, una + 4000, options=sacks((5000, 6000), base=una))
    out = script.output()
    assert [seg.seq - una for seg in out if seg.payload][:1] in ([4000], [6000])
    script.inject(".", ack_seq, una + 6000)  # past the recovery point: recovery ends
    assert not conn.congestion.in_recovery
    assert conn.congestion.cwnd == conn.congestion.ssthresh


def test_tail_loss_probe_draws_the_sack_instead_of_waiting_for_the_rto() -> None:
    script, conn = sack_script()
    conn.send(b"y" * 3000)
    script.advance(0.0)
    una = script.iss + 1
    script.expect((".", una, PEER_ISN + 1, MSS), (".", una + 1000, PEER_ISN + 1, MSS),
                  ("P.", una + 2000, PEER_ISN + 1, MSS))
    # No ACK at all (the whole flight or its ACKs lost): after 2*SRTT (here the 10 ms
    # floor, the handshake took no time), the last segment goes again; the RTO is 1 s.
    script.advance(0.009)
    script.expect()
    script.advance(0.010)
    script.expect((".", una + 2000, PEER_ISN + 1, MSS))
    assert script.layer.counters.tail_loss_probes == 1 and script.layer.counters.timeouts == 0
    script.advance(0.5)
    script.expect()  # one probe per episode
    script.advance(1.010)
    script.expect((".", una, PEER_ISN + 1, MSS))  # then the RTO, re-armed by the probe
    assert script.layer.counters.timeouts == 1


def test_ack_sequence_stays_inside_the_peers_window() -> None:
    """The peer's window closed below SND.MAX (our last segments were lost): our ACKs must
    carry SND.UNA + SND.WND, else a Linux peer drops them unread (RFC 9293 3.10.7.4)."""
    script, conn = sack_script()
    conn.send(b"z" * 3000)
    script.advance(0.0)
    una = script.iss + 1
    script.output()
    seq = PEER_ISN + 1
    script.inject(".", seq, una + 1000, window=0)  # took one segment, then its buffer filled
    script.inject(".", seq, una + 1000, window=0, payload=b"p" * 100)
    script.advance(0.040)  # the delayed ACK
    (ack,) = script.expect((".", una + 1000, seq + 100))
    assert ack.seq == una + 1000 and conn.snd_max == una + 3000


def test_zero_window_still_takes_the_ack_of_a_segment_at_rcv_nxt() -> None:
    """RFC 9293 3.10.7.4: with RCV.WND zero, "special allowance should be made to accept
    valid ACKs"; the data is cut and an ACK tells the sender our window."""
    config = TcpConfig(recv_buffer=2000, msl=10.0)
    script, conn = sack_script(config)
    conn.send(b"q" * 500)
    script.advance(0.0)
    una = script.iss + 1
    script.output()
    seq = PEER_ISN + 1
    script.inject(".", seq, una, payload=b"a" * 1000)
    script.inject(".", seq + 1000, una, payload=b"b" * 1000)
    script.output()
    assert conn.readable == 2000  # the application has not read: our window is zero
    script.inject(".", seq + 2000, una + 500, payload=b"c" * 1000)
    (ack,) = script.expect((".", una + 500, seq + 2000))
    assert ack.window == 0 and conn.snd_una == una + 500 and conn.readable == 2000


def test_ack_at_exactly_our_right_edge_is_accepted() -> None:
    config = TcpConfig(recv_buffer=3000, msl=10.0)
    script, conn = sack_script(config)
    conn.send(b"r" * 200)
    script.advance(0.0)
    una = script.iss + 1
    script.output()
    seq = PEER_ISN + 1
    # The peer filled our window and sends its ACK at SND.NXT: exactly RCV.NXT + RCV.WND.
    script.inject(".", seq + 3000, una + 200)
    assert conn.snd_una == una + 200
    assert script.layer.counters.drop_out_of_window == 0


def test_old_duplicate_data_is_acked_every_time_pure_acks_at_most_twice_a_second() -> None:
    script, conn = sack_script()
    seq = PEER_ISN + 1
    una = script.iss + 1
    script.inject(".", seq, una, payload=b"a" * 1000)
    script.inject(".", seq + 1000, una, payload=b"b" * 1000)
    script.output()
    for _ in range(3):  # a retransmission of bytes we hold: the sender needs our ACK
        script.inject(".", seq, una, payload=b"a" * 1000)
        script.expect((".", una, seq + 2000))
    script.inject(".", seq + 99_999, una)  # unacceptable pure ACKs: one answer per interval
    script.expect((".", una, seq + 2000))
    script.inject(".", seq + 99_999, una)
    script.expect()
    script.now = 0.5
    script.inject(".", seq + 99_999, una)
    script.expect((".", una, seq + 2000))
    assert conn.state == TcpState.ESTABLISHED


def test_sack_blocks_take_their_room_from_the_data() -> None:
    """RFC 6691: a segment carrying SACK blocks holds that much less data."""
    script, conn = sack_script()
    seq = PEER_ISN + 1
    una = script.iss + 1
    script.inject(".", seq + 1000, una, payload=b"b" * 10)
    script.output()
    conn.send(b"s" * 2000)
    script.advance(0.0)
    out = script.output()
    assert [len(seg.payload) for seg in out] == [MSS - 12, MSS - 12, 24]
    assert all(seg.options.sack_blocks == ((seq + 1000, seq + 1010),) for seg in out)
    assert all(_flag_text(seg.flags).endswith(".") for seg in out)
