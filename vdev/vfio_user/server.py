"""The device side of vfio-user: a sans-I/O request handler and a non-blocking socket adapter.

``ServerSession`` turns one request ``Message`` into a reply, validating every field
(section 5 of the fact sheet, ``/work/shared/reference/vfio-user.md``) before the device
model sees it. ``VfioUserServerConnection`` wraps it around one accepted AF_UNIX socket
for a device host's epoll loop: one ``recvmsg`` per readiness event, replies queued and
sent with non-blocking ``sendmsg``, and every received fd either handed to the model,
mapped, or closed.

Events the device host's loop must deliver (level-triggered)::

    EPOLLIN  -> conn.on_readable()   False: finished, unregister and forget it
    EPOLLOUT -> conn.on_writable()   register EPOLLOUT only while conn.wants_write
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import socket
from collections import deque
from typing import Final, Protocol

from vdev.dma import DmaTable
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

log = logging.getLogger(__name__)

DEFAULT_SERVER_MAX_MSG_FDS: Final = 8
DEFAULT_RECV_SIZE: Final = 64 * 1024
# A reply to one REGION_READ can be max_data_xfer_size bytes; allow a few of them queued
# before deciding the client does not read its replies.
OUTPUT_LIMIT_REPLIES: Final = 4

_EVENTFD_LINK: Final = "anon_inode:[eventfd]"
# Every send and receive is non-blocking by its own flags, not only by the socket's
# O_NONBLOCK: the device host must never sleep on a socket whose other end an app holds,
# whoever may have changed the file's flags. No SIGPIPE for a client that went away.
_SEND_FLAGS: Final = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
# What a region fd must be sealed with before a client gets it: the client holds the same
# file, and a size it could change under the device's own mapping is a SIGBUS in the device
# host (F_SEAL_SEAL: nor may it add seals, e.g. F_SEAL_WRITE against the device).
REQUIRED_REGION_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class DeviceModel(Protocol):
    """What a device implements to be served over vfio-user.

    The server has checked every argument against ``device_info``/``region_info``/
    ``irq_info`` before calling the other methods. Methods refuse with ``VfioError``.
    ``device_info`` and ``region_info`` are asked once per connection and must not change.
    """

    dma_table: DmaTable

    def device_info(self) -> DeviceInfo: ...

    def region_info(self, index: int) -> RegionInfo:
        """The region; ``fd`` stays owned by the device (the server sends a duplicate)."""
        ...

    def region_read(self, index: int, offset: int, count: int) -> bytes: ...

    def region_write(self, index: int, offset: int, data: bytes) -> None: ...

    def irq_info(self, index: int) -> IrqInfo: ...

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        """Use ``fds`` for vectors start.. of ``index``; owned by the device once this returns."""
        ...

    def clear_irqs(self, index: int, start: int, count: int) -> None:
        """De-assign (and close) the eventfds of vectors start..start+count."""
        ...

    def reset(self) -> None: ...

    def disconnected(self) -> None:
        """The client is gone: drop its eventfds; DMA has already been unmapped."""
        ...


def _is_eventfd(fd: int) -> bool:
    # Writing the interrupt to anything else could block the device host (a full pipe)
    # or reach a file: only an eventfd's 8-byte write never blocks for long.
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
    except OSError:
        return False


def _is_sealed(fd: int) -> bool:
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return seals & REQUIRED_REGION_SEALS == REQUIRED_REGION_SEALS


def _one_bit(value: int) -> bool:
    return value != 0 and value & (value - 1) == 0


class ServerSession:
    """The vfio-user request handler for one client, without I/O.

    ``handle`` returns (reply payload, fd to attach or None), or raises ``VfioError``
    (answer with an error reply, go on) or ``ProtocolError`` (answer, then close). It
    always takes ownership of ``message.fds``: each is kept by the model or closed.
    """

    def __init__(
        self,
        model: DeviceModel,
        max_data_xfer_size: int = wire.DEFAULT_MAX_DATA_XFER_SIZE,
        max_msg_fds: int = DEFAULT_SERVER_MAX_MSG_FDS,
    ) -> None:
        if not 1 <= max_msg_fds <= wire.MAX_MSG_FDS_LIMIT:
            raise ValueError(f"max_msg_fds {max_msg_fds} out of range")
        self.model = model
        self.capabilities = Capabilities(
            max_msg_fds=max_msg_fds,
            max_data_xfer_size=max_data_xfer_size,
            max_dma_maps=model.dma_table.max_maps,
            pgsizes=model.dma_table.page_size,
        )
        # libvfio-user's limit: the largest REGION_WRITE (header + access header + data).
        self.max_msg_size = max_data_xfer_size + wire.HEADER_SIZE + wire.REGION_ACCESS.size
        self.client_capabilities: Capabilities | None = None
        self._device: DeviceInfo | None = None
        self._regions: dict[int, RegionInfo] = {}
        self._irqs: dict[int, IrqInfo] = {}
        self._handlers = {
            wire.CMD_DMA_MAP: self._dma_map,
            wire.CMD_DMA_UNMAP: self._dma_unmap,
            wire.CMD_DEVICE_GET_INFO: self._get_info,
            wire.CMD_DEVICE_GET_REGION_INFO: self._get_region_info,
            wire.CMD_DEVICE_GET_IRQ_INFO: self._get_irq_info,
            wire.CMD_DEVICE_SET_IRQS: self._set_irqs,
            wire.CMD_REGION_READ: self._region_read,
            wire.CMD_REGION_WRITE: self._region_write,
            wire.CMD_DEVICE_RESET: self._reset,
        }

    @property
    def negotiated(self) -> bool:
        return self.client_capabilities is not None

    def handle(self, message: Message) -> tuple[bytes, int | None]:
        fds = list(message.fds)
        try:
            return self._dispatch(message, fds)
        finally:
            close_fds(fds)  # whatever the model did not take

    def _dispatch(self, message: Message, fds: list[int]) -> tuple[bytes, int | None]:
        header = message.header
        if len(fds) > self.capabilities.max_msg_fds:
            raise ProtocolError(f"{len(fds)} fds, more than the {self.capabilities.max_msg_fds} advertised", header)
        if header.command == wire.CMD_VERSION:
            return self._version(message, fds), None
        if not self.negotiated:
            raise ProtocolError("the first message must be VERSION", header)
        handler = self._handlers.get(header.command)
        if handler is None:
            raise VfioError(errno.EINVAL, f"unsupported command {header.command}")
        if fds and header.command not in (wire.CMD_DMA_MAP, wire.CMD_DEVICE_SET_IRQS):
            raise VfioError(errno.EINVAL, f"{wire.COMMAND_NAMES[header.command]} takes no fds")
        return handler(message.payload, fds)

    def _version(self, message: Message, fds: list[int]) -> bytes:
        header = message.header
        if self.negotiated:
            raise VfioError(errno.EINVAL, "VERSION sent twice")
        # A failed negotiation ends the session (spec: "otherwise close").
        if fds:
            raise ProtocolError("VERSION carries no fds", header)
        try:
            proposal = wire.decode_version(message.payload)
        except VfioError as exc:
            raise ProtocolError(exc.message, header) from None
        if proposal.major != wire.SUPPORTED_MAJOR:
            raise ProtocolError(f"unsupported major version {proposal.major}", header)
        if not proposal.capabilities.pgsizes & self.capabilities.pgsizes:
            raise ProtocolError("no common DMA page size", header)
        self.client_capabilities = proposal.capabilities
        minor = min(proposal.minor, wire.SUPPORTED_MINOR)
        return wire.encode_version(wire.SUPPORTED_MAJOR, minor, self.capabilities.to_json())

    def _device_info(self) -> DeviceInfo:
        if self._device is None:
            self._device = self.model.device_info()
        return self._device

    def _region(self, index: int) -> RegionInfo:
        if index >= self._device_info().num_regions:
            raise VfioError(errno.EINVAL, f"region {index} does not exist")
        region = self._regions.get(index)
        if region is None:
            region = self._regions[index] = self.model.region_info(index)
        return region

    def _irq(self, index: int) -> IrqInfo:
        if index >= self._device_info().num_irqs:
            raise VfioError(errno.EINVAL, f"IRQ index {index} does not exist")
        irq = self._irqs.get(index)
        if irq is None:
            irq = self._irqs[index] = self.model.irq_info(index)
        return irq

    def _check_argsz(self, argsz: int) -> None:
        if argsz > self.max_msg_size:
            raise VfioError(errno.EINVAL, f"argsz {argsz} over the limit")

    def _dma_map(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        request = wire.decode_dma_map(payload)
        if request.flags & ~(wire.DMA_FLAG_READ | wire.DMA_FLAG_WRITE):
            raise VfioError(errno.EINVAL, f"DMA_MAP: unknown flags {request.flags:#x}")
        if len(fds) != 1:
            # Without an fd only DMA_READ/WRITE messages could reach the memory; this
            # server does not implement them.
            raise VfioError(errno.EINVAL, f"DMA_MAP needs exactly one fd, got {len(fds)}")
        self.model.dma_table.map(
            request.address,
            request.size,
            fds[0],
            request.offset,
            readable=bool(request.flags & wire.DMA_FLAG_READ),
            writable=bool(request.flags & wire.DMA_FLAG_WRITE),
        )
        return b"", None  # the mapping holds the file; the fd itself is closed by handle()

    def _dma_unmap(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        request = wire.decode_dma_unmap(payload)
        self._check_argsz(request.argsz)
        if request.flags:
            raise VfioError(errno.EINVAL, f"DMA_UNMAP: unsupported flags {request.flags:#x}")
        self.model.dma_table.unmap(request.address, request.size)
        return wire.encode_dma_unmap(0, request.address, request.size), None

    def _get_info(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        self._check_argsz(wire.decode_device_info_request(payload))
        return wire.encode_device_info_reply(self._device_info()), None

    def _get_region_info(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        argsz, index = wire.decode_region_info_request(payload)
        self._check_argsz(argsz)
        region = self._region(index)
        reply, send_fd = wire.encode_region_info_reply(argsz, index, region)
        if send_fd and region.fd is None:
            raise VfioError(errno.EIO, f"region {index} is mmappable but has no fd")
        if send_fd and region.fd is not None and not _is_sealed(region.fd):
            # Whatever the device model: nothing resizable ever leaves the device host.
            raise VfioError(errno.EIO, f"region {index}'s memory is not sealed; not handed out")
        return reply, region.fd if send_fd else None

    def _get_irq_info(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        argsz, index = wire.decode_irq_info_request(payload)
        self._check_argsz(argsz)
        return wire.encode_irq_info_reply(index, self._irq(index)), None

    def _set_irqs(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        request = wire.decode_set_irqs(payload)
        data_kind = request.flags & wire.IRQ_DATA_MASK
        action = request.flags & wire.IRQ_ACTION_MASK_BITS
        if request.flags & ~(wire.IRQ_DATA_MASK | wire.IRQ_ACTION_MASK_BITS):
            raise VfioError(errno.EINVAL, f"SET_IRQS: unknown flags {request.flags:#x}")
        if not (_one_bit(data_kind) and _one_bit(action)):
            raise VfioError(errno.EINVAL, "SET_IRQS: needs exactly one DATA and one ACTION bit")
        irq = self._irq(request.index)
        if request.start + request.count > irq.count:
            raise VfioError(errno.EINVAL, f"SET_IRQS: vectors {request.start}+{request.count} beyond {irq.count}")
        if request.count == 0:
            # The one meaning of count 0: NONE|TRIGGER, start 0 disables the whole index.
            if request.start != 0 or request.flags != wire.IRQ_DATA_NONE | wire.IRQ_ACTION_TRIGGER:
                raise VfioError(errno.EINVAL, "SET_IRQS: count 0 only with start 0 and NONE|TRIGGER")
            self.model.clear_irqs(request.index, 0, irq.count)
            return b"", None
        expected_data = request.count if data_kind == wire.IRQ_DATA_BOOL else 0
        if len(request.data) != expected_data:
            raise VfioError(errno.EINVAL, f"SET_IRQS: {len(request.data)} data bytes, expected {expected_data}")
        if action != wire.IRQ_ACTION_TRIGGER and not irq.flags & wire.IRQ_INFO_MASKABLE:
            raise VfioError(errno.EINVAL, "SET_IRQS: index is not maskable")
        if fds and data_kind != wire.IRQ_DATA_EVENTFD:
            raise VfioError(errno.EINVAL, "SET_IRQS: fds only with DATA_EVENTFD")
        if data_kind != wire.IRQ_DATA_EVENTFD or action != wire.IRQ_ACTION_TRIGGER:
            raise VfioError(errno.EINVAL, "SET_IRQS: only EVENTFD|TRIGGER is supported")
        if not irq.flags & wire.IRQ_INFO_EVENTFD:
            raise VfioError(errno.EINVAL, "SET_IRQS: index does not signal through eventfds")
        if not fds:
            self.model.clear_irqs(request.index, request.start, request.count)
            return b"", None
        if len(fds) != request.count:
            raise VfioError(errno.EINVAL, f"SET_IRQS: {len(fds)} fds for {request.count} vectors")
        if not all(_is_eventfd(fd) for fd in fds):
            raise VfioError(errno.EINVAL, "SET_IRQS: every fd must be an eventfd")
        handed = list(fds)
        self.model.set_irq_eventfds(request.index, request.start, handed)
        fds.clear()  # the model owns them now
        return b"", None

    def _check_access(self, access: wire.RegionAccess, flag: int) -> None:
        region = self._region(access.region)
        if not region.flags & flag:
            raise VfioError(errno.EINVAL, f"region {access.region} does not allow this access")
        if access.offset + access.count > region.size:
            raise VfioError(errno.EINVAL, f"access {access.offset}+{access.count} beyond region size {region.size}")
        client_limit = self.client_capabilities.max_data_xfer_size if self.client_capabilities else 0
        if access.count > min(self.capabilities.max_data_xfer_size, client_limit):
            raise VfioError(errno.EINVAL, f"access of {access.count} bytes over max_data_xfer_size")

    def _region_read(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        if len(payload) != wire.REGION_ACCESS.size:
            raise VfioError(errno.EINVAL, "REGION_READ: request is exactly 16 bytes")
        access = wire.decode_region_access(payload, with_data=False)
        self._check_access(access, wire.REGION_FLAG_READ)
        data = self.model.region_read(access.region, access.offset, access.count)
        if len(data) != access.count:
            raise VfioError(errno.EIO, f"device returned {len(data)} of {access.count} bytes")
        return wire.encode_region_access(access.offset, access.region, access.count, data), None

    def _region_write(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        access = wire.decode_region_access(payload, with_data=True)
        self._check_access(access, wire.REGION_FLAG_WRITE)
        self.model.region_write(access.region, access.offset, access.data)
        return wire.encode_region_access(access.offset, access.region, access.count), None

    def _reset(self, payload: bytes, fds: list[int]) -> tuple[bytes, int | None]:
        if payload:
            raise VfioError(errno.EINVAL, "DEVICE_RESET has no payload")
        if not self._device_info().flags & wire.DEVICE_FLAG_RESET:
            raise VfioError(errno.EINVAL, "device does not support reset")
        self.model.reset()
        return b"", None


class _Pending:
    __slots__ = ("data", "fds")

    def __init__(self, data: bytes, fds: list[int]) -> None:
        self.data = memoryview(data)
        self.fds = fds


class VfioUserServerConnection:
    """One client connection, driven by the device host's (single-threaded) epoll loop."""

    def __init__(
        self,
        sock: socket.socket,
        model: DeviceModel,
        max_data_xfer_size: int = wire.DEFAULT_MAX_DATA_XFER_SIZE,
        max_msg_fds: int = DEFAULT_SERVER_MAX_MSG_FDS,
        recv_size: int = DEFAULT_RECV_SIZE,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.model = model
        self.session = ServerSession(model, max_data_xfer_size, max_msg_fds)
        self._reader = wire.MessageReader(self.session.max_msg_size, wire.TYPE_COMMAND)
        self._recv_size = recv_size
        self._ancillary_size = socket.CMSG_SPACE(max_msg_fds * array.array("i").itemsize)
        self._output: deque[_Pending] = deque()
        self._output_bytes = 0
        self.output_limit = OUTPUT_LIMIT_REPLIES * (self.session.max_msg_size + wire.HEADER_SIZE)
        self._fileno = sock.fileno()
        self.closed = False
        # Refused NO_REPLY requests: nothing goes back for them (spec), so count them.
        self.silent_errors = 0

    def fileno(self) -> int:
        return self._fileno

    @property
    def wants_write(self) -> bool:
        return bool(self._output)

    def epoll_events(self) -> int:
        return select.EPOLLIN | (select.EPOLLOUT if self._output else 0)

    def on_readable(self) -> bool:
        """Read once, answer every whole message; False once the connection is finished."""
        if self.closed:
            return False
        try:
            self._read_once()
            self._flush()
        except (ProtocolError, OSError) as exc:
            log.debug("vfio-user connection closed: %s", exc)
            self.close()
        except Exception:
            # A device-model bug must not take down every other client of the device host.
            log.exception("vfio-user device model failed; dropping the client")
            self.close()
        return not self.closed

    def on_writable(self) -> bool:
        if self.closed:
            return False
        try:
            self._flush()
        except OSError as exc:
            log.debug("vfio-user connection closed while sending: %s", exc)
            self.close()
        return not self.closed

    def _read_once(self) -> None:
        try:
            data, ancillary, msg_flags, _ = self.sock.recvmsg(
                self._recv_size, self._ancillary_size, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
            )
        except (BlockingIOError, InterruptedError):
            return
        fds = _collect_fds(ancillary)
        if msg_flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise ProtocolError("control message truncated: too many fds")
        if not data:
            close_fds(fds)
            raise ProtocolError("peer closed the connection")
        try:
            self._reader.feed(data, fds)
        except ProtocolError as exc:
            self._answer_framing_error(exc)
            raise
        for message in self._reader:
            self._process(message)
            if self._output_bytes > self.output_limit:
                raise ProtocolError("client does not read its replies")

    def _process(self, message: Message) -> None:
        header = message.header
        try:
            payload, fd = self.session.handle(message)
        except VfioError as exc:
            if header.no_reply:
                self.silent_errors += 1
            else:
                self._queue(wire.encode_error_reply(header, exc.errno), None)
            return
        except ProtocolError as exc:
            self._answer_framing_error(exc)
            raise
        if not header.no_reply:
            self._queue(wire.encode_reply(header, payload), fd)

    def _answer_framing_error(self, exc: ProtocolError) -> None:
        # Error reply, then close (spec, "Bad input"): try to get it out before closing.
        if exc.header is not None and not exc.header.no_reply:
            self._queue(wire.encode_error_reply(exc.header, errno.EINVAL), None)
            try:
                self._flush()
            except OSError:
                pass

    def _queue(self, data: bytes, fd: int | None) -> None:
        # The device keeps its own fd; a duplicate travels, so closing it after the send
        # (or on teardown) never touches the device's copy.
        fds = [os.dup(fd)] if fd is not None else []
        self._output.append(_Pending(data, fds))
        self._output_bytes += len(data)

    def _flush(self) -> None:
        while self._output:
            pending = self._output[0]
            try:
                if pending.fds:
                    # fds ride on the first byte of the message (spec, "fds").
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", pending.fds))]
                    sent = self.sock.sendmsg([pending.data], rights, _SEND_FLAGS)
                    close_fds(pending.fds)
                    pending.fds = []
                else:
                    sent = self.sock.send(pending.data, _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return
            self._output_bytes -= sent
            if sent == len(pending.data):
                self._output.popleft()
            else:
                pending.data = pending.data[sent:]

    def close(self) -> None:
        """Tear down: unmap all DMA, tell the model, close every fd we hold. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._reader.close()
        for pending in self._output:
            close_fds(pending.fds)
        self._output.clear()
        self._output_bytes = 0
        try:
            self.model.dma_table.clear()
        except Exception:
            log.exception("unmap callbacks failed during disconnect")
        try:
            self.model.disconnected()
        except Exception:
            log.exception("device model failed in disconnected()")
        self.sock.close()


def _collect_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds

