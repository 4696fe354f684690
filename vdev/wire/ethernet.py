"""Ethernet II frames (IEEE 802.3 clause 3.2.6 with an EtherType), without the FCS.

The device model and the tap deliver frames without the frame check sequence and
without padding removed, so a frame may carry up to 46 - len(payload) trailing zero
bytes; the layer above uses its own length field to trim them.

Frame layout (offsets in bytes)::

    off  size  field
    0    6     destination MAC
    6    6     source MAC
    12   2     EtherType (network order)
    14   ..    payload
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vdev.wire.errors import SanityError, TruncatedError

HEADER = struct.Struct("!6s6sH")
HEADER_LEN: Final = HEADER.size  # 14
DST_OFFSET: Final = 0
SRC_OFFSET: Final = 6
ETHERTYPE_OFFSET: Final = 12

ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_ARP: Final = 0x0806
ETHERTYPE_IPV6: Final = 0x86DD
ETHERTYPE_VLAN: Final = 0x8100
# Values below this are IEEE 802.3 length fields, not EtherTypes (IEEE 802.3 3.2.6).
ETHERTYPE_MIN: Final = 0x0600

MAC_LEN: Final = 6
BROADCAST_MAC: Final = b"\xff" * MAC_LEN
ZERO_MAC: Final = b"\x00" * MAC_LEN
MIN_FRAME_LEN: Final = 60  # 64 bytes on the wire less the 4-byte FCS


def is_multicast_mac(mac: bytes) -> bool:
    """The I/G bit: the least significant bit of the first octet (broadcast included)."""
    return bool(mac[0] & 1)


def mac_to_str(mac: bytes) -> str:
    """``b"\\x02\\x00..."`` -> ``"02:00:..."``."""
    if len(mac) != MAC_LEN:
        raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
    return ":".join(f"{octet:02x}" for octet in mac)


def mac_to_bytes(text: str) -> bytes:
    """``"02:00:00:00:00:01"`` -> 6 bytes; raises ValueError on anything else."""
    parts = text.split(":")
    if len(parts) != MAC_LEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"not a MAC address: {text!r}")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"not a MAC address: {text!r}") from None


@dataclass(frozen=True, slots=True)
class EthernetFrame:
    dst: bytes
    src: bytes
    ethertype: int
    payload: bytes

    def emit(self) -> bytes:
        return build(self.dst, self.src, self.ethertype, self.payload)


def parse(buf: bytes | bytearray | memoryview) -> EthernetFrame:
    """Decode a frame; the payload keeps any link-layer padding."""
    if len(buf) < HEADER_LEN:
        raise TruncatedError(f"Ethernet frame of {len(buf)} bytes is shorter than its header")
    dst, src, ethertype = HEADER.unpack_from(buf, 0)
    # IEEE 802.3 4.2.3: a source address is always an individual address.
    if src[0] & 1:
        raise SanityError(f"Ethernet source {mac_to_str(src)} is a group address")
    return EthernetFrame(dst, src, ethertype, bytes(buf[HEADER_LEN:]))


def header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    """The 14-byte header alone (to prepend to a payload built elsewhere)."""
    _check_mac(dst, "destination")
    _check_mac(src, "source")
    return HEADER.pack(dst, src, ethertype)


def build(dst: bytes, src: bytes, ethertype: int, payload: bytes | bytearray | memoryview) -> bytes:
    """A complete frame. No padding is added: the tap and the device pad short frames."""
    return header(dst, src, ethertype) + bytes(payload)


def _check_mac(mac: bytes, what: str) -> None:
    # struct's "6s" would silently pad or cut a wrong-sized value.
    if len(mac) != MAC_LEN:
        raise ValueError(f"{what} MAC must be 6 bytes, not {len(mac)}")
