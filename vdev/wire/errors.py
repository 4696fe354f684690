"""Errors raised by the packet codecs in ``vdev.wire``.

Integrity errors mean the bytes cannot be a well-formed packet of that kind (too short,
bad checksum); sanity errors mean the packet is well formed but asks for something the
protocol forbids. Callers drop and count either kind; they never crash.
"""

from __future__ import annotations


class WireError(ValueError):
    """Any problem decoding a packet."""


class IntegrityError(WireError):
    """The bytes are not a well-formed packet (length, offsets, checksum)."""


class TruncatedError(IntegrityError):
    """The buffer is shorter than the header or the length fields say."""


class ChecksumError(IntegrityError):
    """The checksum does not verify."""


class SanityError(WireError):
    """A well-formed packet whose field values the protocol forbids."""
