"""Out-of-order receive queue (RFC 9293 3.10.7.4: segments beyond RCV.NXT but inside the
window may be held for later delivery).

Bounded two ways: the caller only offers bytes inside the receive window, and the number
of separate holes is capped so a peer sending one-byte fragments cannot make the list
(and the work per insertion) grow without bound. Offsets are relative to RCV.NXT, so no
sequence wrap-around arithmetic is needed here.
"""

from __future__ import annotations

from typing import Final

DEFAULT_MAX_FRAGMENTS: Final = 64


class Reassembler:
    """Holds byte ranges keyed by their offset from the next expected byte."""

    __slots__ = ("_fragments", "_max_fragments", "buffered")

    def __init__(self, max_fragments: int = DEFAULT_MAX_FRAGMENTS) -> None:
        if max_fragments < 1:
            raise ValueError("max_fragments must be at least 1")
        # Sorted, non-overlapping, non-adjacent [offset, data] pairs.
        self._fragments: list[tuple[int, bytes]] = []
        self._max_fragments = max_fragments
        self.buffered = 0

    def __len__(self) -> int:
        return len(self._fragments)

    def insert(self, offset: int, data: bytes | memoryview) -> bool:
        """Store ``data`` at ``offset`` (> 0) bytes past RCV.NXT, merging with neighbours.

        Returns False when the range was dropped because the fragment cap is reached.
        """
        if offset <= 0:
            raise ValueError("out-of-order data must start past RCV.NXT")
        if not data:
            return True
        start, end = offset, offset + len(data)
        before: list[tuple[int, bytes]] = []
        touching: list[tuple[int, bytes]] = []
        after: list[tuple[int, bytes]] = []
        for fragment in self._fragments:
            frag_start = fragment[0]
            frag_end = frag_start + len(fragment[1])
            if frag_end < start:
                before.append(fragment)
            elif frag_start > end:
                after.append(fragment)
            else:
                touching.append(fragment)
        if not touching and len(self._fragments) >= self._max_fragments:
            return False
        merged_start = min([start] + [frag[0] for frag in touching])
        merged_end = max([end] + [frag[0] + len(frag[1]) for frag in touching])
        buf = bytearray(merged_end - merged_start)
        buf[start - merged_start : end - merged_start] = data
        for frag_start, frag_data in touching:
            # Bytes already held win where ranges overlap; a correct peer sends equal ones.
            buf[frag_start - merged_start : frag_start - merged_start + len(frag_data)] = frag_data
            self.buffered -= len(frag_data)
        self._fragments = before + [(merged_start, bytes(buf))] + after
        self.buffered += len(buf)
        return True

    def ranges(self) -> list[tuple[int, int]]:
        """The held ranges as (offset, length), lowest first: what SACK reports."""
        return [(offset, len(data)) for offset, data in self._fragments]

    def advance(self, delivered: int) -> bytes:
        """RCV.NXT moved forward by ``delivered`` bytes: return the held bytes that are
        now in order (possibly empty) and rebase the rest past them.

        The caller advances RCV.NXT by the length of what is returned as well.
        """
        out = b""
        kept: list[tuple[int, bytes]] = []
        for frag_start, frag_data in self._fragments:
            start = frag_start - delivered
            if start + len(frag_data) <= 0:
                self.buffered -= len(frag_data)
                continue
            if start <= 0:
                # Fragments never touch, so at most one can straddle the new RCV.NXT.
                out = frag_data[-start:]
                self.buffered -= len(frag_data)
                continue
            kept.append((start, frag_data))
        if out:
            kept = [(start - len(out), data) for start, data in kept]
        self._fragments = kept
        return out

    def clear(self) -> None:
        self._fragments.clear()
        self.buffered = 0
