"""vfio-user client and server end to end, and the server against hostile clients.

The device is a small fake: BAR0 of two pages backed by a memfd (the first page mappable
through the sparse-mmap capability, the second trapped: writes there are doorbells) and
one MSI-X index of four vectors. The server runs the same epoll pattern a device host
uses, in a background thread, on an abstract AF_UNIX socket tagged "h1".
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.dma import DmaFault, DmaTable
from vdev.vfio_user import wire
from vdev.vfio_user.client import VfioUserClient
from vdev.vfio_user.server import ServerSession, VfioUserServerConnection
from vdev.vfio_user.wire import DeviceInfo, IrqInfo, Message, MessageReader, ProtocolError, RegionInfo, VfioError

PAGE = 4096
BAR_SIZE = 2 * PAGE
MSIX = wire.PCI_MSIX_IRQ
VECTORS = 4


class FakeDevice:
    """A DeviceModel: BAR0 in a memfd, doorbells recorded, eventfds kept per vector."""

    def __init__(self) -> None:
        self.dma_table = DmaTable(max_maps=8)
        self.bar_fd = os.memfd_create("h1-bar0", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.bar_fd, BAR_SIZE)
        # The server hands out only memory whose size the client cannot change.
        fcntl.fcntl(self.bar_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        self.bar = mmap.mmap(self.bar_fd, BAR_SIZE)
        self.doorbells: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.irq_fds: dict[int, int] = {}
        self.unmapped: list[tuple[int, int]] = []
        self.resets = 0
        self.disconnects = 0
        self.dma_table.on_unmap(lambda iova, size: self.unmapped.append((iova, size)))

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(wire.DEVICE_FLAG_RESET | wire.DEVICE_FLAG_PCI, wire.PCI_NUM_REGIONS, wire.PCI_NUM_IRQS)

    def region_info(self, index: int) -> RegionInfo:
        if index == wire.PCI_BAR0_REGION:
            flags = wire.REGION_FLAG_READ | wire.REGION_FLAG_WRITE | wire.REGION_FLAG_MMAP
            return RegionInfo(flags, BAR_SIZE, self.bar_fd, 0, [(0, PAGE)])
        return RegionInfo(0, 0)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        return bytes(self.bar[offset : offset + count])

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self.bar[offset : offset + len(data)] = data
        if offset >= PAGE:
            self.doorbells.put((offset, data))

    def irq_info(self, index: int) -> IrqInfo:
        if index == MSIX:
            return IrqInfo(wire.IRQ_INFO_EVENTFD | wire.IRQ_INFO_NORESIZE, VECTORS)
        return IrqInfo(0, 0)

    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        self.clear_irqs(index, start, len(fds))
        for number, fd in enumerate(fds):
            self.irq_fds[start + number] = fd

    def clear_irqs(self, index: int, start: int, count: int) -> None:
        for vector in range(start, start + count):
            fd = self.irq_fds.pop(vector, None)
            if fd is not None:
                os.close(fd)

    def trigger(self, vector: int) -> None:
        os.eventfd_write(self.irq_fds[vector], 1)

    def reset(self) -> None:
        self.resets += 1

    def disconnected(self) -> None:
        self.clear_irqs(MSIX, 0, VECTORS)
        self.disconnects += 1

    def close(self) -> None:
        self.dma_table.clear()
        self.clear_irqs(MSIX, 0, VECTORS)
        self.bar.close()
        os.close(self.bar_fd)


class ServerThread:
    """A device host's loop in miniature: accept, then drive connections from epoll."""

    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.address = f"\0h1-vfio-user-{secrets.token_hex(4)}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(self.address)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
        self.epoll = select.epoll()
        self.connections: dict[int, VfioUserServerConnection] = {}
        self.finished = 0
        self.thread = threading.Thread(target=self._run, name="h1-vfio-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.epoll.register(self.stop_fd, select.EPOLLIN)
        while True:
            for fd, events in self.epoll.poll(1.0):
                if fd == self.stop_fd:
                    return
                if fd == self.listener.fileno():
                    self._accept()
                    continue
                conn = self.connections[fd]
                alive = True
                if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    alive = conn.on_readable()
                if alive and events & select.EPOLLOUT:
                    alive = conn.on_writable()
                if alive:
                    self.epoll.modify(fd, conn.epoll_events())
                else:
                    del self.connections[fd]  # closing the socket removed it from epoll
                    self.finished += 1

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn = VfioUserServerConnection(sock, self.device)
            self.connections[conn.fileno()] = conn
            self.epoll.register(conn.fileno(), conn.epoll_events())

    def wait_idle(self, finished: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.finished < finished or self.connections:
            if time.monotonic() > deadline:
                raise AssertionError(f"server still has {len(self.connections)} connections")
            time.sleep(0.001)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(10)
        sock.connect(self.address)
        return sock

    def stop(self) -> None:
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join(10)
        for conn in list(self.connections.values()):
            conn.close()
        self.epoll.close()
        self.listener.close()
        os.close(self.stop_fd)


@pytest.fixture
def server() -> Iterator[ServerThread]:
    device = FakeDevice()
    thread = ServerThread(device)
    try:
        yield thread
    finally:
        thread.stop()
        device.close()


def dma_memfd(size: int) -> int:
    fd = os.memfd_create("h1-dma", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    return fd


def test_full_session(server: ServerThread) -> None:
    device = server.device
    client = VfioUserClient(server.connect())
    memfd = dma_memfd(16 * PAGE)
    eventfds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(VECTORS)]
    try:
        assert client.version == (0, 2)
        assert client.server_capabilities.max_msg_fds == 8
        info = client.get_device_info()
        assert info.flags & wire.DEVICE_FLAG_PCI and info.num_regions == 9 and info.num_irqs == 5

        region, fd = client.get_region_info(0)
        assert fd is not None and region.size == BAR_SIZE and tuple(region.sparse_areas) == ((0, PAGE),)
        os.close(fd)
        assert client.get_region_info(1) == (RegionInfo(0, 0, None, 0, ()), None)

        registers = client.map_region(0)
        assert len(registers) == PAGE
        struct.pack_into("<I", registers, 0x40, 0xC0FFEE)
        assert struct.unpack_from("<I", device.bar, 0x40)[0] == 0xC0FFEE  # same pages
        assert client.region_read(0, 0x40, 4) == struct.pack("<I", 0xC0FFEE)

        client.region_write(0, PAGE + 8, b"\x05\x00\x00\x00", no_reply=True)
        assert device.doorbells.get(timeout=5) == (PAGE + 8, b"\x05\x00\x00\x00")
        client.region_write(0, PAGE + 12, b"\x06\x00\x00\x00")  # with a reply this time
        assert device.doorbells.get_nowait() == (PAGE + 12, b"\x06\x00\x00\x00")

        with mmap.mmap(memfd, 16 * PAGE) as driver_memory:
            driver_memory[PAGE : PAGE + 5] = b"hello"
            client.dma_map(0x100000, 16 * PAGE, memfd)
            memory, offset = device.dma_table.translate(0x100000 + PAGE, 5, write=False)
            assert bytes(memory[offset : offset + 5]) == b"hello"
            memory[offset : offset + 5] = b"HELLO"  # the device writes, the driver sees it
            assert driver_memory[PAGE : PAGE + 5] == b"HELLO"
            with pytest.raises(VfioError) as caught:
                client.dma_map(0x100000 + PAGE, PAGE, memfd)
            assert caught.value.errno == errno.EEXIST

        irq = client.get_irq_info(MSIX)
        assert irq.count == VECTORS and irq.flags & wire.IRQ_INFO_EVENTFD
        client.set_irq_eventfds(MSIX, 0, eventfds)
        device.trigger(2)
        assert select.select([eventfds[2]], [], [], 5)[0] == [eventfds[2]]
        assert os.eventfd_read(eventfds[2]) == 1

        client.reset()
        assert device.resets == 1
        client.disable_irqs(MSIX)
        assert device.irq_fds == {}
        client.dma_unmap(0x100000, 16 * PAGE)
        assert device.unmapped == [(0x100000, 16 * PAGE)]
        with pytest.raises(DmaFault):
            device.dma_table.translate(0x100000 + PAGE, 5, write=False)
        registers.close()
    finally:
        client.close()
        os.close(memfd)
        for fd in eventfds:
            os.close(fd)
    server.wait_idle(1)
    assert device.disconnects == 1


def test_disconnect_unmaps_and_drops_eventfds(server: ServerThread) -> None:
    device = server.device
    memfd = dma_memfd(PAGE)
    eventfd = os.eventfd(0, os.EFD_CLOEXEC)
    with VfioUserClient(server.connect()) as client:
        client.dma_map(0, PAGE, memfd)
        client.set_irq_eventfds(MSIX, 3, [eventfd])
    server.wait_idle(1)
    os.close(memfd)
    os.close(eventfd)
    assert len(device.dma_table) == 0 and device.irq_fds == {} and device.disconnects == 1


def test_large_region_transfer_in_blocks(server: ServerThread) -> None:
    with VfioUserClient(server.connect()) as client:
        client.region_write(0, 100, bytes(range(256)) * 20)
        assert client.region_read(0, 100, 5120) == bytes(range(256)) * 20


# Raw sessions: what a hostile or buggy client can send.


def send(sock: socket.socket, data: bytes, fds: list[int] | None = None) -> None:
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def receive(sock: socket.socket) -> Message | None:
    """The next reply, or None when the server closed the connection."""
    reader = MessageReader(2 << 20, wire.TYPE_REPLY)
    while (message := reader.next_message()) is None:
        data, fds, _, _ = socket.recv_fds(sock, 65536, 8)
        if not data:
            return None
        reader.feed(data, fds)
    wire.close_fds(message.fds)
    return message


def command(msg_id: int, cmd: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return wire.encode_message(msg_id, cmd, payload, flags)


VERSION = command(0, wire.CMD_VERSION, wire.encode_version(0, 2, {"capabilities": {"max_msg_fds": 8}}))


@dataclass
class Case:
    """One bad request; ``code`` None means the server must close the connection."""

    name: str
    data: bytes
    code: int | None
    fds: Callable[[], list[int]] = list
    negotiate: bool = True
    no_answer: bool = False


def _eventfds(count: int) -> Callable[[], list[int]]:
    return lambda: [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(count)]


def _sealed(size: int) -> Callable[[], list[int]]:
    def make() -> list[int]:
        fd = dma_memfd(size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return [fd]

    return make


def _dma_map(address: int, size: int, offset: int = 0, flags: int = 3) -> bytes:
    return command(1, wire.CMD_DMA_MAP, wire.encode_dma_map(flags, offset, address, size))


def _set_irqs(flags: int, index: int, start: int, count: int, data: bytes = b"") -> bytes:
    return command(1, wire.CMD_DEVICE_SET_IRQS, wire.encode_set_irqs(flags, index, start, count, data))


def _access(cmd: int, offset: int, region: int, count: int, data: bytes = b"", flags: int = 0) -> bytes:
    return command(1, cmd, wire.encode_region_access(offset, region, count, data), flags)


EVENTFD_TRIGGER = wire.IRQ_DATA_EVENTFD | wire.IRQ_ACTION_TRIGGER
U64 = 1 << 64

CASES = [
    Case("truncated-header", b"\x01\x00\x04\x00\x10", None),
    Case("msg-size-below-header", wire.HEADER.pack(1, 4, 8, 0, 0), None),
    Case("msg-size-oversize", wire.HEADER.pack(1, 10, 1 << 30, 0, 0), None),
    Case("reply-type-from-client", wire.HEADER.pack(1, 4, 16, wire.TYPE_REPLY, 0), None),
    Case("unknown-command", command(1, 99), errno.EINVAL),
    Case("dma-read-not-served", command(1, wire.CMD_DMA_READ, bytes(16)), errno.EINVAL),
    Case("fds-on-get-info", command(1, 4, wire.encode_device_info_request()), errno.EINVAL, _eventfds(2)),
    Case("too-many-fds", _set_irqs(EVENTFD_TRIGGER, MSIX, 0, 4), None, _eventfds(9)),
    Case("get-info-short", command(1, 4, b"\x10\x00"), errno.EINVAL),
    Case("get-info-argsz-small", command(1, 4, wire.encode_device_info_request(8)), errno.EINVAL),
    Case("dma-map-no-fd", _dma_map(0, PAGE), errno.EINVAL),
    Case("dma-map-two-fds", _dma_map(0, PAGE), errno.EINVAL, lambda: _sealed(PAGE)() + _sealed(PAGE)()),
    Case("dma-map-unaligned", _dma_map(100, PAGE), errno.EINVAL, _sealed(PAGE)),
    Case("dma-map-beyond-file", _dma_map(0, 2 * PAGE), errno.EINVAL, _sealed(PAGE)),
    Case("dma-map-overflow", _dma_map(U64 - PAGE, 2 * PAGE), errno.EINVAL, _sealed(2 * PAGE)),
    Case("dma-map-offset-overflow", _dma_map(0, 2 * PAGE, U64 - PAGE), errno.EINVAL, _sealed(2 * PAGE)),
    Case("dma-map-unknown-flags", _dma_map(0, PAGE, flags=0x13), errno.EINVAL, _sealed(PAGE)),
    Case("dma-map-unsealed", _dma_map(0, PAGE), errno.EPERM, lambda: [dma_memfd(PAGE)]),
    Case("dma-map-eventfd", _dma_map(0, PAGE), errno.EINVAL, _eventfds(1)),
    Case("dma-unmap-unknown", command(1, 3, wire.encode_dma_unmap(0, 0, PAGE)), errno.ENOENT),
    Case("set-irqs-beyond-vectors", _set_irqs(EVENTFD_TRIGGER, MSIX, 3, 2), errno.EINVAL, _eventfds(2)),
    Case("set-irqs-start-overflow", _set_irqs(EVENTFD_TRIGGER, MSIX, 0xFFFFFFFF, 2), errno.EINVAL),
    Case("set-irqs-bad-index", _set_irqs(EVENTFD_TRIGGER, 9, 0, 1), errno.EINVAL),
    Case("set-irqs-empty-index", _set_irqs(EVENTFD_TRIGGER, 0, 0, 1), errno.EINVAL),
    Case("set-irqs-count0-eventfd", _set_irqs(EVENTFD_TRIGGER, MSIX, 0, 0), errno.EINVAL),
    Case("set-irqs-count0-start1", _set_irqs(0x21, MSIX, 1, 0), errno.EINVAL),
    Case("set-irqs-two-data-bits", _set_irqs(0x25, MSIX, 0, 1), errno.EINVAL),
    Case("set-irqs-no-action", _set_irqs(wire.IRQ_DATA_EVENTFD, MSIX, 0, 1), errno.EINVAL),
    Case("set-irqs-fd-count", _set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1), errno.EINVAL, _eventfds(2)),
    Case("set-irqs-not-eventfd", _set_irqs(EVENTFD_TRIGGER, MSIX, 0, 1), errno.EINVAL, _sealed(PAGE)),
    Case("set-irqs-fds-with-none", _set_irqs(0x21, MSIX, 0, 1), errno.EINVAL, _eventfds(1)),
    Case("set-irqs-bool-length", _set_irqs(0x22, MSIX, 0, 2, b"\x01"), errno.EINVAL),
    Case("set-irqs-mask-unmaskable", _set_irqs(0x9, MSIX, 0, 1), errno.EINVAL),
    Case("read-beyond-region", _access(9, BAR_SIZE - 2, 0, 4), errno.EINVAL),
    Case("read-offset-overflow", _access(9, U64 - 1, 0, 2), errno.EINVAL),
    Case("read-bad-region", _access(9, 0, 9, 4), errno.EINVAL),
    Case("read-empty-region", _access(9, 0, 1, 4), errno.EINVAL),
    Case("read-too-large", _access(9, 0, 0, (1 << 20) + 1), errno.EINVAL),
    Case("write-count-mismatch", _access(10, 0, 0, 4, b"abc"), errno.EINVAL),
    Case("write-beyond-region", _access(10, BAR_SIZE - 1, 0, 2, b"ab"), errno.EINVAL),
    Case("write-no-reply-refused", _access(10, BAR_SIZE, 0, 1, b"a", wire.FLAG_NO_REPLY), None, no_answer=True),
    Case("reset-with-payload", command(1, 13, b"x"), errno.EINVAL),
    Case("version-twice", VERSION, errno.EINVAL),
    Case("command-before-version", command(1, 4, wire.encode_device_info_request()), None, negotiate=False),
    Case("version-garbage-json", command(0, 1, b"\x00\x00\x02\x00{garbage\x00"), None, negotiate=False),
    Case("version-no-nul", command(0, 1, b"\x00\x00\x02\x00{}"), None, negotiate=False),
    Case("version-major-1", command(0, 1, b"\x01\x00\x00\x00"), None, negotiate=False),
    Case("version-with-fd", command(0, 1, b"\x00\x00\x02\x00"), None, _eventfds(1), negotiate=False),
]


def run_case(server: ServerThread, case: Case) -> tuple[str, int | None]:
    """Play ``case`` on a fresh connection: ("error", errno), ("closed", None) or ("alive", None)."""
    fds = case.fds()
    sock = server.connect()
    try:
        if case.negotiate:
            send(sock, VERSION)
            version = receive(sock)
            assert version is not None and not version.header.is_error
        send(sock, case.data, fds)
        wire.close_fds(fds)
        fds = []
        if case.no_answer:
            # Nothing comes back for a NO_REPLY request, even a refused one; the next
            # request's reply is the first thing to arrive.
            send(sock, command(7, 4, wire.encode_device_info_request()))
            reply = receive(sock)
            assert reply is not None and reply.header.msg_id == 7 and not reply.header.is_error
            return "alive", None
        if case.name == "truncated-header":
            sock.shutdown(socket.SHUT_WR)
        reply = receive(sock)
        if reply is None:
            return "closed", None
        assert reply.header.is_error and reply.payload == b""
        # After a refused request the session must go on; after bad framing it must end.
        try:
            send(sock, command(8, 4, wire.encode_device_info_request()))
            after = receive(sock)
        except (BrokenPipeError, ConnectionResetError):
            after = None
        if after is None:
            return "closed", None
        assert after.header.msg_id == 8 and not after.header.is_error
        return "error", reply.header.error_no
    finally:
        wire.close_fds(fds)
        sock.close()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_request(server: ServerThread, case: Case) -> None:
    outcome = run_case(server, case)
    if case.no_answer:
        assert outcome == ("alive", None)
    elif case.code is None:
        assert outcome == ("closed", None)
    else:
        assert outcome == ("error", case.code)
    # The server still serves a well-behaved client afterwards.
    with VfioUserClient(server.connect()) as client:
        assert client.get_device_info().num_regions == 9


def test_open_fds_flat_over_1000_bad_sessions(server: ServerThread) -> None:
    for case in CASES:  # warm up: lazily opened files (hypothesis, /proc) settle first
        run_case(server, case)
    server.wait_idle(len(CASES))
    before = len(os.listdir("/proc/self/fd"))
    sessions = 1000
    for number in range(sessions):
        run_case(server, CASES[number % len(CASES)])
    server.wait_idle(len(CASES) + sessions)
    assert len(os.listdir("/proc/self/fd")) == before
    assert len(server.device.dma_table) == 0 and server.device.irq_fds == {}


def test_client_that_never_reads_is_dropped() -> None:
    device = FakeDevice()
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VfioUserServerConnection(server_end, device, max_data_xfer_size=64 * 1024)
    try:
        client_end.setblocking(False)
        client_end.sendall(VERSION)
        assert conn.on_readable()
        read = _access(9, 0, 0, 4096)
        alive = True
        for _ in range(10_000):
            try:
                client_end.send(read * 16)
            except BlockingIOError:
                pass
            alive = conn.on_readable()
            if not alive:
                break
        assert not alive and conn.closed and device.disconnects == 1
    finally:
        conn.close()
        client_end.close()
        device.close()


def test_output_waits_for_writability() -> None:
    device = FakeDevice()
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VfioUserServerConnection(server_end, device)
    try:
        client_end.sendall(VERSION + _access(9, 0, 0, BAR_SIZE) * 40)
        while not conn.wants_write:
            assert conn.on_readable()
        assert conn.epoll_events() & select.EPOLLOUT
        reader = MessageReader(1 << 20, wire.TYPE_REPLY)
        replies = 0
        client_end.settimeout(5)
        while replies < 41:
            reader.feed(client_end.recv(65536))
            replies += len(list(reader))
            assert conn.on_writable()
        assert not conn.wants_write
    finally:
        conn.close()
        client_end.close()
        device.close()


class ScriptedServer:
    """Answers each request with a reply built by ``answer`` (to test the client's checks)."""

    def __init__(self, answer: Callable[[Message], list[tuple[bytes, list[int]]]]) -> None:
        self.server_end, self.client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.answer = answer
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        reader = MessageReader(1 << 20)
        try:
            while True:
                data, fds, _, _ = socket.recv_fds(self.server_end, 65536, 8)
                if not data:
                    return
                reader.feed(data, fds)
                for message in reader:
                    wire.close_fds(message.fds)
                    for reply, reply_fds in self.answer(message):
                        send(self.server_end, reply, reply_fds)
        except OSError:
            return

    def close(self) -> None:
        self.server_end.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.server_end.close()


def _honest_version(message: Message) -> list[tuple[bytes, list[int]]]:
    payload = wire.encode_version(0, 2, wire.Capabilities(max_msg_fds=2).to_json())
    return [(wire.encode_reply(message.header, payload), [])]


@pytest.mark.parametrize(
    ("name", "reply"),
    [
        ("wrong-msg-id", lambda m: wire.encode_message(m.header.msg_id + 1, m.header.command, bytes(16), 1)),
        ("wrong-command", lambda m: wire.encode_message(m.header.msg_id, 7, bytes(16), 1)),
        ("short-payload", lambda m: wire.encode_reply(m.header, b"\x10")),
        ("huge-region-count", lambda m: wire.encode_reply(m.header, wire.DEVICE_INFO.pack(16, 2, 1 << 20, 5))),
        ("command-not-reply", lambda m: wire.encode_message(m.header.msg_id, 4, bytes(16), 0)),
    ],
)
def test_client_checks_replies(name: str, reply: Callable[[Message], bytes]) -> None:
    def answer(message: Message) -> list[tuple[bytes, list[int]]]:
        if message.header.command == wire.CMD_VERSION:
            return _honest_version(message)
        return [(reply(message), [])]

    scripted = ScriptedServer(answer)
    client = VfioUserClient(scripted.client_end, timeout=5)
    try:
        with pytest.raises(ProtocolError):
            client.get_device_info()
        with pytest.raises(ProtocolError):  # a broken session stays broken
            client.get_device_info()
    finally:
        client.close()
        scripted.close()


def test_client_error_reply_and_fd_blocks() -> None:
    seen_fd_counts: list[int] = []

    def answer(message: Message) -> list[tuple[bytes, list[int]]]:
        if message.header.command == wire.CMD_VERSION:
            return _honest_version(message)
        seen_fd_counts.append(len(message.fds))
        if message.header.command == wire.CMD_DEVICE_RESET:
            return [(wire.encode_error_reply(message.header, errno.EBUSY), [])]
        return [(wire.encode_reply(message.header), [])]

    scripted = ScriptedServer(answer)
    client = VfioUserClient(scripted.client_end, timeout=5)
    eventfds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(5)]
    try:
        with pytest.raises(VfioError) as caught:
            client.reset()
        assert caught.value.errno == errno.EBUSY
        client.set_irq_eventfds(MSIX, 0, eventfds)  # the server takes two fds per message
        assert seen_fd_counts == [0, 2, 2, 1]
    finally:
        client.close()
        scripted.close()
        wire.close_fds(eventfds)


def test_client_refuses_a_server_that_rejects_version() -> None:
    scripted = ScriptedServer(lambda m: [(wire.encode_error_reply(m.header, errno.ENOTSUP), [])])
    try:
        with pytest.raises(VfioError):
            VfioUserClient(scripted.client_end, timeout=5)
    finally:
        scripted.close()


# Property tests: whatever arrives, the server answers or closes, and keeps no fd.


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600))
def test_connection_survives_random_bytes(noise: bytes) -> None:
    device = FakeDevice()
    server_end, client_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    conn = VfioUserServerConnection(server_end, device)
    try:
        client_end.sendall(VERSION + noise)
        client_end.shutdown(socket.SHUT_WR)
        for _ in range(100):
            if not conn.on_readable():
                break
        assert conn.closed  # the client half-closed: the server finishes either way
    finally:
        conn.close()
        client_end.close()
        device.close()


COMMANDS = st.sampled_from(sorted(wire.COMMAND_NAMES) + [0, 14, 200])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(COMMANDS, st.binary(max_size=64), st.integers(0, 3)), max_size=6))
def test_session_random_requests_raise_only_our_errors(requests: list[tuple[int, bytes, int]]) -> None:
    device = FakeDevice()
    session = ServerSession(device)
    version = wire.decode_version(VERSION[16:])
    handed: list[int] = []
    try:
        session.handle(Message(wire.Header(0, 1, len(VERSION), 0, 0), VERSION[16:]))
        assert session.client_capabilities == version.capabilities
        for cmd, payload, fd_count in requests:
            fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(fd_count))
            handed += fds
            try:
                session.handle(Message(wire.Header(1, cmd, 16 + len(payload), 0, 0), payload, fds))
            except (VfioError, ProtocolError):
                pass
    finally:
        device.close()
    # Every fd was closed by the session or taken (and closed) by the device.
    still_open = []
    for fd in handed:
        try:
            os.fstat(fd)
            still_open.append(fd)
        except OSError:
            pass
    assert still_open == []
