"""Receive-side scaling: which of a function's queues a received frame goes to.

The filter table picks the function and a queue for a frame. When the function's driver
turned RSS on (the register block in ``vdev.layout``), an IPv4 TCP or UDP frame goes instead
to the queue its flow hashes to, as on a multi-queue NIC: the Toeplitz hash of Microsoft's
RSS specification ("RSS Hashing Functions", NdisHashFunctionToeplitz) over the input

    source address (4 bytes) | destination address (4) | source port (2) | destination port (2)

in network byte order, with the driver's 40-byte secret key; the low bits of the hash index
an indirection table of queue numbers. Every frame of one flow has the same 4-tuple, so it
goes to the same queue and a flow is never reordered across queues.

What is not spread keeps the filter's queue: ARP, non-IPv4, other IP protocols, malformed
headers, and IP fragments (a later fragment carries no ports, so spreading the first one by
its ports would split a datagram over two queues; all fragments stay together instead).
Frames for the default function never come here.

The driver's registers are hostile: the device reads the block once per look into private
memory, checks it whole (table size a power of two in range, every entry a queue the
function has, no unknown control bit), and a bad setting is refused as a whole: RSS stays
off, ``rss_state`` says REFUSED and ``rss_refusals`` counts it. The device never acts on a
half-checked table.
"""

from __future__ import annotations

from typing import Final

from vdev import layout
from vdev.ring import Registers

_ETHERTYPE_IPV4: Final = b"\x08\x00"
_PROTO_TCP: Final = 6
_PROTO_UDP: Final = 17
_ETH_HLEN: Final = 14
_IPV4_MIN_FRAME: Final = _ETH_HLEN + 20
_TUPLE_SIZE: Final = 12
_U32: Final = 0xFFFFFFFF


