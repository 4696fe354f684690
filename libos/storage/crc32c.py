"""CRC32C (Castagnoli), the checksum of the persistent log.

CRC32C is the polynomial 0x1EDC6F41 (bit-reflected: 0x82F63B78), chosen by iSCSI
(RFC 3720 section 12.1 and appendix B.4) because it detects more error patterns than the
CRC-32 of Ethernet/zlib at the same width; SSE4.2 and ARMv8 compute it in hardware, which
is why storage formats (ext4 metadata, btrfs, iSCSI, NVMe) use it. The standard library only
has zlib's CRC-32, so :func:`crc32c` uses the ``crc32c`` package (hardware instruction)
when it is installed and falls back to the table-driven :func:`crc32c_py` otherwise.
Both follow the usual convention: initial value 0, the running value of a previous call
passed back in to continue over more data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

_POLY_REFLECTED: Final = 0x82F63B78
_MASK32: Final = 0xFFFFFFFF


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE: Final = _make_table()


def crc32c_py(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """Pure-Python CRC32C of ``data``, continuing from ``crc`` (0 to start)."""
    if not 0 <= crc <= _MASK32:
        raise ValueError(f"crc must be a 32-bit unsigned value, got {crc}")
    table = _TABLE
    # The register holds the complement of the published value (RFC 3720 B.4: initial
    # value all ones, final XOR all ones), so a running value continues seamlessly.
    value = crc ^ _MASK32
    for byte in memoryview(data).cast("B"):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ _MASK32


def _load_native() -> Callable[[bytes | bytearray | memoryview, int], int] | None:
    try:
        import crc32c as native
    except ImportError:
        return None

    def native_crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
        if not 0 <= crc <= _MASK32:
            raise ValueError(f"crc must be a 32-bit unsigned value, got {crc}")
        return native.crc32c(data, crc)

    return native_crc32c


_native: Final = _load_native()
HAVE_NATIVE: Final = _native is not None


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C of ``data``, continuing from ``crc`` (0 to start); native when available."""
    if _native is not None:
        return _native(data, crc)
    return crc32c_py(data, crc)
