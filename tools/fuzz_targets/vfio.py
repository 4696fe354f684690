"""vfio-user: the wire codec (``vdev.vfio_user.wire``) and the server (``vdev.vfio_user.server``)
driven in-process with a real VNIC function as its device model.

Clean rejections: ``ProtocolError`` from the stream reader and the session (the connection
closes), ``VfioError`` from the decoders and the session (an error reply). The socket adapter
must never raise at all, must never log a device-model failure (that is a server bug it
caught), and must not leave an fd open once the connection is closed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct

from tools.fuzz_targets import ContractViolation
from tools.fuzz_targets._input import Input
from vdev import layout
from vdev import eventfd_signal
from vdev.vfio_user import wire
from vdev.vfio_user.server import ServerSession, VfioUserServerConnection
from vdev.vfio_user.wire import Header, Message, ProtocolError, VfioError
from vdev.vnic.function import FunctionConfig, VnicFunction

_MAX_MSG = 4096 + wire.HEADER_SIZE + wire.REGION_ACCESS.size

# ---- the codec ---------------------------------------------------------------------------

_DECODERS = (
    wire.decode_version,
    wire.decode_dma_map,
    wire.decode_dma_unmap,
    wire.decode_device_info_request,
    wire.decode_device_info_reply,
    wire.decode_region_info_request,
    wire.decode_region_info_reply,
    wire.decode_irq_info_request,
    wire.decode_irq_info_reply,
    wire.decode_set_irqs,
)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _check_reader(inp: Input) -> None:
    max_size = wire.HEADER_SIZE + inp.below(512)
    reader = wire.MessageReader(max_size, inp.choice((wire.TYPE_COMMAND, wire.TYPE_REPLY)))
    handed: list[int] = []
    made: list[int] = []
    try:
        while not inp.exhausted:
            chunk = inp.blob(300)
            fds: list[int] = []
            if inp.below(8) == 0:
                fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(1 + inp.below(3))]
                made.extend(fds)
            try:
                reader.feed(chunk, fds)
            except ProtocolError:
                return
            for message in reader:
                size = message.header.msg_size
                if not wire.HEADER_SIZE <= size <= max_size or len(message.payload) != size - wire.HEADER_SIZE:
                    raise ContractViolation(f"reader handed out a message of size {size}, payload {len(message.payload)}")
                if message.header.message_type != reader.expected_type:
                    raise ContractViolation("reader handed out a message of the wrong type")
                handed.extend(message.fds)
    finally:
        reader.close()
        # Every fd fed is now either handed out (ours to close) or closed by the reader.
        for fd in made:
            try:
                os.fstat(fd)
            except OSError:
                continue
            if fd not in handed:
                raise ContractViolation(f"fd {fd} neither handed out nor closed by the reader")
        wire.close_fds(handed)


def _check_decoder(inp: Input) -> None:
    decoder = _DECODERS[inp.below(len(_DECODERS))]
    payload = inp.rest()
    try:
        result = decoder(payload)
    except VfioError:
        return
    if decoder is wire.decode_dma_map:
        assert isinstance(result, wire.DmaMapRequest)
        again = wire.encode_dma_map(result.flags, result.offset, result.address, result.size)
        if again != payload:
            raise ContractViolation("DMA_MAP does not round-trip")
    elif decoder is wire.decode_region_info_reply:
        info = wire.decode_region_info_reply(payload)[2]
        for offset, size in info.sparse_areas:
            if offset + size > info.size:
                raise ContractViolation("sparse area beyond the region accepted")
    elif decoder is wire.decode_version:
        assert isinstance(result, wire.Version)
        caps = result.capabilities
        if not 1 <= caps.max_msg_fds <= wire.MAX_MSG_FDS_LIMIT or caps.max_data_xfer_size > wire.U32_MAX:
            raise ContractViolation(f"VERSION accepted out-of-range capabilities {caps}")


def one_input_vfio_wire(data: bytes) -> None:
    inp = Input(data)
    if inp.below(4) == 0:
        _check_decoder(inp)
    else:
        _check_reader(inp)
    access = Input(data)
    try:
        parsed = wire.decode_region_access(access.rest(), with_data=bool(len(data) & 1))
    except VfioError:
        return
    if len(parsed.data) not in (0, parsed.count):
        raise ContractViolation("region access data length disagrees with its count")


def seeds_vfio_wire() -> list[bytes]:
    version = wire.encode_message(1, wire.CMD_VERSION, wire.encode_version(0, 2, wire.Capabilities().to_json()))
    dma = wire.encode_message(2, wire.CMD_DMA_MAP, wire.encode_dma_map(3, 0, 0x10000, 0x1000))
    region, _ = wire.encode_region_info_reply(
        64, 0, wire.RegionInfo(wire.REGION_FLAG_MMAP | wire.REGION_FLAG_READ, 8192, None, 0, [(0, 4096)])
    )
    return [
        b"\x01\x10" + bytes([len(version)]) + version,
        b"\x01\x40" + bytes([len(version + dma) & 0xFF]) + version + dma,
        b"\x00" + bytes([6]) + region,
        b"\x00" + bytes([0]) + wire.encode_version(0, 2, {"capabilities": {"max_msg_fds": 8}}),
        b"\x00" + bytes([1]) + wire.encode_dma_map(3, 0, 0x10000, 0x1000),
    ]


# ---- the server --------------------------------------------------------------------------


class _LogTrap(logging.Handler):
    """Counts the server's ERROR records: each is a failure it caught instead of refusing."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_TRAP = _LogTrap()
