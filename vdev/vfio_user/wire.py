"""The vfio-user wire format (a core subset), sans-I/O.

Layouts and constants follow the vfio-user specification (QEMU
``docs/interop/vfio-user.rst``) and Linux ``uapi/linux/vfio.h``: every structure is
packed and little-endian, and each message is a 16-byte header plus a payload whose
length is ``msg_size - 16`` (never ``argsz``). Offsets in payload layouts count from the
payload start.

Nothing here touches a socket. ``MessageReader`` is fed what ``recvmsg`` returned (bytes
and the file descriptors of its SCM_RIGHTS control message) and hands back whole
messages; encoders return bytes that the caller sends.

Two exception types: ``VfioError`` is a refused request that becomes an error reply (the
stream stays usable); ``ProtocolError`` is broken framing after which the stream cannot be
resynchronised and the connection must be closed.
"""

from __future__ import annotations

import errno as errno_codes
import json
import os
import struct
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

HEADER: Final = struct.Struct("<HHIII")  # msg_id, command, msg_size, flags, error_no
HEADER_SIZE: Final = HEADER.size

CMD_VERSION: Final = 1
CMD_DMA_MAP: Final = 2
CMD_DMA_UNMAP: Final = 3
CMD_DEVICE_GET_INFO: Final = 4
CMD_DEVICE_GET_REGION_INFO: Final = 5
CMD_DEVICE_GET_REGION_IO_FDS: Final = 6
CMD_DEVICE_GET_IRQ_INFO: Final = 7
CMD_DEVICE_SET_IRQS: Final = 8
CMD_REGION_READ: Final = 9
CMD_REGION_WRITE: Final = 10
CMD_DMA_READ: Final = 11
CMD_DMA_WRITE: Final = 12
CMD_DEVICE_RESET: Final = 13
CMD_REGION_WRITE_MULTI: Final = 15
CMD_DEVICE_FEATURE: Final = 16

COMMAND_NAMES: Final = {
    CMD_VERSION: "VERSION",
    CMD_DMA_MAP: "DMA_MAP",
    CMD_DMA_UNMAP: "DMA_UNMAP",
    CMD_DEVICE_GET_INFO: "DEVICE_GET_INFO",
    CMD_DEVICE_GET_REGION_INFO: "DEVICE_GET_REGION_INFO",
    CMD_DEVICE_GET_REGION_IO_FDS: "DEVICE_GET_REGION_IO_FDS",
    CMD_DEVICE_GET_IRQ_INFO: "DEVICE_GET_IRQ_INFO",
    CMD_DEVICE_SET_IRQS: "DEVICE_SET_IRQS",
    CMD_REGION_READ: "REGION_READ",
    CMD_REGION_WRITE: "REGION_WRITE",
    CMD_DMA_READ: "DMA_READ",
    CMD_DMA_WRITE: "DMA_WRITE",
    CMD_DEVICE_RESET: "DEVICE_RESET",
    CMD_REGION_WRITE_MULTI: "REGION_WRITE_MULTI",
    CMD_DEVICE_FEATURE: "DEVICE_FEATURE",
}

# Header flags: the low four bits are the message type.
TYPE_MASK: Final = 0xF
TYPE_COMMAND: Final = 0x0
TYPE_REPLY: Final = 0x1
FLAG_NO_REPLY: Final = 0x10
FLAG_ERROR: Final = 0x20

DEVICE_FLAG_RESET: Final = 0x1
DEVICE_FLAG_PCI: Final = 0x2

REGION_FLAG_READ: Final = 0x1
REGION_FLAG_WRITE: Final = 0x2
REGION_FLAG_MMAP: Final = 0x4
REGION_FLAG_CAPS: Final = 0x8

CAP_SPARSE_MMAP: Final = 1
CAP_TYPE: Final = 2
CAP_SPARSE_MMAP_VERSION: Final = 1

