"""Selective acknowledgment: the sender's scoreboard (RFC 2018, loss recovery of RFC 6675).

The receiver's half (which blocks to report) lives with the reassembly queue in the
connection; this module is the sender's record of what the peer said it holds above
SND.UNA, and the questions RFC 6675 asks of it: is a sequence number lost (IsLost), how
much is in the network (SetPipe), what to retransmit next (NextSeg rule 1).

SACK blocks come from the peer and are checked here: a block must lie inside
(SND.UNA, SND.MAX] and be non-empty; anything else is ignored (a D-SACK block of
RFC 2883 reports a duplicate below SND.UNA and carries nothing for the scoreboard). The
number of blocks kept is bounded, so a peer reporting a pathological pattern of holes
costs a fixed amount of memory and work per ACK.
"""

from __future__ import annotations

from typing import Final

from libos.net.tcp.seq import seq_diff

DUPTHRESH: Final = 3  # RFC 6675 section 2 (and RFC 5681 3.2)
MAX_SCOREBOARD_BLOCKS: Final = 32


class SackScoreboard:
    """SACKed ranges above SND.UNA as sorted, disjoint, non-adjacent [start, end) offsets
    from ``base`` (the SND.UNA of the last update), so no comparison needs wrap-around."""

    __slots__ = ("base", "_blocks", "sacked_bytes")

    # ``_blocks`` is one list for the scoreboard's life, changed only in place, so the
    # sender may keep a reference and test it for emptiness without a method call (it
    # does on every segment; ``__bool__`` is a Python frame each time).

    def __init__(self) -> None:
        self.base = 0
        self._blocks: list[tuple[int, int]] = []
        self.sacked_bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __bool__(self) -> bool:
        return bool(self._blocks)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The live list of ranges (never replaced): empty exactly when nothing is SACKed."""
        return self._blocks

    def blocks(self) -> list[tuple[int, int]]:
        """The ranges as (start, end) offsets from ``base``, lowest first."""
        return list(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
        self.sacked_bytes = 0

    def advance(self, snd_una: int) -> None:
        """SND.UNA moved to ``snd_una``: drop what it covers and rebase the rest."""
        shift = seq_diff(snd_una, self.base)
        self.base = snd_una
        if shift <= 0 or not self._blocks:
            return
        kept: list[tuple[int, int]] = []
        for start, end in self._blocks:
            # A range reaching the new SND.UNA would say the peer holds bytes it has not
            # acknowledged cumulatively; as in ``update``, the head is never skipped.
            if start > shift:
                kept.append((start - shift, end - shift))
        self._blocks[:] = kept
        self.sacked_bytes = sum(end - start for start, end in kept)

    def update(self, blocks: tuple[tuple[int, int], ...], snd_una: int, snd_max: int) -> bool:
        """Take the blocks of one ACK (after its cumulative ACK moved SND.UNA); returns
        True if any of them told us something new."""
        self.advance(snd_una)
        limit = seq_diff(snd_max, snd_una)
        changed = False
        for left, right in blocks:
            start = seq_diff(left, snd_una)
            end = seq_diff(right, snd_una)
            if start <= 0 or end > limit or start >= end:
                # Past what we sent, empty, or reaching down to SND.UNA: a D-SACK
                # (RFC 2883) or a stale ACK overtaken by a newer one. A block that
                # covered SND.UNA could make us skip the head, which is never done.
                continue
            changed |= self._add(start, end)
        return changed

    def _add(self, start: int, end: int) -> bool:
        merged_start, merged_end = start, end
        kept: list[tuple[int, int]] = []
        inserted = False
        covered = False
        for block_start, block_end in self._blocks:
            if block_end < merged_start:
                kept.append((block_start, block_end))
            elif block_start > merged_end:
                if not inserted:
                    kept.append((merged_start, merged_end))
                    inserted = True
                kept.append((block_start, block_end))
            else:
                if block_start <= start and end <= block_end:
                    covered = True
                merged_start = min(merged_start, block_start)
                merged_end = max(merged_end, block_end)
        if covered:
            return False
        if not inserted:
            kept.append((merged_start, merged_end))
        if len(kept) > MAX_SCOREBOARD_BLOCKS:
            # Forget the highest range: we may then resend bytes the peer holds, never
            # skip bytes it lacks.
            kept.pop()
        self._blocks[:] = kept
        self.sacked_bytes = sum(block_end - block_start for block_start, block_end in kept)
        return True

    def sacked_range_at(self, offset: int) -> tuple[int, int] | None:
        """The SACKed range holding ``offset`` (from ``base``), if any."""
        for start, end in self._blocks:
            if start > offset:
                return None
            if offset < end:
                return (start, end)
        return None

    def next_sacked_start(self, offset: int) -> int | None:
        """The start of the first SACKed range beginning after ``offset``."""
        for start, _ in self._blocks:
            if start > offset:
                return start
        return None

    def sacked_above(self, offset: int) -> int:
        """SACKed bytes at or above ``offset``."""
        total = 0
        for start, end in self._blocks:
            if end > offset:
                total += end - max(start, offset)
        return total

    def lost_frontier(self, mss: int) -> int:
        """The offset below which every un-SACKed byte counts as lost (RFC 6675 IsLost):
        a byte is lost once DupThresh SACKed ranges, or more than (DupThresh - 1) * SMSS
        SACKed bytes, lie above it."""
        above_bytes = 0
        for count, (start, end) in enumerate(reversed(self._blocks), 1):
            above_bytes += end - start
            if count >= DUPTHRESH or above_bytes > (DUPTHRESH - 1) * mss:
                return start
        return 0

    def is_lost(self, offset: int, mss: int) -> bool:
        return offset < self.lost_frontier(mss) and self.sacked_range_at(offset) is None

    def pipe(self, flight: int, high_rxt: int, mss: int) -> int:
        """RFC 6675 SetPipe, by bytes: what is outstanding, less what the peer holds and
        less what is lost and not yet retransmitted (``high_rxt``: the offset up to which
        lost bytes have been resent)."""
        frontier = self.lost_frontier(mss)
        lost = 0
        cursor = max(high_rxt, 0)
        for start, end in self._blocks:
            if cursor >= frontier:
                break
            if start > cursor:
                lost += min(start, frontier) - cursor
            cursor = max(cursor, end)
        return max(flight - self.sacked_bytes - lost, 0)

    def next_lost(self, high_rxt: int, mss: int) -> tuple[int, int] | None:
        """NextSeg rule 1: the first lost, un-SACKed range at or above ``high_rxt``, as
        (offset, length) with length at most ``mss``."""
        frontier = self.lost_frontier(mss)
        cursor = max(high_rxt, 0)
        for start, end in self._blocks:
            if cursor >= frontier:
                return None
            if cursor < start:
                # The frontier is a block's start, so this hole ends at or below it.
                return (cursor, min(mss, start - cursor))
            cursor = max(cursor, end)
        return None
