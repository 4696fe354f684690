"""A deterministic reader of fuzz input bytes (independent of atheris, so that a saved
input replays the same way under pytest as under the fuzzer).

Every method returns something even when the input is used up (zeros), so a harness never
has to guard against running out; it checks ``exhausted`` to stop its loops.
"""

from __future__ import annotations


class Input:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    @property
    def left(self) -> int:
        return max(0, len(self.data) - self.pos)

    def take(self, count: int) -> bytes:
        count = max(0, count)
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes).ljust(nbytes, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, bound: int) -> int:
        """An integer in [0, bound); bound <= 2**32."""
        if bound <= 1:
            return 0
        nbytes = 1 if bound <= 0x100 else 2 if bound <= 0x10000 else 4
        return self.uint(nbytes) % bound

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def choice(self, options: list[int] | tuple[int, ...]) -> int:
        return options[self.below(len(options))]

    def blob(self, max_len: int) -> bytes:
        """A length-prefixed chunk of at most ``max_len`` bytes."""
        return self.take(self.below(max_len + 1))

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk

    def interesting(self, bits: int) -> int:
        """An unsigned ``bits``-wide value, biased to the edges where checks go wrong."""
        mask = (1 << bits) - 1
        kind = self.below(8)
        if kind == 0:
            return 0
        if kind == 1:
            return mask
        if kind == 2:
            return 1 << self.below(bits)
        if kind == 3:
            return (1 << self.below(bits)) - 1
        if kind == 4:
            return (mask - self.below(16)) & mask
        return self.uint((bits + 7) // 8) & mask
