"""Sequence number arithmetic modulo 2**32 (RFC 9293 3.4, RFC 1982 serial numbers).

Comparisons are only meaningful between numbers less than 2**31 apart, which the window
sizes of RFC 7323 (at most 2**30) guarantee.
"""

from __future__ import annotations

from typing import Final

SEQ_MOD: Final = 1 << 32
SEQ_MASK: Final = SEQ_MOD - 1  # x & SEQ_MASK wraps x to 32 bits, like seq_add but inline
_MASK: Final = SEQ_MASK
_HALF: Final = 1 << 31


def seq_add(seq: int, delta: int) -> int:
    """``seq + delta`` wrapped to 32 bits (delta may be negative)."""
    return (seq + delta) & _MASK


def seq_diff(a: int, b: int) -> int:
    """The signed distance ``a - b`` in sequence space, in [-2**31, 2**31)."""
    return ((a - b + _HALF) & _MASK) - _HALF


# The comparisons below are ``seq_diff(a, b) <op> 0`` with the subtraction of _HALF moved
# to the other side: the same result without a second function call, and they run
# several times per segment.


def seq_lt(a: int, b: int) -> bool:
    return ((a - b + _HALF) & _MASK) < _HALF


def seq_le(a: int, b: int) -> bool:
    return ((a - b + _HALF) & _MASK) <= _HALF


def seq_gt(a: int, b: int) -> bool:
    return ((a - b + _HALF) & _MASK) > _HALF


def seq_ge(a: int, b: int) -> bool:
    return ((a - b + _HALF) & _MASK) >= _HALF


def seq_in_window(seq: int, start: int, size: int) -> bool:
    """``start <= seq < start + size`` in sequence space."""
    offset = (seq - start) & _MASK
    return offset < size
