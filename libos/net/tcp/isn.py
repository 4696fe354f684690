"""Initial sequence numbers per RFC 6528: ISN = M + F(4-tuple, secret key).

M is a clock ticking every 4 microseconds (RFC 9293 3.4.1), taken from the injected
``now`` so a fake clock gives reproducible numbers; F is a keyed hash so an off-path
attacker cannot predict the ISN of a connection it does not see (RFC 6528 section 3).
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Final

_TUPLE: Final = struct.Struct("!4sH4sH")
_TICKS_PER_SECOND: Final = 250_000  # one tick per 4 microseconds


class IsnGenerator:
    """Keyed ISN source; the key comes from ``os.urandom`` unless a test injects one."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | None = None) -> None:
        if key is None:
            key = os.urandom(32)
        if not 16 <= len(key) <= 32:
            raise ValueError("ISN key must be 16 to 32 bytes")
        self._key = key

    def isn(self, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int, now: float) -> int:
        tuple_bytes = _TUPLE.pack(local_ip, local_port, remote_ip, remote_port)
        digest = hashlib.blake2s(tuple_bytes, key=self._key, digest_size=4).digest()
        clock = int(now * _TICKS_PER_SECOND)
        return (clock + int.from_bytes(digest, "big")) & 0xFFFFFFFF