IRQ_INFO_EVENTFD: Final = 0x1
IRQ_INFO_MASKABLE: Final = 0x2
IRQ_INFO_AUTOMASKED: Final = 0x4
IRQ_INFO_NORESIZE: Final = 0x8

IRQ_DATA_NONE: Final = 0x1
IRQ_DATA_BOOL: Final = 0x2
IRQ_DATA_EVENTFD: Final = 0x4
IRQ_DATA_MASK: Final = 0x7
IRQ_ACTION_MASK: Final = 0x8
IRQ_ACTION_UNMASK: Final = 0x10
IRQ_ACTION_TRIGGER: Final = 0x20
IRQ_ACTION_MASK_BITS: Final = 0x38

DMA_FLAG_READ: Final = 0x1
DMA_FLAG_WRITE: Final = 0x2

PCI_BAR0_REGION: Final = 0
PCI_ROM_REGION: Final = 6
PCI_CONFIG_REGION: Final = 7
PCI_VGA_REGION: Final = 8
PCI_NUM_REGIONS: Final = 9

PCI_INTX_IRQ: Final = 0
PCI_MSI_IRQ: Final = 1
PCI_MSIX_IRQ: Final = 2
PCI_ERR_IRQ: Final = 3
PCI_REQ_IRQ: Final = 4
PCI_NUM_IRQS: Final = 5

# Capability defaults when the peer's VERSION leaves a key out (spec, "Version").
DEFAULT_MAX_MSG_FDS: Final = 1
DEFAULT_MAX_DATA_XFER_SIZE: Final = 1 << 20
DEFAULT_MAX_DMA_MAPS: Final = 65535
DEFAULT_PGSIZES: Final = 4096
# libvfio-user bounds max_msg_fds the same way: an ancillary buffer for more is silly.
MAX_MSG_FDS_LIMIT: Final = 1024

SUPPORTED_MAJOR: Final = 0
SUPPORTED_MINOR: Final = 2

U32_MAX: Final = 0xFFFFFFFF
U64_LIMIT: Final = 1 << 64

VERSION_FIXED: Final = struct.Struct("<HH")  # major, minor; JSON follows
DMA_MAP: Final = struct.Struct("<IIQQQ")  # argsz, flags, offset, address, size
DMA_UNMAP: Final = struct.Struct("<IIQQ")  # argsz, flags, address, size
DEVICE_INFO: Final = struct.Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO: Final = struct.Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
CAP_HEADER: Final = struct.Struct("<HHI")  # id, version, next
SPARSE_MMAP_COUNT: Final = struct.Struct("<II")  # nr_areas, reserved
SPARSE_AREA: Final = struct.Struct("<QQ")  # offset, size
IRQ_INFO: Final = struct.Struct("<IIII")  # argsz, flags, index, count
SET_IRQS: Final = struct.Struct("<IIIII")  # argsz, flags, index, start, count
REGION_ACCESS: Final = struct.Struct("<QII")  # offset, region, count; data follows

# The fixed reply payload sizes a request's argsz must at least allow.
DEVICE_INFO_SIZE: Final = DEVICE_INFO.size
REGION_INFO_SIZE: Final = REGION_INFO.size
IRQ_INFO_SIZE: Final = IRQ_INFO.size
SPARSE_CAP_SIZE: Final = CAP_HEADER.size + SPARSE_MMAP_COUNT.size


class VfioError(Exception):
    """A request refused with an errno; the server answers it with an error reply."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(f"{message} [{errno_codes.errorcode.get(errno, errno)}]")
        self.errno = errno
        self.message = message


class ProtocolError(Exception):
    """Broken framing: the byte stream cannot be trusted any more, close it.

    ``header`` is the offending message's header when one was read, so that the server
    can still send an error reply before closing (spec, "Bad input").
    """

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.header = header


def close_fds(fds: Sequence[int]) -> None:
    """Close every fd in ``fds``, ignoring ones already gone (cleanup must not stop)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass(frozen=True, slots=True)