_server_log = logging.getLogger("vdev.vfio_user.server")
_server_log.addHandler(_TRAP)
_server_log.propagate = False


def _function() -> VnicFunction:
    config = FunctionConfig(function_id=1, mac=b"\x02\0\0\0\0\x01", ipv4=b"\x0a\0\0\x02", num_queues=2, max_ring_size=64)
    return VnicFunction(config, 0.0)


def _memfd(inp: Input) -> int:
    fd = os.memfd_create("fuzz-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096 * (1 + inp.below(4)))
    if inp.below(4):
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def _request(inp: Input) -> tuple[int, bytes, list[int]]:
    """(command, payload, fds): mostly well-formed requests with hostile field values."""
    kind = inp.below(12)
    fds: list[int] = []
    if kind == 0:
        caps: dict[str, object] = {}
        for key in ("max_msg_fds", "max_data_xfer_size", "pgsizes", "max_dma_maps"):
            if inp.flag():
                caps[key] = inp.interesting(64) if inp.flag() else inp.choice((0, 1, -1, 4096))
        if inp.below(4):
            return wire.CMD_VERSION, wire.encode_version(inp.below(2), inp.u16(), {"capabilities": caps}), fds
        # JSON that is not an object, which encode_version would not produce.
        return wire.CMD_VERSION, wire.VERSION_FIXED.pack(0, inp.u16()) + b"[" + str(inp.u8()).encode() + b"]\0", fds
    if kind == 1:
        flags = inp.choice((1, 2, 3, 0, 4))
        payload = wire.encode_dma_map(flags, 4096 * inp.below(3), 0x10000 * inp.below(4) + inp.choice((0, 1, 4096)), 4096 * inp.below(4))
        if inp.below(8):
            fds.append(_memfd(inp))
        return wire.CMD_DMA_MAP, payload, fds
    if kind == 2:
        return wire.CMD_DMA_UNMAP, wire.encode_dma_unmap(inp.choice((0, 0, 1)), 0x10000 * inp.below(4), 4096 * inp.below(4)), fds
    if kind == 3:
        return wire.CMD_DEVICE_GET_INFO, wire.encode_device_info_request(inp.choice((16, 15, 0xFFFFFFFF, 100))), fds
    if kind == 4:
        return wire.CMD_DEVICE_GET_REGION_INFO, wire.encode_region_info_request(inp.below(10), inp.choice((32, 64, 80, 0xFFFF, 31))), fds
    if kind == 5:
        return wire.CMD_DEVICE_GET_IRQ_INFO, wire.encode_irq_info_request(inp.below(6), inp.choice((16, 8, 1 << 20))), fds
    if kind == 6:
        flags = inp.choice((wire.IRQ_DATA_EVENTFD | wire.IRQ_ACTION_TRIGGER, wire.IRQ_DATA_NONE | wire.IRQ_ACTION_TRIGGER, inp.u8()))
        count = inp.below(4)
        data = bytes(count) if flags & wire.IRQ_DATA_BOOL else b""
        payload = wire.encode_set_irqs(flags, inp.choice((2, 2, 0, 1)), inp.below(3), count, data)
        for _ in range(inp.below(count + 2)):
            if inp.below(4):
                fds.append(os.eventfd(0, os.EFD_CLOEXEC))
            else:
                read_end, write_end = os.pipe()
                os.close(read_end)
                fds.append(write_end)
        return wire.CMD_DEVICE_SET_IRQS, payload, fds
    if kind == 7:
        offset = inp.choice((0, layout.ring_reg(0, 0), 4092, 4096, 8188, 8192, inp.interesting(64)))
        return wire.CMD_REGION_READ, wire.encode_region_access(offset, inp.choice((0, 0, 1, 9)), inp.choice((4, 8, 0, 4096, 8192, inp.u32()))), fds
    if kind == 8:
        offset = inp.choice((0, layout.ring_reg(inp.below(4), inp.below(12) * 4), 4096, layout.doorbell_offset(1), 8190, inp.interesting(64)))
        data = inp.blob(16)
        count = len(data) if inp.below(4) else inp.u32()
        return wire.CMD_REGION_WRITE, wire.encode_region_access(offset, inp.choice((0, 0, 3)), count, data), fds
    if kind == 9:
        return wire.CMD_DEVICE_RESET, inp.blob(2) if inp.below(4) == 0 else b"", fds
    return inp.u8(), inp.blob(64), fds


def _check_session(inp: Input) -> None:
    function = _function()
    session = ServerSession(function, max_data_xfer_size=4096, max_msg_fds=inp.choice((1, 2, 8)))
    try:
        if inp.below(8):
            version = wire.encode_version(0, 2, {"capabilities": {"max_data_xfer_size": 4096}})
            session.handle(Message(Header(0, wire.CMD_VERSION, 16 + len(version), 0, 0), version))
        for msg_id in range(inp.below(24) + 1):
            if inp.exhausted:
                break
            command, payload, fds = _request(inp)
            flags = inp.choice((wire.TYPE_COMMAND, wire.TYPE_COMMAND | wire.FLAG_NO_REPLY))
            message = Message(Header(msg_id, command, wire.HEADER_SIZE + len(payload), flags, 0), payload, tuple(fds))
            try:
                reply, fd = session.handle(message)
            except VfioError:
                continue
            except ProtocolError:
                break
            if command == wire.CMD_REGION_READ:
                access = wire.decode_region_access(payload, with_data=False)
                if len(reply) != wire.REGION_ACCESS.size + access.count:
                    raise ContractViolation("REGION_READ reply of the wrong size")
            if fd is not None and command != wire.CMD_DEVICE_GET_REGION_INFO:
                raise ContractViolation(f"command {command} handed out fd")
            if inp.below(4) == 0:
                # The device host's loop turn between requests.
                function.sync_rings()
                function.transmit(0, 8, 0.0, lambda _fid, _frame: True)
                function.deliver(inp.below(2), bytes(60), 0.0)
    finally:
        function.dma_table.clear()
        function.close()


def _check_connection(inp: Input) -> None:
    function = _function()
    server, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setblocking(False)
    conn = VfioUserServerConnection(server, function, max_data_xfer_size=4096, max_msg_fds=2, recv_size=inp.choice((64, 4096, 65536)))
    made: list[int] = []
    try:
        version = wire.encode_version(0, 2, None)
        stream = [wire.encode_message(0, wire.CMD_VERSION, version)] if inp.below(4) else []
        for msg_id in range(inp.below(12)):
            if inp.below(6) == 0:
                stream.append(inp.blob(48))
                continue
            command, payload, fds = _request(inp)
            wire.close_fds(fds)  # fds travel separately below
            stream.append(wire.encode_message(msg_id + 1, command, payload, inp.choice((0, 0, 0x10, 1))))
        data = b"".join(stream)
        position = 0
        while position < len(data) and not conn.closed:
            size = 1 + inp.below(256)
            chunk = data[position : position + size]
            position += size
            rights: list[int] = []
            if inp.below(6) == 0:
                rights = [_memfd(inp) if inp.flag() else os.eventfd(0, os.EFD_CLOEXEC) for _ in range(1 + inp.below(3))]
            try:
                if rights:
                    client.sendmsg([chunk], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(rights)}i", *rights))])
                else:
                    client.send(chunk)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EPIPE, errno.ECONNRESET):
                    raise
            finally:
                wire.close_fds(rights)
            for _ in range(4):
                if not conn.on_readable():
                    break
                _drain(client, made)
            if inp.below(4) == 0 and not conn.closed:
                conn.on_writable()
        if not conn.closed and inp.flag():
            client.shutdown(socket.SHUT_WR)
            conn.on_readable()
    finally:
        conn.close()
        _drain(client, made)
        client.close()
        wire.close_fds(made)
    if _TRAP.records:
        record = _TRAP.records[0]
        _TRAP.records.clear()
        raise ContractViolation(f"the server caught a device-model failure: {record.getMessage()} {record.exc_text or ''}")


def _drain(client: socket.socket, made: list[int]) -> None:
    while True:
        try:
            data, ancillary, _flags, _ = client.recvmsg(1 << 16, socket.CMSG_SPACE(64))
        except (BlockingIOError, InterruptedError, ConnectionResetError):
            return
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                made.extend(struct.unpack(f"{usable // 4}i", payload[:usable]))
        if not data:
            return


def one_input_vfio_server(data: bytes) -> None:
    # The interrupt signaller's one private memfd per process is made on first use: make it
    # before counting, so it is not taken for a leak of this input.
    eventfd_signal.shared_signaller()
    inp = Input(data)
    before = _open_fds()
    if inp.below(3) == 0:
        _check_connection(inp)
    else:
        _check_session(inp)
    after = _open_fds()
    if after != before:
        raise ContractViolation(f"{after - before} fds leaked by the server")


def seeds_vfio_server() -> list[bytes]:
    return [
        bytes([1, 1, 8]) + bytes(range(64)),
        bytes([0, 1, 3, 7]) + bytes(range(1, 120, 3)),
        bytes([2, 5, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]) * 4,
    ]
