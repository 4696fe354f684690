"""The driver side of vfio-user: a blocking client for the libOS.

One request at a time (NO_REPLY writes aside), so replies come back in order and each
must echo the request's msg_id and command. Everything the server says is checked too:
a server that breaks the protocol raises ``ProtocolError`` and the client is unusable
afterwards; a request the server refused raises ``VfioError`` and the client goes on.
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import socket
from collections.abc import Callable, Sequence
from typing import Final, ParamSpec, TypeVar

from vdev.vfio_user import wire
from vdev.vfio_user.wire import (
    Capabilities,
    DeviceInfo,
    IrqInfo,
    Message,
    ProtocolError,
    RegionInfo,
    VfioError,
    close_fds,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

CLIENT_MAX_MSG_FDS: Final = 8
PROPOSED_MINOR: Final = 2
FIRST_REGION_INFO_ARGSZ: Final = 256
# A region with this much capability data is not one this driver can use.
MAX_REGION_INFO_ARGSZ: Final = 64 * 1024
# Sanity bounds on what the server reports (PCI has 9 regions and 5 IRQ indices; MSI-X
# allows at most 2048 vectors).
MAX_SANE_REGIONS: Final = 1024
MAX_SANE_IRQS: Final = 1024
MAX_SANE_VECTORS: Final = 2048
_RECV_SIZE: Final = 64 * 1024
_VERSION_REPLY_LIMIT: Final = 64 * 1024


class VfioUserClient:
    """A connected vfio-user session; negotiates the version in the constructor."""

    def __init__(self, sock: socket.socket, timeout: float | None = 30.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self._next_id = 0
        self._broken = False
        self._reader = wire.MessageReader(_VERSION_REPLY_LIMIT, wire.TYPE_REPLY)
        self._ancillary_size = socket.CMSG_SPACE(CLIENT_MAX_MSG_FDS * array.array("i").itemsize)
        proposal = {"capabilities": {"max_msg_fds": CLIENT_MAX_MSG_FDS}}
        try:
            reply = self._request(wire.CMD_VERSION, wire.encode_version(wire.SUPPORTED_MAJOR, PROPOSED_MINOR, proposal))
            self._no_fds(reply)
            version = self._decode(wire.decode_version, reply.payload)
            if version.major != wire.SUPPORTED_MAJOR or version.minor > PROPOSED_MINOR:
                raise ProtocolError(f"server answered version {version.major}.{version.minor}")
        except BaseException:
            self.close()
            raise
        self.version = (version.major, version.minor)
        self.server_capabilities: Capabilities = version.capabilities
        self._reader.max_msg_size = self.server_capabilities.max_data_xfer_size + 2 * wire.HEADER_SIZE

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._broken = True
        self._reader.close()
        self.sock.close()

    def _send(self, data: bytes, fds: Sequence[int]) -> None:
        view = memoryview(data)
        if fds:
            # The fds go with the header's bytes (spec, "fds").
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            sent = self.sock.sendmsg([view], rights)
            view = view[sent:]
        if view:
            self.sock.sendall(view)

    def _receive(self) -> Message:
        while (message := self._reader.next_message()) is None:
            data, ancillary, msg_flags, _ = self.sock.recvmsg(_RECV_SIZE, self._ancillary_size, socket.MSG_CMSG_CLOEXEC)
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
            if msg_flags & socket.MSG_CTRUNC:
                close_fds(fds)
                raise ProtocolError("server sent more fds than we can take")
            if not data:
                close_fds(fds)
                raise ProtocolError("server closed the connection")
            self._reader.feed(data, fds)
        return message

    def _request(
        self, command: int, payload: bytes, fds: Sequence[int] = (), no_reply: bool = False
    ) -> Message:
        if self._broken:
            raise ProtocolError("the session is closed or broken")
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        flags = wire.TYPE_COMMAND | (wire.FLAG_NO_REPLY if no_reply else 0)
        try:
            self._send(wire.encode_message(msg_id, command, payload, flags), fds)
            if no_reply:
                return Message(wire.Header(msg_id, command, wire.HEADER_SIZE, flags, 0), b"")
            reply = self._receive()
        except BaseException:
            # A request that failed half-way (timeout, bad framing) leaves the stream out of
            # step: a late reply would answer the next request.
            self._broken = True
            raise
        header = reply.header
        if header.msg_id != msg_id or header.command != command:
            close_fds(reply.fds)
            self._broken = True
            raise ProtocolError(f"reply {header.msg_id}/{header.command} to request {msg_id}/{command}")
        if header.is_error:
            close_fds(reply.fds)
            code = header.error_no or errno.EIO
            raise VfioError(code, f"server refused {wire.COMMAND_NAMES.get(command, command)}")
        return reply

    def _no_fds(self, reply: Message) -> None:
        if reply.fds:
            close_fds(reply.fds)
            self._broken = True
            raise ProtocolError("unexpected fds in a reply")

    def _decode(self, decoder: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        # A reply the wire codec refuses is the server's fault, not a refused request.
        try:
            return decoder(*args, **kwargs)
        except VfioError as exc:
            raise self._fail(exc.message) from None

    def get_device_info(self) -> DeviceInfo:
        reply = self._request(wire.CMD_DEVICE_GET_INFO, wire.encode_device_info_request())
        self._no_fds(reply)
        info = self._decode(wire.decode_device_info_reply, reply.payload)
        if info.num_regions > MAX_SANE_REGIONS or info.num_irqs > MAX_SANE_IRQS:
            raise self._fail(f"implausible device info {info}")
        return info

    def get_region_info(self, index: int) -> tuple[RegionInfo, int | None]:
        """The region and, when it is mmappable, an fd the caller must close."""
        argsz = FIRST_REGION_INFO_ARGSZ
        for _ in range(2):
            reply = self._request(wire.CMD_DEVICE_GET_REGION_INFO, wire.encode_region_info_request(index, argsz))
            fds = list(reply.fds)
            try:
                needed, reply_index, info = self._decode(wire.decode_region_info_reply, reply.payload)
                if reply_index != index:
                    raise self._fail(f"region info for {reply_index}, asked for {index}")
                if needed > argsz:
                    # VFIO's argsz convention: only the fixed part came back; ask again.
                    if fds or needed > MAX_REGION_INFO_ARGSZ:
                        raise self._fail(f"region info needs argsz {needed} (with {len(fds)} fds)")
                    argsz = needed
                    continue
                expected_fds = 1 if info.flags & wire.REGION_FLAG_MMAP else 0
                if len(fds) != expected_fds:
                    raise self._fail(f"region info came with {len(fds)} fds, expected {expected_fds}")
                return info, fds.pop() if fds else None
            finally:
                close_fds(fds)
        raise self._fail("server keeps asking for a bigger argsz")

    def map_region(self, index: int, area: int = 0) -> mmap.mmap:
        """mmap sparse area ``area`` of the region (the whole region when it has none)."""
        info, fd = self.get_region_info(index)
        if fd is None:
            raise VfioError(errno.EINVAL, f"region {index} is not mmappable")
        try:
            areas = list(info.sparse_areas) or [(0, info.size)]
            if not 0 <= area < len(areas):
                raise ValueError(f"region {index} has {len(areas)} mappable areas")
            area_offset, area_size = areas[area]
            prot = (mmap.PROT_READ if info.flags & wire.REGION_FLAG_READ else 0) | (
                mmap.PROT_WRITE if info.flags & wire.REGION_FLAG_WRITE else 0
            )
            try:
                return mmap.mmap(fd, area_size, flags=mmap.MAP_SHARED, prot=prot, offset=info.offset + area_offset)
            except (ValueError, OverflowError) as exc:
                raise VfioError(errno.EINVAL, f"cannot map region {index}: {exc}") from None
        finally:
            close_fds([fd])

    def _transfer_limit(self) -> int:
        return min(self.server_capabilities.max_data_xfer_size, wire.DEFAULT_MAX_DATA_XFER_SIZE)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Read ``count`` bytes; fewer only if the server returned a short read."""
        chunks: list[bytes] = []
        limit = self._transfer_limit()
        done = 0
        while done < count:
            want = min(limit, count - done)
            reply = self._request(wire.CMD_REGION_READ, wire.encode_region_access(offset + done, index, want))
            self._no_fds(reply)
            access = self._decode(wire.decode_region_access, reply.payload, True)
            if access.count > want or access.region != index or access.offset != offset + done:
                raise self._fail(f"REGION_READ reply {access.offset}/{access.region}/{access.count} for {want}")
            chunks.append(access.data)
            done += access.count
            if access.count < want:
                break
        return b"".join(chunks)

    def region_write(self, index: int, offset: int, data: bytes, no_reply: bool = False) -> None:
        """Write ``data``; with ``no_reply`` (doorbells) nothing comes back, not even errors."""
        limit = self._transfer_limit()
        view = memoryview(data)
        for start in range(0, len(view), limit):
            piece = bytes(view[start : start + limit])
            payload = wire.encode_region_access(offset + start, index, len(piece), piece)
            reply = self._request(wire.CMD_REGION_WRITE, payload, no_reply=no_reply)
            self._no_fds(reply)

    def posted_write(self, index: int, offset: int, data: bytes) -> None:
        """A small REGION_WRITE with NO_REPLY in one system call: the doorbell path.

        ``region_write`` goes through the socket's timeout machinery, which makes CPython
        poll() before every send; a doorbell is one short message, so it is written
        directly (falling back to the careful path if the socket cannot take it at once).
        """
        if self._broken:
            raise ProtocolError("the session is closed or broken")
        msg_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFF
        message = wire.encode_message(
            msg_id,
            wire.CMD_REGION_WRITE,
            wire.encode_region_access(offset, index, len(data), data),
            wire.TYPE_COMMAND | wire.FLAG_NO_REPLY,
        )
        try:
            written = os.write(self.sock.fileno(), message)
        except BlockingIOError:
            written = 0
        except OSError:
            self._broken = True
            raise
        if written < len(message):
            try:
                self.sock.sendall(message[written:])
            except BaseException:
                self._broken = True
                raise

    def dma_map(
        self, iova: int, size: int, fd: int, offset: int = 0, readable: bool = True, writable: bool = True
    ) -> None:
        """Grant the device [iova, iova+size) backed by ``fd`` (a memfd) from ``offset``.

        The device host insists on F_SEAL_SHRINK (a shrunk file under a mapping would kill
        it with SIGBUS), so this adds the seal when the memfd allows sealing
        (``os.MFD_ALLOW_SEALING``); the caller cannot shrink the memfd afterwards.
        """
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        except OSError:
            pass  # not sealable: the server gives the precise refusal
        flags = (wire.DMA_FLAG_READ if readable else 0) | (wire.DMA_FLAG_WRITE if writable else 0)
        reply = self._request(wire.CMD_DMA_MAP, wire.encode_dma_map(flags, offset, iova, size), [fd])
        self._no_fds(reply)

    def dma_unmap(self, iova: int, size: int) -> None:
        reply = self._request(wire.CMD_DMA_UNMAP, wire.encode_dma_unmap(0, iova, size))
        self._no_fds(reply)

    def get_irq_info(self, index: int) -> IrqInfo:
        reply = self._request(wire.CMD_DEVICE_GET_IRQ_INFO, wire.encode_irq_info_request(index))
        self._no_fds(reply)
        reply_index, info = self._decode(wire.decode_irq_info_reply, reply.payload)
        if reply_index != index or info.count > MAX_SANE_VECTORS:
            raise self._fail(f"implausible IRQ info {reply_index}/{info} for index {index}")
        return info

    def set_irq_eventfds(self, index: int, start: int, fds: Sequence[int]) -> None:
        """Give vectors start.. of ``index`` these eventfds (the caller keeps its copies)."""
        if not fds:
            raise ValueError("no eventfds given; use disable_irqs to de-assign")
        block = self.server_capabilities.max_msg_fds
        flags = wire.IRQ_DATA_EVENTFD | wire.IRQ_ACTION_TRIGGER
        for first in range(0, len(fds), block):
            chunk = list(fds[first : first + block])
            payload = wire.encode_set_irqs(flags, index, start + first, len(chunk))
            self._no_fds(self._request(wire.CMD_DEVICE_SET_IRQS, payload, chunk))

    def disable_irqs(self, index: int) -> None:
        """De-assign every vector of ``index`` (NONE|TRIGGER, start = count = 0)."""
        payload = wire.encode_set_irqs(wire.IRQ_DATA_NONE | wire.IRQ_ACTION_TRIGGER, index, 0, 0)
        self._no_fds(self._request(wire.CMD_DEVICE_SET_IRQS, payload))

    def reset(self) -> None:
        self._no_fds(self._request(wire.CMD_DEVICE_RESET, b""))

    def _fail(self, message: str) -> ProtocolError:
        self._broken = True
        return ProtocolError(f"server broke the protocol: {message}")