class Header:
    msg_id: int
    command: int
    msg_size: int
    flags: int
    error_no: int

    @property
    def message_type(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    @property
    def is_error(self) -> bool:
        return bool(self.flags & FLAG_ERROR)


@dataclass(frozen=True, slots=True)
class Message:
    """One whole message; the receiver owns ``fds`` and must close or keep each one."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


def encode_message(
    msg_id: int, command: int, payload: bytes = b"", flags: int = TYPE_COMMAND, error_no: int = 0
) -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, error_no) + payload


def encode_reply(request: Header, payload: bytes = b"") -> bytes:
    return encode_message(request.msg_id, request.command, payload, TYPE_REPLY)


def encode_error_reply(request: Header, errno: int) -> bytes:
    # An error reply is header-only with ERROR set (spec, "Header").
    return encode_message(request.msg_id, request.command, b"", TYPE_REPLY | FLAG_ERROR, errno)


def _short(what: str, payload: bytes, need: int) -> VfioError:
    return VfioError(errno_codes.EINVAL, f"{what}: payload of {len(payload)} bytes, need {need}")


# VERSION ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The limits one side announces in VERSION; defaults apply to absent keys."""

    max_msg_fds: int = DEFAULT_MAX_MSG_FDS
    max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE
    max_dma_maps: int = DEFAULT_MAX_DMA_MAPS
    pgsizes: int = DEFAULT_PGSIZES

    def to_json(self) -> dict[str, object]:
        return {
            "capabilities": {
                "max_msg_fds": self.max_msg_fds,
                "max_data_xfer_size": self.max_data_xfer_size,
                "max_dma_maps": self.max_dma_maps,
                "pgsizes": self.pgsizes,
            }
        }


@dataclass(frozen=True, slots=True)
class Version:
    major: int
    minor: int
    capabilities: Capabilities = field(default_factory=Capabilities)


def encode_version(major: int, minor: int, json_object: Mapping[str, object] | None) -> bytes:
    """A VERSION payload; the JSON text is NUL-terminated as the spec requires."""
    body = VERSION_FIXED.pack(major, minor)
    if json_object is None:
        return body
    text = json.dumps(json_object, separators=(",", ":")).encode()
    return body + text + b"\x00"


def _positive_int(caps: Mapping[str, object], key: str, default: int, limit: int) -> int:
    value = caps.get(key, default)
    # bool is an int subclass in Python; JSON true is not a number here.
    if not isinstance(value, int) or isinstance(value, bool):
        raise VfioError(errno_codes.EINVAL, f"VERSION: {key} must be an integer")
    if not 1 <= value <= limit:
        raise VfioError(errno_codes.EINVAL, f"VERSION: {key}={value} out of range 1..{limit}")
    return value


def decode_version(payload: bytes) -> Version:
    """Parse a VERSION payload (either direction); unknown capability keys are ignored."""
    if len(payload) < VERSION_FIXED.size:
        raise _short("VERSION", payload, VERSION_FIXED.size)
    major, minor = VERSION_FIXED.unpack_from(payload)
    text = payload[VERSION_FIXED.size :]
    if not text:
        return Version(major, minor)
    if text[-1] != 0:
        raise VfioError(errno_codes.EINVAL, "VERSION: JSON is not NUL-terminated")
    try:
        document = json.loads(text[:-1].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise VfioError(errno_codes.EINVAL, f"VERSION: bad JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise VfioError(errno_codes.EINVAL, "VERSION: JSON is not an object")
    caps = document.get("capabilities", {})
    if not isinstance(caps, dict):
        raise VfioError(errno_codes.EINVAL, "VERSION: capabilities is not an object")
    pgsizes = _positive_int(caps, "pgsizes", DEFAULT_PGSIZES, U64_LIMIT - 1)
    return Version(
        major,
        minor,
        Capabilities(
            max_msg_fds=_positive_int(caps, "max_msg_fds", DEFAULT_MAX_MSG_FDS, MAX_MSG_FDS_LIMIT),
            max_data_xfer_size=_positive_int(
                caps, "max_data_xfer_size", DEFAULT_MAX_DATA_XFER_SIZE, U32_MAX
            ),
            max_dma_maps=_positive_int(caps, "max_dma_maps", DEFAULT_MAX_DMA_MAPS, U32_MAX),
            pgsizes=pgsizes,
        ),
    )


# DMA_MAP / DMA_UNMAP -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmaMapRequest:
    argsz: int
    flags: int
    offset: int
    address: int
    size: int


@dataclass(frozen=True, slots=True)
class DmaUnmapRequest:
    argsz: int
    flags: int
    address: int
    size: int


def encode_dma_map(flags: int, offset: int, address: int, size: int) -> bytes:
    return DMA_MAP.pack(DMA_MAP.size, flags, offset, address, size)


def decode_dma_map(payload: bytes) -> DmaMapRequest:
    # argsz is the request size for DMA_MAP; no extension is defined, so exactly 32.
    if len(payload) != DMA_MAP.size:
        raise _short("DMA_MAP", payload, DMA_MAP.size)
    request = DmaMapRequest(*DMA_MAP.unpack(payload))
    if request.argsz != DMA_MAP.size:
        raise VfioError(errno_codes.EINVAL, f"DMA_MAP: argsz {request.argsz} != {DMA_MAP.size}")
    return request


def encode_dma_unmap(flags: int, address: int, size: int) -> bytes:
    return DMA_UNMAP.pack(DMA_UNMAP.size, flags, address, size)


def decode_dma_unmap(payload: bytes) -> DmaUnmapRequest:
    if len(payload) < DMA_UNMAP.size:
        raise _short("DMA_UNMAP", payload, DMA_UNMAP.size)
    request = DmaUnmapRequest(*DMA_UNMAP.unpack_from(payload))
    if request.argsz < DMA_UNMAP.size:
        raise VfioError(errno_codes.EINVAL, f"DMA_UNMAP: argsz {request.argsz} too small")
    return request


# DEVICE_GET_INFO -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int


def encode_device_info_request(argsz: int = DEVICE_INFO_SIZE) -> bytes:
    return DEVICE_INFO.pack(argsz, 0, 0, 0)


def decode_device_info_request(payload: bytes) -> int:
    """Returns argsz; the other request fields are defined as zero and not used."""
    if len(payload) < DEVICE_INFO.size:
        raise _short("DEVICE_GET_INFO", payload, DEVICE_INFO.size)
    argsz: int = DEVICE_INFO.unpack_from(payload)[0]
    if argsz < DEVICE_INFO_SIZE:
        raise VfioError(errno_codes.EINVAL, f"DEVICE_GET_INFO: argsz {argsz} too small")
    return argsz


def encode_device_info_reply(info: DeviceInfo) -> bytes:
    return DEVICE_INFO.pack(DEVICE_INFO_SIZE, info.flags, info.num_regions, info.num_irqs)


def decode_device_info_reply(payload: bytes) -> DeviceInfo:
    if len(payload) < DEVICE_INFO.size:
        raise _short("DEVICE_GET_INFO reply", payload, DEVICE_INFO.size)
    _, flags, num_regions, num_irqs = DEVICE_INFO.unpack_from(payload)
    return DeviceInfo(flags, num_regions, num_irqs)


# DEVICE_GET_REGION_INFO ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """A region as the device describes it.

    ``fd`` is the descriptor to mmap when MMAP is set; on the wire it travels out of band
    (SCM_RIGHTS), so a decoded reply has ``fd=None`` and the fd comes separately.
    ``sparse_areas`` are (offset, size) pairs inside the region that may be mmapped;
    empty with MMAP set means the whole region.
    """

    flags: int
    size: int
    fd: int | None = None
    offset: int = 0
    sparse_areas: Sequence[tuple[int, int]] = ()


def encode_region_info_request(index: int, argsz: int) -> bytes:
    return REGION_INFO.pack(argsz, 0, index, 0, 0, 0)


def decode_region_info_request(payload: bytes) -> tuple[int, int]:
    """Returns (argsz, index)."""
    if len(payload) < REGION_INFO.size:
        raise _short("DEVICE_GET_REGION_INFO", payload, REGION_INFO.size)
    argsz, _, index, _, _, _ = REGION_INFO.unpack_from(payload)
    if argsz < REGION_INFO_SIZE:
        raise VfioError(errno_codes.EINVAL, f"DEVICE_GET_REGION_INFO: argsz {argsz} too small")
    return argsz, index


def region_info_reply_size(info: RegionInfo) -> int:
    if not info.flags & REGION_FLAG_MMAP:
        return REGION_INFO_SIZE
    areas = len(info.sparse_areas) or 1
    return REGION_INFO_SIZE + SPARSE_CAP_SIZE + SPARSE_AREA.size * areas


def encode_region_info_reply(argsz: int, index: int, info: RegionInfo) -> tuple[bytes, bool]:
    """The reply payload and whether the region's fd goes with it.

    An mmappable region always gets a sparse-mmap capability (one area covering the
    whole region when the device names none), as libvfio-user does. When the client's
    argsz is too small for the capabilities, only the fixed part goes back, with argsz
    saying how much is needed, and no fd: the client retries (VFIO's argsz convention).
    """
    needed = region_info_reply_size(info)
    flags = info.flags & ~REGION_FLAG_CAPS
    if needed == REGION_INFO_SIZE:
        return REGION_INFO.pack(needed, flags, index, 0, info.size, info.offset), False
    flags |= REGION_FLAG_CAPS
    if argsz < needed:
        return REGION_INFO.pack(needed, flags, index, 0, info.size, info.offset), False
    areas = list(info.sparse_areas) or [(0, info.size)]
    parts = [
        REGION_INFO.pack(needed, flags, index, REGION_INFO_SIZE, info.size, info.offset),
        CAP_HEADER.pack(CAP_SPARSE_MMAP, CAP_SPARSE_MMAP_VERSION, 0),
        SPARSE_MMAP_COUNT.pack(len(areas), 0),
    ]
    parts.extend(SPARSE_AREA.pack(area_offset, area_size) for area_offset, area_size in areas)
    return b"".join(parts), True


def decode_region_info_reply(payload: bytes) -> tuple[int, int, RegionInfo]:
    """Returns (argsz, index, info) with every capability offset checked against the payload.

    Capability offsets count from the payload start; each ``next`` must move forward, so a
    hostile chain cannot loop.
    """
    if len(payload) < REGION_INFO.size:
        raise _short("DEVICE_GET_REGION_INFO reply", payload, REGION_INFO.size)
    argsz, flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(payload)
    areas: list[tuple[int, int]] = []
    if flags & REGION_FLAG_CAPS and len(payload) > REGION_INFO.size:
        position = cap_offset
        while position:
            if position < REGION_INFO.size or position + CAP_HEADER.size > len(payload):
                raise VfioError(errno_codes.EINVAL, f"region info: capability at {position} out of bounds")
            cap_id, cap_version, next_offset = CAP_HEADER.unpack_from(payload, position)
            if cap_id == CAP_SPARSE_MMAP:
                areas.extend(_decode_sparse(payload, position, size))
            if next_offset and next_offset <= position:
                raise VfioError(errno_codes.EINVAL, "region info: capability chain goes backwards")
            position = next_offset
    return argsz, index, RegionInfo(flags, size, None, offset, tuple(areas))


def _decode_sparse(payload: bytes, position: int, region_size: int) -> list[tuple[int, int]]:
    start = position + CAP_HEADER.size
    if start + SPARSE_MMAP_COUNT.size > len(payload):
        raise VfioError(errno_codes.EINVAL, "region info: sparse capability truncated")
    nr_areas, _ = SPARSE_MMAP_COUNT.unpack_from(payload, start)
    start += SPARSE_MMAP_COUNT.size
    if start + nr_areas * SPARSE_AREA.size > len(payload):
        raise VfioError(errno_codes.EINVAL, f"region info: {nr_areas} sparse areas overrun the reply")
    areas = []
    for number in range(nr_areas):
        area_offset, area_size = SPARSE_AREA.unpack_from(payload, start + number * SPARSE_AREA.size)
        if area_offset + area_size > region_size:
            raise VfioError(errno_codes.EINVAL, "region info: sparse area beyond the region")
        areas.append((area_offset, area_size))
    return areas


# DEVICE_GET_IRQ_INFO / DEVICE_SET_IRQS -------------------------------------------


@dataclass(frozen=True, slots=True)
class IrqInfo:
    flags: int
    count: int


def encode_irq_info_request(index: int, argsz: int = IRQ_INFO_SIZE) -> bytes:
    return IRQ_INFO.pack(argsz, 0, index, 0)


def decode_irq_info_request(payload: bytes) -> tuple[int, int]:
    """Returns (argsz, index)."""
    if len(payload) < IRQ_INFO.size:
        raise _short("DEVICE_GET_IRQ_INFO", payload, IRQ_INFO.size)
    argsz, _, index, _ = IRQ_INFO.unpack_from(payload)
    if argsz < IRQ_INFO_SIZE:
        raise VfioError(errno_codes.EINVAL, f"DEVICE_GET_IRQ_INFO: argsz {argsz} too small")
    return argsz, index


def encode_irq_info_reply(index: int, info: IrqInfo) -> bytes:
    return IRQ_INFO.pack(IRQ_INFO_SIZE, info.flags, index, info.count)


def decode_irq_info_reply(payload: bytes) -> tuple[int, IrqInfo]:
    """Returns (index, info)."""
    if len(payload) < IRQ_INFO.size:
        raise _short("DEVICE_GET_IRQ_INFO reply", payload, IRQ_INFO.size)
    _, flags, index, count = IRQ_INFO.unpack_from(payload)
    return index, IrqInfo(flags, count)


@dataclass(frozen=True, slots=True)
class SetIrqsRequest:
    argsz: int
    flags: int
    index: int
    start: int
    count: int
    data: bytes = b""


def encode_set_irqs(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return SET_IRQS.pack(SET_IRQS.size + len(data), flags, index, start, count) + data


def decode_set_irqs(payload: bytes) -> SetIrqsRequest:
    # argsz is the request size here (spec, "DEVICE_SET_IRQS").
    if len(payload) < SET_IRQS.size:
        raise _short("DEVICE_SET_IRQS", payload, SET_IRQS.size)
    argsz, flags, index, start, count = SET_IRQS.unpack_from(payload)
    if argsz != len(payload):
        raise VfioError(errno_codes.EINVAL, f"DEVICE_SET_IRQS: argsz {argsz} != payload {len(payload)}")
    return SetIrqsRequest(argsz, flags, index, start, count, payload[SET_IRQS.size :])


# REGION_READ / REGION_WRITE ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegionAccess:
    offset: int
    region: int
    count: int
    data: bytes = b""


def encode_region_access(offset: int, region: int, count: int, data: bytes = b"") -> bytes:
    return REGION_ACCESS.pack(offset, region, count) + data


def decode_region_access(payload: bytes, with_data: bool) -> RegionAccess:
    """A REGION_READ/WRITE body; with data, the payload must be exactly 16 + count."""
    if len(payload) < REGION_ACCESS.size:
        raise _short("region access", payload, REGION_ACCESS.size)
    offset, region, count = REGION_ACCESS.unpack_from(payload)
    if with_data:
        if len(payload) != REGION_ACCESS.size + count:
            raise VfioError(
                errno_codes.EINVAL,
                f"region access: {len(payload) - REGION_ACCESS.size} data bytes, count {count}",
            )
        return RegionAccess(offset, region, count, payload[REGION_ACCESS.size :])
    return RegionAccess(offset, region, count)


# Stream framing ------------------------------------------------------------------


class MessageReader:
    """Cuts a vfio-user byte stream into messages and pairs each with its fds.

    Feed it every ``recvmsg`` result, in order: ``feed(data, fds)``. Linux delivers the
    SCM_RIGHTS fds of an AF_UNIX stream write together with the first byte of that write,
    and a ``recvmsg`` that picks up fds stops right there (``unix_stream_read_generic``
    breaks after the skb that carried them). A sender puts the fds on the ``sendmsg`` of
    the message header, so the fds of one ``recvmsg`` belong to the *last* header that
    starts inside its bytes; fds on a chunk in which no header starts are a framing error.

    The reader owns every fd fed to it until it hands the fd out with a message; on
    ``ProtocolError`` the fds of the failing feed are closed at once, and ``close()``
    closes the rest. Headers are checked as soon as their 16 bytes are in, so an oversize
    ``msg_size`` is refused before its body is buffered.
    """

    def __init__(self, max_msg_size: int, expected_type: int = TYPE_COMMAND) -> None:
        if max_msg_size < HEADER_SIZE:
            raise ValueError("max_msg_size below the header size")
        self.max_msg_size = max_msg_size
        self.expected_type = expected_type
        self._buffer = bytearray()
        self._base = 0  # stream offset of _buffer[0], always a message start
        self._fed = 0  # stream offset one past the last byte fed
        self._scan = 0  # stream offset of the first header not yet checked
        self._headers: deque[Header] = deque()  # checked headers from _base on
        self._fds_at: dict[int, list[int]] = {}  # message start -> its fds
        self._broken = False

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def pending_fds(self) -> int:
        return sum(len(fds) for fds in self._fds_at.values())

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if self._broken:
            close_fds(fds)
            raise ProtocolError("reader already failed")
        chunk_start = self._fed
        self._buffer += data
        self._fed += len(data)
        last_start = None
        try:
            while self._scan + HEADER_SIZE <= self._fed:
                position = self._scan - self._base
                header = Header(*HEADER.unpack_from(self._buffer, position))
                self._check_header(header)
                if self._scan >= chunk_start:
                    last_start = self._scan
                self._headers.append(header)
                self._scan += header.msg_size
            if chunk_start <= self._scan < self._fed:
                last_start = self._scan
            if fds:
                if last_start is None:
                    raise ProtocolError("fds arrived without a message header")
                self._fds_at[last_start] = list(fds)
        except ProtocolError:
            self._broken = True
            close_fds(fds)
            raise

    def _check_header(self, header: Header) -> None:
        if header.msg_size < HEADER_SIZE:
            raise ProtocolError(f"msg_size {header.msg_size} below the header size", header)
        if header.msg_size > self.max_msg_size:
            raise ProtocolError(f"msg_size {header.msg_size} over the limit {self.max_msg_size}", header)
        if header.message_type != self.expected_type:
            raise ProtocolError(f"message type {header.message_type} unexpected", header)

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes arrive."""
        if not self._headers:
            return None
        header = self._headers[0]
        if self._base + header.msg_size > self._fed:
            return None
        self._headers.popleft()
        payload = bytes(self._buffer[HEADER_SIZE : header.msg_size])
        # bytearray keeps a start offset, so deleting from the front is cheap.
        del self._buffer[: header.msg_size]
        fds = self._fds_at.pop(self._base, None)
        self._base += header.msg_size
        return Message(header, payload, tuple(fds) if fds else ())

    def __iter__(self) -> Iterator[Message]:
        while (message := self.next_message()) is not None:
            yield message

    def close(self) -> None:
        """Close every fd not yet handed out; the reader is unusable afterwards."""
        self._broken = True
        for fds in self._fds_at.values():
            close_fds(fds)
        self._fds_at.clear()
        self._headers.clear()
        self._buffer.clear()