def toeplitz_hash(key: bytes, data: bytes) -> int:
    """The Toeplitz hash of ``data`` under ``key``, bit by bit as the specification's
    pseudocode reads (the reference for ``ToeplitzHasher`` and the C path).

    For each set bit of the input, left to right, the result takes the 32 key bits that
    start at that bit's position.
    """
    if len(key) < len(data) + 4:
        raise ValueError("the key must be 4 bytes longer than the input")
    key_bits = int.from_bytes(key, "big")
    key_len = 8 * len(key)
    result = 0
    for position in range(8 * len(data)):
        if data[position // 8] & (0x80 >> (position % 8)):
            result ^= (key_bits >> (key_len - 32 - position)) & _U32
    return result


# REG_RSS_STATE and REG_RSS_REFUSALS, as a slice of the block that starts at REG_RSS_CONTROL.
_DEVICE_WRITTEN = slice(layout.REG_RSS_STATE - layout.REG_RSS_CONTROL, layout.REG_RSS_KEY - layout.REG_RSS_CONTROL)
_DEVICE_WRITTEN_BYTES = layout.REG_RSS_KEY - layout.REG_RSS_STATE

class ToeplitzHasher:
    """The same hash for a fixed key and 12-byte inputs, as twelve table look-ups: the
    contribution of every byte value at every input position is computed once per key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != layout.RSS_KEY_SIZE:
            raise ValueError(f"an RSS key is {layout.RSS_KEY_SIZE} bytes")
        key_bits = int.from_bytes(key, "big")
        key_len = 8 * len(key)
        self._tables: list[list[int]] = []
        for byte_index in range(_TUPLE_SIZE):
            windows = [(key_bits >> (key_len - 32 - (8 * byte_index + bit))) & _U32 for bit in range(8)]
            table = [0] * 256
            for value in range(1, 256):
                contribution = 0
                for bit in range(8):
                    if value & (0x80 >> bit):
                        contribution ^= windows[bit]
                table[value] = contribution
            self._tables.append(table)

    def hash(self, data: bytes | memoryview) -> int:
        result = 0
        for table, value in zip(self._tables, data):
            result ^= table[value]
        return result


def flow_tuple(frame: bytes | memoryview) -> bytes | None:
    """The 12-byte RSS input of an unfragmented IPv4 TCP/UDP frame, or None.

    The checks are the C path's (``rss_tuple`` in vfast.c), so both pick the same frames.
    """
    length = len(frame)
    if length < _IPV4_MIN_FRAME or frame[12:14] != _ETHERTYPE_IPV4:
        return None
    version_ihl = frame[14]
    header_len = (version_ihl & 0x0F) * 4
    total = (frame[16] << 8) | frame[17]
    if version_ihl >> 4 != 4 or header_len < 20 or total < header_len + 4 or _ETH_HLEN + total > length:
        return None
    if frame[23] not in (_PROTO_TCP, _PROTO_UDP):
        return None
    if ((frame[20] << 8) | frame[21]) & 0x3FFF:  # more-fragments or an offset: a fragment
        return None
    ports = _ETH_HLEN + header_len
    return bytes(frame[26:34]) + bytes(frame[ports : ports + 4])


class RssSteering:
    """One function's RSS setting: the device's checked copy of the driver's registers."""

    def __init__(self, num_queues: int) -> None:
        self.num_queues = num_queues
        self.enabled = False
        self.key = bytes(layout.RSS_KEY_SIZE)
        self.table = bytes(1)  # queue numbers, table_size entries
        self.mask = 0
        self.generation = 0  # bumped on every change the device accepted (the C mirror's cue)
        self.refusals = 0
        self._raw: bytes | None = None
        self._hasher: ToeplitzHasher | None = None

    def sync(self, regs: Registers) -> None:
        """Look at the driver's RSS block; act only on a setting that checks out whole."""
        block = bytearray(regs.page[layout.REG_RSS_CONTROL : layout.RSS_BLOCK_END])  # read once
        # Only what the driver writes decides whether the setting is new: the device's own
        # state and refusal counter (written below) sit inside the block too.
        block[_DEVICE_WRITTEN] = bytes(_DEVICE_WRITTEN_BYTES)
        raw = bytes(block)
        if raw == self._raw:
            return
        self._raw = raw
        state = self._accept(raw)
        regs.write32(layout.REG_RSS_STATE, state)
        regs.write32(layout.REG_RSS_REFUSALS, self.refusals & _U32)

    def _accept(self, raw: bytes) -> int:
        def field(offset: int, size: int) -> bytes:
            start = offset - layout.REG_RSS_CONTROL
            return raw[start : start + size]

        control = int.from_bytes(field(layout.REG_RSS_CONTROL, 4), "little")
        if not control & layout.RSS_ENABLE and not control & ~layout.RSS_KNOWN_CONTROL:
            self._turn_off()
            return layout.RSS_STATE_OFF
        size = int.from_bytes(field(layout.REG_RSS_TABLE_SIZE, 4), "little")
        table = field(layout.REG_RSS_TABLE, layout.RSS_TABLE_MAX)[: size if 0 < size <= layout.RSS_TABLE_MAX else 0]
        valid = (
            not control & ~layout.RSS_KNOWN_CONTROL
            and 1 <= size <= layout.RSS_TABLE_MAX
            and size & (size - 1) == 0
            and max(table) < self.num_queues
        )
        if not valid:
            self.refusals += 1
            self._turn_off()
            return layout.RSS_STATE_REFUSED
        key = field(layout.REG_RSS_KEY, layout.RSS_KEY_SIZE)
        if key != self.key or self._hasher is None:
            self._hasher = ToeplitzHasher(key)
            self.key = key
        self.table = table
        self.mask = size - 1
        self.enabled = True
        self.generation += 1
        return layout.RSS_STATE_ON

    def _turn_off(self) -> None:
        if self.enabled:
            self.generation += 1
        self.enabled = False

    def queue_for(self, frame: bytes | memoryview, queue: int) -> int:
        """The queue ``frame`` goes to, given the filter's ``queue``."""
        if not self.enabled:
            return queue
        data = flow_tuple(frame)
        hasher = self._hasher
        if data is None or hasher is None:
            return queue
        return self.table[hasher.hash(data) & self.mask]

    def snapshot(self) -> dict[str, object]:
        return {"enabled": self.enabled, "table_size": len(self.table) if self.enabled else 0, "refusals": self.refusals}
